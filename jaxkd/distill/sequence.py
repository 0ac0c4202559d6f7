"""Sparse top-k teacher term for language-model distillation (DistillKit's `sparse_kl_div`).

Every logit term of `jaxkd.distill.logit` already works per token: with logits ``[B, S, V]``
and a ``[B, S]`` mask, ``kd`` is the masked per-token mean of `jaxkd.losses.sequence`
(``sequence_loss(kd, student_logits, teacher_logits, mask)``). This module adds the one term
whose teacher is not a dense distribution: ``sparse_topk_kd``, forward KL from the teacher's
top-k log-probabilities to the dense student (`jaxkd.losses.sequence.sparse_topk_kd`).

Its teacher is the batch's cached top-k pair (`jaxkd.teachers.cache`, kind ``'topk'``) when the
batch carries one: the stored log-probabilities are of the full vocabulary, so the
``'residual'`` mode knows the missing mass. With a live teacher, its top-``k`` (option) is taken
inside the step (all classes when ``k`` exceeds the vocabulary). ``teacher_temperature`` is the
temperature the log-probabilities were taken at (1 for a live teacher, whose logits the term
reads untempered).
"""

from jaxkd.distill import LossDef, LossInputs, register
from jaxkd.losses import sequence


def _sparse_topk_kd(inputs: LossInputs):
  teacher = inputs.teacher_topk
  if teacher is None:
    k = min(inputs.options["k"], inputs.teacher_logits.shape[-1])
    teacher = sequence.sparse_teacher_from_logits(inputs.teacher_logits, k)
  values = sequence.sparse_topk_kd(
    inputs.student_logits,
    teacher,
    missing=inputs.options["missing"],
    temperature=inputs.hparams["temperature"],
    teacher_temperature=inputs.hparams["teacher_temperature"],
    scale_by_temperature_squared=inputs.options["scale_by_temperature_squared"],
    eps=inputs.options["eps"],
    reduction="none",
  )
  return inputs.mean(values)


register(
  LossDef(
    name="sparse_topk_kd",
    compute=_sparse_topk_kd,
    hparams={"temperature": 1.0, "teacher_temperature": 1.0},
    options={"k": 64, "missing": "renormalize", "scale_by_temperature_squared": True, "eps": 1e-6},
    ranges={"temperature": "positive", "teacher_temperature": "positive"},
    choices={"missing": ("renormalize", "residual")},
  )
)
