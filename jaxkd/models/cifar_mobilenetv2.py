"""MobileNetV2 for CIFAR as in the KD benchmarks: 'MobileNetV2' = 'mobile_half' (width 0.5, T = 6).

Same architecture, parameter names and initialisation as RepDistiller / mdistiller
`mobilenetv2.py` (from "Knowledge Distillation via Route Constrained Optimization"), whose registry
maps 'MobileNetV2' → `mobile_half`: stem `conv1` = [3×3 conv stride 2, BN, ReLU], seven `blocks`
of inverted residuals (each `conv` = [1×1 expand, BN, ReLU, 3×3 depthwise, BN, ReLU, 1×1 project,
BN]; the expansion conv exists even for expansion 1), `conv2` = [1×1 conv to 1280, BN, ReLU], mean
pool, `classifier` = [Linear]. Convolutions start from N(0, 2 / (kh·kw·out)), BatchNorm from (1, 0),
the classifier from N(0, 0.01²) and zero bias.

Features (`return_features=True`), as RepDistiller's `is_feat` list: `stem` (conv1 output),
`stage1..4` (outputs of blocks 1, 2, 4 and 6: the 16, 8, 4 and 2 px ends), `pooled` (classifier
input). Block outputs are linear (no ReLU), so `preact_stage1..4` are the same arrays — what
RepDistiller returns with `preact=True`.
"""

import jax.numpy as jnp
from flax import nnx

from jaxkd.models import layers
from jaxkd.models.registry import register

# (expansion t, channels c, blocks n, first stride s) per block group; t is replaced by T
# except in the first group.
_INVERTED_RESIDUAL_SETTING = (
  (1, 16, 1, 1),
  (None, 24, 2, 1),
  (None, 32, 3, 2),
  (None, 64, 4, 2),
  (None, 96, 3, 1),
  (None, 160, 3, 2),
  (None, 320, 1, 1),
)
_FEATURE_BLOCKS = (1, 2, 4, 6)  # `stage{k}` is the output of blocks[_FEATURE_BLOCKS[k - 1]].


class InvertedResidual(nnx.Module):
  """x + conv(x) when the stride is 1 and the width is kept, else conv(x) (Sandler et al. 2018)."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    stride: int,
    expand_ratio: int,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    hidden = in_channels * expand_ratio
    conv_args = dict(
      bias=False,
      kernel_init=layers.kaiming_normal_fan_out,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    bn_args = dict(dtype=dtype, param_dtype=param_dtype)
    self.use_res_connect = stride == 1 and in_channels == out_channels
    self.conv = nnx.List(
      [
        layers.conv2d(in_channels, hidden, 1, **conv_args),
        layers.BatchNorm2d(hidden, **bn_args),
        nnx.relu,
        layers.conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, **conv_args),
        layers.BatchNorm2d(hidden, **bn_args),
        nnx.relu,
        layers.conv2d(hidden, out_channels, 1, **conv_args),
        layers.BatchNorm2d(out_channels, **bn_args),
      ]
    )

  def __call__(self, x, train: bool = False):
    out = layers.sequential(self.conv, x, train=train)
    return x + out if self.use_res_connect else out


class MobileNetV2(nnx.Module):
  """RepDistiller `MobileNetV2(T, feature_dim, width_mult)` for 32×32 inputs."""

  def __init__(
    self,
    expand_ratio: int,
    width_mult: float,
    *,
    num_classes: int,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    conv_args = dict(bias=False, kernel_init=layers.kaiming_normal_fan_out, **kwargs)
    bn_args = dict(dtype=dtype, param_dtype=param_dtype)
    in_channels = int(32 * width_mult)
    self.conv1 = nnx.List(
      [
        layers.conv2d(3, in_channels, 3, stride=2, padding=1, **conv_args),
        layers.BatchNorm2d(in_channels, **bn_args),
        nnx.relu,
      ]
    )
    blocks = []
    for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
      out_channels = int(c * width_mult)
      group = []
      for index in range(n):
        group.append(
          InvertedResidual(
            in_channels,
            out_channels,
            s if index == 0 else 1,
            expand_ratio if t is None else t,
            **kwargs,
          )
        )
        in_channels = out_channels
      blocks.append(nnx.List(group))
    self.blocks = nnx.List(blocks)
    last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
    self.conv2 = nnx.List(
      [
        layers.conv2d(in_channels, last_channels, 1, **conv_args),
        layers.BatchNorm2d(last_channels, **bn_args),
        nnx.relu,
      ]
    )
    self.classifier = nnx.List(
      [
        layers.linear(
          last_channels,
          num_classes,
          kernel_init=nnx.initializers.normal(0.01),
          bias_init=nnx.initializers.zeros,
          **kwargs,
        )
      ]
    )

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    x = layers.sequential(self.conv1, x, train=train)
    collect("stem", x)
    for index, group in enumerate(self.blocks):
      for block in group:
        x = block(x, train)
      if index in _FEATURE_BLOCKS:
        stage = _FEATURE_BLOCKS.index(index) + 1
        collect(f"stage{stage}", x)
        collect(f"preact_stage{stage}", x)
    x = layers.sequential(self.conv2, x, train=train)
    # The reference's AvgPool2d(2, ceil_mode=True) covers the whole 2×2 map of a 32-px input.
    pooled = layers.global_avg_pool(x)
    collect("pooled", pooled)
    logits = layers.sequential(self.classifier, pooled, train=train)
    return logits.astype(jnp.float32), collect.features


def _register_mobilenetv2(name: str) -> None:
  @register(name)
  def build(
    *, num_classes: int = 100, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ) -> MobileNetV2:
    return MobileNetV2(
      6, 0.5, num_classes=num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  build.__name__ = build.__qualname__ = name
  build.__doc__ = "RepDistiller's `mobile_half`: MobileNetV2 with T = 6, width 0.5."


# 'MobileNetV2' is the name in RepDistiller's / mdistiller's model_dict, `mobile_half` the function.
for _name in ("MobileNetV2", "mobile_half"):
  _register_mobilenetv2(_name)
