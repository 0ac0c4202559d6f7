"""Building blocks shared by the model families, with PyTorch's layer semantics.

The KD literature's models are PyTorch definitions (RepDistiller, mdistiller, torchvision). These
helpers reproduce torch's semantics in Flax NNX so that a model written with them computes what the
reference computes, and each parameter's nnx path is the torch state-dict key
(`('layer1', 0, 'conv1', 'kernel')` ↔ `'layer1.0.conv1.weight'`, see `jaxkd.models.torch_import`):

- `conv2d` takes torch's symmetric integer `padding`. torch `padding=1, stride=2` pads one pixel on
  every side; flax 'SAME' pads (0, 1) there and shifts the sampling grid by one pixel.
- `BatchNorm2d` normalises with the biased batch variance and updates the running variance with the
  unbiased one, as torch does.
- A torch `nn.Sequential` is an `nnx.List` whose parameter-free positions (ReLU) hold a function, so
  that list indices are torch's indices; `sequential` applies one, nested Sequentials included.
- The initialisers are named after the torch conventions they reproduce.

Layouts: activations NHWC, conv kernels HWIO, linear kernels (in, out).

On XLA:CPU every convolution's input goes through `fusion_barrier` (see there): without it the
backward pass of a CIFAR ResNet spends a third of its time recomputing activations.
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# `nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')`: N(0, 2 / (kh·kw·out_channels)).
# RepDistiller's WRN / VGG / MobileNetV2 `normal_(0, sqrt(2 / n))`, n = kh·kw·out_channels, is the
# same distribution.
kaiming_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch's default weight init of nn.Conv2d / nn.Linear, `kaiming_uniform_(a=√5)`:
# gain² = 2 / (1 + a²) = 1/3, so the bound is sqrt(3 · (1/3) / fan_in) = 1 / √fan_in.
torch_default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable[..., Array]:
  """torch's default bias init of nn.Conv2d / nn.Linear: U(-1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def fusion_barrier(x: Array, anchor: Array) -> Array:
  """Returns `x` unchanged, computed once and stored, on XLA:CPU.

  Why: the kernel gradient of a convolution reads its input in a transposed layout (the batch
  becomes the contracted feature axis). XLA:CPU's fusion pass duplicates cheap elementwise
  producers into every consumer, so the layout-changing copy recomputes the input from the
  operands of its whole elementwise chain: in a ResNet that chain runs back through the residual
  stream (BN, add, ReLU of several blocks), read in strided order. Measured on resnet20,
  batch 64 (`benchmarks/step_profile.py`): those copies took a third of forward + backward.

  How: `jax.lax.optimization_barrier` is expanded away before fusion on XLA:CPU, so the barrier
  is a division by a runtime 1.0. XLA counts a floating-point division as expensive and does
  not duplicate it, so `x / 1` is materialised once and the copies read it. `x / 1.0 == x`
  exactly in IEEE arithmetic, including ±0, ±inf and NaN (XLA:CPU flushes subnormals to zero,
  here as in every other arithmetic op). The 1.0 is
  `1 + 0 · stop_gradient(anchor[0, ..., 0])`, which XLA cannot constant-fold; `anchor` is a
  small local array (the layer's own kernel), so sharded parameters cost at most one scalar.

  Other backends fuse without this pathology; there `x` is returned as it is.
  """
  if jax.default_backend() != "cpu":
    return x
  one = 1 + 0 * jax.lax.stop_gradient(anchor[(0,) * anchor.ndim]).astype(x.dtype)
  return x / one


class Conv2d(nnx.Conv):
  """`nnx.Conv` whose input passes through `fusion_barrier`; same parameters and state."""

  def __call__(self, inputs: Array, **kwargs) -> Array:
    return super().__call__(fusion_barrier(inputs, self.kernel[...]), **kwargs)


def conv2d(
  in_channels: int,
  out_channels: int,
  kernel_size: int,
  *,
  stride: int = 1,
  padding: int = 0,
  groups: int = 1,
  bias: bool = True,
  kernel_init: Callable[..., Array] = torch_default_kernel_init,
  bias_init: Callable[..., Array] | None = None,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
  rngs: nnx.Rngs,
) -> Conv2d:
  """`torch.nn.Conv2d` as a `Conv2d` (an `nnx.Conv`): same arguments, same defaults, same output grid.

  `padding` pads `padding` pixels on each side of H and W (explicit, never 'SAME'); `groups` is
  flax's `feature_group_count` (depthwise conv: groups = in_channels). The kernel is HWIO,
  (kh, kw, in_channels / groups, out_channels). The default initialisers are torch's.
  """
  if bias_init is None:
    bias_init = torch_default_bias_init(in_channels // groups * kernel_size * kernel_size)
  return Conv2d(
    in_channels,
    out_channels,
    (kernel_size, kernel_size),
    strides=stride,
    padding=((padding, padding), (padding, padding)),
    feature_group_count=groups,
    use_bias=bias,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


def linear(
  in_features: int,
  out_features: int,
  *,
  bias: bool = True,
  kernel_init: Callable[..., Array] = torch_default_kernel_init,
  bias_init: Callable[..., Array] | None = None,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
  rngs: nnx.Rngs,
) -> nnx.Linear:
  """`torch.nn.Linear` as an `nnx.Linear` (kernel (in, out)), with torch's default initialisers."""
  if bias_init is None:
    bias_init = torch_default_bias_init(in_features)
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=bias,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class BatchNorm2d(nnx.Module):
  """`torch.nn.BatchNorm2d` over the last (channel) axis.

  y = (x - μ) / √(σ² + eps) · scale + bias, with (μ, σ²) the biased batch statistics over all
  axes but the last when `train=True`, the running statistics otherwise. In training the running
  statistics move as torch's do: running ← (1 - momentum) · running + momentum · batch, where the
  variance term is the unbiased n / (n - 1) · σ² (n = elements per channel). torch momentum 0.1 is
  flax momentum 0.9. Statistics are computed and kept in float32 whatever the compute dtype; the
  output has the compute `dtype` (the input's when None).

  Variables: `scale`, `bias` (`nnx.Param`), `mean`, `var` (`nnx.BatchStat`), torch's `weight`,
  `bias`, `running_mean`, `running_var`.
  """

  def __init__(
    self,
    num_features: int,
    *,
    eps: float = 1e-5,
    momentum: float = 0.1,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
  ):
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.eps = eps
    self.momentum = momentum
    self.dtype = dtype

  def __call__(self, x: Array, train: bool = False) -> Array:
    inputs = x.astype(jnp.float32)
    if train:
      reduce_axes = tuple(range(x.ndim - 1))
      mean = inputs.mean(reduce_axes)
      var = jnp.square(inputs - mean).mean(reduce_axes)
      count = x.size // x.shape[-1]
      unbiased_var = var * (count / max(count - 1, 1))
      self.mean[...] = (1 - self.momentum) * self.mean[...] + self.momentum * jax.lax.stop_gradient(
        mean
      )
      self.var[...] = (1 - self.momentum) * self.var[...] + self.momentum * jax.lax.stop_gradient(
        unbiased_var
      )
    else:
      mean, var = self.mean[...], self.var[...]
    scale = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
    outputs = (inputs - mean) * scale + self.bias[...].astype(jnp.float32)
    return outputs.astype(self.dtype or x.dtype)


def sequential(layers: Sequence[Any], x: Array, *, train: bool) -> Array:
  """Applies a torch-style `nn.Sequential` held as a list; BatchNorm layers receive `train`.

  A list inside the list is a Sequential nested in a Sequential (torchvision's
  `Conv2dNormActivation` blocks inside `InvertedResidual.conv`) and is applied recursively.
  """
  for layer in layers:
    if isinstance(layer, (nnx.List, list)):
      x = sequential(layer, x, train=train)
    elif isinstance(layer, BatchNorm2d):
      x = layer(x, train=train)
    else:
      x = layer(x)
  return x


def global_avg_pool(x: Array) -> Array:
  """Mean over H and W (NHWC → NC), accumulated in float32.

  The CIFAR references pool with fixed windows (`AvgPool2d(8)`, `F.avg_pool2d(out, 4)`) sized so
  that the window covers the whole final map of a 32×32 input: the global mean is the same
  operation wherever the reference's classifier shapes agree.
  """
  return x.mean(axis=(1, 2), dtype=jnp.float32).astype(x.dtype)


class FeatureCollector:
  """Named intermediate features, kept only when requested.

  `collect = FeatureCollector(return_features); collect('stage1', x); ...; collect.features` is
  `{}` unless enabled, so a plain forward pass builds no dictionary.
  """

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self.features: dict[str, Array] = {}

  def __call__(self, name: str, value: Array) -> None:
    if self.enabled:
      self.features[name] = value


def _block_layer_args(dtype, param_dtype, rngs) -> tuple[dict[str, Any], dict[str, Any]]:
  """(conv, BatchNorm) keyword arguments of the ResNet blocks: bias-free convs, kaiming fan-out."""
  conv_args = dict(
    bias=False, kernel_init=kaiming_normal_fan_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs
  )
  return conv_args, dict(dtype=dtype, param_dtype=param_dtype)


class BasicBlock(nnx.Module):
  """ResNet basic block (He et al. 2016), torchvision / RepDistiller layout.

  out = relu(preact), preact = bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x); conv1 carries the
  stride. The projection shortcut (1×1 conv with the stride, BN) exists when the stride or the width
  changes; it is named `shortcut_name` as in the reference (`downsample` in torchvision and
  RepDistiller's resnet.py, `shortcut` in RepDistiller's resnetv2.py). Returns (out, preact): the
  pre-ReLU sum is what RepDistiller's `preact=True` features return.
  """

  expansion = 1

  def __init__(
    self,
    in_planes: int,
    planes: int,
    stride: int = 1,
    *,
    shortcut_name: str = "downsample",
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    conv_args, bn_args = _block_layer_args(dtype, param_dtype, rngs)
    self.conv1 = conv2d(in_planes, planes, 3, stride=stride, padding=1, **conv_args)
    self.bn1 = BatchNorm2d(planes, **bn_args)
    self.conv2 = conv2d(planes, planes, 3, padding=1, **conv_args)
    self.bn2 = BatchNorm2d(planes, **bn_args)
    self.shortcut_name = shortcut_name
    setattr(
      self,
      shortcut_name,
      _projection(in_planes, planes * self.expansion, stride, conv_args, bn_args),
    )

  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    out = jax.nn.relu(self.bn1(self.conv1(x), train))
    out = self.bn2(self.conv2(out), train)
    preact = out + _shortcut(getattr(self, self.shortcut_name), x, train)
    return jax.nn.relu(preact), preact


class Bottleneck(nnx.Module):
  """ResNet bottleneck block, expansion 4, stride on the 3×3 conv (torchvision "v1.5" layout,
  also RepDistiller's resnet.py / resnetv2.py): 1×1 → 3×3 → 1×1 (×4 channels), + shortcut, ReLU.
  Shortcut naming and the (out, preact) return as in `BasicBlock`.
  """

  expansion = 4

  def __init__(
    self,
    in_planes: int,
    planes: int,
    stride: int = 1,
    *,
    shortcut_name: str = "downsample",
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    conv_args, bn_args = _block_layer_args(dtype, param_dtype, rngs)
    self.conv1 = conv2d(in_planes, planes, 1, **conv_args)
    self.bn1 = BatchNorm2d(planes, **bn_args)
    self.conv2 = conv2d(planes, planes, 3, stride=stride, padding=1, **conv_args)
    self.bn2 = BatchNorm2d(planes, **bn_args)
    self.conv3 = conv2d(planes, planes * self.expansion, 1, **conv_args)
    self.bn3 = BatchNorm2d(planes * self.expansion, **bn_args)
    self.shortcut_name = shortcut_name
    setattr(
      self,
      shortcut_name,
      _projection(in_planes, planes * self.expansion, stride, conv_args, bn_args),
    )

  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    out = jax.nn.relu(self.bn1(self.conv1(x), train))
    out = jax.nn.relu(self.bn2(self.conv2(out), train))
    out = self.bn3(self.conv3(out), train)
    preact = out + _shortcut(getattr(self, self.shortcut_name), x, train)
    return jax.nn.relu(preact), preact


def _projection(in_planes, out_planes, stride, conv_args, bn_args) -> nnx.List | None:
  """Sequential(1×1 conv with stride, BN) when the block changes resolution or width, else None."""
  if stride == 1 and in_planes == out_planes:
    return None
  return nnx.List(
    [
      conv2d(in_planes, out_planes, 1, stride=stride, **conv_args),
      BatchNorm2d(out_planes, **bn_args),
    ]
  )


def _shortcut(projection: nnx.List | None, x: Array, train: bool) -> Array:
  return x if projection is None else sequential(projection, x, train=train)


def residual_stage(
  block: type[BasicBlock] | type[Bottleneck],
  in_planes: int,
  planes: int,
  num_blocks: int,
  stride: int,
  **block_kwargs,
) -> nnx.List:
  """torch `_make_layer`: `num_blocks` blocks, the first with `stride` (and the projection)."""
  blocks = []
  for index in range(num_blocks):
    blocks.append(block(in_planes, planes, stride if index == 0 else 1, **block_kwargs))
    in_planes = planes * block.expansion
  return nnx.List(blocks)


def apply_stage(stage: Sequence[nnx.Module], x: Array, *, train: bool) -> tuple[Array, Array]:
  """Runs blocks returning (out, preact); returns the last block's (out, preact)."""
  preact = x
  for block in stage:
    x, preact = block(x, train)
  return x, preact


def apply_stages(
  module: nnx.Module, x: Array, *, num_stages: int, train: bool, collect: "FeatureCollector"
) -> Array:
  """Runs `module.layer1 .. layer{num_stages}` (torch naming), collecting each stage's output as
  `stage{i}` and its pre-ReLU sum as `preact_stage{i}`; returns the last stage's output."""
  for index in range(1, num_stages + 1):
    x, preact = apply_stage(getattr(module, f"layer{index}"), x, train=train)
    collect(f"stage{index}", x)
    collect(f"preact_stage{index}", preact)
  return x
