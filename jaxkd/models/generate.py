"""Sampling from a `TransformerLM` with a fixed-size KV cache: one prefill, then a `lax.scan`.

The whole generation is one compiled program per (model structure, batch, prompt length,
`max_new_tokens`, `top_k`, `greedy`, `return_logits`, whether `top_p` is None); the values of
`temperature` and `top_p` are traced, so sweeping them does not recompile. On-policy distillation
(GKD, MiniLLM, SKD) calls this for student samples.

Prompts are a [B, P] block. Equal-length prompts need no mask; ragged prompts are LEFT-padded
with `prompt_mask` False on the padding, so that every sequence's last prompt token sits in
slot P-1 and generation proceeds in lock step. Positions (RoPE angles or learned-table rows)
count real tokens only, so a left-padded prompt generates exactly what it would alone, as
Hugging Face's `generate` does. The cache keeps every slot; sliding-window layers mask the keys
outside their window.
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
