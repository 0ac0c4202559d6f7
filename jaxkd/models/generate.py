"""Sampling from a `TransformerLM` with a fixed-size KV cache: one prefill, then a `lax.scan`.

The whole generation is one compiled program per (model structure, batch, prompt length,
`max_new_tokens`, `top_k`, `greedy`, `return_logits`, whether `top_p` is None); the values of
`temperature` and `top_p` are traced, so sweeping them does not recompile. On-policy distillation
(GKD, MiniLLM) and sequence-level KD call this for student and teacher samples
(`jaxkd.sampling`).

Prompts are a [B, P] block. Equal-length prompts need no mask; ragged prompts are LEFT-padded
with `prompt_mask` False on the padding, so that every sequence's last prompt token sits in
slot P-1 and generation proceeds in lock step. Positions (RoPE angles or learned-table rows)
count real tokens only, so a left-padded prompt generates exactly what it would alone, as
Hugging Face's `generate` does. The cache keeps every slot; sliding-window layers mask the keys
outside their window.

`speculative_generate` samples with two models, as speculative KD does (Xu et al. 2024): the
student proposes blocks of tokens with its cache, the teacher verifies each block in one cached
forward and replaces the proposals outside its top-k by its own samples.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.models.transformer import TransformerLM


class Generation(NamedTuple):
  """tokens: [B, N] sampled ids. logits: [B, N, V] float32 raw model logits that token i was
  sampled from (before temperature and filtering), or None unless `return_logits=True`."""

  tokens: jax.Array
  logits: jax.Array | None


def filter_logits(
  logits: jax.Array, *, temperature=1.0, top_k: int | None = None, top_p=None
) -> jax.Array:
  """Logits / temperature with everything outside the top-k and the top-p nucleus set to -inf.

  Order as in Hugging Face's samplers: temperature, then top-k, then top-p. The nucleus
  (Holtzman et al. 2020) is the smallest set of most likely tokens whose probability sums to
  >= top_p: a token is kept when the mass of the strictly more likely tokens is < top_p, so the
  most likely token is always kept. Ties at a threshold are kept. Computed in float32.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
  if top_p is not None:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    smallest_kept = jnp.min(
      jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True
    )
    logits = jnp.where(logits >= smallest_kept, logits, -jnp.inf)
  return logits


def sample_logits(
  logits: jax.Array,
  rng: jax.Array,
  *,
  temperature=1.0,
  top_k: int | None = None,
  top_p=None,
  greedy: bool = False,
) -> jax.Array:
  """One token id per row of `logits` [..., V]: argmax if `greedy`, else a filtered sample."""
  if greedy:
    return jnp.argmax(logits, axis=-1)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, filtered, axis=-1)


def generate(
  model: TransformerLM,
  prompt_tokens: jax.Array,
  max_new_tokens: int,
  *,
  rng: jax.Array,
  temperature=1.0,
  top_k: int | None = None,
  top_p=None,
  greedy: bool = False,
  prompt_mask: jax.Array | None = None,
  return_logits: bool = False,
) -> Generation:
  """Samples `max_new_tokens` continuations of `prompt_tokens` [B, P] (left-padded if ragged).

  The cache holds P + max_new_tokens slots. Token i is drawn from the logits at slot P-1+i,
  which equal the full-sequence forward's logits of prompt + tokens[:i] at that position.
  """
  graphdef, state = nnx.split(model)
  if prompt_mask is None:
    prompt_mask = np.ones(prompt_tokens.shape, bool)  # numpy: no eager device op to compile
  return _generate(
    graphdef,
    state,
    prompt_tokens,
    prompt_mask,
    rng,
    temperature,
    top_p,
    max_new_tokens=max_new_tokens,
    top_k=top_k,
    greedy=greedy,
    return_logits=return_logits,
  )


@functools.partial(
  jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "top_k", "greedy", "return_logits")
)
def _generate(
  graphdef,
  state,
  prompt_tokens,
  prompt_mask,
  rng,
  temperature,
  top_p,
  *,
  max_new_tokens,
  top_k,
  greedy,
  return_logits,
):
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  model = nnx.merge(graphdef, state)
  prompt_mask = prompt_mask.astype(bool)
  batch, prompt_length = prompt_tokens.shape
  sample = functools.partial(
    sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
  )
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  cache = model.init_cache(batch, prompt_length + max_new_tokens)
  logits, _, cache = model(prompt_tokens, positions=positions, cache=cache, token_mask=prompt_mask)
  rngs = jax.random.split(rng, max_new_tokens)

  def decode_step(carry, step_rng):
    cache, logits, position = carry
    token = sample(logits, step_rng)
    next_logits, _, cache = model(token[:, None], positions=position[:, None], cache=cache)
    carry = (cache, next_logits[:, 0], position + 1)
    return carry, (token, logits if return_logits else None)

  # max_new_tokens - 1 cached forwards; the last token needs no forward of its own.
  carry = (cache, logits[:, -1], positions[:, -1] + 1)
  (_, last_logits, _), (tokens, step_logits) = jax.lax.scan(decode_step, carry, rngs[:-1])
  tokens = jnp.concatenate([tokens.T, sample(last_logits, rngs[-1])[:, None]], axis=1)
  if not return_logits:
    return Generation(tokens, None)
  step_logits = jnp.concatenate([jnp.moveaxis(step_logits, 0, 1), last_logits[:, None]], axis=1)
  return Generation(tokens, step_logits)


class SpeculativeGeneration(NamedTuple):
  """The output of `speculative_generate`, all [B, N].

  tokens: the generated ids.
  replaced: True where the teacher's sample replaced a proposal outside its top-k.
  judged: how many student proposals for this position the teacher judged with a valid prefix
    (the row's proposals up to and including its first rejection in a block; more than one when
    a block was cut short by another row and the position was drafted again).
  accepted: how many of those were inside the teacher's top-k.
  """

  tokens: jax.Array
  replaced: jax.Array
  judged: jax.Array
  accepted: jax.Array


def speculative_generate(
  student: TransformerLM,
  teacher: TransformerLM,
  prompt_tokens: jax.Array,
  max_new_tokens: int,
  *,
  rng: jax.Array,
  accept_top_k: int = 25,
  draft_tokens: int = 5,
  temperature=0.5,
  top_k: int | None = None,
  top_p=0.5,
  teacher_temperature=0.2,
  teacher_top_p=0.5,
  greedy: bool = False,
  teacher_greedy: bool = False,
) -> SpeculativeGeneration:
  """Speculative KD sampling (SKD, Xu et al. 2024): student proposals, teacher top-k verification.

  Token by token, SKD draws y_i from the student (`temperature`, `top_k`, `top_p`, or its argmax
  when `greedy`); if y_i is not among the `accept_top_k` most likely tokens of the teacher at
  that prefix, it is replaced by a teacher sample (`teacher_temperature`, `teacher_top_p`, or
  the argmax when `teacher_greedy`). k = 0 gives teacher samples (sequence-level KD); k = V the
  student's own (on-policy). Defaults: google-research/speculative_kd (k = 25, blocks of 5
  proposals, student T = 0.5 and top-p 0.5, teacher T = 0.2 and top-p 0.5).

  Computed in blocks, in lock step over the batch, with fixed shapes: both models keep a KV cache
  of everything but the last token. Per block the student drafts d_0..d_{D-1} (D =
  `draft_tokens`, one cached forward each) and the teacher judges them in one cached forward over
  [last, d_0..d_{D-2}]. With j_r the first rejection of row r (D if none) and m = min_r j_r, every
  row advances by min(m + 1, D): positions before m are accepted proposals in every row; at m,
  rows rejected there take the teacher's sample and the others keep their accepted d_m. Both
  caches then roll their `end` back to the new last token, which the next block feeds first.

  Each row's tokens have exactly the distribution of token-by-token SKD: the cut at m depends
  only on the outcomes at positions <= m (a stopping time of the position-by-position process),
  so the kept tokens are a prefix of an SKD trajectory, and an accepted proposal dropped past m
  is simply drafted again from the same prefix in the next block. Top-k membership counts the
  teacher logits strictly above the proposal's (ties at the boundary are accepted).

  Prompts are an equal-length [B, P] block (no padding). The caches hold P + N + D slots. One
  compiled program per (model structures, shapes, `draft_tokens`, `top_k`, the greedy flags,
  which top-p are None); k, the temperatures and the top-p values are traced.
  """
  if student.vocab_size != teacher.vocab_size:
    raise ValueError(
      f"student and teacher vocabularies differ: {student.vocab_size} vs {teacher.vocab_size}"
    )
  if max_new_tokens < 1 or draft_tokens < 1 or accept_top_k < 0:
    raise ValueError(
      f"need max_new_tokens >= 1, draft_tokens >= 1 and accept_top_k >= 0, got "
      f"{max_new_tokens}, {draft_tokens}, {accept_top_k}"
    )
  student_graphdef, student_state = nnx.split(student)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  return _speculative_generate(
    student_graphdef,
    teacher_graphdef,
    student_state,
    teacher_state,
    prompt_tokens,
    rng,
    accept_top_k,
    temperature,
    top_p,
    teacher_temperature,
    teacher_top_p,
    max_new_tokens=max_new_tokens,
    draft_tokens=draft_tokens,
    top_k=top_k,
    greedy=greedy,
    teacher_greedy=teacher_greedy,
  )


@functools.partial(
  jax.jit,
  static_argnums=(0, 1),
  static_argnames=(
    "max_new_tokens",
    "draft_tokens",
    "top_k",
    "greedy",
    "teacher_greedy",
  ),
)
def _speculative_generate(
  student_graphdef,
  teacher_graphdef,
  student_state,
  teacher_state,
  prompt_tokens,
  rng,
  accept_top_k,
  temperature,
  top_p,
  teacher_temperature,
  teacher_top_p,
  *,
  max_new_tokens,
  draft_tokens,
  top_k,
  greedy,
  teacher_greedy,
):
  student = nnx.merge(student_graphdef, student_state)
  teacher = nnx.merge(teacher_graphdef, teacher_state)
  propose = functools.partial(
    sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
  )
  resample = functools.partial(
    sample_logits, temperature=teacher_temperature, top_p=teacher_top_p, greedy=teacher_greedy
  )
  batch, prompt_length = prompt_tokens.shape
  end_length = prompt_length + max_new_tokens
  capacity = end_length + draft_tokens  # the last block may draft past the end
  student_cache = student.init_cache(batch, capacity)
  teacher_cache = teacher.init_cache(batch, capacity)
  if prompt_length > 1:  # the caches hold everything but the last token
    student_cache = student(prompt_tokens[:, :-1], cache=student_cache)[2]
    teacher_cache = teacher(prompt_tokens[:, :-1], cache=teacher_cache)[2]
  padding = jnp.zeros((batch, capacity - prompt_length), jnp.int32)
  tokens = jnp.concatenate([prompt_tokens.astype(jnp.int32), padding], axis=1)
  counts = jnp.zeros((batch, capacity), jnp.int32)
  offsets = jnp.arange(draft_tokens)

  def draft(carry, step_rng):
    cache, token = carry
    logits, _, cache = student(token[:, None], cache=cache)
    proposal = propose(logits[:, 0], step_rng).astype(jnp.int32)
    return (cache, proposal), proposal

  def block(carry):
    tokens, replaced, judged, accepted, length, student_cache, teacher_cache, rng = carry
    rng, draft_rng, teacher_rng = jax.random.split(rng, 3)
    last = jax.lax.dynamic_index_in_dim(tokens, length - 1, axis=1, keepdims=False)
    (student_cache, _), proposals = jax.lax.scan(
      draft, (student_cache, last), jax.random.split(draft_rng, draft_tokens)
    )
    proposals = proposals.T  # [B, D]
    fed = jnp.concatenate([last[:, None], proposals[:, :-1]], axis=1)
    teacher_logits, _, teacher_cache = teacher(fed, cache=teacher_cache)  # [B, D, V]
    proposal_logits = jnp.take_along_axis(teacher_logits, proposals[..., None], axis=-1)
    in_top_k = jnp.sum(teacher_logits > proposal_logits, axis=-1) < accept_top_k
    first_rejection = jnp.where(
      jnp.all(in_top_k, axis=1), draft_tokens, jnp.argmax(~in_top_k, axis=1)
    )
    cut = jnp.min(first_rejection)
    cut_logits = jax.lax.dynamic_index_in_dim(
      teacher_logits, jnp.minimum(cut, draft_tokens - 1), axis=1, keepdims=False
    )
    teacher_sample = resample(cut_logits, teacher_rng).astype(jnp.int32)
    swap = (offsets == cut)[None, :] & (first_rejection == cut)[:, None]  # none when cut = D
    block_tokens = jnp.where(swap, teacher_sample[:, None], proposals)
    valid = offsets[None, :] <= first_rejection[:, None]  # judged with a valid prefix

    def write(buffer, values):
      return jax.lax.dynamic_update_slice_in_dim(buffer, values.astype(buffer.dtype), length, 1)

    def add(buffer, values):
      current = jax.lax.dynamic_slice_in_dim(buffer, length, draft_tokens, axis=1)
      return write(buffer, current + values)

    # Entries past the advance are overwritten by the next block, or lie past the end.
    tokens, replaced = write(tokens, block_tokens), write(replaced, swap)
    judged, accepted = add(judged, valid), add(accepted, valid & in_top_k)
    length = length + jnp.minimum(cut + 1, draft_tokens)
    student_cache = student_cache.replace(end=length - 1)
    teacher_cache = teacher_cache.replace(end=length - 1)
    return tokens, replaced, judged, accepted, length, student_cache, teacher_cache, rng

  carry = (
    tokens,
    counts.astype(bool),
    counts,
    counts,
    jnp.asarray(prompt_length, jnp.int32),
    student_cache,
    teacher_cache,
    rng,
  )
  tokens, replaced, judged, accepted, *_ = jax.lax.while_loop(
    lambda carry: carry[4] < end_length, block, carry
  )
  generated = slice(prompt_length, end_length)
  return SpeculativeGeneration(
    tokens[:, generated], replaced[:, generated], judged[:, generated], accepted[:, generated]
  )
