"""Sequence (language-model) distillation: per-token losses under a mask, and sparse teachers.

A language model emits one distribution per position, so a distillation loss for it is a per-token
divergence (any function of `jaxkd.losses.logit` with `reduction='none'`) averaged over the scored
positions. This module holds:

* `per_token_divergence` / `per_token_cross_entropy`: the divergence (or the cross-entropy with the
  target tokens) at every position, exactly 0 (value and gradient) where the mask is False, whatever
  the logits hold there (padding, prompt tokens, garbage, inf, nan);
* `token_mean`: sum over scored positions / their count, or / a global count (gradient accumulation);
* `sequence_loss` / `sequence_cross_entropy`: the two composed, the losses most trainers want;
* sparse teachers (`SparseTeacher`): the top-p-then-top-k truncation of pre-training distillation
  (`truncate_teacher`), the KD against it (`sparse_topk_kd`) and its compact storage
  (`encode_sparse_teacher` / `decode_sparse_teacher`);
* vocabulary guards: `check_vocab_sizes`, `slice_vocab` (a padded teacher embedding).

Nothing here shifts. jaxkd's language-model batches are already shifted when they are built
(`targets[:, t]` is the token after `inputs[:, t]`, `loss_mask[:, t]` says whether it is scored), so
`logits, _ = model(batch['inputs'])` lines up with `batch['targets']` and `batch['loss_mask']`. With
Hugging Face-style unshifted `labels` (-100 = ignored), shift once: `logits[:, :-1]` against
`labels[:, 1:]`, and pass `mask = labels[:, 1:] != -100`. Masks are boolean: an integer array (such as
the labels themselves) is rejected with a TypeError.
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses.reduction import Reduction
from jaxkd.losses.reduction import reduce_loss

Divergence = Callable[..., jax.Array]


# ---------------------------------------------------------------------------------------------
# Guards
# ---------------------------------------------------------------------------------------------


def bool_mask(mask: jax.typing.ArrayLike, name: str = "mask") -> jax.Array:
  """`mask` as a boolean array; an integer array (e.g. labels with -100 = ignored) is an error.

  A float mask is accepted (nonzero = scored). An integer one is refused rather than cast: labels
  passed by mistake would count every position whose label is not 0, -100 ones included.
  """
  dtype = jnp.result_type(mask)
  if jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(
      f"{name} has integer dtype {dtype}; a mask is boolean (True where the token is scored). "
      "For labels with -100 = ignored (TRL, Hugging Face), pass `labels != -100`."
    )
  return jnp.asarray(mask).astype(bool)


def check_vocab_sizes(student_vocab: int, teacher_vocab: int) -> None:
  """Raises a ValueError naming both sizes when the vocabularies differ."""
  if student_vocab != teacher_vocab:
    raise ValueError(
      f"student vocabulary size {student_vocab} != teacher vocabulary size {teacher_vocab}; "
      "distillation over logits needs one vocabulary (a teacher whose embedding is padded past its "
      "tokenizer: jaxkd.losses.slice_vocab(teacher_logits, student_vocab_size))."
    )


def check_top_k(k: int, vocab_size: int) -> None:
  """Raises a ValueError unless 1 <= k <= vocab_size."""
  if not 1 <= k <= vocab_size:
    raise ValueError(f"top-k of k={k} entries needs 1 <= k <= the vocabulary size {vocab_size}")


def slice_vocab(
  teacher_logits: jax.Array, vocab_size: int, *, max_dropped_mass: float = 1e-3
) -> jax.Array:
  """The first `vocab_size` entries of a teacher whose vocabulary axis is padded.

  Model embeddings are often padded past the tokenizer (Qwen2.5: 152064 rows for 151936 tokens) so
  that the matrix shape divides evenly across devices; the extra rows are never a target and the
  teacher gives them almost no probability. Slicing them off gives logits over the student's
  vocabulary; every divergence renormalises over it.

  Whether the dropped entries are only padding is checked when the logits are concrete (outside
  `jax.jit`): the largest teacher probability they carry at any position must not exceed
  `max_dropped_mass`, otherwise they hold real tokens and the two vocabularies differ. Under a trace
  the check cannot raise; run it once on a concrete batch before training.

  Args:
    teacher_logits: [..., Vt] logits, Vt >= vocab_size.
    vocab_size: the student's vocabulary size.
    max_dropped_mass: the largest probability the dropped entries may carry at one position.

  Returns:
    [..., vocab_size] logits.
  """
  teacher_vocab = teacher_logits.shape[-1]
  if vocab_size > teacher_vocab:
    raise ValueError(
      f"cannot slice a teacher vocabulary of {teacher_vocab} to {vocab_size} entries: the student's "
      "is larger (pad the teacher's logits with -inf, or slice the student's unembedding instead)"
    )
  if vocab_size == teacher_vocab:
    return teacher_logits
  if not isinstance(teacher_logits, jax.core.Tracer):
    logits = jnp.asarray(teacher_logits, jnp.float32)
    dropped_logmass = jax.nn.logsumexp(logits[..., vocab_size:], axis=-1) - jax.nn.logsumexp(
      logits, axis=-1
    )
    dropped = float(jnp.exp(jnp.max(dropped_logmass)))
    if dropped > max_dropped_mass:
      raise ValueError(
        f"the {teacher_vocab - vocab_size} teacher entries past {vocab_size} carry up to "
        f"{dropped:.3g} of the probability at one position (> {max_dropped_mass}): they are real "
        "tokens, not padding, so the teacher's vocabulary is not the student's"
      )
  return teacher_logits[..., :vocab_size]


# ---------------------------------------------------------------------------------------------
# Masked per-token losses
# ---------------------------------------------------------------------------------------------


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
    mask: boolean array of the same shape, True where the position counts (an integer array raises).
    num_tokens: the number of valid tokens to divide by instead of `sum(mask)`. With gradient accumulation
      over micro-batches (or data parallelism), pass the count over the whole global batch so the
      accumulated loss is the per-token mean of the global batch, not a mean of micro-batch means.

  Returns:
    A float32 scalar.
  """
  mask = bool_mask(mask)
  if per_token.shape != mask.shape:
    raise ValueError(f"per_token shape {per_token.shape} != mask shape {mask.shape}")
  total = jnp.sum(jnp.where(mask, per_token.astype(jnp.float32), 0.0))
  if num_tokens is None:
    num_tokens = jnp.maximum(jnp.sum(mask), 1)
  return total / jnp.asarray(num_tokens, jnp.float32)


def _where_scored(mask: jax.Array, tree: Any) -> Any:
  """Every [..., n] leaf of `tree` with its masked positions replaced by zeros."""
  keep = mask[..., None]
  return jax.tree.map(lambda leaf: jnp.where(keep, leaf, jnp.zeros((), leaf.dtype)), tree)


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
  mask = bool_mask(mask)
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
  per_token = divergence_fn(
    _where_scored(mask, student_logits),
    _where_scored(mask, teacher),
    reduction="none",
    **divergence_kwargs,
  )
  return jnp.where(mask, per_token.astype(jnp.float32), 0.0)


def per_token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Cross-entropy with the target tokens, `logsumexp(z) - z[target]`, 0 at masked positions.

  Like `per_token_divergence`, masked positions are zeroed before and after, so their logits and their
  targets (-100, out of range) reach neither the value nor the gradient.

  Args:
    logits: [..., V] logits, cast to float32.
    targets: [...] integer token ids.
    mask: [...] boolean, True where the position is scored.

  Returns:
    [...] float32 per-position values.
  """
  mask = bool_mask(mask)
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
  if targets.shape != logits.shape[:-1] or mask.shape != targets.shape:
    raise ValueError(
      f"targets {targets.shape} and mask {mask.shape} must be the logits' leading shape "
      f"{logits.shape[:-1]}"
    )
  logits = _where_scored(mask, logits.astype(jnp.float32))
  targets = jnp.where(mask, targets, 0)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.where(mask, jax.nn.logsumexp(logits, axis=-1) - target_logits, 0.0)


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
    student_logits: [..., V] logits, aligned with the mask (see the module docstring).
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


def sequence_cross_entropy(
  logits: jax.Array,
  targets: jax.Array,
  mask: jax.Array,
  *,
  num_tokens: jax.Array | float | None = None,
) -> jax.Array:
  """The language-modelling loss: per-token mean cross-entropy with `targets` over the scored positions.

  `token_mean(per_token_cross_entropy(logits, targets, mask), mask, num_tokens=num_tokens)`; with
  `mask = labels != -100` it is Hugging Face's causal-LM loss (`ignore_index=-100`, mean over the rest).
  """
  return token_mean(per_token_cross_entropy(logits, targets, mask), mask, num_tokens=num_tokens)


# ---------------------------------------------------------------------------------------------
# Sparse teachers: truncation, KD, storage
# ---------------------------------------------------------------------------------------------


class SparseTeacher(NamedTuple):
  """A teacher distribution stored as a few entries per position (offline logit caches).

  Attributes:
    ids: [..., k] integer token ids; -1 (or any id outside [0, V)) marks an unused slot.
    logprobs: [..., k] teacher log-probabilities of those ids, normalised over the *full* vocabulary
      (log-softmax at the storage temperature), so `1 - sum(exp(logprobs))` is the mass outside the
      stored ids; -inf marks an unused slot.
  """

  ids: jax.Array
  logprobs: jax.Array


def truncate_teacher(
  teacher_logits: jax.Array,
  *,
  top_p: float = 0.95,
  top_k: int = 100,
  temperature: float = 1.0,
) -> SparseTeacher:
  r"""Top-p then top-k truncation of a teacher distribution (Peng et al. 2024, arXiv:2410.16215).

  Pre-training distillation stores `Truncate(z)` per token and trains on the target
  :math:`\mathrm{softmax}(\mathrm{Truncate}(z) / \tau)`, where `Truncate` keeps the logits of

  1. the nucleus: the smallest set of most probable tokens whose probability sums to at least `top_p`
     (Holtzman et al. 2020; the token that crosses `top_p` is kept), then
  2. the `top_k` most probable tokens of that set,

  and sets every other logit to :math:`-\infty`. The paper's vanilla setting is p = 0.95, k = 100.
  Both steps keep a prefix of the tokens sorted by probability, so the kept set is the
  :math:`\min(|\text{nucleus}|, k)` most probable tokens; `top_p >= 1` keeps all k.

  What is stored: the kept ids and their log-probabilities *over the full vocabulary*,
  :math:`\log\mathrm{softmax}(z / T_0)` at `temperature` :math:`T_0`. Unused slots (a nucleus smaller
  than k) hold id -1 and log-prob -inf. This is enough to form the target exactly at any
  :math:`\tau`: within the kept set :math:`K`, :math:`\log p_k = z_k / T_0 - \log Z`, and
  :math:`\mathrm{softmax}_K(\log p_K \cdot T_0 / \tau) = \mathrm{softmax}(\mathrm{Truncate}(z) / \tau)`
  because :math:`\log Z` cancels (`sparse_topk_kd(..., missing='renormalize', temperature=τ,
  teacher_temperature=T_0)`). It also keeps the truncated mass :math:`1 - \sum_K p_k` for the
  `missing='residual'` mode.

  Args:
    teacher_logits: [..., V] teacher logits.
    top_p: nucleus mass, in (0, 1].
    top_k: at most this many ids per position (1 <= top_k <= V).
    temperature: :math:`T_0`, the temperature of the distribution that is truncated and stored (the
      paper truncates the raw logits: 1).

  Returns:
    A `SparseTeacher` of [..., top_k] int32 ids and float32 log-probabilities, sorted by decreasing
    probability.
  """
  check_top_k(top_k, teacher_logits.shape[-1])
  if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  logprobs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  logprobs, ids = jax.lax.top_k(logprobs, top_k)
  probs = jnp.exp(logprobs)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # The nucleus is computed in float32; at top_p = 1 rounding could end it before the last token.
  keep = ((mass_before < top_p) | (top_p >= 1)) & (logprobs > -jnp.inf)
  return SparseTeacher(ids=jnp.where(keep, ids, -1), logprobs=jnp.where(keep, logprobs, -jnp.inf))


def sparse_teacher_from_logits(teacher_logits: jax.Array, k: int) -> SparseTeacher:
  """The top-k of the float32 log-softmax of `teacher_logits` [..., V] (no nucleus): `truncate_teacher`
  with `top_p=1`."""
  return truncate_teacher(teacher_logits, top_p=1.0, top_k=k)


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
  outside = ~kept_vocab & (flat_logprobs > -jnp.inf)
  # A student with no mass outside the kept ids: -inf, with a zero (not NaN) gradient.
  any_outside = jnp.any(outside, axis=-1, keepdims=True)
  log_outside = jax.nn.logsumexp(
    jnp.where(outside, flat_logprobs, 0.0), axis=-1, where=outside | ~any_outside
  )
  log_outside = jnp.where(any_outside[:, 0], log_outside, -jnp.inf)
  return log_outside.reshape(student_logprobs.shape[:-1])


def sparse_topk_kd(
  student_logits: jax.Array,
  teacher: SparseTeacher,
  *,
  form: Literal["kl", "cross_entropy"] = "kl",
  missing: Literal["renormalize", "residual"] = "renormalize",
  temperature: float = 1.0,
  teacher_temperature: float = 1.0,
  student_temperature: float | None = None,
  scale_by_temperature_squared: bool = True,
  eps: float = 1e-6,
  reduction: Reduction = "batchmean",
) -> jax.Array:
  r"""KD from a sparse teacher to the dense student: DistillKit's `sparse_kl_div`, and pre-training
  distillation's KLD / NLL losses (Peng et al. 2024).

  The student's full-vocabulary log-softmax :math:`\log q = \log\mathrm{softmax}(z_s / T_s)` is gathered
  at the teacher's ids :math:`K`. The teacher's stored log-probabilities (taken at `teacher_temperature`
  :math:`T_0`) are re-tempered to the distillation temperature :math:`\tau` (`temperature`) by
  :math:`\alpha = T_0 / \tau`. :math:`T_s` is `student_temperature`, :math:`\tau` by default (Hinton
  KD; pre-training distillation tempers only the teacher: pass `student_temperature=1`). Two ways to
  treat the mass outside :math:`K`:

  * `'renormalize'` (DistillKit `MissingProbabilityHandling.ZERO`, its default): the teacher is
    renormalised over :math:`K`, :math:`\tilde p = \mathrm{softmax}_K(\alpha \log p_K)`, which is
    exactly :math:`\mathrm{softmax}(\mathrm{Truncate}(z_t) / \tau)` (see `truncate_teacher`). The
    student is *not* renormalised, so the KL :math:`\sum_K \tilde p_k \log(\tilde p_k / q_k) \ge -\log
    \sum_K q_k \ge 0` also pulls the student's mass onto :math:`K`.
  * `'residual'` (DistillKit `SYMMETRIC_UNIFORM`): the missing mass is one more bucket on both sides,
    :math:`r_p = 1 - \sum_K p_k`, :math:`r_q = 1 - \sum_K q_k`, adding
    :math:`r_p \log(r_p / r_q)`; :math:`\log r_p` is a log1mexp of the teacher's logsumexp and
    :math:`\log r_q` a logsumexp over the student's vocabulary outside :math:`K` (exact, no cancellation).
    As in DistillKit, the bucket is dropped where the stored :math:`r_p \le` `eps` (the rounding of a full
    top-k; here before re-tempering, which would inflate it) and :math:`r_q` is floored at `eps`. A
    temperature change re-tempers the :math:`k + 1` buckets together, the residual treated as a single
    token (DistillKit's approximation).

  `form`: `'kl'` is :math:`\sum \tilde p \log(\tilde p / q)` over the buckets (the paper's KLD);
  `'cross_entropy'` is :math:`-\sum \tilde p \log q` (the paper's NLL: the soft cross-entropy, the KL
  plus the teacher entropy; same gradient for the student).

  Ids outside [0, V) (e.g. -1) or log-prob -inf are padding (a position with only padding gives 0); a
  repeated id has its probabilities summed (found by comparing the k^2 pairs of a position, less memory
  than the [..., V] logits for k up to about sqrt(V)). The teacher is stored data: no gradient flows into
  it. An id of a *different* vocabulary that happens to lie in [0, V) cannot be detected here: check the
  tokenizers match (`jaxkd.data` fingerprints) before caching.

  Args:
    student_logits: [..., V] logits.
    teacher: a `SparseTeacher` with [..., k] ids and log-probs, k <= V.
    form: `'kl'` or `'cross_entropy'`, see above.
    missing: `'renormalize'` or `'residual'`, see above.
    temperature: distillation temperature :math:`\tau` of the teacher target.
    teacher_temperature: temperature :math:`T_0` at which the teacher log-probs were stored.
    student_temperature: :math:`T_s`; None = `temperature`.
    scale_by_temperature_squared: multiply by :math:`\tau^2` (DistillKit's `KLDLoss` does).
    eps: residual-mass threshold and floor of the `'residual'` mode (DistillKit's default 1e-6).
    reduction: 'batchmean' (mean over positions, the default of `jaxkd.losses.logit`), 'sum' or 'none'
      (per-position values); `sequence_loss` / `token_mean` give the masked per-token mean.

  Returns:
    A float32 scalar, or [...] per-position values for `reduction='none'`.
  """
  if form not in ("kl", "cross_entropy"):
    raise ValueError(f"form must be 'kl' or 'cross_entropy', got {form!r}")
  if missing not in ("renormalize", "residual"):
    raise ValueError(f"missing must be 'renormalize' or 'residual', got {missing!r}")
  if teacher.ids.shape != teacher.logprobs.shape:
    raise ValueError(
      f"teacher ids shape {teacher.ids.shape} != teacher logprobs shape {teacher.logprobs.shape}"
    )
  vocab = student_logits.shape[-1]
  if teacher.ids.shape[-1] > vocab:
    raise ValueError(
      f"sparse teacher has k={teacher.ids.shape[-1]} entries per position, more than the student "
      f"vocabulary size {vocab}"
    )
  if student_temperature is None:
    student_temperature = temperature
  student_logprobs = jax.nn.log_softmax(
    student_logits.astype(jnp.float32) / student_temperature, axis=-1
  )

  ids = teacher.ids.astype(jnp.int32)
  stored = jax.lax.stop_gradient(teacher.logprobs.astype(jnp.float32))
  valid = (ids >= 0) & (ids < vocab) & (stored > -jnp.inf)
  keep, stored = _merge_duplicates(ids, stored, valid)
  safe_ids = jnp.where(keep, ids, 0)
  alpha = teacher_temperature / temperature
  # The teacher's own log-probability term: present in the KL, absent from the cross-entropy.
  with_entropy = 1.0 if form == "kl" else 0.0

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
    bucket = jnp.where(
      has_residual, jnp.exp(residual) * (with_entropy * residual - student_residual), 0.0
    )

  student_kept = jnp.take_along_axis(student_logprobs, safe_ids, axis=-1)
  safe_teacher_logprobs = jnp.where(keep, teacher_logprobs, 0.0)
  kept_terms = jnp.where(
    keep,
    jnp.exp(safe_teacher_logprobs) * (with_entropy * safe_teacher_logprobs - student_kept),
    0.0,
  )
  # A position without any kept id has all its mass in the bucket on both sides: exactly 0, not rounding.
  per_token = jnp.where(jnp.any(keep, axis=-1), jnp.sum(kept_terms, axis=-1) + bucket, 0.0)
  if scale_by_temperature_squared:
    per_token = per_token * temperature**2
  # Not a sum of per-class terms over the vocabulary, so reduce_loss rejects 'mean'.
  return reduce_loss(per_token, reduction)


def sparse_id_dtype(vocab_size: int) -> np.dtype:
  """Storage dtype of sparse-teacher ids: uint16 below 2^16 entries (its all-ones 65535, outside
  [0, V), marks an unused slot), else int32 (-1 marks it)."""
  return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.int32)


def sparse_bytes_per_token(vocab_size: int, k: int, logprob_dtype: Any = "float16") -> int:
  """Bytes one position of an encoded sparse teacher takes: k ids + k log-probs (dense fp32: 4 V)."""
  return k * (sparse_id_dtype(vocab_size).itemsize + jnp.dtype(logprob_dtype).itemsize)


def encode_sparse_teacher(
  teacher: SparseTeacher, vocab_size: int, logprob_dtype: Any = "float16"
) -> tuple[np.ndarray, np.ndarray]:
  """A sparse teacher in its compact storage dtypes, as host numpy arrays (what a cache writer saves).

  Ids become `sparse_id_dtype(vocab_size)` (2 bytes below 65536 entries, else 4); log-probs become
  `logprob_dtype` ('float16': about 3 significant digits, an absolute error of at most 2^-7 for
  log-probs down to -16, i.e. a relative probability error below 0.4%; 'bfloat16': at most 2^-4 there,
  6%; 'float32': exact). Unused slots (id outside [0, V), log-prob -inf or nan) are stored as the
  padding id and -inf.

  Returns:
    (ids [..., k], logprobs [..., k]) numpy arrays; `decode_sparse_teacher` inverts it.
  """
  ids = np.asarray(teacher.ids).astype(np.int64)
  logprobs = np.asarray(teacher.logprobs, np.float32)
  unused = (ids < 0) | (ids >= vocab_size) | ~(logprobs > -np.inf)
  id_dtype = sparse_id_dtype(vocab_size)
  padding_id = np.iinfo(id_dtype).max if id_dtype == np.uint16 else -1
  return (
    np.where(unused, padding_id, ids).astype(id_dtype),
    np.where(unused, -np.inf, logprobs).astype(jnp.dtype(logprob_dtype)),
  )


def decode_sparse_teacher(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> SparseTeacher:
  """`encode_sparse_teacher`'s arrays back to a `SparseTeacher` of int32 ids (-1 = unused) and float32
  log-probs (-inf = unused), as numpy arrays."""
  ids = np.asarray(ids).astype(np.int64)
  logprobs = np.asarray(logprobs).astype(np.float32)
  unused = (ids < 0) | (ids >= vocab_size) | ~(logprobs > -np.inf)
  return SparseTeacher(
    ids=np.where(unused, -1, ids).astype(np.int32),
    logprobs=np.where(unused, -np.inf, logprobs).astype(np.float32),
  )
