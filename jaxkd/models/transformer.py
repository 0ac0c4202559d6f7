"""Decoder-only transformer language model: one implementation, configured per family.

`DecoderConfig` (a frozen dataclass) describes the architecture; `TransformerLM(config, ...)` is
the model. Its options cover the layouts of the Hugging Face causal LMs that KD teachers and
students come from, so that their checkpoints load path by path (`jaxkd.models.hf`):

  * LLaMA (Touvron et al. 2023), the default: pre-norm RMSNorm, rotary position embeddings
    (RoPE, Su et al. 2021) in Hugging Face's rotate-half pairing (dimension i with
    i + head_dim/2), SwiGLU MLP (Shazeer 2020), no biases, optional grouped-query attention
    (GQA, Ainslie et al. 2023) and tied embeddings. RoPE scaling: linear (Chen et al. 2023,
    position interpolation), `llama3` (Llama 3.1) and `yarn` (Peng et al. 2023).
  * Qwen2: biases on q, k, v. Qwen3: per-head RMSNorm of q and k (`qk_norm`), head_dim free.
  * Gemma (Gemma Team 2024): embeddings × sqrt(width) in the compute dtype, RMSNorm scaled by
    (1 + w) (`norm_scale_offset=1`), GeGLU with tanh-approximated GELU, free head_dim.
    Gemma 2: norms before and after attention and MLP (`sandwich_norm`), attention-logit and
    final-logit soft-capping c·tanh(x/c), query scale query_pre_attn_scalar^-1/2, sliding-window
    attention on alternating layers (`layer_types`, `sliding_window`). Gemma 3: q/k norm, its
    sliding-window pattern, a separate RoPE base on local layers (`local_rope_theta`) and RoPE
    scaling on global layers only.
  * GPT-2 (Radford et al. 2019): learned absolute positions (`positions='learned'`), LayerNorm
    with bias (`norm_type='layer'`), non-gated GELU MLP, biases everywhere, tied embeddings.

Submodule names follow Hugging Face's `LlamaForCausalLM` without its `model.` prefix
(`embed_tokens`, `layers.{i}.self_attn.q_proj`, `layers.{i}.mlp.gate_proj`, `norm`, `lm_head`),
plus `q_norm`/`k_norm`, `pre_feedforward_layernorm`/`post_feedforward_layernorm` (Gemma 2/3) and
`embed_positions` (GPT-2's `wpe`). In the sandwich layout `post_attention_layernorm` normalises
the attention output (Gemma 2's meaning); otherwise it is the pre-MLP norm (LLaMA's meaning).

Call (the jaxkd language-model protocol):

  logits, features = model(tokens [B, S], train=False, return_features=False, positions=None,
                           segment_ids=None, token_mask=None, cache=None, return_hidden=False)

`segment_ids` [B, S] (1-based document number, 0 = padding) restricts attention to the query's
own document (block-diagonal causal attention for packed rows); `token_mask` marks real tokens.
With `cache=...` the call also returns the updated cache. Features are the residual stream:
`embed`, `layer1`..`layerL`, `final` (after the last norm). `return_hidden=True` returns the
final hidden state instead of the logits; `logits = softcap(hidden @ model.unembedding(),
model.final_logit_softcap)`.

Vocabulary size: `create('lm_tiny', num_classes=V)` and `create('lm_tiny', vocab_size=V)` are
the same model (`num_classes` is the registry's name for the head size).
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxkd.models import layers
from jaxkd.models.registry import register

# GPT-2 / LLaMA initialisation: every weight matrix and the embedding ~ N(0, 0.02).
_INIT = nnx.initializers.normal(stddev=0.02)
# Logit of a masked (query, key) pair: finite, so that a row without any valid key (a padding
# query) gives a uniform softmax instead of NaN. jax.nn.dot_product_attention uses the same.
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
ROPE_TYPES = ("linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, as Hugging Face's `rope_parameters` (`modeling_rope_utils.py`).

  rope_type 'linear': every frequency / factor. 'llama3': low frequencies (wavelength above
  original_max_position_embeddings / low_freq_factor) / factor, high ones (below ... /
  high_freq_factor) kept, a smooth interpolation between. 'yarn' (Peng et al. 2023): per-dimension
  blend of interpolated and original frequencies over the correction range set by beta_fast and
  beta_slow, and cos/sin multiplied by attention_factor (default 0.1·ln(factor) + 1, or the
  mscale / mscale_all_dim ratio).
  """

  rope_type: str
  factor: float
  original_max_position_embeddings: int | None = None
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  beta_fast: float | None = None  # None: 32
  beta_slow: float | None = None  # None: 1
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool | None = None  # None: True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r} is not one of {ROPE_TYPES}")
    needed = {"llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}
    needed["yarn"] = ("original_max_position_embeddings",)
    for field in needed.get(self.rope_type, ()):
      if getattr(self, field) is None:
        raise ValueError(f"rope_type={self.rope_type!r} needs {field}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The architecture of a `TransformerLM`; the defaults are the LLaMA layout.

  Unset sizes are resolved on construction: num_kv_heads = num_heads, head_dim =
  width // num_heads, mlp_dim = `default_mlp_dim(width)`. `layer_types[i]` is
  'full_attention' or 'sliding_attention' (a query attends to keys at most sliding_window - 1
  slots before it); None means all full. Sliding layers use `local_rope_theta` without scaling
  when it is set, else the global RoPE. `mlp_activation` is one of `ACTIVATIONS`; the attention
  scale is query_pre_attn_scalar^-1/2 (default head_dim). `max_positions` is the size of the
  learned position table; with RoPE it only records the trained context length (Hugging Face's
  max_position_embeddings), and positions are not bounded.
  """

  vocab_size: int
  num_layers: int
  width: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  mlp_activation: str = "silu"
  gated_mlp: bool = True
  norm_type: str = "rms"  # 'rms' or 'layer'
  norm_eps: float = 1e-6
  norm_scale_offset: float = 0.0  # 1.0: Gemma's x · (1 + w)
  sandwich_norm: bool = False
  qk_norm: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  embed_scale: bool = False
  positions: str = "rope"  # 'rope' or 'learned'
  max_positions: int | None = None
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  local_rope_theta: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  tie_embeddings: bool = False

  def __post_init__(self):
    def resolve(field, value):
      object.__setattr__(self, field, value)

    if isinstance(self.rope_scaling, dict):
      resolve("rope_scaling", RopeScaling(**self.rope_scaling))
    if self.layer_types is not None:
      resolve("layer_types", tuple(self.layer_types))
    resolve("num_kv_heads", self.num_kv_heads or self.num_heads)
    if self.head_dim is None:
      if self.width % self.num_heads:
        raise ValueError(
          f"width={self.width} is not a multiple of num_heads={self.num_heads}; set head_dim"
        )
      resolve("head_dim", self.width // self.num_heads)
    resolve("mlp_dim", self.mlp_dim or default_mlp_dim(self.width))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    choices = {
      "mlp_activation": tuple(ACTIVATIONS),
      "norm_type": ("rms", "layer"),
      "positions": ("rope", "learned"),
    }
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f"{field}={getattr(self, field)!r} is not one of {allowed}")
    if self.positions == "learned" and not self.max_positions:
      raise ValueError("positions='learned' needs max_positions (the position table size)")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(
          f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}"
        )
      unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
      if unknown:
        raise ValueError(
          f"layer_types holds {sorted(unknown)}; use {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}"
        )
      if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is unset")

  def layer_type(self, index: int) -> str:
    return FULL_ATTENTION if self.layer_types is None else self.layer_types[index]

  def layer_rope(self, layer_type: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of the layers of type `layer_type`."""
    if layer_type == SLIDING_ATTENTION and self.local_rope_theta is not None:
      return self.local_rope_theta, None
    return self.rope_theta, self.rope_scaling

  def create_kwargs(self) -> dict[str, Any]:
    """JSON-serialisable keyword arguments of `create('transformer_lm', ...)` for this config."""
    kwargs = dataclasses.asdict(self)
    if self.layer_types is not None:
      kwargs["layer_types"] = list(self.layer_types)
    return kwargs


@struct.dataclass
class KVCache:
  """Keys and values of every layer at `max_length` slots, written left to right.

  keys, values: [num_layers, B, max_length, num_kv_heads, head_dim] in the compute dtype.
  segment_ids: [B, max_length] int32, the document of the token in each slot (0: padding or an
    empty slot, never attended to).
  end: int32 scalar, the next free slot.
  """

  keys: jax.Array
  values: jax.Array
  segment_ids: jax.Array
  end: jax.Array


def default_mlp_dim(width: int) -> int:
  """LLaMA's SwiGLU width: 2/3 of 4*width (same parameters as a 4x GELU MLP), rounded up to 64."""
  return 64 * math.ceil(8 * width / 3 / 64)


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
  """cap · tanh(logits / cap) (Gemma 2's soft-capping); the identity when cap is None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


@functools.lru_cache(maxsize=None)
def rope_frequencies(
  head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[np.ndarray, float]:
  """(inverse frequencies [head_dim/2] float32, cos/sin multiplier) of a RoPE variant.

  theta^(-2i/head_dim), then the scaling of Hugging Face's `ROPE_INIT_FUNCTIONS` (see
  `RopeScaling`). Computed in float64 on the host, rounded once to float32.
  """
  inverse = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inverse.astype(np.float32), 1.0
  factor = scaling.factor
  if scaling.rope_type == "linear":
    return (inverse / factor).astype(np.float32), 1.0
  original_length = scaling.original_max_position_embeddings
  if scaling.rope_type == "llama3":
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inverse
    scaled = np.where(wavelength > original_length / low, inverse / factor, inverse)
    smooth = (original_length / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original_length / high) & (wavelength <= original_length / low)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0

  # YaRN: dimension d rotates original_length / (2π theta^(2d/D)) times over the original context.
  def mscale(scale, multiplier=1.0):
    return 1.0 if scale <= 1 else 0.1 * multiplier * math.log(scale) + 1.0

  attention_factor = scaling.attention_factor
  if attention_factor is None:
    if scaling.mscale and scaling.mscale_all_dim:
      attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
    else:
      attention_factor = mscale(factor)

  def correction_dim(rotations):
    return head_dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(scaling.beta_fast or 32.0), correction_dim(scaling.beta_slow or 1.0)
  if scaling.truncate is not False:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # as Hugging Face: avoids a division by zero
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  blended = inverse / factor * ramp + inverse * (1 - ramp)
  return blended.astype(np.float32), float(attention_factor)


def rope_cos_sin(
  positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None
) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, S, head_dim/2] float32 of the rotation angles at integer `positions`."""
  inverse, multiplier = rope_frequencies(head_dim, theta, scaling)
  angles = positions.astype(jnp.float32)[..., None] * inverse
  return jnp.cos(angles) * multiplier, jnp.sin(angles) * multiplier


def apply_rope(inputs: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pair (x_i, x_{i+D/2}) of `inputs` [B, S, H, D] by the angles of cos/sin [B, S, D/2].

  The rotate-half convention of Hugging Face. Computed in float32.
  """
  cos, sin = cos[:, :, None], sin[:, :, None]
  first, second = jnp.split(inputs.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(inputs.dtype)


def _dense(in_features, out_features, *, use_bias=False, dtype, param_dtype, rngs):
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    kernel_init=_INIT,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class Norm(nnx.Module):
  """RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016) over the last axis.

  RMS: x / sqrt(mean(x²) + eps) · (offset + scale); layer: (x - mean) / sqrt(var + eps) · scale
  + bias. Statistics and the product in float32, then cast to the compute dtype (Gemma's order;
  LLaMA's RMSNorm casts before the product, the same in float32). `scale` starts at 1 - offset,
  so every norm starts as the identity map's normalisation.
  """

  def __init__(self, width: int, config: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    del rngs  # deterministic initialisation
    self.layer_norm = config.norm_type == "layer"
    self.eps, self.offset, self.dtype = config.norm_eps, config.norm_scale_offset, dtype
    self.scale = nnx.Param(jnp.full((width,), 1.0 - self.offset, param_dtype))
    self.bias = nnx.Param(jnp.zeros((width,), param_dtype)) if self.layer_norm else None

  def __call__(self, inputs):
    x = inputs.astype(jnp.float32)
    if self.layer_norm:
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    x = x * (self.offset + self.scale[...].astype(jnp.float32))
    if self.bias is not None:
      x = x + self.bias[...].astype(jnp.float32)
    return x.astype(self.dtype)


def attention(query, key, value, mask, *, scale: float, logit_softcap: float | None = None):
  """Softmax attention with grouped heads.

  query [B, S, H, D], key/value [B, T, K, D] with H a multiple of K (query head h reads key head
  h // (H/K), Hugging Face's `repeat_kv`), mask [B, S, T] bool. Logits q·k·scale, soft-capped,
  and the softmax in float32; the weights are cast to the value dtype, as
  jax.nn.dot_product_attention's XLA path does. Returns [B, S, H·D].
  """
  batch, length, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  query = query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("bskgd,btkd->bkgst", query, key, preferred_element_type=jnp.float32)
  logits = softcap(logits * scale, logit_softcap)
  logits = jnp.where(mask[:, None, None], logits, _MASKED_LOGIT)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  attended = jnp.einsum("bkgst,btkd->bskgd", weights, value)
  return attended.reshape(batch, length, num_heads * head_dim)


class SelfAttention(nnx.Module):
  """Causal multi-head attention with RoPE (unless learned positions), GQA and q/k norms."""

  def __init__(self, config: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
    self.head_dim = config.head_dim
    self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
    self.logit_softcap = config.attn_logit_softcap
    width = config.width
    q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q_proj = _dense(width, q_width, use_bias=config.qkv_bias, **kw)
    self.k_proj = _dense(width, kv_width, use_bias=config.qkv_bias, **kw)
    self.v_proj = _dense(width, kv_width, use_bias=config.qkv_bias, **kw)
    self.o_proj = _dense(q_width, width, use_bias=config.out_bias, **kw)
    self.q_norm = Norm(self.head_dim, config, **kw) if config.qk_norm else None
    self.k_norm = Norm(self.head_dim, config, **kw) if config.qk_norm else None

  def __call__(self, hidden, rotary, mask, cached_kv=None, cache_end=None):
    """hidden [B, S, D], rotary (cos, sin) or None, mask [B, S, T] bool.

    Without a cache T = S. With `cached_kv = (keys, values)` [B, T, K, Dh], this call's keys and
    values are written at slots cache_end..cache_end+S-1 and the updated pair is returned.
    """
    batch, length, _ = hidden.shape
    query = self.q_proj(hidden).reshape(batch, length, self.num_heads, self.head_dim)
    key = self.k_proj(hidden).reshape(batch, length, self.num_kv_heads, self.head_dim)
    value = self.v_proj(hidden).reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      query, key = self.q_norm(query), self.k_norm(key)
    if rotary is not None:
      query, key = apply_rope(query, *rotary), apply_rope(key, *rotary)
    if cached_kv is not None:
      slot = (0, cache_end, 0, 0)
      key = jax.lax.dynamic_update_slice(cached_kv[0], key.astype(cached_kv[0].dtype), slot)
      value = jax.lax.dynamic_update_slice(cached_kv[1], value.astype(cached_kv[1].dtype), slot)
    attended = attention(
      query,
      key.astype(query.dtype),
      value.astype(query.dtype),
      mask,
      scale=self.scale,
      logit_softcap=self.logit_softcap,
    )
    return self.o_proj(attended), (key, value)


class MLP(nnx.Module):
  """down_proj(act(gate_proj(x)) · up_proj(x)) when gated (SwiGLU, GeGLU), else
  down_proj(act(up_proj(x))) (GPT-2's c_fc / c_proj)."""

  def __init__(self, config: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width, hidden = config.width, config.mlp_dim
    self.gate_proj = _dense(width, hidden, **kw) if config.gated_mlp else None
    self.up_proj = _dense(width, hidden, **kw)
    self.down_proj = _dense(hidden, width, **kw)
    self.activation = config.mlp_activation

  def __call__(self, hidden):
    activation = ACTIVATIONS[self.activation]
    if self.gate_proj is None:
      return self.down_proj(activation(self.up_proj(hidden)))
    return self.down_proj(activation(self.gate_proj(hidden)) * self.up_proj(hidden))


class DecoderLayer(nnx.Module):
  """Pre-norm: h + attn(norm(h)), then h + mlp(norm(h)). Sandwich (Gemma 2/3):
  h + post_norm(attn(norm(h))), then h + post_norm(mlp(pre_norm(h)))."""

  def __init__(self, config: DecoderConfig, index: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_type = config.layer_type(index)
    self.input_layernorm = Norm(config.width, config, **kw)
    self.self_attn = SelfAttention(config, **kw)
    self.post_attention_layernorm = Norm(config.width, config, **kw)
    sandwich = config.sandwich_norm
    self.pre_feedforward_layernorm = Norm(config.width, config, **kw) if sandwich else None
    self.post_feedforward_layernorm = Norm(config.width, config, **kw) if sandwich else None
    self.mlp = MLP(config, **kw)

  def __call__(self, hidden, rotary, mask, cached_kv=None, cache_end=None):
    attended, kv = self.self_attn(self.input_layernorm(hidden), rotary, mask, cached_kv, cache_end)
    if self.post_feedforward_layernorm is None:
      hidden = hidden + attended
      return hidden + self.mlp(self.post_attention_layernorm(hidden)), kv
    hidden = hidden + self.post_attention_layernorm(attended)
    mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden))
    return hidden + self.post_feedforward_layernorm(mlp_out), kv


class TransformerLM(nnx.Module):
  """Causal LM over token ids; see the module docstring for layouts, features and cache."""

  def __init__(
    self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.vocab_size = config.vocab_size
    self.dtype = dtype
    self.final_logit_softcap = config.final_logit_softcap
    self.embed_tokens = nnx.Embed(config.vocab_size, config.width, embedding_init=_INIT, **kw)
    self.embed_positions = (
      nnx.Embed(config.max_positions, config.width, embedding_init=_INIT, **kw)
      if config.positions == "learned"
      else None
    )
    self.layers = nnx.List([DecoderLayer(config, i, **kw) for i in range(config.num_layers)])
    self.norm = Norm(config.width, config, **kw)
    self.lm_head = None if config.tie_embeddings else _dense(config.width, config.vocab_size, **kw)

  def init_cache(self, batch_size: int, max_length: int) -> KVCache:
    """An empty cache for `max_length` tokens (prompt + generation) per sequence."""
    config = self.config
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return KVCache(
      keys=jnp.zeros(shape, self.dtype),
      values=jnp.zeros(shape, self.dtype),
      segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
      end=jnp.zeros((), jnp.int32),
    )

  def unembedding(self) -> jax.Array:
    """The [D, V] output projection: `lm_head`'s kernel, or the transposed embedding if tied."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

  def _attention_masks(self, query_segments, key_segments, query_slots, key_slots):
    """{layer type: [B, S, T] bool}: same non-zero segment, key not later, inside the window."""
    same_document = (query_segments[:, :, None] == key_segments[:, None, :]) & (
      key_segments[:, None, :] != 0
    )
    distance = query_slots[:, None] - key_slots[None, :]
    masks = {FULL_ATTENTION: same_document & (distance >= 0)[None]}
    if self.config.sliding_window:
      in_window = (distance >= 0) & (distance < self.config.sliding_window)
      masks[SLIDING_ATTENTION] = same_document & in_window[None]
    return masks

  def __call__(
    self,
    tokens,
    train: bool = False,
    return_features: bool = False,
    positions=None,
    segment_ids=None,
    token_mask=None,
    cache: KVCache | None = None,
    return_hidden: bool = False,
  ):
    """tokens [B, S] int → logits [B, S, V] float32 (and the updated cache when `cache` is given).

    positions: [B, S] positions inside each document (RoPE angles or learned-table rows); default
      `cache.end + arange(S)` (0..S-1 without cache). Left-padded batches pass
      `cumsum(token_mask) - 1` so each sequence starts at position 0.
    segment_ids: [B, S] int, document of each token (1-based, 0 = padding); a query attends only
      to keys of its own document. Default: one document per row. With a cache, the cached
      slots keep the segments they were written with; pass segment_ids on every call when
      continuing packed rows.
    token_mask: [B, S] bool, False on padding tokens (segment 0). Default all True.
    return_hidden: return the final hidden state [B, S, D] (compute dtype) instead of logits.
    """
    del train  # no dropout
    batch, length = tokens.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache.end
    query_slots = start + jnp.arange(length)
    if positions is None:
      positions = jnp.broadcast_to(query_slots, (batch, length))
    query_segments = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
    if token_mask is not None:
      query_segments = jnp.where(token_mask, query_segments, 0)
    query_segments = query_segments.astype(jnp.int32)
    if cache is None:
      key_segments, key_slots = query_segments, query_slots
    else:
      key_segments = jax.lax.dynamic_update_slice(cache.segment_ids, query_segments, (0, start))
      key_slots = jnp.arange(cache.segment_ids.shape[1])
    masks = self._attention_masks(query_segments, key_segments, query_slots, key_slots)
    rotary = {}
    if self.embed_positions is None:
      for layer_type in {layer.layer_type for layer in self.layers}:
        theta, scaling = self.config.layer_rope(layer_type)
        rotary[layer_type] = rope_cos_sin(positions, self.config.head_dim, theta, scaling)

    collect = layers.FeatureCollector(return_features)
    hidden = self.embed_tokens(tokens)
    if self.config.embed_scale:
      hidden = hidden * jnp.asarray(math.sqrt(self.config.width), hidden.dtype)
    if self.embed_positions is not None:
      hidden = hidden + self.embed_positions(positions)
    collect("embed", hidden)
    new_keys, new_values = [], []
    for index, layer in enumerate(self.layers):
      cached_kv = None if cache is None else (cache.keys[index], cache.values[index])
      hidden, (keys, values) = layer(
        hidden, rotary.get(layer.layer_type), masks[layer.layer_type], cached_kv, start
      )
      new_keys.append(keys)
      new_values.append(values)
      collect(f"layer{index + 1}", hidden)
    hidden = self.norm(hidden)
    collect("final", hidden)
    if return_hidden:
      output = hidden
    else:
      logits = jnp.dot(
        hidden, self.unembedding().astype(hidden.dtype), preferred_element_type=jnp.float32
      )
      output = softcap(logits.astype(jnp.float32), self.final_logit_softcap)
    if cache is None:
      return output, collect.features
    cache = KVCache(
      keys=jnp.stack(new_keys),
      values=jnp.stack(new_values),
      segment_ids=key_segments,
      end=start + length,
    )
    return output, collect.features, cache

  @staticmethod
  def adapt_torch_state_dict(state_dict: dict) -> dict:
    """Hugging Face `LlamaForCausalLM` keys → this model's: drops the `model.` prefix.

    Hook of `jaxkd.models.load_torch_state_dict`. A tied checkpoint has no `lm_head.weight`
    (safetensors stores the tied tensor once); load it with `tie_embeddings=True`. Other
    families and whole Hugging Face directories: `jaxkd.models.hf.load_pretrained`.
    """
    return {key.removeprefix("model."): value for key, value in state_dict.items()}


def keep_layers(model: TransformerLM, layer_indices: Sequence[int]) -> TransformerLM:
  """A decoder of the same family holding only the layers `layer_indices` of `model`, in order.

  Initialises a layer-dropped student from its teacher (DistilBERT, Sanh et al. 2019; Gemma and
  MiniLLM practice): `keep_layers(teacher, range(0, L, 2))` keeps every other layer,
  `keep_layers(teacher, range(k))` the first k. Layer i of the result is layer
  `layer_indices[i]` of `model`, with its weights and attention type; the embeddings, final norm
  and head are the model's. The arrays are shared, not copied: the result's weights are the
  teacher's until one of them is updated (jax arrays are immutable).
  """
  config = model.config
  layer_indices = [int(index) for index in layer_indices]
  if not layer_indices or sorted(set(layer_indices)) != layer_indices:
    raise ValueError(f"layer_indices must be increasing and non-empty, got {layer_indices}")
  if layer_indices[0] < 0 or layer_indices[-1] >= config.num_layers:
    raise ValueError(f"layer_indices {layer_indices} out of range for {config.num_layers} layers")
  layer_types = config.layer_types and tuple(config.layer_types[i] for i in layer_indices)
  student_config = dataclasses.replace(
    config, num_layers=len(layer_indices), layer_types=layer_types
  )
  param_dtype = jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype
  student = nnx.eval_shape(
    lambda: TransformerLM(
      student_config, dtype=model.dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)
    )
  )
  teacher_state = dict(nnx.to_flat_state(nnx.state(model)))
  kept = []
  for path, variable in nnx.to_flat_state(nnx.state(student)):
    source = path
    if path[0] == "layers":
      source = ("layers", layer_indices[path[1]], *path[2:])
    kept.append((path, variable.replace(teacher_state[source][...])))
  nnx.update(student, nnx.from_flat_state(kept))
  return student


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
  config = DecoderConfig(vocab_size=vocab_size, **{**preset, **overrides})
  return TransformerLM(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


@register("transformer_lm")
def transformer_lm(**kwargs) -> TransformerLM:
  """Fully configured LM: vocab_size (or num_classes) and the other `DecoderConfig` fields.

  `create('transformer_lm', **model.config.create_kwargs())` rebuilds any decoder, imported
  Hugging Face models included.
  """
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
    "vocab_size is given; other DecoderConfig fields override the preset."
  )
  return build


for _name, _preset in _PRESETS.items():
  _register_preset(_name, _preset)
