"""Sequence (language-model) distillation: per-token losses under a mask.

A language model emits one distribution per position, so a distillation loss for it is a per-token
divergence (any function of `jaxkd.losses.logit` with `reduction='none'`) averaged over the valid
positions. This module holds the three pieces that turn a per-position divergence into a sequence loss:

* `per_token_divergence`: the divergence at every position, exactly 0 (value and gradient) where the mask
  is False, whatever the logits hold there (padding, prompt tokens, garbage, inf, nan);
* `token_mean`: sum over valid positions / their count, or / a global count for gradient accumulation;
* `sequence_loss`: the two composed, the loss most trainers want.

Plus a sparse teacher: `sparse_topk_kd`, the forward KL against a stored top-k teacher (DistillKit).

Shifting is the caller's job. A causal LM's logits at position t predict token t+1, so the loss over the
response of `tokens [B, S]` with `loss_mask [B, S]` (True on response tokens) reads:

  student_logits = student(tokens)[:, :-1]   # position t predicts tokens[:, t + 1]
  teacher_logits = teacher(tokens)[:, :-1]
  mask = loss_mask[:, 1:]                    # whether tokens[:, t + 1] is scored
  loss = sequence_loss(jsd, student_logits, teacher_logits, mask, beta=0.5)

With TRL-style labels (-100 = ignored) already shifted, `mask = labels != -100`.
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses.reduction import Reduction
from jaxkd.losses.reduction import reduce_loss

Divergence = Callable[..., jax.Array]


def token_mean(
  per_token: jax.Array,
  mask: jax.Array,
  *,
  num_tokens: jax.Array | float | None = None,
) -> jax.Array:
  r"""Mean of a per-token quantity over the valid (mask=True) positions.

  .. math::
    \mathcal{L} = \frac{\sum_{i} m_i \ell_i}{N}, \qquad N = \sum_i m_i \text{ by default.}

  The reduction of TRL's `generalized_jsd_loss(..., reduction='batchmean')` with labels (it divides by the
  number of labels != -100), DistiLLM's losses (`sum(x * mask) / sum(mask)`) and DistillKit's
  (`/ num_items_in_batch`). Masked positions are selected away with `where`, so nan or inf there neither
  reaches the value nor the gradient. A fully masked input gives 0 (TRL would return nan).

  Args:
    per_token: per-position values, any shape; cast to float32.
    mask: boolean array of the same shape, True where the position counts.
    num_tokens: the number of valid tokens to divide by instead of `sum(mask)`. With gradient accumulation
      over micro-batches (or data parallelism), pass the count over the whole global batch so the
      accumulated loss is the per-token mean of the global batch, not a mean of micro-batch means.

  Returns:
    A float32 scalar.
  """
  if per_token.shape != mask.shape:
    raise ValueError(f"per_token shape {per_token.shape} != mask shape {mask.shape}")
  mask = mask.astype(bool)
  total = jnp.sum(jnp.where(mask, per_token.astype(jnp.float32), 0.0))
  if num_tokens is None:
    num_tokens = jnp.maximum(jnp.sum(mask), 1)
  return total / jnp.asarray(num_tokens, jnp.float32)


def check_vocab_sizes(student_vocab: int, teacher_vocab: int) -> None:
  """Raises a ValueError naming both sizes when the vocabularies differ."""
  if student_vocab != teacher_vocab:
    raise ValueError(
      f"student vocabulary size {student_vocab} != teacher vocabulary size {teacher_vocab}; "
      "distillation over logits needs a shared vocabulary (slice or pad the unembedding first)."
    )


def per_token_divergence(
  divergence_fn: Divergence,
  student_logits: jax.Array,
  teacher: Any,
  mask: jax.Array,
  **divergence_kwargs,
) -> jax.Array:
  """A per-position divergence that is exactly 0, in value and gradient, at masked positions.

  The masked positions are replaced by zeros *before* the divergence (uniform distributions: finite
  values, finite gradients), then its output is zeroed there again. Zeroing only after would let nan or
  inf logits at padded positions poison the gradient (0 * nan = nan in the backward pass).

  Args:
    divergence_fn: a per-token divergence called as
      `divergence_fn(student_logits, teacher, reduction='none', **divergence_kwargs)` returning one value per
      position: `kd`, `reverse_kl`, `jsd`, `skew_kl`, `skew_reverse_kl`, `tvd`, `akl`... of
      `jaxkd.losses.logit`, or `sparse_topk_kd` with a `SparseTeacher`.
    student_logits: [..., V] logits, class axis last, any leading (batch, sequence) dims.
    teacher: [..., V] teacher logits, or any pytree of [..., k] arrays (a `SparseTeacher`).
    mask: [...] boolean, True where the position is scored.
    **divergence_kwargs: the divergence's conventions (temperature, beta, alpha...).

  Returns:
    [...] float32 per-position values, 0 where `mask` is False.
  """
  lead_shape = student_logits.shape[:-1]
  if mask.shape != lead_shape:
    raise ValueError(f"mask shape {mask.shape} != student logits leading shape {lead_shape}")
  if isinstance(teacher, (jax.Array, np.ndarray)):
    check_vocab_sizes(student_logits.shape[-1], teacher.shape[-1])
  for leaf in jax.tree.leaves(teacher):
    if leaf.shape[:-1] != lead_shape:
      raise ValueError(
        f"teacher leading shape {leaf.shape[:-1]} != student leading shape {lead_shape}"
      )
  mask = mask.astype(bool)
  keep = mask[..., None]
  safe_student = jnp.where(keep, student_logits, jnp.zeros((), student_logits.dtype))
  safe_teacher = jax.tree.map(
    lambda leaf: jnp.where(keep, leaf, jnp.zeros((), leaf.dtype)), teacher
  )
  per_token = divergence_fn(safe_student, safe_teacher, reduction="none", **divergence_kwargs)
  return jnp.where(mask, per_token.astype(jnp.float32), 0.0)


def sequence_loss(
  divergence_fn: Divergence,
  student_logits: jax.Array,
  teacher: Any,
  mask: jax.Array,
  *,
  num_tokens: jax.Array | float | None = None,
  **divergence_kwargs,
) -> jax.Array:
  """Per-token mean of a divergence over the valid positions: `token_mean(per_token_divergence(...))`.

  With `divergence_fn=jsd` (TRL generalized JSD) and `mask = labels != -100` this is TRL's
  `GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
  reduction='batchmean')`; with `skew_kl` / `skew_reverse_kl` and `mask = labels != -100` it is DistiLLM's
  `skewed_forward_kl` / `skewed_reverse_kl` normalisation (sum over valid tokens / their count).

  Args:
    divergence_fn: see `per_token_divergence`.
    student_logits: [..., V] logits, already shifted (see the module docstring).
    teacher: [..., V] teacher logits or a `SparseTeacher`.
    mask: [...] boolean, True where the position is scored.
    num_tokens: optional global token count (gradient accumulation), see `token_mean`.
    **divergence_kwargs: the divergence's conventions.

  Returns:
    A float32 scalar.
  """
  per_token = per_token_divergence(
    divergence_fn, student_logits, teacher, mask, **divergence_kwargs
  )
  return token_mean(per_token, mask, num_tokens=num_tokens)


class SparseTeacher(NamedTuple):
  """A teacher distribution stored as its top-k entries per position (offline logit caches).

  Attributes:
    ids: [..., k] integer token ids; -1 (or any id outside [0, V)) marks padding.
    logprobs: [..., k] teacher log-probabilities of those ids (log-softmax over the full vocabulary at
      the storage temperature); -inf marks padding.
  """

  ids: jax.Array
  logprobs: jax.Array


def sparse_teacher_from_logits(teacher_logits: jax.Array, k: int) -> SparseTeacher:
  """Top-k of the float32 log-softmax of `teacher_logits` [..., V]: what an offline cache stores."""
  logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1), k)
  return SparseTeacher(ids=ids, logprobs=logprobs)


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012); -inf at x >= 0."""
  below = x < 0
  safe = jnp.where(below, x, -1.0)
  value = jnp.where(safe > -np.log(2.0), jnp.log(-jnp.expm1(safe)), jnp.log1p(-jnp.exp(safe)))
  return jnp.where(below, value, -jnp.inf)


def _merge_duplicates(
  ids: jax.Array, logprobs: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Sums the probabilities of repeated ids into their first occurrence; later copies become padding.

  Returns (keep [..., k] bool, merged log-probs [..., k], -inf where not kept).
  """
  k = ids.shape[-1]
  same = (ids[..., :, None] == ids[..., None, :]) & valid[..., :, None] & valid[..., None, :]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # earlier[j, i]: i < j
  keep = valid & ~jnp.any(same & earlier, axis=-1)
  merged = jax.nn.logsumexp(
    jnp.broadcast_to(logprobs[..., None, :], same.shape), axis=-1, where=same
  )
  return keep, jnp.where(keep, merged, -jnp.inf)


def _outside_logprob(student_logprobs: jax.Array, ids: jax.Array, keep: jax.Array) -> jax.Array:
  """log of the student mass outside the kept ids, summed in log space (no 1 - sum(q) cancellation)."""
  vocab = student_logprobs.shape[-1]
  flat_logprobs = student_logprobs.reshape(-1, vocab)
  flat_ids = jnp.where(keep, ids, vocab).reshape(flat_logprobs.shape[0], -1)
  rows = jnp.arange(flat_ids.shape[0])[:, None]
  # Padding ids point one past the vocabulary and are dropped by the scatter.
  kept_vocab = jnp.zeros(flat_logprobs.shape, bool).at[rows, flat_ids].set(True, mode="drop")
  outside = jax.nn.logsumexp(flat_logprobs, axis=-1, where=~kept_vocab)
  return outside.reshape(student_logprobs.shape[:-1])


def sparse_topk_kd(
  student_logits: jax.Array,
  teacher: SparseTeacher,
  *,
  missing: Literal["renormalize", "residual"] = "renormalize",
  temperature: float = 1.0,
  teacher_temperature: float = 1.0,
  scale_by_temperature_squared: bool = True,
  eps: float = 1e-6,
  reduction: Reduction = "batchmean",
) -> jax.Array:
  r"""Forward KL from a sparse top-k teacher to the dense student (DistillKit `sparse_kl_div`).

  The student's full-vocabulary log-softmax :math:`\log q = \log\mathrm{softmax}(z_s / T)` is gathered at
  the teacher's ids :math:`K`; the teacher's stored log-probabilities (taken at `teacher_temperature`
  :math:`T_0`) are re-tempered by :math:`\alpha = T_0 / T`. Two ways to treat the mass outside :math:`K`:

  * `'renormalize'` (DistillKit `MissingProbabilityHandling.ZERO`, its default): the teacher is
    renormalised over :math:`K`, :math:`\tilde p = \mathrm{softmax}_K(\alpha \log p_K)`; the student is *not*
    renormalised, so the loss :math:`\sum_K \tilde p_k \log(\tilde p_k / q_k) \ge -\log \sum_K q_k \ge 0`
    also pulls the student's mass onto :math:`K`.
  * `'residual'` (DistillKit `SYMMETRIC_UNIFORM`): the missing mass is one more bucket on both sides,
    :math:`r_p = 1 - \sum_K p_k`, :math:`r_q = 1 - \sum_K q_k`, adding
    :math:`r_p \log(r_p / r_q)`; :math:`\log r_p` is a log1mexp of the teacher's logsumexp and
    :math:`\log r_q` a logsumexp over the student's vocabulary outside :math:`K` (exact, no cancellation).
    As in DistillKit, the bucket is dropped where the stored :math:`r_p \le` `eps` (the rounding of a full
    top-k; here before re-tempering, which would inflate it) and :math:`r_q` is floored at `eps`. A
    temperature change re-tempers the :math:`k + 1` buckets together, the residual treated as a single
    token (DistillKit's approximation).

  Re-tempering stored log-probs, :math:`\mathrm{softmax}_K(\alpha \log p)`, equals the truncated and
  renormalised :math:`\mathrm{softmax}(z_t / T)` exactly over the kept support only: the shift
  :math:`\log Z` cancels inside :math:`K`, but the mass outside :math:`K` at the new temperature is unknown.

  Ids outside [0, V) (e.g. -1) or log-prob -inf are padding (a position with only padding gives 0); a
  repeated id has its probabilities summed (found by comparing the k^2 pairs of a position, less memory
  than the [..., V] logits for k up to about sqrt(V)). The teacher is stored data: no gradient flows into it.

  Args:
    student_logits: [..., V] logits.
    teacher: a `SparseTeacher` with [..., k] ids and log-probs.
    missing: `'renormalize'` or `'residual'`, see above.
    temperature: distillation temperature :math:`T`.
    teacher_temperature: temperature :math:`T_0` at which the teacher log-probs were stored.
    scale_by_temperature_squared: multiply by :math:`T^2` (DistillKit's `KLDLoss` does).
    eps: residual-mass threshold and floor of the `'residual'` mode (DistillKit's default 1e-6).
    reduction: 'batchmean' (mean over positions, the default of `jaxkd.losses.logit`), 'sum' or 'none'
      (per-position values); `sequence_loss` / `token_mean` give the masked per-token mean.

  Returns:
    A float32 scalar, or [...] per-position values for `reduction='none'`.
  """
  if missing not in ("renormalize", "residual"):
    raise ValueError(f"missing must be 'renormalize' or 'residual', got {missing!r}")
  if teacher.ids.shape != teacher.logprobs.shape:
    raise ValueError(
      f"teacher ids shape {teacher.ids.shape} != teacher logprobs shape {teacher.logprobs.shape}"
    )
  vocab = student_logits.shape[-1]
  student_logprobs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)

  ids = teacher.ids.astype(jnp.int32)
  stored = jax.lax.stop_gradient(teacher.logprobs.astype(jnp.float32))
  valid = (ids >= 0) & (ids < vocab) & (stored > -jnp.inf)
  keep, stored = _merge_duplicates(ids, stored, valid)
  safe_ids = jnp.where(keep, ids, 0)
  alpha = teacher_temperature / temperature

  if missing == "renormalize":
    norm = jax.nn.logsumexp(alpha * stored, axis=-1, where=keep, keepdims=True)
    teacher_logprobs = alpha * stored - norm
    bucket = 0.0
  else:
    residual = _log1mexp(jax.nn.logsumexp(stored, axis=-1, where=keep))
    # A stored residual below eps is the rounding of a (nearly) full top-k, not mass: drop it before
    # re-tempering, which would inflate it (1e-7 ** (1 / 2) = 3e-4 at T = 2).
    has_residual = residual > np.log(eps)
    residual = jnp.where(has_residual, residual, -jnp.inf)
    norm = jnp.logaddexp(jax.nn.logsumexp(alpha * stored, axis=-1, where=keep), alpha * residual)
    teacher_logprobs = alpha * stored - norm[..., None]
    residual = jnp.where(has_residual, alpha * residual - norm, 0.0)
    student_residual = jnp.maximum(_outside_logprob(student_logprobs, safe_ids, keep), np.log(eps))
    bucket = jnp.where(has_residual, jnp.exp(residual) * (residual - student_residual), 0.0)

  student_kept = jnp.take_along_axis(student_logprobs, safe_ids, axis=-1)
  safe_teacher_logprobs = jnp.where(keep, teacher_logprobs, 0.0)
  kept_terms = jnp.where(
    keep, jnp.exp(safe_teacher_logprobs) * (safe_teacher_logprobs - student_kept), 0.0
  )
  # A position without any kept id has all its mass in the bucket on both sides: exactly 0, not rounding.
  per_token = jnp.where(jnp.any(keep, axis=-1), jnp.sum(kept_terms, axis=-1) + bucket, 0.0)
  if scale_by_temperature_squared:
    per_token = per_token * temperature**2
  # Not a sum of per-class terms over the vocabulary, so reduce_loss rejects 'mean'.
  return reduce_loss(per_token, reduction)
