"""Adapter modules: shapes, initialisation, and torch parity with the reference modules.

The torch classes below transcribe RepDistiller (models/util.py ConvReg, distiller_zoo/VID.py
VIDLoss, crd/criterion.py Embed) and mdistiller (distillers/ReviewKD.py ABF and the ABF chain of
ReviewKD.forward_train); weights are copied into ours (NHWC) and outputs compared.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd.distill import adapters
from jaxkd.losses import feature

torch = pytest.importorskip('torch')
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
  return nnx.jit(lambda: module_type(
      *args, rngs=nnx.Rngs(jax.random.key(0, impl='rbg')), **kwargs))()


def _apply(module, *args, **kwargs):
  """module(*args, **kwargs) compiled: eager NNX calls dispatch op by op, which is slow."""
  return nnx.jit(lambda m, *a: m(*a, **kwargs))(module, *args)


def _copy_conv(ours, theirs):
  """torch Conv2d / ConvTranspose2d weight -> Flax kernel (both: permute(2, 3, 1, 0))."""
  ours.kernel[...] = jnp.asarray(theirs.weight.detach().permute(2, 3, 1, 0).numpy())
  if theirs.bias is not None:
    ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())


def _copy_bn(ours, theirs, seed):
  """Random affine parameters and running statistics, copied to both."""
  channels = theirs.num_features
  values = [_normal(seed, (channels,)), _normal(seed + 1, (channels,)),
            _normal(seed + 2, (channels,)), np.abs(_normal(seed + 3, (channels,))) + 0.5]
  with torch.no_grad():
    for tensor, value in zip((theirs.weight, theirs.bias, theirs.running_mean, theirs.running_var),
                             values):
      tensor.copy_(torch.tensor(value))
  for variable, value in zip((ours.scale, ours.bias, ours.mean, ours.var), values):
    variable[...] = jnp.asarray(value)


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
        nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
        nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
        nn.Conv2d(c_mid, c_out, 1, bias=False))
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
    self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False),
                               nn.BatchNorm2d(c_out))
    self.att_conv = nn.Sequential(nn.Conv2d(c_mid * 2, 2, 1), nn.Sigmoid()) if fuse else None

  def forward(self, x, y=None, shape=None, out_shape=None):
    n, _, h, w = x.shape
    x = self.conv1(x)
    if self.att_conv is not None:
      y = F.interpolate(y, (shape, shape), mode='nearest')
      z = self.att_conv(torch.cat([x, y], dim=1))
      x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
      x = F.interpolate(x, (out_shape, out_shape), mode='nearest')
    return self.conv2(x), x


@pytest.mark.parametrize('student_hw,teacher_hw', [(8, 4), (4, 8), (6, 4), (4, 4)])
@pytest.mark.parametrize('train', [True, False])
def test_conv_reg_matches_repdistiller(student_hw, teacher_hw, train):
  student_shape, teacher_shape = (2, student_hw, student_hw, 3), (2, teacher_hw, teacher_hw, 5)
  ours = _create(adapters.ConvReg, student_shape, teacher_shape)
  theirs = TorchConvReg((2, 3, student_hw, student_hw), (2, 5, teacher_hw, teacher_hw))
  _copy_conv(ours.conv, theirs.conv)
  _copy_bn(ours.bn, theirs.bn, seed=10)
  theirs.train(train)
  x = _normal(0, student_shape)
  np.testing.assert_allclose(_apply(ours, jnp.asarray(x), train=train),
                             _to_nhwc(theirs(_to_nchw(x))),
                             rtol=RTOL, atol=ATOL)
  if train:  # the batch mean enters the running average with torch's momentum 0.1
    np.testing.assert_allclose(ours.bn.mean[...], theirs.bn.running_mean.numpy(), rtol=RTOL,
                               atol=ATOL)


def test_conv_reg_rejects_unsupported_sizes():
  with pytest.raises(ValueError, match='student size 4'):
    _create(adapters.ConvReg, (1, 4, 4, 3), (1, 6, 6, 3))


@pytest.mark.parametrize('student_hw,teacher_hw', [(4, 4), (8, 4), (4, 8)])
def test_vid_regressor_and_loss_match_repdistiller(student_hw, teacher_hw):
  ours = _create(adapters.VIDRegressor, 3, 6, 6)
  theirs = TorchVIDLoss(3, 6, 6)
  np.testing.assert_allclose(ours.log_scale[...], theirs.log_scale.detach().numpy(), rtol=RTOL)
  for our_conv, index in zip((ours.conv1, ours.conv2, ours.conv3), (0, 2, 4)):
    _copy_conv(our_conv, theirs.regressor[index])
  x, target = _normal(0, (2, student_hw, student_hw, 3)), _normal(1, (2, teacher_hw, teacher_hw, 6))

  @nnx.jit
  def our_loss(module, x, target):
    return feature.vid(module(x, target.shape[1:3]), target, module.log_scale[...])
  expected = theirs(_to_nchw(x), _to_nchw(target))
  np.testing.assert_allclose(our_loss(ours, jnp.asarray(x), jnp.asarray(target)), expected.item(),
                             rtol=RTOL)


def test_vid_regressor_initial_variance():
  regressor = _create(adapters.VIDRegressor, 3, 4, 4, init_pred_var=5.0, eps=1e-5)
  np.testing.assert_allclose(jax.nn.softplus(regressor.log_scale[...]) + 1e-5, 5.0, rtol=1e-6)


@pytest.mark.parametrize('normalize', [True, False])
def test_embed_matches_repdistiller(normalize):
  ours = _create(adapters.Embed, 10, 4, normalize=normalize)
  theirs = nn.Linear(10, 4)
  ours.linear.kernel[...] = jnp.asarray(theirs.weight.detach().numpy().T)
  ours.linear.bias[...] = jnp.asarray(theirs.bias.detach().numpy())
  x = _normal(0, (3, 10))
  expected = theirs(torch.tensor(x))
  if normalize:  # RepDistiller Normalize(2): x / ‖x‖₂
    expected = expected / expected.pow(2).sum(1, keepdim=True).pow(0.5)
  np.testing.assert_allclose(_apply(ours, jnp.asarray(x)), expected.detach().numpy(), rtol=RTOL,
                             atol=ATOL)
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
  kernel = np.asarray(abf.conv1.kernel[...])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound


def test_review_kd_fusion_matches_mdistiller():
  """Three levels (8×8, 4×4, pooled 1×1), student channels (4, 8, 8) -> teacher (6, 10, 12)."""
  in_channels, out_channels, out_sizes = [4, 8, 8], [6, 10, 12], [8, 4, 1]
  ours = _create(adapters.ReviewKDFusion, in_channels, out_channels, out_sizes)
  mid = min(512, in_channels[-1])
  theirs = [TorchABF(c_in, mid, c_out, level < 2)
            for level, (c_in, c_out) in enumerate(zip(in_channels, out_channels))]
  for level, (block, reference) in enumerate(zip(ours.blocks, theirs)):
    _copy_conv(block.conv1, reference.conv1[0])
    _copy_conv(block.conv2, reference.conv2[0])
    _copy_bn(block.bn1, reference.conv1[1], seed=10 * level)
    _copy_bn(block.bn2, reference.conv2[1], seed=10 * level + 5)
    if reference.att_conv is not None:
      _copy_conv(block.att_conv, reference.att_conv[0])
  features = [_normal(0, (2, 8, 8, 4)), _normal(1, (2, 4, 4, 8)), _normal(2, (2, 1, 1, 8))]
  # mdistiller forward_train: levels deepest first, shapes = each input's size.
  x = [_to_nchw(f) for f in features][::-1]
  shapes, outs = [1, 4, 8], out_sizes[::-1]
  expected = []
  out, residual = theirs[2](x[0], out_shape=outs[0])
  expected.append(out)
  for feat, abf, shape, out_shape in zip(x[1:], theirs[::-1][1:], shapes[1:], outs[1:]):
    out, residual = abf(feat, residual, shape, out_shape)
    expected.insert(0, out)
  results = _apply(ours, [jnp.asarray(f) for f in features], train=True)
  for result, reference in zip(results, expected):
    np.testing.assert_allclose(result, _to_nhwc(reference), rtol=RTOL, atol=ATOL)


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
