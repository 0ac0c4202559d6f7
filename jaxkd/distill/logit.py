"""Logit terms: cross-entropy with the labels and every logit loss of `jaxkd.losses.logit`.

Each term binds a loss function to the registry: which settings are traced floats
(``hparams``) and which are static (``options``). Per-example losses are averaged over the real
examples (tokens) of the batch (`LossInputs.mean`); batch-level losses (DIST) see the whole batch.

Every teacher term takes the static option ``standardize`` (default False): z-score both logit
vectors first (`jaxkd.losses.logit.standardize`, Sun et al. 2024). KD+LS is
``losses={'ce': 0.1, 'kd': 9.0}, kd={'temperature': 2.0, 'standardize': True}``; DKD+LS is
``dkd={'standardize': True, ...}``.
"""

from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import optax

from jaxkd.distill import LossDef, LossInputs, defaults_of, register
from jaxkd.losses import logit


def _cross_entropy(inputs: LossInputs):
  """Label cross-entropy, optionally label-smoothed: ``-Σ_c y_c log q_c``."""
  num_classes = inputs.student_logits.shape[-1]
  targets = optax.smooth_labels(
    jnp.eye(num_classes, dtype=jnp.float32)[inputs.labels], inputs.hparams["label_smoothing"]
  )
  return inputs.mean(optax.softmax_cross_entropy(inputs.student_logits, targets))


register(
  LossDef(
    name="ce",
    compute=_cross_entropy,
    hparams={"label_smoothing": 0.0},
    ranges={"label_smoothing": "unit_interval"},
    needs_teacher=False,
    reads_labels=True,
  )
)


def _logit_pair(inputs: LossInputs):
  """(student, teacher) logits, z-scored when the term's ``standardize`` option is on."""
  if inputs.options["standardize"]:
    return logit.standardize(inputs.student_logits), logit.standardize(inputs.teacher_logits)
  return inputs.student_logits, inputs.teacher_logits


def _register_divergence(
  name: str,
  loss_fn: Callable,
  hparams: Mapping[str, str],
  fn_options: Sequence[str] = (),
  choices: Mapping[str, tuple] | None = None,
  term_options: Mapping[str, object] | None = None,
  with_labels: bool = False,
  per_example: bool = True,
  scale: Callable[[int], float] | None = None,
):
  """Registers ``loss_fn(student_logits, teacher_logits, [labels,] **hparams, **fn_options)``.

  Defaults of hparams and options are `loss_fn`'s own (its reference implementation's).

  Args:
    hparams: traced keyword arguments of `loss_fn` → the range their values need
      (`jaxkd.distill.RANGES`).
    fn_options: static keyword arguments of `loss_fn` a config may set.
    choices: the values an option may take.
    term_options: defaults of the term's generic options (``warmup_epochs``).
    per_example: the loss takes ``reduction='none'``; the term is then the mean over the
      scored examples (tokens). Otherwise it is a batch-level scalar.
    scale: multiplier as a function of the class count, for losses whose reference reduction
      also averages over classes (``'mean'``), here recovered from the per-example sums.
  """
  fn_options = defaults_of(loss_fn, fn_options)

  def compute(inputs: LossInputs):
    student_logits, teacher_logits = _logit_pair(inputs)
    labels = (inputs.labels,) if with_labels else ()
    kwargs = {**inputs.hparams, **{k: inputs.options[k] for k in fn_options}}
    if not per_example:
      return loss_fn(student_logits, teacher_logits, *labels, **kwargs)
    values = loss_fn(student_logits, teacher_logits, *labels, **kwargs, reduction="none")
    factor = scale(student_logits.shape[-1]) if scale else 1.0
    return inputs.mean(values) * factor

  compute.__doc__ = f"The `{name}` term: `jaxkd.losses.logit.{loss_fn.__name__}`."
  return register(
    LossDef(
      name=name,
      compute=compute,
      hparams={key: float(value) for key, value in defaults_of(loss_fn, hparams).items()},
      ranges=dict(hparams),
      options={"standardize": False, **fn_options, **(term_options or {})},
      choices=choices or {},
      reads_labels=with_labels,
    )
  )


_TEMPERATURE = {"temperature": "positive"}
_T2 = ("scale_by_temperature_squared",)

_register_divergence("kd", logit.kd, _TEMPERATURE, fn_options=_T2)
# −Σ p log q: KD without T² plus the teacher entropy (DistiLLM's `forward_kl` value).
_register_divergence("soft_cross_entropy", logit.soft_cross_entropy, _TEMPERATURE, fn_options=_T2)
_register_divergence("reverse_kl", logit.reverse_kl, _TEMPERATURE, fn_options=_T2)
_register_divergence("jsd", logit.jsd, {"beta": "unit_interval", **_TEMPERATURE})
_register_divergence(
  "skew_kl",
  logit.skew_kl,
  {"alpha": "unit_interval", **_TEMPERATURE},
  fn_options=("form",),
  choices={"form": ("cross_entropy", "kl")},
)
_register_divergence(
  "skew_reverse_kl", logit.skew_reverse_kl, {"alpha": "unit_interval", **_TEMPERATURE}
)
_register_divergence("tvd", logit.tvd, _TEMPERATURE)
_register_divergence("akl", logit.akl, {"head_threshold": "unit_interval", **_TEMPERATURE})
_register_divergence(
  "correlation_kd",
  logit.correlation_kd,
  {
    "pearson_weight": "non_negative",
    "spearman_weight": "non_negative",
    "regularization_strength": "positive",
    **_TEMPERATURE,
  },
  fn_options=_T2,
)
# nn.MSELoss over batch and classes: the per-example class sums divided by C.
_register_divergence(
  "mse_logits", logit.mse_logits, {}, scale=lambda num_classes: 1.0 / num_classes
)
# DIST correlates each class over the batch: one scalar for the whole batch.
_register_divergence(
  "dist",
  logit.dist,
  {"beta": "non_negative", "gamma": "non_negative", **_TEMPERATURE},
  fn_options=_T2,
  per_example=False,
)
# mdistiller's DKD: CE 1, α 1, β 8, T 4, the DKD term warmed up linearly over 20 epochs.
_register_divergence(
  "dkd",
  logit.dkd,
  {"alpha": "non_negative", "beta": "non_negative", **_TEMPERATURE},
  term_options={"warmup_epochs": 20},
  with_labels=True,
)
