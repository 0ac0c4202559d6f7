"""Logit terms: cross-entropy with the labels and every logit loss of `jaxkd.losses.logit`.

Each term binds a loss function to the registry: which settings are traced floats
(``hparams``) and which are static (``options``). Per-example losses are averaged over the real
examples of the batch (`masked_mean`); batch-level losses (DIST) see the whole batch.

Every teacher term takes the static option ``standardize`` (default False): z-score both logit
vectors first (`jaxkd.losses.logit.standardize`, Sun et al. 2024). KD+LS is
``losses={'ce': 0.1, 'kd': 9.0}, kd={'temperature': 2.0, 'standardize': True}``; DKD+LS is
``dkd={'standardize': True, ...}``.
"""

from collections.abc import Callable, Mapping

import jax.numpy as jnp
import optax

from jaxkd.distill import LossDef, LossInputs, masked_mean, register
from jaxkd.losses import logit


def _cross_entropy(inputs: LossInputs):
  """Label cross-entropy, optionally label-smoothed: ``-Σ_c y_c log q_c``."""
  num_classes = inputs.student_logits.shape[-1]
  targets = optax.smooth_labels(
    jnp.eye(num_classes, dtype=jnp.float32)[inputs.labels], inputs.hparams["label_smoothing"]
  )
  per_example = optax.softmax_cross_entropy(inputs.student_logits, targets)
  return masked_mean(per_example, inputs.mask)


register(
  LossDef(name="ce", compute=_cross_entropy, hparams={"label_smoothing": 0.0}, needs_teacher=False)
)


def _logit_pair(inputs: LossInputs):
  """(student, teacher) logits, z-scored when the term's ``standardize`` option is on."""
  if inputs.options["standardize"]:
    return logit.standardize(inputs.student_logits), logit.standardize(inputs.teacher_logits)
  return inputs.student_logits, inputs.teacher_logits


def _register_divergence(
  name: str,
  loss_fn: Callable,
  hparams: Mapping[str, float],
  fn_options: Mapping[str, object] | None = None,
  term_options: Mapping[str, object] | None = None,
  with_labels: bool = False,
  per_example: bool = True,
  scale: Callable[[int], float] | None = None,
):
  """Registers ``loss_fn(student_logits, teacher_logits, [labels,] **hparams, **fn_options)``.

  Args:
    fn_options: static keyword arguments of `loss_fn` a config may set, with defaults.
    term_options: defaults of the term's generic options (``warmup_epochs``).
    per_example: the loss takes ``reduction='none'``; the term is then the masked mean over
      examples. Otherwise it is a batch-level scalar.
    scale: multiplier as a function of the class count, for losses whose reference reduction
      also averages over classes (``'mean'``), here recovered from the per-example sums.
  """
  fn_options = dict(fn_options or {})

  def compute(inputs: LossInputs):
    student_logits, teacher_logits = _logit_pair(inputs)
    labels = (inputs.labels,) if with_labels else ()
    kwargs = {**inputs.hparams, **{k: inputs.options[k] for k in fn_options}}
    if not per_example:
      return loss_fn(student_logits, teacher_logits, *labels, **kwargs)
    values = loss_fn(student_logits, teacher_logits, *labels, **kwargs, reduction="none")
    factor = scale(student_logits.shape[-1]) if scale else 1.0
    return masked_mean(values, inputs.mask) * factor

  compute.__doc__ = f"The `{name}` term: `jaxkd.losses.logit.{loss_fn.__name__}`."
  return register(
    LossDef(
      name=name,
      compute=compute,
      hparams=hparams,
      options={"standardize": False, **fn_options, **(term_options or {})},
    )
  )


# Defaults are each loss function's own (its reference implementation's).
_register_divergence("kd", logit.kd, {"temperature": 4.0})
# −Σ p log q: KD without T² plus the teacher entropy (DistiLLM's `forward_kl` value).
_register_divergence(
  "soft_cross_entropy",
  logit.soft_cross_entropy,
  {"temperature": 1.0},
  fn_options={"scale_by_temperature_squared": False},
)
_register_divergence("reverse_kl", logit.reverse_kl, {"temperature": 1.0})
_register_divergence("jsd", logit.jsd, {"beta": 0.5, "temperature": 1.0})
_register_divergence(
  "skew_kl", logit.skew_kl, {"alpha": 0.1, "temperature": 1.0}, fn_options={"form": "cross_entropy"}
)
_register_divergence("skew_reverse_kl", logit.skew_reverse_kl, {"alpha": 0.1, "temperature": 1.0})
_register_divergence("tvd", logit.tvd, {"temperature": 1.0})
_register_divergence("akl", logit.akl, {"head_threshold": 0.5, "temperature": 1.0})
_register_divergence(
  "correlation_kd",
  logit.correlation_kd,
  {
    "pearson_weight": 1.0,
    "spearman_weight": 1.0,
    "temperature": 1.0,
    "regularization_strength": 1.0,
  },
)
# nn.MSELoss over batch and classes: the per-example class sums divided by C.
_register_divergence(
  "mse_logits", logit.mse_logits, {}, scale=lambda num_classes: 1.0 / num_classes
)
# DIST correlates each class over the batch: one scalar for the whole batch.
_register_divergence(
  "dist", logit.dist, {"beta": 1.0, "gamma": 1.0, "temperature": 1.0}, per_example=False
)
# mdistiller's DKD: CE 1, α 1, β 8, T 4, the DKD term warmed up linearly over 20 epochs.
_register_divergence(
  "dkd",
  logit.dkd,
  {"alpha": 1.0, "beta": 8.0, "temperature": 4.0},
  term_options={"warmup_epochs": 20},
  with_labels=True,
)
