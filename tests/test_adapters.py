"""Adapter modules: shapes, initialisation, and torch parity with the reference modules.

The torch classes below transcribe RepDistiller (models/util.py ConvReg, distiller_zoo/VID.py
VIDLoss, crd/criterion.py Embed) and mdistiller (distillers/ReviewKD.py ABF and the ABF chain of
ReviewKD.forward_train). Their state dicts load into ours by the models' mechanical name mapping
(our variable paths are their keys); outputs are compared, and for BatchNorm the running statistics
after a training step and the eval-mode outputs that follow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd.distill import adapters
from jaxkd.losses import feature
from jaxkd.models import torch_import

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
RTOL, ATOL = 1e-5, 1e-5


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _to_nchw(x):
  return torch.tensor(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _to_nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _create(module_type, *args, **kwargs):
  """Constructs a module in one compiled call, with an 'rbg' key.

  Eager initialisation compiles once per parameter shape, and XLA:CPU compiles threefry slowly
  (about a minute for ReviewKDFusion on a loaded machine); the parity tests overwrite the weights.
  """
  return nnx.jit(
    lambda: module_type(*args, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **kwargs)
  )()


def _apply(module, *args, **kwargs):
  """module(*args, **kwargs) compiled: eager NNX calls dispatch op by op, which is slow."""
  return nnx.jit(lambda m, *a: m(*a, **kwargs))(module, *args)


def _load(ours, theirs):
  """Copies the torch module's state dict into ours (paths = torch keys, kernels to HWIO).

  The tensors are cloned first: on CPU the converted arrays can share the tensors' memory, and
  torch then updates its running statistics in place, under our arrays.
  """
  state_dict = {key: tensor.detach().clone() for key, tensor in theirs.state_dict().items()}
  nnx.update(ours, torch_import.convert_state_dict(ours, state_dict))


def _randomize_batch_norms(theirs, seed):
  """Random affine parameters and running statistics in every BatchNorm of the torch module."""
  batch_norms = [m for m in theirs.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for index, bn in enumerate(batch_norms):
      shape, seed_bn = (bn.num_features,), seed + 10 * index
      bn.weight.copy_(torch.tensor(_normal(seed_bn, shape)))
      bn.bias.copy_(torch.tensor(_normal(seed_bn + 1, shape)))
      bn.running_mean.copy_(torch.tensor(_normal(seed_bn + 2, shape)))
      bn.running_var.copy_(torch.tensor(np.abs(_normal(seed_bn + 3, shape)) + 0.5))


def _assert_state_matches(ours, theirs):
  """Every parameter and BatchNorm statistic of ours equals the torch module's."""
  expected = nnx.to_flat_state(torch_import.convert_state_dict(ours, theirs.state_dict()))
  actual = dict(nnx.to_flat_state(nnx.state(ours, (nnx.Param, nnx.BatchStat))))
  for path, variable in expected:
    np.testing.assert_allclose(
      actual[path][...], variable[...], rtol=RTOL, atol=ATOL, err_msg=torch_import.torch_key(path)
    )


class TorchConvReg(nn.Module):
  """RepDistiller models/util.py ConvReg."""

  def __init__(self, s_shape, t_shape, use_relu=True):
    super().__init__()
    self.use_relu = use_relu
    _, s_c, s_h, s_w = s_shape
    _, t_c, t_h, t_w = t_shape
    if s_h == 2 * t_h:
      self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif s_h * 2 == t_h:
      self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    else:
      self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    self.bn = nn.BatchNorm2d(t_c)

  def forward(self, x):
    x = self.bn(self.conv(x))
    return F.relu(x) if self.use_relu else x


class TorchVIDLoss(nn.Module):
  """RepDistiller distiller_zoo/VID.py VIDLoss."""

  def __init__(self, c_in, c_mid, c_out, init_pred_var=5.0, eps=1e-5):
    super().__init__()
    self.regressor = nn.Sequential(
      nn.Conv2d(c_in, c_mid, 1, bias=False),
      nn.ReLU(),
      nn.Conv2d(c_mid, c_mid, 1, bias=False),
      nn.ReLU(),
      nn.Conv2d(c_mid, c_out, 1, bias=False),
    )
    self.log_scale = nn.Parameter(np.log(np.exp(init_pred_var - eps) - 1.0) * torch.ones(c_out))
    self.eps = eps

  def forward(self, x, target):
    s_h, t_h = x.shape[2], target.shape[2]
    if s_h > t_h:
      x = F.adaptive_avg_pool2d(x, (t_h, t_h))
    elif s_h < t_h:
      target = F.adaptive_avg_pool2d(target, (s_h, s_h))
    pred_mean = self.regressor(x)
    pred_var = (torch.log(1.0 + torch.exp(self.log_scale)) + self.eps).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var)))


class TorchABF(nn.Module):
  """mdistiller distillers/ReviewKD.py ABF."""

  def __init__(self, c_in, c_mid, c_out, fuse):
    super().__init__()
    self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
    self.conv2 = nn.Sequential(
      nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
    )
    self.att_conv = nn.Sequential(nn.Conv2d(c_mid * 2, 2, 1), nn.Sigmoid()) if fuse else None

  def forward(self, x, y=None, shape=None, out_shape=None):
    n, _, h, w = x.shape
    x = self.conv1(x)
    if self.att_conv is not None:
      y = F.interpolate(y, (shape, shape), mode="nearest")
      z = self.att_conv(torch.cat([x, y], dim=1))
      x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
      x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return self.conv2(x), x


class TorchReviewKDFusion(nn.Module):
  """mdistiller distillers/ReviewKD.py ReviewKD: its `abfs` (deepest first) and the ABF chain of
  forward_train, on student features listed shallow → deep as ours."""

  def __init__(self, in_channels, out_channels, shapes, out_shapes):
    super().__init__()
    self.shapes, self.out_shapes = shapes, out_shapes
    abfs = nn.ModuleList()
    mid_channel = min(512, in_channels[-1])
    for idx, in_channel in enumerate(in_channels):
      abfs.append(TorchABF(in_channel, mid_channel, out_channels[idx], idx < len(in_channels) - 1))
    self.abfs = abfs[::-1]

  def forward(self, features):
    x = features[::-1]
    results = []
    out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(
      x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]
    ):
      out_features, res_features = abf(features, res_features, shape, out_shape)
      results.insert(0, out_features)
    return results


@pytest.mark.parametrize(
  "student_hw,teacher_hw",
  [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((6, 6), (4, 4)), ((4, 4), (4, 4)), ((6, 5), (4, 4))],
)  # The last: a rectangular 3×2 kernel.
def test_conv_reg_matches_repdistiller(student_hw, teacher_hw):
  """A training step (output, then every parameter and running statistic), then eval mode."""
  student_shape, teacher_shape = (2, *student_hw, 3), (2, *teacher_hw, 5)
  ours = _create(adapters.ConvReg, student_shape, teacher_shape)
  theirs = TorchConvReg((2, 3, *student_hw), (2, 5, *teacher_hw))
  _randomize_batch_norms(theirs, seed=10)
  _load(ours, theirs)
  for step, train in enumerate((True, False)):
    x = _normal(step, student_shape)
    theirs.train(train)
    with torch.no_grad():
      expected = _to_nhwc(theirs(_to_nchw(x)))
    np.testing.assert_allclose(
      _apply(ours, jnp.asarray(x), train=train), expected, rtol=RTOL, atol=ATOL
    )
    _assert_state_matches(ours, theirs)


def test_running_variance_takes_the_unbiased_batch_variance():
  """torch's update, running ← 0.9·running + 0.1·n/(n−1)·σ², not Flax's biased one.

  1×1 output maps and a batch of 2 give n = 2 per channel, so the two updates differ by 2×.
  """
  regressor = _create(adapters.ConvReg, (2, 2, 2, 3), (2, 1, 1, 4))
  student = jnp.asarray(_normal(0, (2, 2, 2, 3)))
  bn_input = np.asarray(_apply(regressor.conv, student), np.float64).reshape(-1, 4)
  _apply(regressor, student, train=True)
  np.testing.assert_allclose(regressor.bn.var[...], 0.9 + 0.1 * bn_input.var(0, ddof=1), rtol=RTOL)
  np.testing.assert_allclose(regressor.bn.mean[...], 0.1 * bn_input.mean(0), rtol=RTOL, atol=ATOL)


def test_conv_reg_rejects_unsupported_sizes():
  with pytest.raises(ValueError, match="student size 4"):
    _create(adapters.ConvReg, (1, 4, 4, 3), (1, 6, 6, 3))


@pytest.mark.parametrize("student_hw,teacher_hw", [(4, 4), (8, 4), (4, 8)])
def test_vid_regressor_and_loss_match_repdistiller(student_hw, teacher_hw):
  ours = _create(adapters.VIDRegressor, 3, 6, 6)
  theirs = TorchVIDLoss(3, 6, 6)
  np.testing.assert_allclose(ours.log_scale[...], theirs.log_scale.detach().numpy(), rtol=RTOL)
  _load(ours, theirs)
  x, target = _normal(0, (2, student_hw, student_hw, 3)), _normal(1, (2, teacher_hw, teacher_hw, 6))

  @nnx.jit
  def our_loss(module, x, target):
    return feature.vid(module(x, target.shape[1:3]), target, module.log_scale[...])

  expected = theirs(_to_nchw(x), _to_nchw(target))
  np.testing.assert_allclose(
    our_loss(ours, jnp.asarray(x), jnp.asarray(target)), expected.item(), rtol=RTOL
  )


def test_vid_regressor_initial_variance():
  regressor = _create(adapters.VIDRegressor, 3, 4, 4, init_pred_var=5.0, eps=1e-5)
  np.testing.assert_allclose(jax.nn.softplus(regressor.log_scale[...]) + 1e-5, 5.0, rtol=1e-6)


class TorchEmbed(nn.Module):
  """RepDistiller crd/criterion.py Embed (normalize=False: models/util.py LinearEmbed)."""

  def __init__(self, dim_in, dim_out, normalize):
    super().__init__()
    self.linear = nn.Linear(dim_in, dim_out)
    self.normalize = normalize

  def forward(self, x):
    x = self.linear(x.view(x.shape[0], -1))
    if self.normalize:  # RepDistiller Normalize(2): x / ‖x‖₂
      x = x / x.pow(2).sum(1, keepdim=True).pow(0.5)
    return x


@pytest.mark.parametrize("normalize", [True, False])
def test_embed_matches_repdistiller(normalize):
  ours = _create(adapters.Embed, 10, 4, normalize=normalize)
  theirs = TorchEmbed(10, 4, normalize)
  _load(ours, theirs)
  x = _normal(0, (3, 10))
  np.testing.assert_allclose(
    _apply(ours, jnp.asarray(x)), theirs(torch.tensor(x)).detach().numpy(), rtol=RTOL, atol=ATOL
  )
  assert _apply(ours, jnp.asarray(_normal(1, (3, 2, 5)))).shape == (3, 4)  # flattens per sample


def test_linear_projection_is_bias_free():
  projection = _create(adapters.LinearProjection, 6, 10)
  assert projection.linear.bias is None
  hidden = jnp.asarray(_normal(0, (2, 5, 6)))
  projected = _apply(projection, jnp.stack([hidden, 2 * hidden]))
  assert projected.shape == (2, 2, 5, 10)
  np.testing.assert_allclose(projected[1], 2 * projected[0], rtol=1e-6)


def test_torch_default_init_bounds():
  """Kernels uniform in ±1/√fan_in (torch's default), ABF convs in ±√(3/fan_in) (a=1)."""
  reg = _create(adapters.ConvReg, (1, 8, 8, 16), (1, 4, 4, 8))
  bound = 1 / np.sqrt(16 * 9)
  kernel = np.asarray(reg.conv.kernel[...])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  assert np.abs(np.asarray(reg.conv.bias[...])).max() <= bound
  abf = _create(adapters.ABF, 16, 32, 8, fuse=False)
  bound = np.sqrt(3 / 16)
  kernel = np.asarray(abf.conv1[0].kernel[...])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound


def test_review_kd_fusion_matches_mdistiller():
  """Three levels (8×8, 4×4, pooled 1×1), student channels (4, 8, 8) -> teacher (6, 10, 12).

  A training step (outputs, then every parameter and running statistic: the pooled level's BN
  sees n = 2 values per channel, where the unbiased update doubles the biased one), then eval.
  """
  in_channels, out_channels, out_sizes = [4, 8, 8], [6, 10, 12], [8, 4, 1]
  ours = _create(adapters.ReviewKDFusion, in_channels, out_channels, out_sizes)
  # mdistiller's SHAPES are the inputs' sizes and OUT_SHAPES the teacher's, both deepest first.
  theirs = TorchReviewKDFusion(in_channels, out_channels, [1, 4, 8], out_sizes[::-1])
  _randomize_batch_norms(theirs, seed=10)
  _load(ours, theirs)
  shapes = [(2, 8, 8, 4), (2, 4, 4, 8), (2, 1, 1, 8)]
  for step, train in enumerate((True, False)):
    features = [_normal(10 * step + level, shape) for level, shape in enumerate(shapes)]
    theirs.train(train)
    with torch.no_grad():
      expected = theirs([_to_nchw(f) for f in features])
    results = _apply(ours, [jnp.asarray(f) for f in features], train=train)
    for result, reference in zip(results, expected):
      np.testing.assert_allclose(result, _to_nhwc(reference), rtol=RTOL, atol=ATOL)
    _assert_state_matches(ours, theirs)


def test_adapters_train_under_nnx_jit():
  """A gradient step through ConvReg + fitnet: finite grads, BN statistics updated."""
  regressor = _create(adapters.ConvReg, (2, 8, 8, 3), (2, 4, 4, 5))
  student, teacher = jnp.asarray(_normal(0, (2, 8, 8, 3))), jnp.asarray(_normal(1, (2, 4, 4, 5)))

  @nnx.jit
  def grads(module):
    return nnx.grad(lambda m: feature.fitnet(m(student, train=True), teacher))(module)

  gradients = grads(regressor)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gradients))
  assert np.abs(np.asarray(regressor.bn.mean[...])).sum() > 0
