"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Same architecture, parameter names and initialisation as RepDistiller / mdistiller `wrn.py`:
pre-activation blocks (BN-ReLU-conv), depth = 6n + 4, widths (16, 16k, 32k, 64k), stages
`block1..3` each holding a `layer` list, final `bn1`-ReLU, mean pool, `fc`. Convolutions start from
N(0, 2 / (kh·kw·out)), BatchNorm from (1, 0), the classifier bias from 0 (weight: torch default).

Features (`return_features=True`), as RepDistiller's `is_feat` / `preact=True` lists:
`stem` (conv1 output), `stage1..3` (each stage's output: a residual sum, not yet normalised — the
network is pre-activation, so this is RepDistiller's f1..f3, not a post-ReLU map),
`preact_stage1..3` (that output after the next BN, before its ReLU: `block2.layer[0].bn1(f1)`,
`block3.layer[0].bn1(f2)`, `bn1(f3)`), `pooled` (classifier input).
"""

import jax.numpy as jnp
from flax import nnx

from jaxkd.models import layers
from jaxkd.models.registry import register


class WideBasicBlock(nnx.Module):
  """Pre-activation block: x + conv2(relu(bn2(conv1(relu(bn1(x)))))).

  When the width changes, the 1×1 `convShortcut` (with the stride) projects the *activated*
  input, as in the reference. Returns (out, bn1(x)): the normalised input before its ReLU, which
  RepDistiller uses as the previous stage's pre-activation feature.
  """

  def __init__(
    self, in_planes: int, out_planes: int, stride: int, *, dtype, param_dtype, rngs: nnx.Rngs
  ):
    conv_args = dict(
      bias=False,
      kernel_init=layers.kaiming_normal_fan_out,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.bn1 = layers.BatchNorm2d(in_planes, dtype=dtype, param_dtype=param_dtype)
    self.conv1 = layers.conv2d(in_planes, out_planes, 3, stride=stride, padding=1, **conv_args)
    self.bn2 = layers.BatchNorm2d(out_planes, dtype=dtype, param_dtype=param_dtype)
    self.conv2 = layers.conv2d(out_planes, out_planes, 3, padding=1, **conv_args)
    self.convShortcut = (
      None
      if in_planes == out_planes
      # pylint: disable=invalid-name
      else layers.conv2d(in_planes, out_planes, 1, stride=stride, **conv_args)
    )

  def __call__(self, x, train: bool = False):
    normalized = self.bn1(x, train)
    activated = nnx.relu(normalized)
    out = self.conv2(nnx.relu(self.bn2(self.conv1(activated), train)))
    shortcut = x if self.convShortcut is None else self.convShortcut(activated)
    return shortcut + out, normalized


class NetworkBlock(nnx.Module):
  """One stage: `layer[0]` with the stride and the width change, then `num_blocks - 1` blocks."""

  def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, **kwargs):
    self.layer = nnx.List(
      [
        WideBasicBlock(
          in_planes if index == 0 else out_planes, out_planes, stride if index == 0 else 1, **kwargs
        )
        for index in range(num_blocks)
      ]
    )

  def __call__(self, x, train: bool = False):
    """Returns (stage output, normalised input of the first block before its ReLU)."""
    x, normalized_input = self.layer[0](x, train)
    for block in self.layer[1:]:
      x, _ = block(x, train)
    return x, normalized_input


class WideResNet(nnx.Module):
  """WRN-depth-widen_factor for 32×32 inputs."""

  def __init__(
    self, depth: int, widen_factor: int, *, num_classes: int, dtype, param_dtype, rngs: nnx.Rngs
  ):
    if (depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
    num_blocks = (depth - 4) // 6
    widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = layers.conv2d(
      3, widths[0], 3, padding=1, bias=False, kernel_init=layers.kaiming_normal_fan_out, **kwargs
    )
    self.block1 = NetworkBlock(num_blocks, widths[0], widths[1], 1, **kwargs)
    self.block2 = NetworkBlock(num_blocks, widths[1], widths[2], 2, **kwargs)
    self.block3 = NetworkBlock(num_blocks, widths[2], widths[3], 2, **kwargs)
    self.bn1 = layers.BatchNorm2d(widths[3], dtype=dtype, param_dtype=param_dtype)
    self.fc = layers.linear(widths[3], num_classes, bias_init=nnx.initializers.zeros, **kwargs)

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    x = self.conv1(x)
    collect("stem", x)
    for index, stage in enumerate((self.block1, self.block2, self.block3), start=1):
      x, normalized_input = stage(x, train)
      if index > 1:  # The first block of stage k normalises stage k - 1's output.
        collect(f"preact_stage{index - 1}", normalized_input)
      collect(f"stage{index}", x)
    normalized = self.bn1(x, train)
    collect("preact_stage3", normalized)
    pooled = layers.global_avg_pool(nnx.relu(normalized))
    collect("pooled", pooled)
    return self.fc(pooled).astype(jnp.float32), collect.features


def _register_wrn(depth: int, widen_factor: int) -> None:
  name = f"wrn_{depth}_{widen_factor}"

  @register(name)
  def build(
    *, num_classes: int = 100, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ) -> WideResNet:
    return WideResNet(
      depth, widen_factor, num_classes=num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  build.__name__ = build.__qualname__ = name
  build.__doc__ = f"RepDistiller's `{name}`: WRN-{depth}-{widen_factor}."


for _depth, _widen_factor in [(16, 1), (16, 2), (40, 1), (40, 2)]:
  _register_wrn(_depth, _widen_factor)
