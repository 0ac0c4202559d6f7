"""ImageNet MobileNets, KD students: mobilenet_v1 (mdistiller) and mobilenet_v2 (torchvision).

`mobilenet_v1` (Howard et al. 2017) is mdistiller's `mdistiller/models/imagenet/mobilenetv1.py`,
the student of the ResNet-50 → MobileNet ImageNet benchmark (CRD, ReviewKD, DKD tables):
`model.0` = conv_bn(3, 32, stride 2) = (conv, bn, relu); `model.1..13` = conv_dw =
(3×3 depthwise conv, bn, relu, 1×1 conv, bn, relu); global mean pool (the reference's
AvgPool2d(7) at 224 px); `fc`. torch default init, as the reference leaves it.
Features as mdistiller's: `stem` (model.0), `stage1..4` = outputs of model.3, .5, .11, .13
(128, 256, 512, 1024 channels at strides 4, 8, 16, 32), `preact_stage1..4` (the same before
their last ReLU), `pooled`.

`mobilenet_v2` (Sandler et al. 2018) is `torchvision.models.mobilenet_v2` at width 1.0:
`features.0` = Conv2dNormActivation(3, 32, stride 2, ReLU6); `features.1..17` =
InvertedResidual blocks, each `conv` = [1×1 expand (Conv2dNormActivation, absent when t = 1),
3×3 depthwise (Conv2dNormActivation), 1×1 project conv, BN] with a residual when the shape is
kept; `features.18` = Conv2dNormActivation(320, 1280, 1×1); mean pool; `classifier.1` = Linear.
torchvision init: convs Kaiming-normal (fan_out), BN (1, 0), Linear N(0, 0.01) with zero bias.
torchvision's Dropout(0.2) before the classifier is not applied (the model contract has no
train-time RNG); its position stays so that the Linear is `classifier.1`.
Features: `stem` (features.0), `stage1..4` = outputs of features.3, .6, .13, .17 (24, 32, 96,
320 channels at strides 4, 8, 16, 32), `preact_stage1..4` = the same arrays (inverted residuals
end linearly; as RepDistiller's CIFAR MobileNetV2 with `preact=True`), `pooled` (after
features.18 and the mean pool).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkd.models import layers
from jaxkd.models.registry import register


class MobileNetV1(nnx.Module):
  """mdistiller's ImageNet MobileNetV1 (1024-wide, 1000 classes by default)."""

  # (output channels, stride) of conv_dw blocks model.1 .. model.13.
  _DEPTHWISE_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
  )
  # Indices in `model` whose outputs are stage1..4 (mdistiller's feat1..feat4).
  _STAGE_ENDS = (3, 5, 11, 13)

  def __init__(
    self, *, num_classes: int = 1000, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    conv_args = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    bn_args = dict(dtype=dtype, param_dtype=param_dtype)
    blocks = [
      nnx.List(
        [
          layers.conv2d(3, 32, 3, stride=2, padding=1, **conv_args),
          layers.BatchNorm2d(32, **bn_args),
          jax.nn.relu,
        ]
      )
    ]
    in_channels = 32
    for out_channels, stride in self._DEPTHWISE_BLOCKS:
      blocks.append(
        nnx.List(
          [
            layers.conv2d(
              in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, **conv_args
            ),
            layers.BatchNorm2d(in_channels, **bn_args),
            jax.nn.relu,
            layers.conv2d(in_channels, out_channels, 1, **conv_args),
            layers.BatchNorm2d(out_channels, **bn_args),
            jax.nn.relu,
          ]
        )
      )
      in_channels = out_channels
    self.model = nnx.List(blocks)
    self.fc = layers.linear(
      in_channels, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    x = layers.sequential(self.model[0], x, train=train)
    collect("stem", x)
    for index in range(1, len(self.model)):
      block = self.model[index]
      if index in self._STAGE_ENDS:
        preact = layers.sequential(block[:-1], x, train=train)
        x = jax.nn.relu(preact)
        stage = self._STAGE_ENDS.index(index) + 1
        collect(f"stage{stage}", x)
        collect(f"preact_stage{stage}", preact)
      else:
        x = layers.sequential(block, x, train=train)
    pooled = layers.global_avg_pool(x)
    collect("pooled", pooled)
    return self.fc(pooled).astype(jnp.float32), collect.features


def _conv_bn_relu6(
  in_channels, out_channels, kernel_size, *, stride=1, groups=1, dtype, param_dtype, rngs
):
  """torchvision `Conv2dNormActivation(..., activation_layer=ReLU6)`: [conv, BN, ReLU6]."""
  return nnx.List(
    [
      layers.conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        groups=groups,
        bias=False,
        kernel_init=layers.kaiming_normal_fan_out,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      ),
      layers.BatchNorm2d(out_channels, dtype=dtype, param_dtype=param_dtype),
      jax.nn.relu6,
    ]
  )


class InvertedResidual(nnx.Module):
  """torchvision `InvertedResidual`: 1×1 expand → 3×3 depthwise → linear 1×1 (+ x, same shape)."""

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
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = int(round(in_channels * expand_ratio))
    self.use_residual = stride == 1 and in_channels == out_channels
    expand = [] if expand_ratio == 1 else [_conv_bn_relu6(in_channels, hidden, 1, **kw)]
    self.conv = nnx.List(
      expand
      + [
        _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden, **kw),
        layers.conv2d(
          hidden, out_channels, 1, bias=False, kernel_init=layers.kaiming_normal_fan_out, **kw
        ),
        layers.BatchNorm2d(out_channels, dtype=dtype, param_dtype=param_dtype),
      ]
    )

  def __call__(self, x, train: bool = False):
    out = layers.sequential(self.conv, x, train=train)
    return x + out if self.use_residual else out


def _dropout_not_applied(x):
  return x


class MobileNetV2(nnx.Module):
  """torchvision `mobilenet_v2()` (width 1.0): 3,504,872 parameters with 1000 classes."""

  # torchvision's inverted_residual_setting: expansion t, channels c, repeats n, first stride s.
  _SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
  )
  # Indices in `features` whose outputs are stage1..4 (last block at strides 4, 8, 16, 32).
  _STAGE_ENDS = (3, 6, 13, 17)

  def __init__(
    self, *, num_classes: int = 1000, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    features = [_conv_bn_relu6(3, 32, 3, stride=2, **kw)]
    in_channels = 32
    for expand_ratio, out_channels, repeats, first_stride in self._SETTING:
      for index in range(repeats):
        features.append(
          InvertedResidual(
            in_channels, out_channels, first_stride if index == 0 else 1, expand_ratio, **kw
          )
        )
        in_channels = out_channels
    features.append(_conv_bn_relu6(in_channels, 1280, 1, **kw))
    self.features = nnx.List(features)
    self.classifier = nnx.List(
      [
        _dropout_not_applied,
        layers.linear(
          1280,
          num_classes,
          kernel_init=nnx.initializers.normal(0.01),
          bias_init=nnx.initializers.zeros,
          **kw,
        ),
      ]
    )

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    x = layers.sequential(self.features[0], x, train=train)
    collect("stem", x)
    for index in range(1, len(self.features) - 1):
      x = self.features[index](x, train)
      if index in self._STAGE_ENDS:
        stage = self._STAGE_ENDS.index(index) + 1
        collect(f"stage{stage}", x)
        collect(f"preact_stage{stage}", x)
    x = layers.sequential(self.features[-1], x, train=train)
    pooled = layers.global_avg_pool(x)
    collect("pooled", pooled)
    return self.classifier[1](pooled).astype(jnp.float32), collect.features


@register("mobilenet_v1")
def mobilenet_v1(
  *, num_classes: int = 1000, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> MobileNetV1:
  """mdistiller's ImageNet MobileNetV1: 4,231,976 parameters with 1000 classes."""
  return MobileNetV1(num_classes=num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


@register("mobilenet_v2")
def mobilenet_v2(
  *, num_classes: int = 1000, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> MobileNetV2:
  """torchvision's `mobilenet_v2()`: 3,504,872 parameters with 1000 classes."""
  return MobileNetV2(num_classes=num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
