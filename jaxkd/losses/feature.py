"""Feature-based distillation losses: the student matches the teacher's intermediate features.

Pure functions of arrays (jax and numpy only): jit, vmap and grad safe, no state. Inputs of any
float dtype are cast to float32 and every loss returns a float32 scalar.

Layout: feature maps are NHWC (batch, height, width, channels), as jaxkd's models produce them. The
reference implementations (RepDistiller, mdistiller) are NCHW; each docstring says which axis of
ours plays the role of theirs, so that our value on an NHWC array equals the reference value on its
NCHW transpose.

Matrix products and pooling run at `Precision.HIGHEST` so that the float32 values match the
references on accelerators too, where the default precision would round operands to bfloat16/TF32.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses.reduction import FINITE
from jaxkd.losses.reduction import NON_NEGATIVE
from jaxkd.losses.reduction import POSITIVE
from jaxkd.losses.reduction import POSITIVE_INTEGER
from jaxkd.losses.reduction import check_arguments

_HIGHEST = jax.lax.Precision.HIGHEST
# torch.nn.functional.normalize's default floor on the norm.
_NORMALIZE_EPS = 1e-12


def _as_float32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _as_list(features) -> list[jax.Array]:
  """Stage lists are the reference's interface; a single array counts as one stage."""
  if isinstance(features, (list, tuple)):
    return [_as_float32(f) for f in features]
  return [_as_float32(features)]


def l2_norm(x: jax.Array, axis: int | Sequence[int] = -1, keepdims: bool = True) -> jax.Array:
  """Euclidean norm whose gradient is finite (zero) at the origin.

  `sqrt` has an infinite derivative at 0; the double `where` keeps both the value and the
  gradient finite for all-zero vectors (zero features, identical samples).
  """
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = _NORMALIZE_EPS) -> jax.Array:
  """`x / max(‖x‖₂, eps)`: torch.nn.functional.normalize(x, p=2, dim=axis, eps=eps)."""
  return x / jnp.maximum(l2_norm(x, axis=axis), eps)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Averaging matrix [out_size, in_size] of torch's adaptive average pooling.

  Output cell i averages input cells [floor(i·in/out), ceil((i+1)·in/out)), the windows of
  `torch.nn.functional.adaptive_avg_pool2d`; they overlap when out_size does not divide in_size.
  """
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool2d(features: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
  """`F.adaptive_avg_pool2d` on NHWC features: [B, H, W, C] -> [B, h, w, C].

  Exact for any sizes (divisible or not), including torch's overlapping windows. An int
  `output_size` means a square output, like torch.
  """
  check_arguments("adaptive_avg_pool2d", output_size=(output_size, POSITIVE_INTEGER))
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  in_h, in_w = features.shape[1:3]
  if (in_h, in_w) == (out_h, out_w):
    return features
  return jnp.einsum(
    "ih,bhwc,jw->bijc",
    _adaptive_pool_matrix(in_h, out_h),
    features,
    _adaptive_pool_matrix(in_w, out_w),
    precision=_HIGHEST,
  )


def match_spatial(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pools the map with the larger height down to the other's size (RepDistiller AT/NST/VID).

  The reference compares heights only and pools to (H, H); for the square maps it is written for,
  pooling to the other map's (H, W), as here, is the same.
  """
  student_h, teacher_h = student.shape[1], teacher.shape[1]
  if student_h > teacher_h:
    student = adaptive_avg_pool2d(student, teacher.shape[1:3])
  elif student_h < teacher_h:
    teacher = adaptive_avg_pool2d(teacher, student.shape[1:3])
  return student, teacher


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(a - b))


def fitnet(student_hint: jax.Array, teacher_hint: jax.Array) -> jax.Array:
  """FitNet hint loss: `mean((r(f_s) − f_t)²)` over every element.

  Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. Reproduces RepDistiller
  `distiller_zoo/FitNet.py` HintLoss (`nn.MSELoss()`, elementwise mean). The layout does not
  matter: the mean runs over all elements.

  Args:
    student_hint: the student's guided layer after the `ConvReg` regressor, [B, H, W, C].
    teacher_hint: the teacher's hint layer, same shape.

  Returns:
    float32 scalar.
  """
  student_hint, teacher_hint = _as_float32(student_hint), _as_float32(teacher_hint)
  if student_hint.shape != teacher_hint.shape:
    raise ValueError(
      f"fitnet: student hint {student_hint.shape} and teacher hint "
      f"{teacher_hint.shape} differ; regress the student with ConvReg first."
    )
  return _mse(student_hint, teacher_hint)


def attention_map(features: jax.Array, *, p: int = 2, eps: float = _NORMALIZE_EPS) -> jax.Array:
  """Spatial attention map of AT: `normalize(mean_c(f^p))`, [B, H, W, C] -> [B, H·W].

  The mean over channels is the reference's `mean(1)` on NCHW; flattening (H, W) row-major
  gives the reference's `view(B, -1)` order. `p` is an integer power, as torch's `pow(2)`.
  """
  channel_mean = jnp.mean(_as_float32(features) ** p, axis=-1)
  return l2_normalize(channel_mean.reshape(channel_mean.shape[0], -1), axis=-1, eps=eps)


def attention_transfer(
  student_features, teacher_features, *, p: int = 2, eps: float = _NORMALIZE_EPS
) -> jax.Array:
  """Attention transfer: `Σ_stages mean_{b,hw}((at(f_s) − at(f_t))²)`.

  Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017. Reproduces RepDistiller
  `distiller_zoo/AT.py` Attention (p=2): per stage, the map with the larger height is adaptive-
  average-pooled to the other's size, `at(f) = F.normalize(f.pow(p).mean(1).view(B, -1))`, and
  the stage loss is the mean over batch and positions of the squared difference (the reference
  returns the per-stage list; RepDistiller's trainer sums it, as here). Channel counts may differ.

  Args:
    student_features: one [B, H, W, C] map or a list of them (one per stage).
    teacher_features: the matching teacher maps.
    p: integer power of the activations.
    eps: floor of the L2 norm (torch's normalize eps).

  Returns:
    float32 scalar, summed over stages.
  """
  check_arguments("attention_transfer", p=(p, POSITIVE_INTEGER), eps=(eps, POSITIVE))
  total = jnp.zeros((), jnp.float32)
  for student, teacher in zip(_as_list(student_features), _as_list(teacher_features), strict=True):
    student, teacher = match_spatial(student, teacher)
    total += _mse(attention_map(student, p=p, eps=eps), attention_map(teacher, p=p, eps=eps))
  return total


def _polynomial_kernel_mean(a: jax.Array, b: jax.Array, degree: int, offset: float) -> jax.Array:
  """mean over (batch, i, j) of `(a_i·b_j + offset)^degree` for channel vectors a_i, b_j."""
  gram = jnp.einsum("bsi,bsj->bij", a, b, precision=_HIGHEST)
  return jnp.mean((gram + offset) ** degree)


def nst(
  student_features,
  teacher_features,
  *,
  degree: int = 2,
  offset: float = 0.0,
  eps: float = _NORMALIZE_EPS,
) -> jax.Array:
  """Neural selectivity transfer: squared MMD between channel activation patterns.

  Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017.
  Reproduces RepDistiller `distiller_zoo/NST.py` NSTLoss (full_loss=True). Each channel's spatial
  map is one sample: NCHW `f.view(B, C, H·W)` normalised over H·W is, in NHWC,
  `f.reshape(B, H·W, C)` normalised over axis 1. With the polynomial kernel k(x, y) = (x·y + offset)^degree (reference:
  degree 2, offset 0), per stage

    loss = mean k(t, t) + mean k(s, s) − 2 mean k(s, t),

  the means running over batch and all channel pairs; k(t, t) carries no gradient, as the
  reference's `.detach()`. Spatial sizes are matched as in AT; channel counts may differ.

  Returns:
    float32 scalar, summed over stages.
  """
  check_arguments(
    "nst", degree=(degree, POSITIVE_INTEGER), offset=(offset, FINITE), eps=(eps, POSITIVE)
  )
  total = jnp.zeros((), jnp.float32)
  for student, teacher in zip(_as_list(student_features), _as_list(teacher_features), strict=True):
    student, teacher = match_spatial(student, teacher)
    student, teacher = (
      l2_normalize(f.reshape(f.shape[0], -1, f.shape[-1]), axis=1, eps=eps)
      for f in (student, teacher)
    )
    total += (
      jax.lax.stop_gradient(_polynomial_kernel_mean(teacher, teacher, degree, offset))
      + _polynomial_kernel_mean(student, student, degree, offset)
      - 2.0 * _polynomial_kernel_mean(student, teacher, degree, offset)
    )
  return total


def vid(
  predicted_mean: jax.Array, target: jax.Array, log_scale: jax.Array, *, eps: float = 1e-5
) -> jax.Array:
  """Variational information distillation: Gaussian negative log-likelihood of the teacher.

  Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019.
  Reproduces RepDistiller `distiller_zoo/VID.py` VIDLoss.forward (= mdistiller `vid_loss`):

    σ²_c = softplus(log_scale_c) + eps,
    loss = mean_{b,h,w,c} ½ ((μ − t)² / σ²_c + log σ²_c).

  The per-channel variance indexes the last (channel) axis, the reference's `view(1, -1, 1, 1)`.
  The reference pools the larger map before the regressor; a larger teacher map is pooled here,
  while a larger student map must be pooled before the regressor (`VIDRegressor(x, output_size)`).

  Args:
    predicted_mean: μ, the `VIDRegressor` output on the student feature, [B, h, w, C_t].
    target: the teacher feature t, [B, H, W, C_t] with H >= h.
    log_scale: the regressor's per-channel variance parameter, [C_t].
    eps: variance floor (reference 1e-5).

  Returns:
    float32 scalar.
  """
  check_arguments("vid", eps=(eps, POSITIVE))
  predicted_mean, target = _as_float32(predicted_mean), _as_float32(target)
  if predicted_mean.shape[1] > target.shape[1]:
    raise ValueError(
      f"vid: predicted mean {predicted_mean.shape} is larger than the target "
      f"{target.shape}; pool the student feature before the regressor."
    )
  _, target = match_spatial(predicted_mean, target)
  variance = jax.nn.softplus(_as_float32(log_scale)) + eps
  return jnp.mean(0.5 * (jnp.square(predicted_mean - target) / variance + jnp.log(variance)))


def review_hcl(
  student_features,
  teacher_features,
  *,
  pool_sizes: Sequence[int] = (4, 2, 1),
  level_decay: float = 0.5,
) -> jax.Array:
  """ReviewKD hierarchical context loss.

  Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021. Reproduces mdistiller
  `distillers/ReviewKD.py` `hcl_loss`: per stage, the MSE at full resolution (weight 1) plus the
  MSE after adaptive average pooling to each l×l in `pool_sizes` with l < H (skipped levels do
  not count), the k-th level used weighted `level_decay^k` (0.5, 0.25, 0.125), all divided by
  the total weight; stages are summed. Pooling is torch's, exact also for non-divisible sizes
  (7×7 → 4×4 on ImageNet).

  Args:
    student_features: the ReviewKD fusion outputs, a list of [B, H, W, C] (or one array).
    teacher_features: the matching teacher maps, same shapes.

  Returns:
    float32 scalar, summed over stages.
  """
  check_arguments(
    "review_hcl",
    pool_sizes=(pool_sizes, POSITIVE_INTEGER),
    level_decay=(level_decay, NON_NEGATIVE),
  )
  total = jnp.zeros((), jnp.float32)
  for student, teacher in zip(_as_list(student_features), _as_list(teacher_features), strict=True):
    height = student.shape[1]
    stage_loss, weight, total_weight = _mse(student, teacher), 1.0, 1.0
    for size in pool_sizes:
      if size >= height:
        continue
      weight *= level_decay
      stage_loss += weight * _mse(
        adaptive_avg_pool2d(student, size), adaptive_avg_pool2d(teacher, size)
      )
      total_weight += weight
    total += stage_loss / total_weight
  return total


def _scored_tokens(
  mask: jax.Array | None, student: jax.Array, teacher: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(float32 token mask [B, S], student, teacher) with the unscored tokens' states zeroed.

  Zeroing before the arithmetic, not only multiplying by the mask after it, keeps nan or inf at
  padded tokens out of the value and the gradient (0 * nan = nan, also in the backward pass).
  """
  if mask is None:
    return jnp.ones(student.shape[:-1], jnp.float32), student, teacher
  token_mask = _as_float32(mask)
  scored = (token_mask != 0)[..., None]
  return token_mask, jnp.where(scored, student, 0.0), jnp.where(scored, teacher, 0.0)


def _mean_over_layers(layer_loss, student_hidden, teacher_hidden) -> jax.Array:
  """DistillKit `compute_hs_loss`: the per-layer losses are averaged over the layer pairs."""
  student_layers, teacher_layers = _as_list(student_hidden), _as_list(teacher_hidden)
  losses = [layer_loss(s, t) for s, t in zip(student_layers, teacher_layers, strict=True)]
  return sum(losses) / len(losses)


def hidden_mse(student_hidden, teacher_hidden, mask: jax.Array | None = None) -> jax.Array:
  """Hidden-state MSE per valid token and unit: `Σ m (h_s − h_t)² / (Σ m · D)`.

  Transformer hidden-state distillation (TinyBERT, Jiao et al. 2020); reproduces DistillKit
  `distillkit/lossfuncs/hidden_state.py` (`compute_hs_loss`, kind "mse"). Project the student
  first with `LinearProjection` when the widths differ. With several layers (lists of arrays,
  paired in order) the layer losses are averaged.

  Args:
    student_hidden: [B, S, D] or a list of them.
    teacher_hidden: [B, S, D] or a list of them.
    mask: [B, S], 1 (True) for the tokens that count; None counts all. Whatever the states hold at
      the other tokens (nan, inf) reaches neither the value nor the gradient.

  Returns:
    float32 scalar; 0 when no token is valid.
  """

  def layer_loss(student, teacher):
    token_mask, student, teacher = _scored_tokens(mask, student, teacher)
    squared_error = jnp.sum(jnp.square(student - teacher) * token_mask[..., None])
    return squared_error / jnp.maximum(jnp.sum(token_mask) * student.shape[-1], 1.0)

  return _mean_over_layers(layer_loss, student_hidden, teacher_hidden)


def hidden_cosine(
  student_hidden, teacher_hidden, mask: jax.Array | None = None, *, eps: float = 1e-8
) -> jax.Array:
  """Hidden-state cosine distance: mean over valid tokens of `1 − cos(h_s, h_t)`.

  Reproduces DistillKit `compute_hs_loss` kind "cosine", with torch's
  `F.cosine_similarity(x, y, dim=-1, eps=1e-8) = x·y / (max(‖x‖, eps) · max(‖y‖, eps))`.
  Layers are averaged as in `hidden_mse`.

  Args:
    student_hidden: [B, S, D] or a list of them (projected to the teacher width).
    teacher_hidden: [B, S, D] or a list of them.
    mask: [B, S], 1 (True) for the tokens that count; None counts all (other tokens as in
      `hidden_mse`).
    eps: floor of each norm (torch's 1e-8).

  Returns:
    float32 scalar; 0 when no token is valid.
  """
  check_arguments("hidden_cosine", eps=(eps, POSITIVE))

  def layer_loss(student, teacher):
    token_mask, student, teacher = _scored_tokens(mask, student, teacher)
    cosine = jnp.sum(student * teacher, axis=-1) / (
      jnp.maximum(l2_norm(student, keepdims=False), eps)
      * jnp.maximum(l2_norm(teacher, keepdims=False), eps)
    )
    return jnp.sum((1.0 - cosine) * token_mask) / jnp.maximum(jnp.sum(token_mask), 1.0)

  return _mean_over_layers(layer_loss, student_hidden, teacher_hidden)
