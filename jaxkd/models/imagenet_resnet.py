"""ImageNet ResNets in torchvision's layout: resnet18, resnet34, resnet50, resnet101, resnet152.

He et al. 2016, "Deep Residual Learning for Image Recognition", as `torchvision.models.resnet`:
7×7/2 stem conv1-bn1-relu, 3×3/2 max pool (padding 1), four stages `layer1..4` (strides 1, 2, 2,
2) of `BasicBlock`s or `Bottleneck`s with the stride on the 3×3 conv ("ResNet v1.5"), global mean
pool, `fc`. Parameter names are torchvision's (`layer2.0.downsample.0.weight` ↔
`('layer2', 0, 'downsample', 0, 'kernel')`), so a torchvision state dict loads with
`jaxkd.models.load_torch_state_dict`. Convolutions start from Kaiming-normal (fan_out), BatchNorm
from (1, 0), `fc` from torch's default; `zero_init_residual=True` zeroes the last BN scale of each
block (torchvision's flag of the same name, Goyal et al. 2017).

Features (`return_features=True`), as mdistiller's ImageNet ResNet (`feats`, `preact_feats`):
`stem` (relu(bn1(conv1)), before the max pool), `stage1..4` (each stage's output),
`preact_stage1..4` (the last block's residual sum before its ReLU), `pooled` (fc input).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkd.models import layers
from jaxkd.models.registry import register


class ResNet(nnx.Module):
  """torchvision `ResNet(block, stage_blocks)` on NHWC images of any size ≥ 32 px."""

  def __init__(
    self,
    block,
    stage_blocks: tuple[int, ...],
    *,
    num_classes: int = 1000,
    zero_init_residual: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.conv1 = layers.conv2d(
      3,
      64,
      7,
      stride=2,
      padding=3,
      bias=False,
      kernel_init=layers.kaiming_normal_fan_out,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.bn1 = layers.BatchNorm2d(64, dtype=dtype, param_dtype=param_dtype)
    in_planes = 64
    self.num_stages = len(stage_blocks)
    for index, num_blocks in enumerate(stage_blocks):
      planes = 64 * 2**index
      stage = layers.residual_stage(
        block,
        in_planes,
        planes,
        num_blocks,
        stride=1 if index == 0 else 2,
        shortcut_name="downsample",
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      if zero_init_residual:
        for residual_block in stage:
          last_bn = residual_block.bn3 if block is layers.Bottleneck else residual_block.bn2
          last_bn.scale[...] = jnp.zeros_like(last_bn.scale[...])
      setattr(self, f"layer{index + 1}", stage)
      in_planes = planes * block.expansion
    self.fc = layers.linear(in_planes, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    x = jax.nn.relu(self.bn1(self.conv1(x), train))
    collect("stem", x)
    # torch MaxPool2d(3, 2, padding=1) pads with -inf, as flax's max_pool does.
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = layers.apply_stages(self, x, num_stages=self.num_stages, train=train, collect=collect)
    pooled = layers.global_avg_pool(x)
    collect("pooled", pooled)
    return self.fc(pooled).astype(jnp.float32), collect.features


def _register(name: str, block, stage_blocks: tuple[int, ...]) -> None:

  @register(name)
  def build(
    *, num_classes: int = 1000, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, **kwargs
  ) -> ResNet:
    return ResNet(
      block,
      stage_blocks,
      num_classes=num_classes,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      **kwargs,
    )

  build.__name__ = build.__qualname__ = name
  build.__doc__ = f"torchvision `{name}` (kwargs: zero_init_residual)."


# torchvision parameter counts with 1000 classes: 11,689,512 / 21,797,672 / 25,557,032 /
# 44,549,160 / 60,192,808.
_register("resnet18", layers.BasicBlock, (2, 2, 2, 2))
_register("resnet34", layers.BasicBlock, (3, 4, 6, 3))
_register("resnet50", layers.Bottleneck, (3, 4, 6, 3))
_register("resnet101", layers.Bottleneck, (3, 4, 23, 3))
_register("resnet152", layers.Bottleneck, (3, 8, 36, 3))
