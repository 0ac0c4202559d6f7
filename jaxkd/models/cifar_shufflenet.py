"""ShuffleNets for CIFAR as in the KD benchmarks: 'ShuffleV1' (g = 3) and 'ShuffleV2' (1×).

Same architectures, parameter names and initialisation (torch's defaults: none is set) as
RepDistiller / mdistiller `ShuffleNetv1.py` and `ShuffleNetv2.py`: a 1×1 stem `conv1`-`bn1` to 24
channels at full resolution (no stride, no max pool), three stages `layer1..3` each halving the
resolution (32 → 16 → 8 → 4 px), mean pool, `linear`. ShuffleV2 adds `conv2`-`bn2` (1×1 to 1024)
before the pool.

Features (`return_features=True`), as RepDistiller's `is_feat` / `preact=True` lists:
`stem` (relu(bn1(conv1 x))), `stage1..3` (each stage's output), `preact_stage1..3` (the last
block's output before its ReLU; for V2 the concatenation [x1, bn3(…)] before the channel shuffle,
as in the reference), `pooled` (classifier input).
"""

import jax.numpy as jnp
from flax import nnx

from jaxkd.models import layers
from jaxkd.models.registry import register


def channel_shuffle(x, groups: int):
  """ShuffleNet's channel shuffle on NHWC: channel j·(C/g) + i moves to i·g + j.

  The NCHW reference views C as (g, C/g) and transposes to (C/g, g); NHWC does the same on the last
  axis.
  """
  *spatial, channels = x.shape
  x = x.reshape(*spatial, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*spatial, channels)


class ShuffleV1Bottleneck(nnx.Module):
  """ShuffleNet unit (Zhang et al. 2018), RepDistiller's `Bottleneck`.

  Grouped 1×1 (mid = out / 4), shuffle, 3×3 depthwise with the stride, grouped 1×1; the stride-2
  unit concatenates a 3×3 average-pooled shortcut (so it outputs `out_planes` new channels plus
  the input's), the stride-1 unit adds the input. Returns (relu(preact), preact).
  """

  def __init__(
    self,
    in_planes: int,
    out_planes: int,
    stride: int,
    groups: int,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    mid_planes = int(out_planes / 4)
    # The reference does not group the first 1×1 conv after the 24-channel stem.
    self.first_groups = 1 if in_planes == 24 else groups
    conv_args = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    bn_args = dict(dtype=dtype, param_dtype=param_dtype)
    self.conv1 = layers.conv2d(in_planes, mid_planes, 1, groups=self.first_groups, **conv_args)
    self.bn1 = layers.BatchNorm2d(mid_planes, **bn_args)
    self.conv2 = layers.conv2d(
      mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, **conv_args
    )
    self.bn2 = layers.BatchNorm2d(mid_planes, **bn_args)
    self.conv3 = layers.conv2d(mid_planes, out_planes, 1, groups=groups, **conv_args)
    self.bn3 = layers.BatchNorm2d(out_planes, **bn_args)
    self.stride = stride

  def __call__(self, x, train: bool = False):
    out = nnx.relu(self.bn1(self.conv1(x), train))
    out = channel_shuffle(out, self.first_groups)
    out = nnx.relu(self.bn2(self.conv2(out), train))
    out = self.bn3(self.conv3(out), train)
    if self.stride == 2:
      # torch AvgPool2d(3, stride=2, padding=1) counts the zero padding (count_include_pad=True).
      shortcut = nnx.avg_pool(
        x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True
      )
      preact = jnp.concatenate([out, shortcut], axis=-1)
    else:
      preact = out + x
    return nnx.relu(preact), preact


class ShuffleNetV1(nnx.Module):
  """ShuffleNet V1 for 32×32 inputs; `out_planes` and `num_blocks` per stage, `groups` g."""

  def __init__(
    self,
    out_planes: tuple[int, ...],
    num_blocks: tuple[int, ...],
    groups: int,
    *,
    num_classes: int,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = layers.conv2d(3, 24, 1, bias=False, **kwargs)
    self.bn1 = layers.BatchNorm2d(24, dtype=dtype, param_dtype=param_dtype)
    in_planes = 24
    for stage, (stage_planes, stage_blocks) in enumerate(zip(out_planes, num_blocks), start=1):
      blocks = []
      for index in range(stage_blocks):
        # The stride-2 unit concatenates its input: it adds only the missing channels.
        new_planes = stage_planes - in_planes if index == 0 else stage_planes
        blocks.append(
          ShuffleV1Bottleneck(in_planes, new_planes, 2 if index == 0 else 1, groups, **kwargs)
        )
        in_planes = stage_planes
      setattr(self, f"layer{stage}", nnx.List(blocks))
    self.num_stages = len(out_planes)
    self.linear = layers.linear(in_planes, num_classes, **kwargs)

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    x = nnx.relu(self.bn1(self.conv1(x), train))
    collect("stem", x)
    x = layers.apply_stages(self, x, num_stages=self.num_stages, train=train, collect=collect)
    pooled = layers.global_avg_pool(x)
    collect("pooled", pooled)
    return self.linear(pooled).astype(jnp.float32), collect.features


class ShuffleV2Block(nnx.Module):
  """ShuffleNet V2 basic unit (Ma et al. 2018), RepDistiller's `BasicBlock`.

  Splits the channels in halves [x1, x2], x2 → 1×1-BN-ReLU → 3×3 depthwise-BN → 1×1-BN-ReLU,
  concatenates [x1, branch] and shuffles with 2 groups. Returns (out, preact) with preact the
  concatenation before the branch's last ReLU and before the shuffle, as the reference.
  """

  def __init__(self, in_channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.split = int(in_channels * 0.5)  # channels per half; the reference's channels are even
    conv_args = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    bn_args = dict(dtype=dtype, param_dtype=param_dtype)
    self.conv1 = layers.conv2d(self.split, self.split, 1, **conv_args)
    self.bn1 = layers.BatchNorm2d(self.split, **bn_args)
    self.conv2 = layers.conv2d(self.split, self.split, 3, padding=1, groups=self.split, **conv_args)
    self.bn2 = layers.BatchNorm2d(self.split, **bn_args)
    self.conv3 = layers.conv2d(self.split, self.split, 1, **conv_args)
    self.bn3 = layers.BatchNorm2d(self.split, **bn_args)

  def __call__(self, x, train: bool = False):
    x1, x2 = x[..., : self.split], x[..., self.split :]
    out = nnx.relu(self.bn1(self.conv1(x2), train))
    out = self.bn2(self.conv2(out), train)
    branch_preact = self.bn3(self.conv3(out), train)
    out = jnp.concatenate([x1, nnx.relu(branch_preact)], axis=-1)
    preact = jnp.concatenate([x1, branch_preact], axis=-1)
    return channel_shuffle(out, 2), preact


class ShuffleV2DownBlock(nnx.Module):
  """ShuffleNet V2 spatial down-sampling unit, RepDistiller's `DownBlock`.

  left: 3×3 depthwise stride 2-BN → 1×1-BN-ReLU; right: 1×1-BN-ReLU → 3×3 depthwise stride 2-BN →
  1×1-BN-ReLU; concatenate (out_channels / 2 each) and shuffle with 2 groups.
  """

  def __init__(self, in_channels: int, out_channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    mid = out_channels // 2
    conv_args = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    bn_args = dict(dtype=dtype, param_dtype=param_dtype)
    self.conv1 = layers.conv2d(
      in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, **conv_args
    )
    self.bn1 = layers.BatchNorm2d(in_channels, **bn_args)
    self.conv2 = layers.conv2d(in_channels, mid, 1, **conv_args)
    self.bn2 = layers.BatchNorm2d(mid, **bn_args)
    self.conv3 = layers.conv2d(in_channels, mid, 1, **conv_args)
    self.bn3 = layers.BatchNorm2d(mid, **bn_args)
    self.conv4 = layers.conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, **conv_args)
    self.bn4 = layers.BatchNorm2d(mid, **bn_args)
    self.conv5 = layers.conv2d(mid, mid, 1, **conv_args)
    self.bn5 = layers.BatchNorm2d(mid, **bn_args)

  def __call__(self, x, train: bool = False):
    left = self.bn1(self.conv1(x), train)
    left = nnx.relu(self.bn2(self.conv2(left), train))
    right = nnx.relu(self.bn3(self.conv3(x), train))
    right = self.bn4(self.conv4(right), train)
    right = nnx.relu(self.bn5(self.conv5(right), train))
    out = channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)
    return out, out  # Only a stage's last unit reports a pre-activation; this one never is.


class ShuffleNetV2(nnx.Module):
  """ShuffleNet V2 for 32×32 inputs; `out_channels` = three stages + the final 1×1 conv."""

  def __init__(
    self,
    out_channels: tuple[int, int, int, int],
    num_blocks: tuple[int, int, int],
    *,
    num_classes: int,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = layers.conv2d(3, 24, 1, bias=False, **kwargs)
    self.bn1 = layers.BatchNorm2d(24, dtype=dtype, param_dtype=param_dtype)
    in_channels = 24
    for stage, (channels, stage_blocks) in enumerate(zip(out_channels[:3], num_blocks), start=1):
      blocks = [ShuffleV2DownBlock(in_channels, channels, **kwargs)]
      blocks += [ShuffleV2Block(channels, **kwargs) for _ in range(stage_blocks)]
      setattr(self, f"layer{stage}", nnx.List(blocks))
      in_channels = channels
    self.conv2 = layers.conv2d(in_channels, out_channels[3], 1, bias=False, **kwargs)
    self.bn2 = layers.BatchNorm2d(out_channels[3], dtype=dtype, param_dtype=param_dtype)
    self.linear = layers.linear(out_channels[3], num_classes, **kwargs)

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    x = nnx.relu(self.bn1(self.conv1(x), train))
    collect("stem", x)
    for stage, stage_layers in enumerate((self.layer1, self.layer2, self.layer3), start=1):
      x, preact = layers.apply_stage(stage_layers, x, train=train)
      collect(f"stage{stage}", x)
      collect(f"preact_stage{stage}", preact)
    x = nnx.relu(self.bn2(self.conv2(x), train))
    pooled = layers.global_avg_pool(x)
    collect("pooled", pooled)
    return self.linear(pooled).astype(jnp.float32), collect.features


@register("ShuffleV1")
def shuffle_v1(
  *, num_classes: int = 100, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> ShuffleNetV1:
  """RepDistiller's `ShuffleV1`: out_planes (240, 480, 960), blocks (4, 8, 4), g = 3."""
  return ShuffleNetV1(
    (240, 480, 960),
    (4, 8, 4),
    3,
    num_classes=num_classes,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


@register("ShuffleV2")
def shuffle_v2(
  *, num_classes: int = 100, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> ShuffleNetV2:
  """RepDistiller's `ShuffleV2` (net_size 1): channels (116, 232, 464, 1024), blocks (3, 7, 3)."""
  return ShuffleNetV2(
    (116, 232, 464, 1024),
    (3, 7, 3),
    num_classes=num_classes,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )
