"""Sparse top-k teacher term for language-model distillation (DistillKit's `sparse_kl_div`).

Every logit term of `jaxkd.distill.logit` already works per token: with logits ``[B, S, V]``
and a ``[B, S]`` mask, ``kd`` is the masked per-token mean of `jaxkd.losses.sequence`
(``sequence_loss(kd, student_logits, teacher_logits, mask)``). This module adds the one term
whose teacher is not a dense distribution: ``sparse_topk_kd``, forward KL from the teacher's
top-k log-probabilities to the dense student (`jaxkd.losses.sequence.sparse_topk_kd`), as KL
(``form='kl'``) or as NLL (``form='cross_entropy'``, −Σ p log q, pre-training distillation's).

Its teacher is the batch's cached top-k pair (`jaxkd.teachers.cache`, kind ``'topk'``) when the
batch carries one: the stored log-probabilities are of the full vocabulary, so the
``'residual'`` mode knows the missing mass. With a live teacher, the teacher is truncated inside
the step: top-``top_p`` nucleus, then top-``k`` (`jaxkd.losses.truncate_teacher`; all classes
when ``k`` exceeds the vocabulary). ``teacher_temperature`` is the temperature the
log-probabilities were taken at (1 for a live teacher, whose logits the term reads untempered);
``temper_student=False`` tempers the teacher alone (Peng et al. 2024).

``chunked_lm`` is the whole language-model loss, ``(1 − α)·CE + α·KD`` (α its hparam, or the
method's alpha schedule), computed from the models' final hidden states and unembeddings one
chunk of tokens at a time (`jaxkd.losses.chunked_lm_loss`): ``[B, S, V]`` logits are never
built, in the forward nor in the backward pass. The teacher is a live model's hidden states
(divergence ``kd``, ``reverse_kl`` or ``jsd`` at ``temperature``, no T²) or a cached top-k
teacher (``sparse_topk_kd`` with ``form`` and ``missing``). It logs ``chunked_lm/ce`` and
``chunked_lm/kd``.
"""

from jaxkd.distill import LossDef, LossInputs, defaults_of, register
from jaxkd.losses import chunked, logit, sequence


def _sparse_topk_kd(inputs: LossInputs):
  teacher = inputs.teacher_topk
  if teacher is None:
    vocab_size = inputs.teacher_logits.shape[-1]
    teacher = sequence.truncate_teacher(
      inputs.teacher_logits,
      top_p=inputs.options["top_p"],
      top_k=min(inputs.options["k"], vocab_size),
    )
  values = sequence.sparse_topk_kd(
    inputs.student_logits,
    teacher,
    form=inputs.options["form"],
    missing=inputs.options["missing"],
    temperature=inputs.hparams["temperature"],
    teacher_temperature=inputs.hparams["teacher_temperature"],
    # Pre-training distillation tempers the teacher alone (Peng et al. 2024).
    student_temperature=None if inputs.options["temper_student"] else 1.0,
    scale_by_temperature_squared=inputs.options["scale_by_temperature_squared"],
    eps=inputs.options["eps"],
    reduction="none",
  )
  return inputs.mean(values)


_OPTIONS = ("form", "missing", "scale_by_temperature_squared", "eps")
register(
  LossDef(
    name="sparse_topk_kd",
    compute=_sparse_topk_kd,
    hparams={
      key: float(value)
      for key, value in defaults_of(
        sequence.sparse_topk_kd, ("temperature", "teacher_temperature")
      ).items()
    },
    # A live teacher is truncated here (top-p, then top-k); a cached one was when it was stored.
    options={
      "k": 64,
      "top_p": 1.0,
      "temper_student": True,
      **defaults_of(sequence.sparse_topk_kd, _OPTIONS),
    },
    ranges={"temperature": "positive", "teacher_temperature": "positive"},
    choices={"form": ("kl", "cross_entropy"), "missing": ("renormalize", "residual")},
  )
)


# Divergences a chunked KD term may use with a hidden-state teacher (a sparse teacher from a
# top-k cache uses `sparse_topk_kd`, with the options above).
_CHUNKED_DIVERGENCES = {"kd": logit.kd, "reverse_kl": logit.reverse_kl, "jsd": logit.jsd}


def _chunked_lm(inputs: LossInputs):
  """`(1 − α)·CE + α·KD` from the models' hidden states, chunk by chunk (`chunked_lm_loss`)."""
  alpha = inputs.alpha if inputs.alpha is not None else inputs.hparams["alpha"]
  options = inputs.options
  if inputs.teacher_topk is not None:
    teacher, kwargs = (
      inputs.teacher_topk,
      dict(
        divergence=sequence.sparse_topk_kd,
        form=options["form"],
        missing=options["missing"],
        teacher_temperature=inputs.hparams["teacher_temperature"],
        scale_by_temperature_squared=False,
      ),
    )
  else:
    teacher, kwargs = (
      inputs.teacher_logits,
      dict(
        divergence=_CHUNKED_DIVERGENCES[options["divergence"]], scale_by_temperature_squared=False
      ),
    )
  total, parts = chunked.chunked_lm_loss(
    inputs.student_logits,
    inputs.mask,
    targets=inputs.labels,
    teacher=teacher,
    ce_weight=1.0 - alpha,
    kd_weight=alpha,
    chunk_size=options["chunk_size"],
    temperature=inputs.hparams["temperature"],
    **kwargs,
  )
  inputs.log.update(parts)
  return total


register(
  LossDef(
    name="chunked_lm",
    compute=_chunked_lm,
    hparams={"alpha": 0.5, "temperature": 1.0, "teacher_temperature": 1.0},
    options={"divergence": "kd", "chunk_size": 256, "form": "kl", "missing": "renormalize"},
    ranges={
      "alpha": "unit_interval",
      "temperature": "positive",
      "teacher_temperature": "positive",
    },
    choices={
      "divergence": tuple(_CHUNKED_DIVERGENCES),
      "form": ("kl", "cross_entropy"),
      "missing": ("renormalize", "residual"),
    },
    lm_head=True,
    reads_labels=True,
  )
)
