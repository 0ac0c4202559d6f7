"""Decoder-only transformer language model (LLaMA layout) with a fixed-size KV cache.

Touvron et al. 2023, "LLaMA": pre-norm RMSNorm (eps 1e-6), rotary position embeddings
(Su et al. 2021, RoFormer), SwiGLU MLP (Shazeer 2020), no biases, optional grouped-query
attention and tied input/output embeddings. Submodule names follow Hugging Face's
`LlamaForCausalLM` without its `model.` prefix (`embed_tokens`, `layers.{i}.self_attn.q_proj`,
`layers.{i}.mlp.gate_proj`, `norm`, `lm_head`), so its state dict maps path by path; RoPE uses
the same rotate-half pairing (dimension i with i + head_dim/2) as Hugging Face.

Call: `logits, features = model(tokens [B, S])`; with `cache=...` the call also returns the
updated cache: `logits, features, cache = model(tokens, cache=cache)`. Features are the
residual stream: `embed`, `layer1`..`layerL`, `final` (after the last RMSNorm).

Vocabulary size: `create('lm_tiny', num_classes=V)` and `create('lm_tiny', vocab_size=V)` are
the same model (`num_classes` is the registry's name for the head size).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxkd.models import layers
from jaxkd.models.registry import register

# GPT-2 / LLaMA initialisation: every weight matrix and the embedding ~ N(0, 0.02).
_INIT = nnx.initializers.normal(stddev=0.02)


@struct.dataclass
class KVCache:
  """Keys and values of every layer at `max_length` slots, written left to right.

  keys, values: [num_layers, B, max_length, num_kv_heads, head_dim] in the compute dtype.
  key_mask: [B, max_length] bool, True where a slot holds a real (non-padding) token.
  end: int32 scalar, the next free slot; slots >= end are never attended to.
  """

  keys: jax.Array
  values: jax.Array
  key_mask: jax.Array
  end: jax.Array


def rope(inputs: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of `inputs` [B, S, H, D] at integer `positions` [B, S].

  Pair (x_i, x_{i+D/2}) is rotated by angle position * theta^(-2i/D), i < D/2 (the
  rotate-half convention of Hugging Face LLaMA). Computed in float32.
  """
  half = inputs.shape[-1] // 2
  inverse_frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None, None] * inverse_frequencies  # [B, S, 1, D/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  first, second = jnp.split(inputs.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(inputs.dtype)


def _dense(in_features, out_features, *, dtype, param_dtype, rngs):
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=False,
    kernel_init=_INIT,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


def _rms_norm(width, *, dtype, param_dtype, rngs):
  return nnx.RMSNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class SelfAttention(nnx.Module):
  """Causal multi-head attention with RoPE on q, k and `num_kv_heads` <= `num_heads` (GQA)."""

  def __init__(
    self,
    width: int,
    num_heads: int,
    num_kv_heads: int,
    rope_theta: float,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    if width % num_heads or num_heads % num_kv_heads:
      raise ValueError(
        f"need width % num_heads == 0 and num_heads % num_kv_heads == 0; got "
        f"width={width}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
      )
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.head_dim = width // num_heads
    self.rope_theta = rope_theta
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = _dense(width, num_heads * self.head_dim, **kw)
    self.k_proj = _dense(width, num_kv_heads * self.head_dim, **kw)
    self.v_proj = _dense(width, num_kv_heads * self.head_dim, **kw)
    self.o_proj = _dense(num_heads * self.head_dim, width, **kw)

  def __call__(self, hidden, positions, attention_mask, cached_kv=None, cache_end=None):
    """hidden [B, S, D], positions [B, S], attention_mask [B, S, T] bool.

    Without a cache T = S. With `cached_kv = (keys, values)` [B, T, K, Dh], this call's keys and
    values are written at slots cache_end..cache_end+S-1 and the updated pair is returned.
    """
    batch, length, _ = hidden.shape
    query = rope(
      self.q_proj(hidden).reshape(batch, length, self.num_heads, self.head_dim),
      positions,
      self.rope_theta,
    )
    key = rope(
      self.k_proj(hidden).reshape(batch, length, self.num_kv_heads, self.head_dim),
      positions,
      self.rope_theta,
    )
    value = self.v_proj(hidden).reshape(batch, length, self.num_kv_heads, self.head_dim)
    if cached_kv is not None:
      slot = (0, cache_end, 0, 0)
      key = jax.lax.dynamic_update_slice(cached_kv[0], key.astype(cached_kv[0].dtype), slot)
      value = jax.lax.dynamic_update_slice(cached_kv[1], value.astype(cached_kv[1].dtype), slot)
    # jax's reference attention takes the softmax in float32 and sets masked logits to a large
    # finite negative number, so rows with no valid key (left padding) stay finite.
    attended = jax.nn.dot_product_attention(
      query, key.astype(query.dtype), value.astype(query.dtype), mask=attention_mask[:, None]
    )
    output = self.o_proj(attended.reshape(batch, length, -1))
    return output, (key, value)


class SwiGLU(nnx.Module):
  """down_proj(silu(gate_proj(x)) * up_proj(x))."""

  def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = _dense(width, hidden, **kw)
    self.up_proj = _dense(width, hidden, **kw)
    self.down_proj = _dense(hidden, width, **kw)

  def __call__(self, hidden):
    return self.down_proj(jax.nn.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class DecoderLayer(nnx.Module):
  """h + attn(rms(h)), then h + mlp(rms(h))."""

  def __init__(
    self, width, num_heads, num_kv_heads, mlp_dim, rope_theta, *, dtype, param_dtype, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = _rms_norm(width, **kw)
    self.self_attn = SelfAttention(width, num_heads, num_kv_heads, rope_theta, **kw)
    self.post_attention_layernorm = _rms_norm(width, **kw)
    self.mlp = SwiGLU(width, mlp_dim, **kw)

  def __call__(self, hidden, positions, attention_mask, cached_kv=None, cache_end=None):
    attended, kv = self.self_attn(
      self.input_layernorm(hidden), positions, attention_mask, cached_kv, cache_end
    )
    hidden = hidden + attended
    return hidden + self.mlp(self.post_attention_layernorm(hidden)), kv


def default_mlp_dim(width: int) -> int:
  """LLaMA's SwiGLU width: 2/3 of 4*width (same parameters as a 4x GELU MLP), rounded up to 64."""
  return 64 * math.ceil(8 * width / 3 / 64)


class TransformerLM(nnx.Module):
  """Causal LM over token ids; see the module docstring for layout, features and cache."""

  def __init__(
    self,
    *,
    vocab_size: int,
    num_layers: int,
    width: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    mlp_dim: int | None = None,
    rope_theta: float = 10_000.0,
    tie_embeddings: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vocab_size = vocab_size
    self.num_kv_heads = num_kv_heads or num_heads
    self.head_dim = width // num_heads
    self.dtype = dtype
    self.embed_tokens = nnx.Embed(vocab_size, width, embedding_init=_INIT, **kw)
    self.layers = nnx.List(
      [
        DecoderLayer(
          width, num_heads, self.num_kv_heads, mlp_dim or default_mlp_dim(width), rope_theta, **kw
        )
        for _ in range(num_layers)
      ]
    )
    self.norm = _rms_norm(width, **kw)
    self.lm_head = None if tie_embeddings else _dense(width, vocab_size, **kw)

  def init_cache(self, batch_size: int, max_length: int) -> KVCache:
    """An empty cache for `max_length` tokens (prompt + generation) per sequence."""
    shape = (len(self.layers), batch_size, max_length, self.num_kv_heads, self.head_dim)
    return KVCache(
      keys=jnp.zeros(shape, self.dtype),
      values=jnp.zeros(shape, self.dtype),
      key_mask=jnp.zeros((batch_size, max_length), bool),
      end=jnp.zeros((), jnp.int32),
    )

  def __call__(
    self,
    tokens,
    train: bool = False,
    return_features: bool = False,
    positions=None,
    cache: KVCache | None = None,
    token_mask=None,
  ):
    """tokens [B, S] int → logits [B, S, V] (and the updated cache when `cache` is given).

    positions: [B, S] RoPE positions; default `cache.end + arange(S)` (0..S-1 without cache).
      Left-padded batches pass `cumsum(token_mask) - 1` so each sequence starts at position 0.
    token_mask: [B, S] bool, False on padding tokens, which no query attends to. Default all True.
    """
    del train  # no dropout
    batch, length = tokens.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache.end
    query_slots = start + jnp.arange(length)
    if positions is None:
      positions = jnp.broadcast_to(query_slots, (batch, length))
    if token_mask is None:
      token_mask = jnp.ones((batch, length), bool)
    if cache is None:
      key_mask, key_slots = token_mask, query_slots
    else:
      key_mask = jax.lax.dynamic_update_slice(cache.key_mask, token_mask, (0, start))
      key_slots = jnp.arange(cache.key_mask.shape[1])
    attention_mask = key_mask[:, None, :] & (key_slots[None, :] <= query_slots[:, None])[None]

    collect = layers.FeatureCollector(return_features)
    hidden = self.embed_tokens(tokens)
    collect("embed", hidden)
    new_keys, new_values = [], []
    for index, layer in enumerate(self.layers):
      cached_kv = None if cache is None else (cache.keys[index], cache.values[index])
      hidden, (keys, values) = layer(hidden, positions, attention_mask, cached_kv, start)
      new_keys.append(keys)
      new_values.append(values)
      collect(f"layer{index + 1}", hidden)
    hidden = self.norm(hidden)
    collect("final", hidden)
    if self.lm_head is None:
      logits = self.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits, collect.features
    cache = KVCache(
      keys=jnp.stack(new_keys), values=jnp.stack(new_values), key_mask=key_mask, end=start + length
    )
    return logits, collect.features, cache

  @staticmethod
  def adapt_torch_state_dict(state_dict: dict) -> dict:
    """Hugging Face `LlamaForCausalLM` keys → this model's: drops the `model.` prefix.

    Hook of `jaxkd.models.load_torch_state_dict`. A tied checkpoint has no `lm_head.weight`
    (safetensors stores the tied tensor once); load it with `tie_embeddings=True`.
    """
    return {key.removeprefix("model."): value for key, value in state_dict.items()}


# Small presets for tests, quickstarts and students; vocabulary 256 (bytes) unless overridden.
_PRESETS = {
  "lm_tiny": dict(num_layers=2, width=64, num_heads=4),
  "lm_small": dict(num_layers=4, width=256, num_heads=4),
  "lm_base": dict(num_layers=8, width=512, num_heads=8),
}
_PRESET_VOCAB_SIZE = 256


def _build(
  preset: dict,
  *,
  num_classes: int | None = None,
  vocab_size: int | None = None,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  rngs: nnx.Rngs,
  **overrides,
) -> TransformerLM:
  if num_classes is not None and vocab_size is not None and num_classes != vocab_size:
    raise ValueError(
      f"num_classes={num_classes} and vocab_size={vocab_size} disagree; "
      "for a language model they are the same number, pass one"
    )
  vocab_size = num_classes or vocab_size
  if vocab_size is None:
    raise ValueError("transformer_lm needs vocab_size (or num_classes)")
  return TransformerLM(
    vocab_size=vocab_size,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
    **{**preset, **overrides},
  )


@register("transformer_lm")
def transformer_lm(**kwargs) -> TransformerLM:
  """Fully configured LM: vocab_size (or num_classes), num_layers, width, num_heads, ..."""
  return _build({}, **kwargs)


def _register_preset(name: str, preset: dict):

  @register(name)
  def build(
    *, num_classes: int | None = None, vocab_size: int | None = None, **kwargs
  ) -> TransformerLM:
    if num_classes is None and vocab_size is None:
      vocab_size = _PRESET_VOCAB_SIZE
    return _build(preset, num_classes=num_classes, vocab_size=vocab_size, **kwargs)

  build.__name__ = build.__qualname__ = name
  build.__doc__ = (
    f"TransformerLM {preset}; vocabulary {_PRESET_VOCAB_SIZE} unless num_classes / "
    "vocab_size is given; other TransformerLM arguments override the preset."
  )
  return build


for _name, _preset in _PRESETS.items():
  _register_preset(_name, _preset)
