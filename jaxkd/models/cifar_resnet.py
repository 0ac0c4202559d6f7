"""CIFAR ResNets of the KD benchmarks: resnet8 … resnet110, resnet8x4, resnet32x4, ResNet18/50.

Same architectures, parameter names and initialisation as RepDistiller `models/resnet.py` (the
"resnetN" family: 3×3 stem, three stages at 32/16/8 px, BasicBlocks, `fc`, shortcut `downsample`)
and `models/resnetv2.py` (`ResNet50`, mdistiller's `ResNet18`: 64-wide 3×3 stem, four stages,
`linear`, shortcut `shortcut`), which mdistiller copies. Convolutions start from Kaiming-normal
(fan_out) weights, BatchNorm from (1, 0), the classifier from torch's default.

Features (`return_features=True`), as RepDistiller's `is_feat` lists [f0, f1, …, pooled]:
`stem` (after conv1-bn1-relu), `stage1..N` (each stage's output), `preact_stage1..N` (the last
block's sum before its ReLU, RepDistiller `preact=True`), `pooled` (global mean, classifier input).
"""

import jax.numpy as jnp
from flax import nnx

from jaxkd.models import layers
from jaxkd.models.registry import register


class CifarResNet(nnx.Module):
  """ResNet for 32×32 inputs: 3×3 stem, stages with strides (1, 2, 2, …), mean pool, linear.

  Args:
    block: `layers.BasicBlock` or `layers.Bottleneck`.
    stem_width: channels of conv1.
    stage_planes: planes of each stage (its output has planes · block.expansion channels).
    stage_blocks: blocks per stage.
    classifier_name: the reference's attribute name of the classifier (`fc` or `linear`).
    shortcut_name: the reference's attribute name of the projection shortcut.
  """

  def __init__(
    self,
    block,
    stem_width: int,
    stage_planes: tuple[int, ...],
    stage_blocks: tuple[int, ...],
    *,
    classifier_name: str,
    shortcut_name: str,
    num_classes: int,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.conv1 = layers.conv2d(
      3,
      stem_width,
      3,
      padding=1,
      bias=False,
      kernel_init=layers.kaiming_normal_fan_out,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.bn1 = layers.BatchNorm2d(stem_width, dtype=dtype, param_dtype=param_dtype)
    in_planes = stem_width
    self.num_stages = len(stage_planes)
    for index, (planes, num_blocks) in enumerate(zip(stage_planes, stage_blocks)):
      stage = layers.residual_stage(
        block,
        in_planes,
        planes,
        num_blocks,
        stride=1 if index == 0 else 2,
        shortcut_name=shortcut_name,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      setattr(self, f"layer{index + 1}", stage)
      in_planes = planes * block.expansion
    self.classifier_name = classifier_name
    setattr(
      self,
      classifier_name,
      layers.linear(in_planes, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
    )

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    x = nnx.relu(self.bn1(self.conv1(x), train))
    collect("stem", x)
    x = layers.apply_stages(self, x, num_stages=self.num_stages, train=train, collect=collect)
    pooled = layers.global_avg_pool(x)
    collect("pooled", pooled)
    logits = getattr(self, self.classifier_name)(pooled)
    return logits.astype(jnp.float32), collect.features


def _register_resnet(
  name: str,
  block,
  stem_width: int,
  stage_planes,
  stage_blocks,
  classifier_name: str,
  shortcut_name: str,
) -> None:
  @register(name)
  def build(
    *, num_classes: int = 100, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ) -> CifarResNet:
    return CifarResNet(
      block,
      stem_width,
      stage_planes,
      stage_blocks,
      classifier_name=classifier_name,
      shortcut_name=shortcut_name,
      num_classes=num_classes,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  build.__name__ = build.__qualname__ = name
  build.__doc__ = f"RepDistiller's CIFAR `{name}`."


# RepDistiller resnet.py: ResNet(depth, num_filters), depth = 6n + 2 → n BasicBlocks per stage;
# num_filters = (stem, stage1, stage2, stage3).
for _name, _depth, _filters in [
  ("resnet8", 8, (16, 16, 32, 64)),
  ("resnet14", 14, (16, 16, 32, 64)),
  ("resnet20", 20, (16, 16, 32, 64)),
  ("resnet32", 32, (16, 16, 32, 64)),
  ("resnet44", 44, (16, 16, 32, 64)),
  ("resnet56", 56, (16, 16, 32, 64)),
  ("resnet110", 110, (16, 16, 32, 64)),
  ("resnet8x4", 8, (32, 64, 128, 256)),
  ("resnet32x4", 32, (32, 64, 128, 256)),
]:
  _register_resnet(
    _name,
    layers.BasicBlock,
    _filters[0],
    _filters[1:],
    ((_depth - 2) // 6,) * 3,
    classifier_name="fc",
    shortcut_name="downsample",
  )

# RepDistiller / mdistiller resnetv2.py.
_register_resnet(
  "ResNet18",
  layers.BasicBlock,
  64,
  (64, 128, 256, 512),
  (2, 2, 2, 2),
  classifier_name="linear",
  shortcut_name="shortcut",
)
_register_resnet(
  "ResNet50",
  layers.Bottleneck,
  64,
  (64, 128, 256, 512),
  (3, 4, 6, 3),
  classifier_name="linear",
  shortcut_name="shortcut",
)
