"""Distillation from hidden states without materialising [batch, sequence, vocab] logits.

With vocabularies of 32k-256k entries the logits, their log-softmax and their gradients are the memory
peak of LM distillation: each [B, S, V] float32 buffer is 0.5 GB at B=4, S=1024, V=32000. Here the
unembedding is applied per sequence chunk inside a `lax.scan`, the divergence is taken on that chunk,
and the chunk body is rematerialised (`jax.checkpoint`) so the backward pass also holds one chunk of
logits at a time; only the per-token values [B, S] leave the scan. The result is the dense
`sequence_loss(divergence, h_s @ W_s, h_t @ W_t, mask)`, value and gradient (EasyDeL's chunked
distillation and Liger's fused linear JSD follow the same idea).
"""

import math

import jax
import jax.numpy as jnp

from jaxkd.losses.logit import kd
from jaxkd.losses.sequence import Divergence
from jaxkd.losses.sequence import check_vocab_sizes
from jaxkd.losses.sequence import per_token_divergence
from jaxkd.losses.sequence import token_mean


def chunked_per_token_divergence(
  student_hidden: jax.Array,
  student_unembed: jax.Array,
  teacher_hidden: jax.Array,
  teacher_unembed: jax.Array,
  mask: jax.Array,
  *,
  divergence: Divergence = kd,
  chunk_size: int = 256,
  **divergence_kwargs,
) -> jax.Array:
  """Per-token divergence between the logits `h_s @ W_s` and `h_t @ W_t`, one sequence chunk at a time.

  Args:
    student_hidden: [B, S, Ds] final hidden states of the student (after the final norm).
    student_unembed: [Ds, V] student output projection (the transposed embedding when tied).
    teacher_hidden: [B, S, Dt] teacher hidden states.
    teacher_unembed: [Dt, V] teacher output projection.
    mask: [B, S] boolean, True where the position is scored (already shifted, see `jaxkd.losses.sequence`).
    divergence: a per-token divergence of `jaxkd.losses.logit` (`kd`, `reverse_kl`, `jsd`, `tvd`,
      `skew_kl`, ...), called with `reduction='none'` on [B, chunk, V] logits.
    chunk_size: positions per chunk; S need not be a multiple (the tail is padded and masked).
      Memory grows with B * chunk_size * V, compute is unchanged.
    **divergence_kwargs: the divergence's conventions (temperature, beta, alpha...).

  Returns:
    [B, S] float32 per-token values, 0 at masked positions.
  """
  batch, seq_len, student_width = student_hidden.shape
  teacher_width = teacher_hidden.shape[-1]
  check_vocab_sizes(student_unembed.shape[-1], teacher_unembed.shape[-1])
  if student_unembed.shape[0] != student_width or teacher_unembed.shape[0] != teacher_width:
    raise ValueError(
      f"hidden widths (student {student_width}, teacher {teacher_width}) do not match the unembedding "
      f"input widths (student {student_unembed.shape[0]}, teacher {teacher_unembed.shape[0]})"
    )
  if teacher_hidden.shape[:2] != (batch, seq_len) or mask.shape != (batch, seq_len):
    raise ValueError(
      f"student hidden {student_hidden.shape[:2]}, teacher hidden {teacher_hidden.shape[:2]} "
      f"and mask {mask.shape} must share [batch, sequence]"
    )
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")

  chunk_size = min(chunk_size, seq_len)
  num_chunks = math.ceil(seq_len / chunk_size)
  padding = num_chunks * chunk_size - seq_len

  def to_chunks(x):
    """[B, S, ...] -> [num_chunks, B, chunk_size, ...], the tail padded with zeros (masked below)."""
    x = jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)

  def chunk_divergence(student_chunk, teacher_chunk, mask_chunk):
    # float32 accumulation of the unembedding even for bfloat16 hidden states and weights.
    student_logits = jnp.einsum(
      "bcd,dv->bcv", student_chunk, student_unembed, preferred_element_type=jnp.float32
    )
    teacher_logits = jnp.einsum(
      "bcd,dv->bcv", teacher_chunk, teacher_unembed, preferred_element_type=jnp.float32
    )
    return per_token_divergence(
      divergence, student_logits, teacher_logits, mask_chunk, **divergence_kwargs
    )

  # Without rematerialisation the scan would save every chunk's logits for the backward pass, which is
  # the dense memory again; prevent_cse=False is safe (and faster) inside a scan.
  chunk_divergence = jax.checkpoint(chunk_divergence, prevent_cse=False)

  def body(carry, chunk):
    return carry, chunk_divergence(*chunk)

  chunks = (to_chunks(student_hidden), to_chunks(teacher_hidden), to_chunks(mask.astype(bool)))
  _, per_token = jax.lax.scan(body, None, chunks)
  return jnp.swapaxes(per_token, 0, 1).reshape(batch, num_chunks * chunk_size)[:, :seq_len]


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
  """Per-token mean of a divergence between student and teacher LM heads, never building [B, S, V].

  Equals `sequence_loss(divergence, student_hidden @ student_unembed, teacher_hidden @ teacher_unembed,
  mask, num_tokens=num_tokens, **divergence_kwargs)` in value and in gradient (w.r.t. the hidden states
  and the unembeddings); peak memory holds a [B, chunk_size, V] slice of logits instead of [B, S, V].
  The teacher is differentiated like any input: pass `jax.lax.stop_gradient` values (or do not take the
  gradient w.r.t. them) when the teacher is frozen.

  Args:
    student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask, divergence, chunk_size,
      **divergence_kwargs: see `chunked_per_token_divergence`.
    num_tokens: optional global token count (gradient accumulation), see `token_mean`.

  Returns:
    A float32 scalar.
  """
  per_token = chunked_per_token_divergence(
    student_hidden,
    student_unembed,
    teacher_hidden,
    teacher_unembed,
    mask,
    divergence=divergence,
    chunk_size=chunk_size,
    **divergence_kwargs,
  )
  return token_mean(per_token, mask, num_tokens=num_tokens)
