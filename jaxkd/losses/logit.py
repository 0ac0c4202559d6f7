"""Logit-based knowledge-distillation losses.

Notation: ``p = softmax(teacher_logits / T)`` (teacher), ``q = softmax(student_logits / T)``
(student), both over the class axis ``axis`` (last by default; any leading dimensions, so
the same functions serve ``[B, C]`` image logits and ``[B, S, V]`` token logits).

Shared conventions, stated once:

* Inputs of any float dtype are cast to float32 before any arithmetic; every loss returns
  float32.
* ``where``: optional boolean mask broadcastable to the logits (an optax-style ``where``; a
  mask without the class axis, e.g. ``[B, S]`` token validity, is expanded along ``axis``).
  Excluded classes are removed from both softmaxes; positions with no included class
  contribute zero and leave the 'batchmean' / 'mean' denominators.
* A logit of ``-inf`` (vocabulary padding, a hard mask) is a class of probability zero.
  Terms ``0 * log 0`` are zero. In a KL term ``p log(p/q)`` with ``q = 0 < p`` the
  divergence is infinite; such classes are dropped, as DistiLLM's ``inf_mask`` does, so
  values and gradients stay finite. All guards use the "double where" so that masked entries
  give zero gradients rather than ``0 * inf = nan``.
* ``reduction`` (see :mod:`jaxkd.losses.reduction`): 'batchmean' = sum over classes, mean over
  positions; 'mean' = mean over all elements; 'sum'; 'none' = per-position values.
  Each loss defaults to what its reference implementation does.
* Teacher gradients are not stopped: wrap ``teacher_logits`` in ``jax.lax.stop_gradient`` (or
  compute them outside ``jax.grad``) as the training step does.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from jaxkd.losses.reduction import NON_NEGATIVE
from jaxkd.losses.reduction import NON_NEGATIVE_INTEGER
from jaxkd.losses.reduction import NON_NEGATIVE_OR_INF
from jaxkd.losses.reduction import POSITIVE
from jaxkd.losses.reduction import UNIT_INTERVAL
from jaxkd.losses.reduction import Reduction
from jaxkd.losses.reduction import check_arguments
from jaxkd.losses.reduction import expand_class_mask
from jaxkd.losses.reduction import position_mask_and_class_counts
from jaxkd.losses.reduction import reduce_loss

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


# ----------------------------------------------------------------------------------------
# Shared pieces: masked float32 log-softmax, guarded KL / cross-entropy, log-space mixture.
# ----------------------------------------------------------------------------------------


def _log_softmax(
  logits: ArrayLike,
  temperature: ArrayLike,
  axis: int,
  where: ArrayLike | None,
) -> Array:
  """float32 ``log_softmax(logits / temperature)``; excluded and ``-inf`` classes get ``-inf``."""
  scaled = jnp.asarray(logits, jnp.float32) / temperature
  included = scaled > -jnp.inf
  if where is not None:
    included = included & expand_class_mask(where, scaled.ndim, axis)
  # A position with no included class would normalise over nothing (0/0): normalise it
  # over all (zeroed) classes instead and mask the result, keeping values and grads finite.
  any_included = jnp.any(included, axis=axis, keepdims=True)
  log_probs = jax.nn.log_softmax(
    jnp.where(included, scaled, 0.0), axis=axis, where=included | ~any_included
  )
  return jnp.where(included, log_probs, -jnp.inf)


def _kl(log_p: Array, log_q: Array, axis: int) -> Array:
  """``KL(p || q) = sum p (log p - log q)`` over ``axis`` from log-probabilities.

  Classes with ``p = 0`` contribute nothing (exact); classes with ``q = 0 < p`` would make
  the divergence infinite and are dropped (DistiLLM's ``inf_mask`` convention).
  """
  kept = (log_p > -jnp.inf) & (log_q > -jnp.inf)
  return optax.losses.kl_divergence_with_log_targets(
    jnp.where(kept, log_q, 0.0), jnp.where(kept, log_p, 0.0), axis=axis, where=kept
  )


def _cross_entropy(log_p: Array, log_q: Array, axis: int) -> Array:
  """``H(p, q) = -sum p log q`` over ``axis``, with the same guards as :func:`_kl`."""
  kept = (log_p > -jnp.inf) & (log_q > -jnp.inf)
  probs = jnp.exp(jnp.where(kept, log_p, 0.0))
  return -jnp.sum(probs * jnp.where(kept, log_q, 0.0), axis=axis, where=kept)


def _log_mixture(log_p: Array, log_q: Array, weight_p: ArrayLike) -> Array:
  """``log(w p + (1 - w) q)`` elementwise, in log space (logsumexp of the weighted terms)."""
  weight_p = jnp.asarray(weight_p, jnp.float32)
  weighted_p = log_p + jnp.log(weight_p)
  weighted_q = log_q + jnp.log1p(-weight_p)
  # Both terms are -inf where p = q = 0, and also where one is zero and the other has weight 0
  # (w = 0 or 1, the forward / reverse KL endpoints). logaddexp(-inf, -inf) has a NaN gradient
  # even when masked afterwards: feed it zeros there.
  both_zero = (weighted_p == -jnp.inf) & (weighted_q == -jnp.inf)
  mixture = jnp.logaddexp(
    jnp.where(both_zero, 0.0, weighted_p), jnp.where(both_zero, 0.0, weighted_q)
  )
  return jnp.where(both_zero, -jnp.inf, mixture)


def _reduce(
  per_example: Array,
  reduction: Reduction,
  where: ArrayLike | None,
  logits_shape: tuple[int, ...],
  axis: int,
  *,
  per_class_sum: bool = True,
) -> Array:
  """Applies :func:`reduce_loss` with the positions and class counts implied by ``where``."""
  positions, class_counts = position_mask_and_class_counts(where, logits_shape, axis)
  return reduce_loss(
    per_example,
    reduction,
    positions=positions,
    class_counts=class_counts if per_class_sum else None,
  )


def _temperature_factor(temperature: ArrayLike, scale_by_temperature_squared: bool) -> Array:
  return jnp.square(jnp.asarray(temperature, jnp.float32)) if scale_by_temperature_squared else 1.0


def _is_concrete_scalar(value) -> bool:
  return isinstance(value, (int, float))


# ----------------------------------------------------------------------------------------
# Divergences between teacher and student distributions.
# ----------------------------------------------------------------------------------------


def _tempered_divergence(
  name,
  divergence,
  student_logits,
  teacher_logits,
  temperature,
  scale_by_temperature_squared,
  axis,
  where,
  reduction,
):
  """`divergence(log_q, log_p)` of the tempered distributions, × T² if asked, reduced.

  The shared body of kd, reverse_kl and soft_cross_entropy, which differ only in the divergence.
  """
  check_arguments(name, temperature=(temperature, POSITIVE))
  log_q = _log_softmax(student_logits, temperature, axis, where)
  log_p = _log_softmax(teacher_logits, temperature, axis, where)
  per_example = divergence(log_q, log_p) * _temperature_factor(
    temperature, scale_by_temperature_squared
  )
  return _reduce(per_example, reduction, where, log_q.shape, axis)


def kd(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  temperature: ArrayLike = 4.0,
  scale_by_temperature_squared: bool = True,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""Hinton knowledge distillation: :math:`T^2 \, KL(p \| q)` with tempered softmaxes.

  .. math::
    \ell = T^2 \sum_c p_c (\log p_c - \log q_c), \quad
    p = \mathrm{softmax}(z_t / T), \; q = \mathrm{softmax}(z_s / T)

  Paper: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015,
  arXiv:1503.02531. Reproduces RepDistiller ``distiller_zoo/KD.py`` ``DistillKL`` (sum / B,
  times T²) and mdistiller ``mdistiller/distillers/KD.py`` ``kd_loss`` (``.sum(1).mean()``
  times T²); both are 'batchmean'. Defaults follow the CIFAR recipe (T = 4). For an LLM,
  DistillKit's dense KD is the same formula, per-token mean.

  Args:
    student_logits: ``[..., C]`` float array (any float dtype).
    teacher_logits: ``[..., C]`` float array.
    temperature: softmax temperature T (a scalar; may be traced).
    scale_by_temperature_squared: multiply by T² (keeps gradient scale independent of T).
    axis: class axis.
    where: optional mask of included classes / positions (module docstring).
    reduction: 'batchmean' (default), 'mean', 'sum' or 'none'.

  Returns:
    float32 scalar, or ``[...]`` per-position values for ``reduction='none'``.
  """
  return _tempered_divergence(
    "kd",
    lambda log_q, log_p: _kl(log_p, log_q, axis),
    student_logits,
    teacher_logits,
    temperature,
    scale_by_temperature_squared,
    axis,
    where,
    reduction,
  )


def reverse_kl(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  temperature: ArrayLike = 1.0,
  scale_by_temperature_squared: bool = False,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""Reverse KL, :math:`KL(q \| p) = \sum_c q_c (\log q_c - \log p_c)` (mode seeking).

  Paper: Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language Models",
  2023, arXiv:2306.08543 (the exact token-level form). Reproduces DistiLLM
  ``distillm/losses.py`` ``reverse_kl`` (per-token mean = 'batchmean', no temperature) and
  TRL ``generalized_jsd_loss`` at ``beta=1``. Computed in log space with
  ``optax.losses.kl_divergence_with_log_targets``.

  Args:
    student_logits: ``[..., C]`` float array.
    teacher_logits: ``[..., C]`` float array.
    temperature: softmax temperature (default 1, as the references).
    scale_by_temperature_squared: multiply by T² (default off, as the references).
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'batchmean' (default), 'mean', 'sum' or 'none'.

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  return _tempered_divergence(
    "reverse_kl",
    lambda log_q, log_p: _kl(log_q, log_p, axis),
    student_logits,
    teacher_logits,
    temperature,
    scale_by_temperature_squared,
    axis,
    where,
    reduction,
  )


def jsd(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  beta: ArrayLike = 0.5,
  temperature: ArrayLike = 1.0,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""Generalized Jensen-Shannon divergence of GKD, exactly as TRL computes it.

  .. math::
    m = \beta p + (1 - \beta) q, \quad
    \mathrm{JSD}_\beta = \beta \, KL(p \| m) + (1 - \beta) \, KL(q \| m)

  with ``log m`` built as ``logsumexp([log p + log β, log q + log1p(-β)])``. The endpoints
  are special-cased as in TRL (the formula above degenerates to 0 there):
  ``beta=0`` gives ``KL(p || q)`` (forward), ``beta=1`` gives ``KL(q || p)`` (reverse).
  EasyDeL uses the opposite convention (its ``beta=0`` is ``KL(q || p)``): pass ``1 - beta``
  to reproduce it.

  Paper: Agarwal et al., "On-Policy Distillation of Language Models: Learning from
  Self-Generated Mistakes" (GKD), 2023, arXiv:2306.13649, Eq. (1). Reproduces TRL
  ``trl/trainer/gkd_trainer.py`` ``GKDTrainer.generalized_jsd_loss`` (logits / T, no T²).
  TRL's default 'batchmean' is ``sum / number of unmasked tokens`` when labels are given
  (this 'batchmean' with a per-token ``where``); without labels TRL divides the sum by the
  batch size only (``jsd.size(0)``), i.e. ``reduction='sum'`` divided by B, which for
  ``[B, S, V]`` input is S times this 'batchmean'.

  Args:
    student_logits: ``[..., V]`` float array.
    teacher_logits: ``[..., V]`` float array.
    beta: interpolation β in [0, 1] (default 0.5). A Python number selects the endpoint
      case statically; a traced β (e.g. vmapped over a sweep) selects it with ``jnp.where``.
    temperature: softmax temperature (default 1; no T² factor, as TRL).
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'batchmean' (default), 'mean', 'sum' or 'none'.

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  check_arguments("jsd", beta=(beta, UNIT_INTERVAL), temperature=(temperature, POSITIVE))
  log_q = _log_softmax(student_logits, temperature, axis, where)
  log_p = _log_softmax(teacher_logits, temperature, axis, where)

  def interior(beta):
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m, axis) + (1.0 - beta) * _kl(log_q, log_m, axis)

  if _is_concrete_scalar(beta):
    if beta == 0:
      per_example = _kl(log_p, log_q, axis)
    elif beta == 1:
      per_example = _kl(log_q, log_p, axis)
    else:
      per_example = interior(float(beta))
  else:
    beta = jnp.asarray(beta, jnp.float32)
    per_example = jnp.where(
      beta == 0,
      _kl(log_p, log_q, axis),
      jnp.where(beta == 1, _kl(log_q, log_p, axis), interior(beta)),
    )
  return _reduce(per_example, reduction, where, log_q.shape, axis)


def skew_kl(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  alpha: ArrayLike = 0.1,
  temperature: ArrayLike = 1.0,
  form: Literal["cross_entropy", "kl"] = "cross_entropy",
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""DistiLLM skew KL: the teacher against a student skewed towards the teacher.

  .. math::
    m = \alpha p + (1 - \alpha) q, \qquad
    \mathrm{SKL}_\alpha = KL(p \| m) = \sum_c p_c (\log p_c - \log m_c)

  Paper: Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation for Large Language
  Models", 2024, arXiv:2402.03898. The reference DistiLLM ``distillm/losses.py``
  ``skewed_forward_kl`` returns the cross-entropy ``-sum p log m``, i.e. the KL plus the
  teacher entropy ``H(p)``, a constant for the student (same gradients, different value).
  ``form='cross_entropy'`` (default) reproduces that value; ``form='kl'`` gives the KL
  itself, which is zero at ``student == teacher`` and non-negative.

  Args:
    student_logits: ``[..., V]`` float array.
    teacher_logits: ``[..., V]`` float array.
    alpha: skew α (teacher weight in the mixture; default 0.1 as DistiLLM). ``alpha=0``
      is forward KL (or the soft cross-entropy).
    temperature: softmax temperature (default 1; DistiLLM has none, no T² factor).
    form: 'cross_entropy' (DistiLLM's value) or 'kl'.
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'batchmean' (default; DistiLLM's per-token mean), 'mean', 'sum' or 'none'.

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  check_arguments("skew_kl", alpha=(alpha, UNIT_INTERVAL), temperature=(temperature, POSITIVE))
  log_q = _log_softmax(student_logits, temperature, axis, where)
  log_p = _log_softmax(teacher_logits, temperature, axis, where)
  log_m = _log_mixture(log_p, log_q, alpha)
  if form == "cross_entropy":
    per_example = _cross_entropy(log_p, log_m, axis)
  elif form == "kl":
    per_example = _kl(log_p, log_m, axis)
  else:
    raise ValueError(f"form must be 'cross_entropy' or 'kl', got {form!r}")
  return _reduce(per_example, reduction, where, log_q.shape, axis)


def skew_reverse_kl(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  alpha: ArrayLike = 0.1,
  temperature: ArrayLike = 1.0,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""DistiLLM skew reverse KL: the student against a teacher skewed towards the student.

  .. math::
    m = (1 - \alpha) p + \alpha q, \qquad
    \mathrm{SRKL}_\alpha = KL(q \| m) = \sum_c q_c (\log q_c - \log m_c)

  Paper: Ko et al., DistiLLM, 2024, arXiv:2402.03898. Reproduces DistiLLM
  ``distillm/losses.py`` ``skewed_reverse_kl`` (a true KL there: the student entropy term is
  included). Note the mixture puts α on the *student* here and on the teacher in
  :func:`skew_kl`, as in the reference.

  Args:
    student_logits: ``[..., V]`` float array.
    teacher_logits: ``[..., V]`` float array.
    alpha: skew α (student weight in the mixture; default 0.1). ``alpha=0`` is reverse KL.
    temperature: softmax temperature (default 1; no T² factor).
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'batchmean' (default), 'mean', 'sum' or 'none'.

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  check_arguments(
    "skew_reverse_kl", alpha=(alpha, UNIT_INTERVAL), temperature=(temperature, POSITIVE)
  )
  log_q = _log_softmax(student_logits, temperature, axis, where)
  log_p = _log_softmax(teacher_logits, temperature, axis, where)
  alpha = jnp.asarray(alpha, jnp.float32)
  log_m = _log_mixture(log_p, log_q, 1.0 - alpha)
  per_example = _kl(log_q, log_m, axis)
  return _reduce(per_example, reduction, where, log_q.shape, axis)


def tvd(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  temperature: ArrayLike = 1.0,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""Total variation distance :math:`\tfrac12 \sum_c |p_c - q_c|`, in [0, 1] per position.

  Reference: DistiLLM ``distillm/losses.py`` ``tv_distance`` (per-token mean = 'batchmean').
  DistiLLM zeroes classes where either logit is ``-inf``; here such a class contributes its
  exact ``|p - q| / 2`` (the two agree when both are ``-inf``, as for vocabulary padding).

  Args:
    student_logits: ``[..., V]`` float array.
    teacher_logits: ``[..., V]`` float array.
    temperature: softmax temperature (default 1).
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'batchmean' (default), 'mean', 'sum' or 'none'.

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  check_arguments("tvd", temperature=(temperature, POSITIVE))
  q = jnp.exp(_log_softmax(student_logits, temperature, axis, where))
  p = jnp.exp(_log_softmax(teacher_logits, temperature, axis, where))
  per_example = 0.5 * jnp.sum(jnp.abs(p - q), axis=axis)
  return _reduce(per_example, reduction, where, q.shape, axis)


def soft_cross_entropy(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  temperature: ArrayLike = 1.0,
  scale_by_temperature_squared: bool = False,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""Cross-entropy to the teacher's soft labels, :math:`-\sum_c p_c \log q_c`.

  Equals :func:`kd` (without T²) plus the teacher entropy ``H(p)``, a constant for the
  student: same gradients, a value that is not zero at ``student == teacher``. Some
  references report this instead of the KL (DistiLLM ``forward_kl`` is this quantity;
  ``optax.losses.safe_softmax_cross_entropy`` with ``labels=p`` is the same per example).

  Args:
    student_logits: ``[..., C]`` float array.
    teacher_logits: ``[..., C]`` float array.
    temperature: softmax temperature (default 1).
    scale_by_temperature_squared: multiply by T² (default off).
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'batchmean' (default; DistiLLM's per-token mean), 'mean', 'sum' or 'none'.

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  return _tempered_divergence(
    "soft_cross_entropy",
    lambda log_q, log_p: _cross_entropy(log_p, log_q, axis),
    student_logits,
    teacher_logits,
    temperature,
    scale_by_temperature_squared,
    axis,
    where,
    reduction,
  )


def akl(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  head_threshold: ArrayLike = 0.5,
  temperature: ArrayLike = 1.0,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""Adaptive KL: forward and reverse KL weighted by where the student misses the teacher.

  Classes are sorted by teacher probability; the *head* holds those whose cumulative teacher
  probability is at most ``head_threshold`` (μ = 0.5), the top class always included; the
  rest is the *tail*. With the student detached,

  .. math::
    g_\mathrm{head} = \sum_{c \in \mathrm{head}} |p_c - q_c|, \quad
    g_\mathrm{tail} = \sum_{c \in \mathrm{tail}} |p_c - q_c|, \quad
    \ell = \frac{g_\mathrm{head}}{g_\mathrm{head} + g_\mathrm{tail}} KL(p \| q)
         + \frac{g_\mathrm{tail}}{g_\mathrm{head} + g_\mathrm{tail}} KL(q \| p).

  Paper: Wu, Tao, Wang, Chen & Wong, "Rethinking Kullback-Leibler Divergence in Knowledge
  Distillation for Large Language Models", 2024, arXiv:2404.02657. Reproduces
  wutaiqiang/LLM_KD_AKL ``AKL.py`` (``get_ratio`` + ``get_kl``; per-token mean, no
  temperature). Departures, both outside the reference's finite domain: the reference
  replaces ``-inf`` logits by 0 before computing the weights (giving padded classes mass);
  here padded classes keep probability 0. Where ``g_head + g_tail = 0`` (``p == q``) the
  reference gives 0/0; here both weights are 0 (both KLs are 0 there anyway).

  Args:
    student_logits: ``[..., V]`` float array.
    teacher_logits: ``[..., V]`` float array.
    head_threshold: μ, the cumulative teacher probability that bounds the head.
    temperature: softmax temperature (default 1; no T² factor).
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'batchmean' (default), 'mean', 'sum' or 'none'.

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  check_arguments(
    "akl", head_threshold=(head_threshold, UNIT_INTERVAL), temperature=(temperature, POSITIVE)
  )
  log_q = _log_softmax(student_logits, temperature, axis, where)
  log_p = _log_softmax(teacher_logits, temperature, axis, where)
  p = jnp.exp(log_p)
  q = jax.lax.stop_gradient(jnp.exp(log_q))
  order = jnp.argsort(p, axis=axis, descending=True)
  sorted_p = jnp.take_along_axis(p, order, axis=axis)
  sorted_errors = jnp.abs(sorted_p - jnp.take_along_axis(q, order, axis=axis))
  # The weights are ratios of gaps, which are as small as 1e-35 where p ≈ q; the gradient of a
  # ratio divides by its denominator squared, which then underflows (inf, then NaN teacher
  # gradients). Dividing the errors by a constant, their largest, leaves the ratios and their
  # gradients exact and keeps the denominator in [1, C].
  largest = jax.lax.stop_gradient(jnp.max(sorted_errors, axis=axis, keepdims=True))
  sorted_errors = sorted_errors / jnp.where(largest > 0, largest, 1.0)
  is_top = jax.lax.broadcasted_iota(jnp.int32, p.shape, axis % p.ndim) == 0
  in_tail = (jnp.cumsum(sorted_p, axis=axis) > head_threshold) & ~is_top
  gap_head = jnp.sum(jnp.where(in_tail, 0.0, sorted_errors), axis=axis)
  gap_tail = jnp.sum(jnp.where(in_tail, sorted_errors, 0.0), axis=axis)
  gap = gap_head + gap_tail
  safe_gap = jnp.where(gap > 0, gap, 1.0)
  head_weight = jnp.where(gap > 0, gap_head / safe_gap, 0.0)
  tail_weight = jnp.where(gap > 0, gap_tail / safe_gap, 0.0)
  per_example = head_weight * _kl(log_p, log_q, axis) + tail_weight * _kl(log_q, log_p, axis)
  return _reduce(per_example, reduction, where, log_q.shape, axis)


# ----------------------------------------------------------------------------------------
# Decoupled KD.
# ----------------------------------------------------------------------------------------


def dkd(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  labels: ArrayLike,
  *,
  alpha: ArrayLike = 1.0,
  beta: ArrayLike = 8.0,
  temperature: ArrayLike = 4.0,
  gt_logit_offset: float = 1000.0,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""Decoupled knowledge distillation: target-class KD (TCKD) + non-target-class KD (NCKD).

  With ``b = [p_gt, 1 - p_gt]`` the binary target/other split of the tempered softmaxes and
  ``\hat p, \hat q`` the softmaxes over the non-target classes only,

  .. math::
    \ell = T^2 \left( \alpha \, KL(b^t \| b^s) + \beta \, KL(\hat p \| \hat q) \right).

  Paper: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022,
  arXiv:2203.08679. Reproduces mdistiller ``mdistiller/distillers/DKD.py`` ``dkd_loss``
  (``size_average=False`` KL times T² divided by the batch size = 'batchmean'); defaults are
  mdistiller's ``CFG.DKD`` (α = 1, β = 8, T = 4). Multiply by :func:`dkd_warmup_factor` for
  the reference's linear warm-up. Computed in log space: ``log(1 - p_gt)`` is a
  ``logsumexp`` over the other classes, where the reference takes ``log`` of a sum of
  probabilities (``-inf`` once it underflows).

  The reference removes the ground-truth class from the NCKD softmaxes by subtracting 1000
  from its logit *after* dividing by T, so that the shift is 1000 in the softmax exponent
  whatever T is (``e^{-1000}`` underflows to exactly 0 in float32) rather than ``1000 / T``.
  It is only exact while the tempered logits span less than about 900; with larger logits
  the "masked" class keeps mass. ``gt_logit_offset=jnp.inf`` removes it exactly.

  Args:
    student_logits: ``[..., C]`` float array.
    teacher_logits: ``[..., C]`` float array.
    labels: ``[...]`` integer ground-truth classes.
    alpha: TCKD weight.
    beta: NCKD weight (mdistiller's CIFAR configs use 8, or 6 / 2 for some pairs; 0.5 on
      ImageNet).
    temperature: softmax temperature T (the loss is multiplied by T²).
    gt_logit_offset: subtracted from the ground-truth tempered logit for NCKD.
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'batchmean' (default), 'sum' or 'none' ('mean' is undefined: TCKD is over
      two bins, NCKD over C).

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  check_arguments(
    "dkd",
    alpha=(alpha, NON_NEGATIVE),
    beta=(beta, NON_NEGATIVE),
    temperature=(temperature, POSITIVE),
    gt_logit_offset=(gt_logit_offset, NON_NEGATIVE_OR_INF),
  )
  # Cast once: each logit feeds two softmaxes, and a low-precision input would otherwise have
  # its two gradient contributions summed in its own dtype.
  student_logits = jnp.asarray(student_logits, jnp.float32)
  teacher_logits = jnp.asarray(teacher_logits, jnp.float32)
  log_q = _log_softmax(student_logits, temperature, axis, where)
  log_p = _log_softmax(teacher_logits, temperature, axis, where)
  is_gt = jax.nn.one_hot(labels, log_q.shape[axis], axis=axis, dtype=bool)

  def target_vs_rest(log_probs):
    log_target = jnp.sum(jnp.where(is_gt, log_probs, 0.0), axis=axis, keepdims=True)
    log_rest = jax.nn.logsumexp(jnp.where(is_gt, -jnp.inf, log_probs), axis=axis, keepdims=True)
    return jnp.concatenate([log_target, log_rest], axis=axis)

  def without_target(logits):
    tempered = logits / temperature
    return _log_softmax(jnp.where(is_gt, tempered - gt_logit_offset, tempered), 1.0, axis, where)

  tckd = _kl(target_vs_rest(log_p), target_vs_rest(log_q), axis)
  nckd = _kl(without_target(teacher_logits), without_target(student_logits), axis)
  per_example = (alpha * tckd + beta * nckd) * _temperature_factor(temperature, True)
  return _reduce(per_example, reduction, where, log_q.shape, axis, per_class_sum=False)


def dkd_warmup_factor(epoch: ArrayLike, warmup_epochs: ArrayLike = 20) -> Array:
  """mdistiller's DKD warm-up weight ``min(epoch / warmup_epochs, 1.0)``.

  mdistiller ``DKD.forward_train`` multiplies the DKD loss by this, with ``epoch`` counted
  from 1 (its training loop starts at epoch 1), ``warmup_epochs = CFG.DKD.WARMUP = 20``.
  """
  check_arguments(
    "dkd_warmup_factor", epoch=(epoch, NON_NEGATIVE), warmup_epochs=(warmup_epochs, POSITIVE)
  )
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup_epochs, 1.0)


# ----------------------------------------------------------------------------------------
# Correlation-based losses.
# ----------------------------------------------------------------------------------------


def _safe_norm(x: Array, axis: int) -> Array:
  """Euclidean norm over ``axis`` whose gradient at the zero vector is 0, not NaN."""
  squared = jnp.sum(jnp.square(x), axis=axis)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _pearson(a: Array, b: Array, axis: int, epsilon: float) -> Array:
  """DIST's ``pearson_correlation``: cosine of the centred vectors, ``eps`` in the denominator."""
  a = a - jnp.mean(a, axis=axis, keepdims=True)
  b = b - jnp.mean(b, axis=axis, keepdims=True)
  return jnp.sum(a * b, axis=axis) / (_safe_norm(a, axis) * _safe_norm(b, axis) + epsilon)


def _probabilities_2d(logits: ArrayLike, temperature: ArrayLike, axis: int) -> Array:
  """float32 softmax with the class axis moved last and leading dimensions flattened."""
  probs = jnp.exp(_log_softmax(logits, temperature, axis, None))
  probs = jnp.moveaxis(probs, axis, -1)
  return probs.reshape(-1, probs.shape[-1])


def dist(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  beta: ArrayLike = 1.0,
  gamma: ArrayLike = 1.0,
  temperature: ArrayLike = 1.0,
  scale_by_temperature_squared: bool = True,
  epsilon: float = 1e-8,
  axis: int = -1,
) -> Array:
  r"""DIST: match inter-class and intra-class Pearson correlations of the predictions.

  With ``Y^s, Y^t`` the ``[N, C]`` tempered softmaxes and ρ the Pearson correlation,

  .. math::
    \ell = T^2 \left( \beta \Big(1 - \tfrac1N \sum_n \rho(Y^s_{n,:}, Y^t_{n,:})\Big)
         + \gamma \Big(1 - \tfrac1C \sum_c \rho(Y^s_{:,c}, Y^t_{:,c})\Big) \right),
    \quad \rho(a, b) = \frac{(a - \bar a) \cdot (b - \bar b)}
                            {\|a - \bar a\| \, \|b - \bar b\| + \epsilon}.

  Paper: Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher",
  NeurIPS 2022, arXiv:2205.10536. Reproduces ``DIST`` in hunto/DIST_KD
  ``classification/lib/models/losses/dist_kd.py`` (= hunto/image_classification_sota
  ``lib/models/losses/dist_kd.py``): softmax of ``z / tau``, both terms multiplied by
  ``tau**2``, ``eps = 1e-8`` added to the product of norms. Module defaults β = γ = τ = 1;
  the CIFAR recipe uses τ = 4 with loss weight 2.

  Batch-level by nature: the intra-class term correlates each class's probabilities across
  the batch, so the loss is one scalar (no ``reduction``), and under data parallelism it must
  see the global batch. Leading dimensions are flattened into the batch (``[B, S, V]`` token
  logits correlate over all B·S tokens). A class whose probability is identical over the
  batch (e.g. a ``-inf`` padded class) has correlation 0, as in the reference.

  Args:
    student_logits: ``[..., C]`` float array.
    teacher_logits: ``[..., C]`` float array.
    beta: inter-class (per example, over classes) weight.
    gamma: intra-class (per class, over the batch) weight.
    temperature: τ.
    scale_by_temperature_squared: multiply by τ² (default on, as the reference).
    epsilon: added to the product of norms in ρ (1e-8, as the reference).
    axis: class axis.

  Returns:
    float32 scalar.
  """
  check_arguments(
    "dist",
    beta=(beta, NON_NEGATIVE),
    gamma=(gamma, NON_NEGATIVE),
    temperature=(temperature, POSITIVE),
    epsilon=(epsilon, POSITIVE),
  )
  student_probs = _probabilities_2d(student_logits, temperature, axis)
  teacher_probs = _probabilities_2d(teacher_logits, temperature, axis)
  inter = 1.0 - jnp.mean(_pearson(student_probs, teacher_probs, -1, epsilon))
  intra = 1.0 - jnp.mean(_pearson(student_probs, teacher_probs, 0, epsilon))
  return (beta * inter + gamma * intra) * _temperature_factor(
    temperature, scale_by_temperature_squared
  )


def _isotonic_decreasing(y: Array) -> Array:
  r"""Decreasing isotonic regression along the last axis, :math:`\arg\min_{v_1 \ge \dots \ge v_n}
  \tfrac12 \|v - y\|^2`, by the min-max formula, O(n²) per row.

  The solution is piecewise constant: each block (a maximal run of equal values; adjacent blocks
  strictly decrease) holds the mean of its ``y``.
  """
  n = y.shape[-1]
  index = jnp.arange(n)
  first_le_last = index[:, None] <= index[None, :]  # [k, l] with k <= l
  # mean(y_k..y_l) = y_k + mean(y_k - y_k, ..., y_l - y_k), the sum accumulated from k: no
  # prefix-sum cancellation, and exactly y_k for tied values (whose blocks soft_rank finds by
  # equality), where summing then dividing rounds.
  offsets = jnp.where(first_le_last, y[..., None, :] - y[..., :, None], 0.0)
  lengths = index[None, :] - index[:, None] + 1
  means = y[..., :, None] + jnp.cumsum(offsets, axis=-1) / lengths
  means = jnp.where(first_le_last, means, -jnp.inf)
  # v_i = min_{k <= i} max_{l >= i} mean(y_k..y_l): the min-max formula of isotonic
  # regression (Barlow et al. 1972), written for decreasing fits.
  best_last = jax.lax.cummax(means, axis=means.ndim - 1, reverse=True)
  return jnp.min(jnp.where(first_le_last, best_last, jnp.inf), axis=-2)


def soft_rank(
  values: ArrayLike,
  *,
  regularization_strength: ArrayLike = 1.0,
  axis: int = -1,
) -> Array:
  r"""Differentiable ascending ranks: l2-regularised projection onto the permutahedron.

  With ``ε = regularization_strength``, ``ρ = (n, n-1, ..., 1)`` and ``P(ρ)`` the permutahedron
  (the convex hull of the permutations of ρ),

  .. math::
    r(x) = \arg\min_{\mu \in P(\rho)} \tfrac12 \| \mu - x / \varepsilon \|^2
         = s - v(s - \rho) \text{ (unsorted back)}, \quad s = \mathrm{sort}_\downarrow(x / \varepsilon),

  with ``v`` the decreasing isotonic regression. Hard ranks 1..n (smallest value → 1) are
  recovered exactly once every gap between sorted values exceeds ε (in float32, gaps of
  ``|x / ε|`` beyond about 1e7 are only resolved down to their float32 spacing); as ε grows the
  ranks collapse to ``x/ε − mean(x/ε) + (n+1)/2``, an affine map of ``x`` (exactly, once every
  gap is below ε). Ties get equal ranks. Shift-invariant; ``Σ r = n(n+1)/2``.

  Paper: Blondel, Teboul, Berthet & Djolonga, "Fast Differentiable Sorting and Ranking",
  ICML 2020, arXiv:2002.08871. Reproduces ``torchsort.soft_rank(values, regularization='l2',
  regularization_strength=ε)`` (teddykoker/torchsort ``ops.py``, copied from
  google-research/fast-soft-sort): same direction, same ρ, same Jacobian (block averages).
  torchsort solves the isotonic regression by pool-adjacent-violators; here the min-max formula
  gives the same solution with array operations only (no sequential loop on an accelerator),
  at O(n²) memory and time per position: meant for class heads, not LLM vocabularies.

  Args:
    values: ``[..., n]`` finite float array.
    regularization_strength: ε > 0, in units of ``values``.
    axis: axis to rank along.

  Returns:
    float32 array of ``values``' shape.
  """
  check_arguments("soft_rank", regularization_strength=(regularization_strength, POSITIVE))
  values = jnp.moveaxis(jnp.asarray(values, jnp.float32), axis, -1)
  scaled = values / regularization_strength
  descending = jnp.argsort(-scaled, axis=-1)
  sorted_values = jnp.take_along_axis(scaled, descending, axis=-1)
  weights = jnp.arange(scaled.shape[-1], 0, -1, dtype=jnp.float32)
  # The isotonic fit v of s - ρ is the mean of s - ρ over each of its blocks (runs of equal
  # values), so r_i = s_i - v_i = mean_{j in block(i)} (s_i - s_j) + mean_{j in block(i)} ρ_j.
  # Pairwise differences are exact for ties and accurate within a block, where forming s - ρ, or
  # s minus its block mean, loses ρ once |s| >> n (the ranks of values / ε = 1e8 came out as
  # even numbers, those of 1e12 as zeros). Holding the blocks constant gives torchsort's
  # Jacobian, the identity minus the block average (Blondel et al. 2020, Sec. 5).
  solution = jax.lax.stop_gradient(_isotonic_decreasing(sorted_values - weights))
  same_block = (solution[..., :, None] == solution[..., None, :]).astype(jnp.float32)
  block_size = jnp.sum(same_block, axis=-1)
  deviation = jnp.sum(same_block * (sorted_values[..., :, None] - sorted_values[..., None, :]), -1)
  sorted_ranks = (deviation + jnp.sum(same_block * weights, axis=-1)) / block_size
  ranks = jnp.take_along_axis(sorted_ranks, jnp.argsort(descending, axis=-1), axis=-1)
  return jnp.moveaxis(ranks, -1, axis)


def _rankable(log_probs: Array, axis: int) -> Array:
  """Log-probabilities with ``-inf`` classes moved just below the row's lowest finite value."""
  finite = log_probs > -jnp.inf
  # Log-probabilities are <= 0, so initial=0 only matters for rows with no finite entry.
  floor = jnp.min(log_probs, axis=axis, where=finite, initial=0.0, keepdims=True) - 1.0
  return jnp.where(finite, log_probs, jax.lax.stop_gradient(floor))


def correlation_kd(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  pearson_weight: ArrayLike = 1.0,
  spearman_weight: ArrayLike = 1.0,
  temperature: ArrayLike = 1.0,
  scale_by_temperature_squared: bool = True,
  regularization_strength: ArrayLike = 1.0,
  epsilon: float = 1e-8,
  axis: int = -1,
  reduction: Reduction = "batchmean",
) -> Array:
  r"""Correlation matching KD: Pearson plus soft-Spearman correlation over classes.

  Per example, with ρ DIST's Pearson correlation (see :func:`dist`), ``p, q`` the tempered
  softmaxes and ``R`` the :func:`soft_rank` (torchsort's l2 soft rank, strength ε) of the
  tempered log-probabilities (equivalently of ``z / T``: soft ranks are shift-invariant),

  .. math::
    \ell = T^2 \left( w_P \, (1 - \rho(q, p)) + w_S \, (1 - \rho(R(\log q), R(\log p))) \right).

  Paper: Niu, Wang, Cai & Hou, "Efficient and Robust Knowledge Distillation from A Stronger
  Teacher Based on Correlation Matching" (CMKD), 2024, arXiv:2410.06561. Neither the authors'
  code nor the paper's method section could be read here (only its abstract, and a citing
  paper saying the Spearman loss uses "a differentiable sorting operation"), so this is the
  paper's structure with conventions chosen here, not a verified reproduction:

  * Spearman ρ = Pearson ρ of soft ranks by Blondel et al.'s differentiable ranking (torchsort's
    ``soft_rank``, l2, default strength 1), teacher ranks soft too, so the loss is ``0`` at
    ``student == teacher``. Ranking probabilities instead of log-probabilities would make the
    term equal the Pearson term at ε = 1 (probability gaps are below 1: the soft rank is affine);
  * the paper weights the two terms per sample by difficulty; its formula is not implemented:
    ``pearson_weight`` and ``spearman_weight`` are scalars or per-example arrays ``[...]``
    computed by the caller, default 1 and 1;
  * the Pearson term is DIST's inter-class term, with DIST's T² and ``eps``; no intra-class
    (batch) term: add :func:`dist` with ``beta=0`` for it;
  * ``-inf`` classes have probability 0 in the Pearson term and the lowest rank in both rank
    vectors.

  Cost: O(C²) per example for the ranks (meant for classification heads, not vocabularies).

  Args:
    student_logits: ``[..., C]`` float array.
    teacher_logits: ``[..., C]`` float array.
    pearson_weight: weight of ``1 - rho`` on probabilities; scalar or ``[...]``.
    spearman_weight: weight of ``1 - rho`` on soft ranks; scalar or ``[...]``.
    temperature: softmax temperature T.
    scale_by_temperature_squared: multiply by T² (default on, as DIST).
    regularization_strength: ε of :func:`soft_rank`, in units of ``z / T`` (torchsort's
      default 1; ranks are exact once the tempered logits' gaps exceed ε).
    epsilon: added to the product of norms in ρ (1e-8, as DIST).
    axis: class axis.
    reduction: 'batchmean' (default: mean over examples, as DIST's ``.mean()``), 'sum' or
      'none' ('mean' is undefined: the terms are not sums over classes).

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  check_arguments(
    "correlation_kd",
    pearson_weight=(pearson_weight, NON_NEGATIVE),
    spearman_weight=(spearman_weight, NON_NEGATIVE),
    temperature=(temperature, POSITIVE),
    regularization_strength=(regularization_strength, POSITIVE),
    epsilon=(epsilon, POSITIVE),
  )
  log_q = _log_softmax(student_logits, temperature, axis, None)
  log_p = _log_softmax(teacher_logits, temperature, axis, None)
  pearson = _pearson(jnp.exp(log_q), jnp.exp(log_p), axis, epsilon)
  spearman = _pearson(
    soft_rank(_rankable(log_q, axis), regularization_strength=regularization_strength, axis=axis),
    soft_rank(_rankable(log_p, axis), regularization_strength=regularization_strength, axis=axis),
    axis,
    epsilon,
  )
  per_example = (pearson_weight * (1.0 - pearson) + spearman_weight * (1.0 - spearman)) * (
    _temperature_factor(temperature, scale_by_temperature_squared)
  )
  return _reduce(per_example, reduction, None, log_q.shape, axis, per_class_sum=False)


# ----------------------------------------------------------------------------------------
# Logit standardisation and logit regression.
# ----------------------------------------------------------------------------------------


def standardize(
  logits: ArrayLike,
  *,
  ddof: int = 1,
  epsilon: float = 1e-7,
  axis: int = -1,
  where: ArrayLike | None = None,
) -> Array:
  r"""Logit standardisation: z-score each logit vector, ``(z - mean) / (std + eps)``.

  Paper: Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation",
  CVPR 2024, arXiv:2403.01427. Reproduces ``normalize`` in sunshangquan/logit-standardization-KD
  ``mdistiller/distillers/KD.py`` / ``DKD.py``: torch's unbiased ``std`` (``ddof=1``) and
  ``eps = 1e-7`` added to the std. Compose it with any logit loss, applied to both sides:

      kd(standardize(s), standardize(t), temperature=2.0)   # KD+LS

  The reference applies ``normalize`` and then its usual KD with ``cfg.KD.TEMPERATURE``,
  which the LS configs set to the "base temperature" 2 (KD weight 9, CE 0.1 for CIFAR KD+LS);
  the T² factor stays. DKD+LS is ``dkd(standardize(s), standardize(t), labels, ...)``.

  ``-inf`` entries and entries excluded by ``where`` are left out of the mean and std and
  come back as ``-inf``, so masked classes stay masked downstream. A constant vector maps to
  zeros (torch gives NaN for one included entry with ``ddof=1``; here the variance is 0).

  Args:
    logits: ``[..., C]`` float array.
    ddof: delta degrees of freedom of the std (1 = unbiased, as torch's default).
    epsilon: added to the std.
    axis: class axis.
    where: optional mask of included classes.

  Returns:
    float32 array of ``logits``' shape.
  """
  check_arguments("standardize", ddof=(ddof, NON_NEGATIVE_INTEGER), epsilon=(epsilon, POSITIVE))
  logits = jnp.asarray(logits, jnp.float32)
  included = logits > -jnp.inf
  if where is not None:
    included = included & expand_class_mask(where, logits.ndim, axis)
  count = jnp.sum(included, axis=axis, keepdims=True, dtype=jnp.float32)
  total = jnp.sum(jnp.where(included, logits, 0.0), axis=axis, keepdims=True)
  centered = jnp.where(included, logits - total / jnp.maximum(count, 1.0), 0.0)
  # std(c) = m std(c / m): the squares of logits beyond ~1e19 would overflow float32 (and make
  # every output 0). A constant m leaves the value and the gradient of the 1-homogeneous std exact.
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(centered), axis=axis, keepdims=True))
  scale = jnp.where(scale > 0, scale, 1.0)
  squares = jnp.sum(jnp.square(centered / scale), axis=axis, keepdims=True)
  variance = squares / jnp.maximum(count - ddof, 1.0)
  positive = variance > 0
  std = scale * jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
  return jnp.where(included, centered / (std + epsilon), -jnp.inf)


def mse_logits(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  *,
  axis: int = -1,
  where: ArrayLike | None = None,
  reduction: Reduction = "mean",
) -> Array:
  r"""Mean squared error between logits, :math:`(z_s - z_t)^2` averaged over every element.

  Paper: Kim, Oh, Kim, Cho & Yun, "Comparing Kullback-Leibler Divergence and Mean Squared
  Error Loss in Knowledge Distillation", IJCAI 2021, arXiv:2105.08919. Reproduces
  jhoon-oh/kd_data ``code/image_classfication/tools/losses.py`` ``mse_logit``
  (``nn.MSELoss()``: mean over batch *and* classes = 'mean', the default here;
  'batchmean' is C times larger). Classes where either logit is ``-inf`` are dropped.

  Args:
    student_logits: ``[..., C]`` float array.
    teacher_logits: ``[..., C]`` float array.
    axis: class axis.
    where: optional mask of included classes / positions.
    reduction: 'mean' (default), 'batchmean', 'sum' or 'none' (per-position sums).

  Returns:
    float32 scalar, or ``[...]`` for ``reduction='none'``.
  """
  student_logits = jnp.asarray(student_logits, jnp.float32)
  teacher_logits = jnp.asarray(teacher_logits, jnp.float32)
  kept = (student_logits > -jnp.inf) & (teacher_logits > -jnp.inf)
  if where is not None:
    kept = kept & expand_class_mask(where, student_logits.ndim, axis)
  difference = jnp.where(kept, student_logits, 0.0) - jnp.where(kept, teacher_logits, 0.0)
  per_example = jnp.sum(jnp.square(difference), axis=axis)
  return _reduce(per_example, reduction, where, student_logits.shape, axis)
