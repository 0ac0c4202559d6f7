"""Language-model losses from hidden states, never materialising [batch, sequence, vocab] logits.

With vocabularies of 32k-256k entries the logits, their softmaxes and their gradients are the memory
peak of LM training and distillation: one [B, S, V] float32 buffer is 1 GiB at B=1, S=2048, V=128k,
and a dense value-and-gradient holds several. `chunked_lm_loss` takes the final hidden states and the
unembedding instead and walks the B·S tokens in chunks (`lax.scan`). Each chunk's student logits are
computed once and give both terms of the language-model distillation loss

  ce_weight · CE(student, targets) + kd_weight · D(teacher ‖ student)

(per-token means over the scored tokens), the teacher being another LM head (hidden states +
unembedding, its chunk logits computed alongside) or a stored sparse teacher (`SparseTeacher`).
Optional final-logit soft-capping (Gemma 2: `c · tanh(z / c)`) applies to either side.

The backward pass is fused into the forward one. The loss is a scalar, so its gradient with respect to
a chunk's logits needs no information from later chunks: the scan computes that gradient right after
the chunk's loss (`jax.vjp` of the chunk's terms) and immediately contracts it with the unembedding
(d hidden) and the hidden states (d unembedding, accumulated in float32), as Liger-Kernel's fused linear
cross-entropy does. The custom VJP then only scales the saved gradients by the incoming cotangent. So
a training step runs the four matmuls of the dense computation (student and teacher logits, two for
the gradient) and holds a few [chunk, V] buffers instead of [B, S, V] ones, where rematerialising the
chunk (`jax.checkpoint`) would run the two forward matmuls twice. Without differentiation only the
forward scan runs.
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses.logit import kd
from jaxkd.losses.sequence import Divergence
from jaxkd.losses.sequence import SparseTeacher
from jaxkd.losses.sequence import bool_mask
from jaxkd.losses.sequence import check_vocab_sizes
from jaxkd.losses.sequence import per_token_cross_entropy
from jaxkd.losses.sequence import per_token_divergence
from jaxkd.losses.sequence import sparse_topk_kd


class LMHead(NamedTuple):
  """A language model's output layer inputs: `logits = soft_cap(hidden @ unembed, softcap)`.

  Attributes:
    hidden: [B, S, D] final hidden states (after the final norm).
    unembed: [D, V] output projection (the transposed embedding when tied).
    softcap: None, or the cap c of final-logit soft-capping (Gemma 2: 30).
  """

  hidden: jax.Array
  unembed: jax.Array
  softcap: float | jax.Array | None = None


def soft_cap(logits: jax.Array, cap: float | jax.Array | None) -> jax.Array:
  """Final-logit soft-capping `cap · tanh(logits / cap)` (Gemma 2); the logits unchanged for None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def _split_static(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(Python values, arrays): the arrays must enter the custom VJP as arguments, not closures."""
  static = {k: v for k, v in values.items() if not isinstance(v, (jax.Array, np.ndarray))}
  return static, {k: v for k, v in values.items() if k not in static}


def chunked_lm_loss(
  student: LMHead,
  mask: jax.Array,
  *,
  targets: jax.Array | None = None,
  teacher: LMHead | SparseTeacher | None = None,
  ce_weight: float | jax.Array = 1.0,
  kd_weight: float | jax.Array = 1.0,
  divergence: Divergence | None = None,
  chunk_size: int = 256,
  num_tokens: jax.Array | float | None = None,
  **divergence_kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`ce_weight · CE + kd_weight · KD` from hidden states, one chunk of tokens at a time.

  Equals, in value and in gradient with respect to the student's hidden states and unembedding,

    logits = soft_cap(student.hidden @ student.unembed, student.softcap)
    ce_weight * sequence_cross_entropy(logits, targets, mask, num_tokens=num_tokens)
    + kd_weight * sequence_loss(divergence, logits, teacher_logits_or_sparse, mask,
                                num_tokens=num_tokens, **divergence_kwargs)

  while holding a few [chunk_size, V] buffers instead of [B, S, V] ones (module docstring).

  The teacher is a constant: it gets no gradient (as under `jax.lax.stop_gradient`). The returned
  per-term values are for logging and are under `stop_gradient`; differentiate the total (with
  `ce_weight` / `kd_weight` selecting a term). Gradients with respect to the weights and to a traced
  `num_tokens` are exact.

  Args:
    student: the student's `LMHead` (hidden [B, S, D], unembed [D, V], optional softcap).
    mask: [B, S] boolean, True where `targets[:, t]` is scored (already aligned, see
      `jaxkd.losses.sequence`); an integer array raises.
    targets: [B, S] integer target tokens for the cross-entropy term; None = no CE term (0).
    teacher: an `LMHead` ([B, S, Dt] hidden, [Dt, V] unembed) or a `SparseTeacher` ([B, S, k]); None =
      no KD term (0).
    ce_weight, kd_weight: weights of the two terms (Python or traced floats, e.g. 1 - α and α of an α
      schedule).
    divergence: a per-token divergence; default `kd` for an `LMHead` teacher, `sparse_topk_kd` for a
      `SparseTeacher`. Called with `reduction='none'` on [chunk_size, V] logits.
    chunk_size: tokens (of the flattened B·S) per chunk; B·S need not be a multiple (the tail is padded
      and masked). The scratch memory is about eight [chunk_size, V] float32 buffers (with `kd` and a
      hidden-state teacher): 1 GiB at 256 tokens and V = 128k, whatever B·S.
    num_tokens: optional global token count (gradient accumulation), see `token_mean`.
    **divergence_kwargs: the divergence's conventions (temperature, beta, missing, ...). Note `kd`'s
      default temperature is 4 (RepDistiller); LM recipes usually pass `temperature=1.0`.

  Returns:
    (total float32 scalar, {'ce': CE, 'kd': KD} float32 scalars under stop_gradient).
  """
  mask = bool_mask(mask)
  batch, seq_len, width = student.hidden.shape
  if student.unembed.ndim != 2 or student.unembed.shape[0] != width:
    raise ValueError(
      f"student hidden width {width} does not match its unembedding {student.unembed.shape} "
      "(expected [hidden width, vocab])"
    )
  vocab = student.unembed.shape[1]
  if mask.shape != (batch, seq_len):
    raise ValueError(
      f"mask shape {mask.shape} != student hidden [batch, sequence] {(batch, seq_len)}"
    )
  if targets is not None:
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if targets.shape != mask.shape:
      raise ValueError(f"targets shape {targets.shape} != mask shape {mask.shape}")
  if isinstance(teacher, LMHead):
    if teacher.hidden.shape[:2] != (batch, seq_len):
      raise ValueError(
        f"teacher hidden {teacher.hidden.shape[:2]} != student hidden {(batch, seq_len)} [batch, "
        "sequence]"
      )
    if teacher.unembed.ndim != 2 or teacher.unembed.shape[0] != teacher.hidden.shape[-1]:
      raise ValueError(
        f"teacher hidden width {teacher.hidden.shape[-1]} does not match its unembedding "
        f"{teacher.unembed.shape} (expected [hidden width, vocab])"
      )
    check_vocab_sizes(vocab, teacher.unembed.shape[1])
  elif isinstance(teacher, SparseTeacher):
    if teacher.ids.shape[:2] != (batch, seq_len):
      raise ValueError(f"sparse teacher {teacher.ids.shape} is not [batch, sequence, k]")
  elif teacher is not None:
    raise TypeError(f"teacher must be an LMHead, a SparseTeacher or None, got {type(teacher)}")
  if divergence is None:
    divergence = sparse_topk_kd if isinstance(teacher, SparseTeacher) else kd
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")

  num_tokens = jnp.asarray(
    jnp.maximum(jnp.sum(mask), 1) if num_tokens is None else num_tokens, jnp.float32
  )
  weights = jnp.asarray([ce_weight, kd_weight], jnp.float32)
  tokens = batch * seq_len
  chunk_size = min(chunk_size, tokens)
  num_chunks = math.ceil(tokens / chunk_size)

  def to_chunks(x):
    """[B, S, ...] -> [num_chunks, chunk_size, ...]; the padded tail is masked."""
    x = x.reshape(tokens, *x.shape[2:])
    x = jnp.pad(x, [(0, num_chunks * chunk_size - tokens)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(num_chunks, chunk_size, *x.shape[1:])

  # Everything that is an array enters the custom VJP as an argument; the rest is static.
  static_kwargs, array_kwargs = _split_static(divergence_kwargs)
  caps = {"student": student.softcap}
  if isinstance(teacher, LMHead):
    caps["teacher"] = teacher.softcap
  static_caps, array_caps = _split_static(caps)
  chunks = {"mask": to_chunks(mask)}
  if targets is not None:
    chunks["targets"] = to_chunks(targets)
  if isinstance(teacher, LMHead):
    chunks["teacher_hidden"] = to_chunks(teacher.hidden)
  elif isinstance(teacher, SparseTeacher):
    chunks["teacher"] = SparseTeacher(*map(to_chunks, teacher))
  constants = {
    "chunks": chunks,
    "kwargs": array_kwargs,
    "caps": array_caps,
    "teacher_unembed": teacher.unembed if isinstance(teacher, LMHead) else None,
  }

  def chunk_sums(student_logits, chunk, constants):
    """(Σ CE, Σ KD) over one chunk's scored tokens, from its [chunk_size, V] float32 student logits."""
    cap = {**static_caps, **constants["caps"]}
    logits = soft_cap(student_logits, cap["student"])
    chunk_mask = chunk["mask"]
    ce_sum = kd_sum = jnp.float32(0.0)
    if targets is not None:
      ce_sum = jnp.sum(per_token_cross_entropy(logits, chunk["targets"], chunk_mask))
    if teacher is not None:
      if isinstance(teacher, LMHead):
        teacher_logits = jnp.einsum(
          "cd,dv->cv",
          chunk["teacher_hidden"],
          constants["teacher_unembed"],
          preferred_element_type=jnp.float32,
        )
        chunk_teacher = jax.lax.stop_gradient(soft_cap(teacher_logits, cap["teacher"]))
      else:
        chunk_teacher = chunk["teacher"]
      per_token = per_token_divergence(
        divergence,
        logits,
        chunk_teacher,
        chunk_mask,
        **static_kwargs,
        **constants["kwargs"],
      )
      kd_sum = jnp.sum(per_token)
    return ce_sum, kd_sum

  def student_chunk_logits(hidden_chunk, unembed):
    # float32 accumulation even for bfloat16 hidden states and weights.
    return jnp.einsum("cd,dv->cv", hidden_chunk, unembed, preferred_element_type=jnp.float32)

  def forward(hidden_chunks, unembed, constants):
    """(Σ CE, Σ KD) over all chunks, no gradient."""

    def body(sums, xs):
      hidden_chunk, chunk = xs
      ce_sum, kd_sum = chunk_sums(student_chunk_logits(hidden_chunk, unembed), chunk, constants)
      return (sums[0] + ce_sum, sums[1] + kd_sum), None

    zero = jnp.float32(0.0)
    (ce_sum, kd_sum), _ = jax.lax.scan(body, (zero, zero), (hidden_chunks, constants["chunks"]))
    return ce_sum, kd_sum

  def forward_with_gradient(hidden_chunks, unembed, weights, num_tokens, constants):
    """The sums and the gradient of the weighted total w.r.t. every hidden chunk and the unembedding."""
    scales = weights / num_tokens

    def body(carry, xs):
      sums, unembed_grad = carry
      hidden_chunk, chunk = xs

      def weighted(student_logits):
        ce_sum, kd_sum = chunk_sums(student_logits, chunk, constants)
        return scales[0] * ce_sum + scales[1] * kd_sum, (ce_sum, kd_sum)

      _, pullback, (ce_sum, kd_sum) = jax.vjp(
        weighted, student_chunk_logits(hidden_chunk, unembed), has_aux=True
      )
      (logits_grad,) = pullback(jnp.float32(1.0))
      hidden_grad = jnp.einsum(
        "cv,dv->cd", logits_grad, unembed, preferred_element_type=jnp.float32
      )
      unembed_grad = unembed_grad + jnp.einsum(
        "cd,cv->dv", hidden_chunk, logits_grad, preferred_element_type=jnp.float32
      )
      return ((sums[0] + ce_sum, sums[1] + kd_sum), unembed_grad), hidden_grad

    zero = jnp.float32(0.0)
    init = ((zero, zero), jnp.zeros(unembed.shape, jnp.float32))
    ((ce_sum, kd_sum), unembed_grad), hidden_grads = jax.lax.scan(
      body, init, (hidden_chunks, constants["chunks"])
    )
    return (ce_sum, kd_sum), hidden_grads, unembed_grad

  def totals(sums, weights, num_tokens):
    ce, kd_value = sums[0] / num_tokens, sums[1] / num_tokens
    return weights[0] * ce + weights[1] * kd_value, ce, kd_value

  @jax.custom_vjp
  def loss(hidden_chunks, unembed, weights, num_tokens, constants):
    return totals(forward(hidden_chunks, unembed, constants), weights, num_tokens)

  def loss_fwd(hidden_chunks, unembed, weights, num_tokens, constants):
    sums, hidden_grads, unembed_grad = forward_with_gradient(
      hidden_chunks, unembed, weights, num_tokens, constants
    )
    total, ce, kd_value = totals(sums, weights, num_tokens)
    residuals = (hidden_grads, unembed_grad, jnp.stack([ce, kd_value]), total, num_tokens)
    return (total, ce, kd_value), residuals

  def loss_bwd(residuals, cotangents):
    # The per-term outputs are under stop_gradient (below): only the total's cotangent is nonzero.
    hidden_grads, unembed_grad, values, total, num_tokens = residuals
    total_cotangent = cotangents[0]
    return (
      (total_cotangent * hidden_grads).astype(student.hidden.dtype),
      (total_cotangent * unembed_grad).astype(student.unembed.dtype),
      total_cotangent * values,
      -total_cotangent * total / num_tokens,
      None,
    )

  loss.defvjp(loss_fwd, loss_bwd)
  # Unscored tokens' hidden states are zeroed: garbage there (NaN padding) reaches neither the
  # value nor the unembedding's gradient (0 · NaN in hᵀ·dlogits would).
  hidden = jnp.where(mask[..., None], student.hidden, 0)
  total, ce, kd_value = loss(to_chunks(hidden), student.unembed, weights, num_tokens, constants)
  return total, jax.lax.stop_gradient({"ce": ce, "kd": kd_value})


def chunked_kd(
  student_hidden: jax.Array,
  student_unembed: jax.Array,
  teacher_hidden: jax.Array,
  teacher_unembed: jax.Array,
  mask: jax.Array,
  *,
  divergence: Divergence = kd,
  chunk_size: int = 256,
  num_tokens: jax.Array | float | None = None,
  **divergence_kwargs,
) -> jax.Array:
  """`sequence_loss(divergence, h_s @ W_s, h_t @ W_t, mask, ...)` without building [B, S, V]: the KD
  term alone of `chunked_lm_loss` (teacher frozen)."""
  total, _ = chunked_lm_loss(
    LMHead(student_hidden, student_unembed),
    mask,
    teacher=LMHead(teacher_hidden, teacher_unembed),
    ce_weight=0.0,
    kd_weight=1.0,
    divergence=divergence,
    chunk_size=chunk_size,
    num_tokens=num_tokens,
    **divergence_kwargs,
  )
  return total
