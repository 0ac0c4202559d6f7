"""Vision Transformers ViT-Ti/S/B with 16x16 patches, in the timm / DeiT layout.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"; Touvron et al. 2021, "Training
data-efficient image transformers & distillation through attention" (DeiT, the ViT-Ti/S sizes).

Layout of timm's `VisionTransformer` with `global_pool='token'` (the ImageNet-1k DeiT models):

    tokens = [cls_token; patch_embed.proj(x)] + pos_embed               # 'embed'
    x = x + attn(norm1(x)); x = x + mlp(norm2(x))    for each block     # 'block1'..'blockN'
    pooled = norm(x)[:, 0];  logits = head(pooled)                      # 'pooled'

Attention uses a fused `qkv` projection with bias and scale head_dim**-0.5; the MLP is
fc1 -> exact (erf) GELU -> fc2 with 4x width; LayerNorms use eps 1e-6. Submodule names equal
timm's parameter names, so a timm state dict maps onto this model path by path.
Stochastic depth and dropout are not implemented (DeiT trains with drop-path 0.1).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkd.models import layers
from jaxkd.models.registry import register

# timm's `init_weights_vit_timm`: Linear weights ~ N(0, 0.02) (truncated), biases 0.
_DENSE_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def _linear(in_features, out_features, *, dtype, param_dtype, rngs):
  return nnx.Linear(
    in_features,
    out_features,
    kernel_init=_DENSE_INIT,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


def _layer_norm(width, *, dtype, param_dtype, rngs):
  return nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class PatchEmbed(nnx.Module):
  """Non-overlapping patches → tokens: a conv with kernel = stride = patch size."""

  def __init__(self, patch_size: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.proj = nnx.Conv(
      3,
      width,
      kernel_size=(patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding="VALID",
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, images):
    patches = self.proj(images)  # [B, H/p, W/p, D]
    return patches.reshape(patches.shape[0], -1, patches.shape[-1])


class Attention(nnx.Module):
  """Multi-head self-attention, softmax(q k^T / sqrt(head_dim)) v, with timm's fused qkv."""

  def __init__(self, width: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not a multiple of num_heads {num_heads}")
    self.num_heads = num_heads
    self.qkv = _linear(width, 3 * width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = _linear(width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens):
    batch, length, width = tokens.shape
    # timm reshapes qkv output to (3, heads, head_dim): q, k, v are contiguous thirds.
    qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
    attended = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(attended.reshape(batch, length, width))


class Mlp(nnx.Module):
  """fc1 → GELU (exact erf form, torch's nn.GELU default) → fc2."""

  def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(width, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = _linear(hidden, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens):
    return self.fc2(jax.nn.gelu(self.fc1(tokens), approximate=False))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(
    self, width: int, num_heads: int, mlp_ratio: float, *, dtype, param_dtype, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _layer_norm(width, **kw)
    self.attn = Attention(width, num_heads, **kw)
    self.norm2 = _layer_norm(width, **kw)
    self.mlp = Mlp(width, int(width * mlp_ratio), **kw)

  def __call__(self, tokens):
    tokens = tokens + self.attn(self.norm1(tokens))
    return tokens + self.mlp(self.norm2(tokens))


class VisionTransformer(nnx.Module):
  """ViT classifier on NHWC images; class-token pooling (timm `global_pool='token'`).

  Features (`return_features=True`): `embed` [B, 1+N, D] (patch tokens with cls token and
  position embedding), `block1`..`blockL` [B, 1+N, D] (residual stream after each block),
  `pooled` [B, D] (cls token after the final LayerNorm, the head's input).
  """

  def __init__(
    self,
    *,
    num_classes: int = 1000,
    image_size: int = 224,
    patch_size: int = 16,
    width: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.image_size = image_size
    num_patches = (image_size // patch_size) ** 2
    self.patch_embed = PatchEmbed(patch_size, width, **kw)
    # timm: cls_token ~ N(0, 1e-6), pos_embed ~ truncated N(0, 0.02); the cls token has a position.
    self.cls_token = nnx.Param(
      nnx.initializers.normal(1e-6)(rngs.params(), (1, 1, width), param_dtype)
    )
    self.pos_embed = nnx.Param(_DENSE_INIT(rngs.params(), (1, 1 + num_patches, width), param_dtype))
    self.blocks = nnx.List([Block(width, num_heads, mlp_ratio, **kw) for _ in range(depth)])
    self.norm = _layer_norm(width, **kw)
    self.head = _linear(width, num_classes, **kw)

  def __call__(self, images, train: bool = False, return_features: bool = False):
    del train  # no dropout, stochastic depth or batch statistics
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
        f"expected {self.image_size}x{self.image_size} images (the position "
        f"embedding's grid), got shape {images.shape}"
      )
    patches = self.patch_embed(images)
    cls_tokens = jnp.broadcast_to(
      self.cls_token[...].astype(patches.dtype), (patches.shape[0], 1, patches.shape[-1])
    )
    tokens = jnp.concatenate([cls_tokens, patches], axis=1)
    tokens = tokens + self.pos_embed[...].astype(tokens.dtype)
    collect = layers.FeatureCollector(return_features)
    collect("embed", tokens)
    for index, block in enumerate(self.blocks):
      tokens = block(tokens)
      collect(f"block{index + 1}", tokens)
    pooled = self.norm(tokens)[:, 0]
    collect("pooled", pooled)
    return self.head(pooled).astype(jnp.float32), collect.features


def _preset(width: int, num_heads: int):

  def build(
    *, num_classes: int = 1000, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, **kwargs
  ) -> VisionTransformer:
    return VisionTransformer(
      num_classes=num_classes,
      width=width,
      depth=12,
      num_heads=num_heads,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      **kwargs,
    )

  return build


# timm vit_tiny/small/base_patch16_224 (= DeiT-Ti/S/B): 5,717,416 / 22,050,664 / 86,567,656
# parameters with 1000 classes.
vit_ti16 = register("vit_ti16")(_preset(width=192, num_heads=3))
vit_s16 = register("vit_s16")(_preset(width=384, num_heads=6))
vit_b16 = register("vit_b16")(_preset(width=768, num_heads=12))
