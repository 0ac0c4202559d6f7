"""Small all-convolutional CNNs for the offline quickstart (Fashion-MNIST, 28×28×1).

Downsampling uses stride-2 convolutions rather than max-pooling: XLA on CPU lowers
`reduce_window` and its gradient slowly, and the quickstart has to train three models in
minutes on two cores. Layout (Springenberg et al. 2015, "Striving for simplicity"):

    stem:   conv3×3(widths[0]) → BN → ReLU                       (full resolution)
    stage i: conv3×3 stride 2 (widths[i]) → BN → ReLU,
             then (depth - 1) × [conv3×3 → BN → ReLU]             (resolution / 2^i)
    head:   global average pool (the CIFAR zoo's head) or, with `flatten=True`, the whole
            last feature map flattened → linear(num_classes)

Flattening keeps the spatial layout that Fashion-MNIST's classes (shirt, pullover, coat) are
told apart by: three conv layers see 15×15-pixel patches, and an average of such local
features learns clearly less in the quickstart's two-epoch schedule.

Features (names shared with the CIFAR zoo): `stem`, `stage1..N` (post-ReLU), `preact_stage1..N`
(the last BN output of the stage, before its ReLU: what Heo et al. 2019 distil), `pooled`.
"""

import jax.numpy as jnp
from flax import nnx

from jaxkd.models.layers import Conv2d
from jaxkd.models.registry import register


class ConvBN(nnx.Module):
  """conv3×3 (no bias: BN follows) → BatchNorm; the caller applies the ReLU."""

  def __init__(
    self, in_features: int, out_features: int, *, strides: int, dtype, param_dtype, rngs: nnx.Rngs
  ):
    self.conv = Conv2d(
      in_features,
      out_features,
      kernel_size=(3, 3),
      strides=strides,
      padding="SAME",
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    # PyTorch BatchNorm2d defaults (momentum 0.1 ↔ flax 0.9, eps 1e-5), as in the CIFAR zoo.
    self.bn = nnx.BatchNorm(
      out_features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x, *, train: bool):
    return self.bn(self.conv(x), use_running_average=not train)


class SmallCNN(nnx.Module):
  """Stem + `len(widths) - 1` stride-2 stages of `depth` ConvBN-ReLU layers + linear head."""

  def __init__(
    self,
    *,
    widths: tuple[int, ...],
    depth: int,
    num_classes: int,
    in_channels: int,
    flatten: bool,
    input_size: int,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    layer_kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem = ConvBN(in_channels, widths[0], strides=1, **layer_kwargs)
    self.stages = nnx.List(
      [
        nnx.List(
          [
            ConvBN(
              width_in if layer == 0 else width_out,
              width_out,
              strides=2 if layer == 0 else 1,
              **layer_kwargs,
            )
            for layer in range(depth)
          ]
        )
        for width_in, width_out in zip(widths[:-1], widths[1:])
      ]
    )
    self.flatten = flatten
    # SAME padding: each stride-2 stage maps size s to ceil(s / 2).
    final_size = input_size
    for _ in widths[1:]:
      final_size = -(-final_size // 2)
    head_features = widths[-1] * (final_size**2 if flatten else 1)
    self.head = nnx.Linear(head_features, num_classes, **layer_kwargs)

  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    features = {}
    x = nnx.relu(self.stem(x, train=train))
    features["stem"] = x
    for stage_index, stage in enumerate(self.stages, start=1):
      for layer in stage:
        preact = layer(x, train=train)
        x = nnx.relu(preact)
      features[f"preact_stage{stage_index}"] = preact
      features[f"stage{stage_index}"] = x
    pooled = x.reshape(x.shape[0], -1) if self.flatten else jnp.mean(x, axis=(1, 2))
    features["pooled"] = pooled
    logits = self.head(pooled)
    return logits, (features if return_features else {})


@register("small_cnn")
def small_cnn(
  *,
  num_classes: int = 10,
  widths: tuple[int, ...] = (32, 64, 128),
  depth: int = 2,
  in_channels: int = 1,
  flatten: bool = False,
  input_size: int = 28,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  rngs: nnx.Rngs,
) -> SmallCNN:
  """The quickstart CNN; `widths[0]` is the stem, each further width one stride-2 stage.

  `input_size` (square images) only matters with `flatten=True`.
  """
  if not widths or min(widths) < 1:
    raise ValueError(f"widths={tuple(widths)!r}: at least one width, each at least 1")
  if not 1 <= depth <= 64:
    raise ValueError(f"depth={depth!r}: must be in [1, 64]")
  return SmallCNN(
    widths=tuple(widths),
    depth=depth,
    num_classes=num_classes,
    in_channels=in_channels,
    flatten=flatten,
    input_size=input_size,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )
