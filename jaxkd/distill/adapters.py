"""Trainable adapter modules that feature-distillation methods train alongside the student.

They belong to the distillation method, not to the model: FitNet's `ConvReg` regressor, CRD's
`Embed` heads (and CC's linear ones), VID's `VIDRegressor`, a bias-free `LinearProjection` for
hidden states of different widths, and ReviewKD's `ABF` blocks chained by `ReviewKDFusion`.

Flax NNX, NHWC, built from the torch-semantics layers of `jaxkd.models.layers`: torch's default
Conv/Linear init (kaiming-uniform with a=√5 on the kernel, uniform ±1/√fan_in on the bias) unless
the reference overrides it (ReviewKD's ABF convolutions), and `BatchNorm2d` as torch's (momentum
0.1, eps 1e-5, running variance fed the unbiased batch variance), so that outputs match the
reference in train and in eval mode. Modules with BatchNorm take `train: bool`.

Each variable's nnx path is the reference module's state-dict key, as for the models
(`('abfs', 0, 'conv1', 1, 'var')` ↔ `'abfs.0.conv1.1.running_var'`), so reference weights load
with `jaxkd.models.torch_import.convert_state_dict(adapter, torch_module.state_dict())`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.losses.feature import adaptive_avg_pool2d, l2_normalize
from jaxkd.models import layers

# kaiming_uniform_(a=1), used by ReviewKD's ABF: gain² = 2 / (1 + a²) = 1, bound √(3/fan_in).
_kaiming_uniform_a1 = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")


class ConvReg(nnx.Module):
  """FitNet convolutional regressor: conv → BN (→ ReLU), student map to the teacher's shape.

  RepDistiller `models/util.py` ConvReg (= mdistiller `distillers/_common.py`), chosen by heights:
  H_s = 2 H_t: 3×3 conv, stride 2, padding 1; 2 H_s = H_t: 4×4 transposed conv, stride 2,
  padding 1; H_s ≥ H_t: a (1 + H_s − H_t) × (1 + W_s − W_t) valid conv; otherwise an error.
  Variables `conv`, `bn` as the reference's.

  Args:
    student_shape: NHWC shape of the student feature (the batch entry is ignored).
    teacher_shape: NHWC shape of the teacher feature.
    use_relu: ReLU after BN (True for FitNet; False in RepDistiller's AB Connector).
  """

  def __init__(
    self,
    student_shape: Sequence[int],
    teacher_shape: Sequence[int],
    *,
    use_relu: bool = True,
    rngs: nnx.Rngs,
  ):
    student_h, student_w, student_c = student_shape[-3:]
    teacher_h, teacher_w, teacher_c = teacher_shape[-3:]
    if student_h == 2 * teacher_h:
      self.conv = layers.conv2d(student_c, teacher_c, 3, stride=2, padding=1, rngs=rngs)
    elif 2 * student_h == teacher_h:
      # torch ConvTranspose2d(k=4, s=2, p=1) pads the dilated input by k − 1 − p = 2 per side;
      # its fan_in (torch counts weight.size(1) = out channels) is the Flax kernel's axis −2.
      self.conv = nnx.ConvTranspose(
        student_c,
        teacher_c,
        (4, 4),
        strides=(2, 2),
        padding=((2, 2), (2, 2)),
        transpose_kernel=True,
        kernel_init=layers.torch_default_kernel_init,
        bias_init=layers.torch_default_bias_init(teacher_c * 16),
        rngs=rngs,
      )
    elif student_h >= teacher_h:
      # Rectangular when the height and width gaps differ, which `layers.conv2d` does not take.
      kernel_size = (1 + student_h - teacher_h, 1 + student_w - teacher_w)
      self.conv = nnx.Conv(
        student_c,
        teacher_c,
        kernel_size,
        padding="VALID",
        kernel_init=layers.torch_default_kernel_init,
        bias_init=layers.torch_default_bias_init(student_c * kernel_size[0] * kernel_size[1]),
        rngs=rngs,
      )
    else:
      raise ValueError(
        f"ConvReg: no regressor from student size {student_h} to teacher size "
        f"{teacher_h} (as RepDistiller)."
      )
    self.bn = layers.BatchNorm2d(teacher_c)
    self.use_relu = use_relu

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.bn(self.conv(x), train)
    return nnx.relu(x) if self.use_relu else x


class Embed(nnx.Module):
  """Linear head, L2-normalised: CRD's `Embed` (with normalize=False, CC's `LinearEmbed`).

  RepDistiller `crd/criterion.py` Embed / `models/util.py` LinearEmbed: flatten per sample,
  linear with bias (variable `linear`), then `x / ‖x‖₂` (floored at 1e-12 here, which only matters
  for zero vectors). Flattening NHWC differs from NCHW in order; it only matters when importing
  torch weights for a spatial input (the references embed pooled [B, C] features, where it does
  not).
  """

  def __init__(self, dim_in: int, dim_out: int = 128, *, normalize: bool = True, rngs: nnx.Rngs):
    self.linear = layers.linear(dim_in, dim_out, rngs=rngs)
    self.normalize = normalize

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.linear(x.reshape(x.shape[0], -1))
    return l2_normalize(x, axis=-1) if self.normalize else x


class LinearProjection(nnx.Module):
  """Bias-free linear map of hidden states [..., d_student] -> [..., d_teacher].

  For hidden-state distillation between transformers of different widths (DistillKit's
  per-layer projection; TinyBERT's W_h), torch nn.Linear(bias=False) init.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.linear = layers.linear(in_features, out_features, bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x)


class VIDRegressor(nnx.Module):
  """VID's mean regressor and per-channel variance parameter.

  RepDistiller `distiller_zoo/VID.py` VIDLoss (RepDistiller builds it with
  mid_channels = out_channels = the teacher's channels): `regressor` = 1×1 conv → ReLU → 1×1 conv
  → ReLU → 1×1 conv, all bias-free, and `log_scale` = softplus⁻¹(init_pred_var − eps) per output
  channel, so that the initial variance softplus(log_scale) + eps equals init_pred_var. Feed
  `(self(x), target, self.log_scale)` to `jaxkd.losses.feature.vid`.
  """

  def __init__(
    self,
    in_channels: int,
    mid_channels: int,
    out_channels: int,
    *,
    init_pred_var: float = 5.0,
    eps: float = 1e-5,
    rngs: nnx.Rngs,
  ):
    self.regressor = nnx.List(
      [
        layers.conv2d(in_channels, mid_channels, 1, bias=False, rngs=rngs),
        nnx.relu,
        layers.conv2d(mid_channels, mid_channels, 1, bias=False, rngs=rngs),
        nnx.relu,
        layers.conv2d(mid_channels, out_channels, 1, bias=False, rngs=rngs),
      ]
    )
    inverse_softplus = float(np.log(np.expm1(init_pred_var - eps)))
    self.log_scale = nnx.Param(jnp.full((out_channels,), inverse_softplus, jnp.float32))

  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """Predicted mean; a student map taller than `output_size` (the teacher's H, W) is first
    adaptive-average-pooled to it, as the reference does before its regressor."""
    if output_size is not None and x.shape[1] > output_size[0]:
      x = adaptive_avg_pool2d(x, output_size)
    return layers.sequential(self.regressor, x, train=False)  # No BatchNorm: `train` is unused.


def _resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch `F.interpolate(mode='nearest')` on NHWC: source index floor(i · in/out)."""
  rows = np.minimum(np.floor(np.arange(size[0]) * (x.shape[1] / size[0])), x.shape[1] - 1)
  cols = np.minimum(np.floor(np.arange(size[1]) * (x.shape[2] / size[1])), x.shape[2] - 1)
  return x[:, rows.astype(np.int32)][:, :, cols.astype(np.int32)]


class ABF(nnx.Module):
  """ReviewKD attention-based fusion block (mdistiller `distillers/ReviewKD.py` ABF).

  x ← BN(conv1×1(x)); with `fuse`, the residual y from the deeper level is nearest-upsampled to
  x's size and mixed by two sigmoid attention maps from conv1×1([x, y]):
  x ← x·a₀ + y·a₁; x is nearest-resized to `out_size` if needed; returns (BN(conv3×3(x)), x),
  the second being the residual for the next (shallower) block. The two main convolutions use
  kaiming_uniform(a=1) as the reference; the attention conv keeps torch's default init.
  Variables as the reference's `nn.Sequential`s: `conv1` = [conv, BN], `conv2` = [conv, BN],
  `att_conv` = [conv, sigmoid] (None without `fuse`).
  """

  def __init__(
    self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, *, rngs: nnx.Rngs
  ):
    conv_args = dict(bias=False, kernel_init=_kaiming_uniform_a1, rngs=rngs)
    self.conv1 = nnx.List(
      [layers.conv2d(in_channels, mid_channels, 1, **conv_args), layers.BatchNorm2d(mid_channels)]
    )
    self.conv2 = nnx.List(
      [
        layers.conv2d(mid_channels, out_channels, 3, padding=1, **conv_args),
        layers.BatchNorm2d(out_channels),
      ]
    )
    self.att_conv = (
      nnx.List([layers.conv2d(2 * mid_channels, 2, 1, rngs=rngs), nnx.sigmoid]) if fuse else None
    )

  def __call__(
    self,
    x: jax.Array,
    residual: jax.Array | None = None,
    out_size: tuple[int, int] | None = None,
    *,
    train: bool,
  ) -> tuple[jax.Array, jax.Array]:
    x = layers.sequential(self.conv1, x, train=train)
    if self.att_conv is not None:
      residual = _resize_nearest(residual, x.shape[1:3])
      attention = layers.sequential(
        self.att_conv, jnp.concatenate([x, residual], axis=-1), train=train
      )
      x = x * attention[..., 0:1] + residual * attention[..., 1:2]
    if out_size is not None and tuple(x.shape[1:3]) != tuple(out_size):
      x = _resize_nearest(x, out_size)
    return layers.sequential(self.conv2, x, train=train), x


class ReviewKDFusion(nnx.Module):
  """ReviewKD's student-side review module: ABF blocks fused from the deepest level up.

  mdistiller `distillers/ReviewKD.py` ReviewKD (the ABF chain of forward_train). All arguments and
  the inputs and outputs run from shallow to deep, the last level being the pooled feature as a
  [B, 1, 1, C] map; `abfs` holds the blocks deepest first, as mdistiller's (`abfs[::-1]`), so that
  `abfs.0` is the same block on both sides. mid channels = min(max_mid_channels, in_channels[-1]);
  the deepest block does not fuse. `out_sizes` is mdistiller's OUT_SHAPES reversed (mdistiller
  lists it deepest first); its SHAPES are the inputs' own sizes, read from the arrays here.

  Args:
    in_channels: student channels per level (mdistiller IN_CHANNELS).
    out_channels: teacher channels per level (OUT_CHANNELS).
    out_sizes: teacher spatial size per level (OUT_SHAPES reversed), int (square) or (H, W).
  """

  def __init__(
    self,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    out_sizes: Sequence[int | tuple[int, int]],
    *,
    max_mid_channels: int = 512,
    rngs: nnx.Rngs,
  ):
    if not len(in_channels) == len(out_channels) == len(out_sizes):
      raise ValueError(
        "ReviewKDFusion: in_channels, out_channels and out_sizes need one entry per level."
      )
    mid_channels = min(max_mid_channels, in_channels[-1])
    blocks = [
      ABF(c_in, mid_channels, c_out, level < len(in_channels) - 1, rngs=rngs)
      for level, (c_in, c_out) in enumerate(zip(in_channels, out_channels))
    ]
    self.abfs = nnx.List(blocks[::-1])
    self.out_sizes = [(s, s) if isinstance(s, int) else tuple(s) for s in out_sizes]

  def __call__(self, student_features: Sequence[jax.Array], train: bool) -> list[jax.Array]:
    """Student features shallow → deep; returns the fused maps shallow → deep (for `review_hcl`)."""
    outputs, residual = [], None
    for abf, student_feature, out_size in zip(
      self.abfs, student_features[::-1], self.out_sizes[::-1]
    ):
      output, residual = abf(student_feature, residual, out_size, train=train)
      outputs.insert(0, output)
    return outputs
