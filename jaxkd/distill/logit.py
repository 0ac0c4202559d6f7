"""Logit-based terms: cross-entropy with the labels and the logit distillation losses.

Each term is a thin binding of a `jaxkd.losses.logit` function to the registry: which settings
are traced (floats) and which are static, and the per-example mean over real examples.
"""
import jax.numpy as jnp
import optax

from jaxkd.distill import LossDef, LossInputs, masked_mean, register
from jaxkd.losses import logit


def _cross_entropy(inputs: LossInputs):
  """Label cross-entropy, optionally label-smoothed: ``-Σ_c y_c log q_c``."""
  num_classes = inputs.student_logits.shape[-1]
  smoothing = inputs.hparams['label_smoothing']
  targets = optax.smooth_labels(
      jnp.eye(num_classes, dtype=jnp.float32)[inputs.labels], smoothing)
  per_example = optax.softmax_cross_entropy(inputs.student_logits, targets)
  return masked_mean(per_example, inputs.mask)


register(LossDef(name='ce', compute=_cross_entropy, hparams={'label_smoothing': 0.0},
                 needs_teacher=False))


def _kd(inputs: LossInputs):
  """Hinton KD, ``T² KL(p_T ‖ q_T)`` per example (RepDistiller ``DistillKL``)."""
  per_example = logit.kd(inputs.student_logits, inputs.teacher_logits,
                         temperature=inputs.hparams['temperature'], reduction='none')
  return masked_mean(per_example, inputs.mask)


register(LossDef(name='kd', compute=_kd, hparams={'temperature': 4.0}))
