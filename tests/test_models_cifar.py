"""CIFAR model zoo: registry names, parameter counts, output and feature shapes, BatchNorm, dtypes.

Shapes are checked abstractly (`nnx.eval_shape`), so no big model is run; numerical agreement with
the PyTorch references is tested in test_torch_import.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import models
from jaxkd.models import layers

# Trainable parameters with num_classes=100 of the reference PyTorch definitions (RepDistiller
# models/*.py; BatchNorm running statistics excluded), as listed by the benchmark tables.
REFERENCE_PARAMETER_COUNTS = {
  "resnet8": 83_892,
  "resnet14": 181_108,
  "resnet20": 278_324,
  "resnet32": 472_756,
  "resnet44": 667_188,
  "resnet56": 861_620,
  "resnet110": 1_736_564,
  "resnet8x4": 1_233_540,
  "resnet32x4": 7_433_860,
  "ResNet50": 23_705_252,
  "wrn_16_1": 180_916,
  "wrn_16_2": 703_284,
  "wrn_40_1": 569_780,
  "wrn_40_2": 2_255_156,
  "vgg8": 3_965_028,
  "vgg11": 9_277_284,
  "vgg13": 9_462_180,
  "vgg16": 14_774_436,
  "vgg19": 20_086_692,
  "MobileNetV2": 812_836,
  "mobile_half": 812_836,
  "ShuffleV1": 949_258,
  "ShuffleV2": 1_355_528,
  # mdistiller resnetv2.py ResNet18 (not in the benchmark tables): counted on the torch
  # definition of test_torch_import.py, TorchResNet(64, (64, 128, 256, 512), (2, 2, 2, 2), …).
  "ResNet18": 11_220_132,
}
CIFAR_MODELS = sorted(REFERENCE_PARAMETER_COUNTS)

# (stem, stage1, …, pooled) feature shapes for a (2, 32, 32, 3) batch, one model per layout.
FEATURE_SHAPES = {
  "resnet8": [(2, 32, 32, 16), (2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64), (2, 64)],
  "resnet32x4": [(2, 32, 32, 32), (2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 256)],
  "ResNet50": [
    (2, 32, 32, 64),
    (2, 32, 32, 256),
    (2, 16, 16, 512),
    (2, 8, 8, 1024),
    (2, 4, 4, 2048),
    (2, 2048),
  ],
  "wrn_40_2": [(2, 32, 32, 16), (2, 32, 32, 32), (2, 16, 16, 64), (2, 8, 8, 128), (2, 128)],
  "vgg13": [
    (2, 32, 32, 64),
    (2, 16, 16, 128),
    (2, 8, 8, 256),
    (2, 4, 4, 512),
    (2, 4, 4, 512),
    (2, 512),
  ],
  "MobileNetV2": [
    (2, 16, 16, 16),
    (2, 16, 16, 12),
    (2, 8, 8, 16),
    (2, 4, 4, 48),
    (2, 2, 2, 160),
    (2, 1280),
  ],
  "ShuffleV1": [(2, 32, 32, 24), (2, 16, 16, 240), (2, 8, 8, 480), (2, 4, 4, 960), (2, 960)],
  "ShuffleV2": [(2, 32, 32, 24), (2, 16, 16, 116), (2, 8, 8, 232), (2, 4, 4, 464), (2, 1024)],
}


def _num_stages(name: str) -> int:
  if name.startswith(("ResNet", "vgg", "MobileNetV2", "mobile_half")):
    return 4
  return 3


def _abstract(name, **kwargs):
  return nnx.eval_shape(lambda: models.create(name, **kwargs))


@functools.cache
def _shared_abstract(name):
  """`create(name, dtype=bfloat16)` (100 classes, float32 params), built abstractly once per name
  and shared by the tests that only read it: building traces every initialiser, a second or more
  for the deeper models. Shapes do not depend on the compute dtype, so the shape tests also check
  that every layer of every model computes in the requested dtype."""
  return _abstract(name, dtype=jnp.bfloat16, param_dtype=jnp.float32)


def _abstract_forward(model, batch_shape=(2, 32, 32, 3), **call_kwargs):
  images = jax.ShapeDtypeStruct(batch_shape, jnp.float32)
  return nnx.eval_shape(lambda m, x: m(x, **call_kwargs), model, images)


@functools.cache
def _default_outputs(name):
  """(logits, features) of `_shared_abstract(name)` on a (2, 32, 32, 3) batch, traced once."""
  return _abstract_forward(_shared_abstract(name), return_features=True)


@nnx.jit(static_argnames="train")
def _forward(model, images, train=False):
  """The one jitted forward of this file: each (model structure, train) compiles once."""
  return model(images, train=train, return_features=True)


def _with_weights(model, seed=0):
  """Fills an abstract model with random weights in numpy (fast: no per-shape jax compilation).

  Kernels get He-scaled normals, BatchNorm scales and variances U(0.5, 1.5), the rest N(0, 0.1²).
  """
  rng = np.random.default_rng(seed)
  filled = []
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    shape, leaf = variable.shape, path[-1]
    if leaf == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    filled.append((path, variable.replace(jax.device_put(np.asarray(value, variable.dtype)))))
  nnx.update(model, nnx.from_flat_state(filled))
  return model


def _images(batch=2):
  return np.random.default_rng(1).normal(size=(batch, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("name, expected", sorted(REFERENCE_PARAMETER_COUNTS.items()))
def test_parameter_count_matches_reference(name, expected):
  params = jax.tree.leaves(nnx.state(_shared_abstract(name), nnx.Param))  # 100 classes: default
  assert sum(leaf.size for leaf in params) == expected
  assert {leaf.dtype for leaf in params} == {np.dtype("float32")}


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_logits_and_feature_names(name):
  logits, features = _default_outputs(name)
  assert logits.shape == (2, 100) and logits.dtype == jnp.float32
  stages = range(1, _num_stages(name) + 1)
  expected = (
    {"stem", "pooled"} | {f"stage{k}" for k in stages} | {f"preact_stage{k}" for k in stages}
  )
  assert set(features) == expected
  assert {value.dtype for value in features.values()} == {np.dtype(jnp.bfloat16)}
  for k in stages:
    assert features[f"preact_stage{k}"].shape == features[f"stage{k}"].shape


def test_features_are_empty_unless_requested():
  _, features = _abstract_forward(_shared_abstract("resnet8"))
  assert features == {}


@pytest.mark.parametrize("name", sorted(FEATURE_SHAPES))
def test_feature_shapes(name):
  _, features = _default_outputs(name)
  ordered = ["stem"] + [f"stage{k}" for k in range(1, _num_stages(name) + 1)] + ["pooled"]
  assert [features[key].shape for key in ordered] == FEATURE_SHAPES[name]


def test_vgg_pools_after_block3_for_64px_inputs():
  logits, features = _abstract_forward(
    _abstract("vgg8", num_classes=200), (2, 64, 64, 3), return_features=True
  )
  assert logits.shape == (2, 200)
  assert features["stage3"].shape == (2, 8, 8, 512)
  assert features["stage4"].shape == (2, 4, 4, 512)


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match="unknown model 'resnet9'") as error:
    models.create("resnet9")
  for name in CIFAR_MODELS:
    assert name in str(error.value)


def test_unknown_name_suggests_the_names_differing_only_in_case():
  # mdistiller's CIFAR `ResNet18` and torchvision's ImageNet `resnet18` are both reference names.
  with pytest.raises(
    ValueError,
    match=r"unknown model 'Resnet18' \(did you mean 'ResNet18' or "
    r"'resnet18'\?\); known models: .*ShuffleV2",
  ):
    models.create("Resnet18")
  with pytest.raises(
    ValueError,
    match=r"unknown model 'mobilenetv2' \(did you mean 'MobileNetV2'"
    r"\?\)",
  ):
    models.create("mobilenetv2")


def test_jit_matches_eager():
  model = _with_weights(_abstract("resnet8"))
  images = _images()
  eager_logits, eager_features = model(images, return_features=True)
  jit_logits, jit_features = _forward(model, images)
  np.testing.assert_allclose(jit_logits, eager_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    jit_features["preact_stage3"], eager_features["preact_stage3"], rtol=1e-5, atol=1e-5
  )


def test_bfloat16_compute_matches_float32():
  reference = _with_weights(_abstract("resnet8"))
  model = _abstract("resnet8", dtype=jnp.bfloat16)
  nnx.update(model, nnx.state(reference))
  logits, features = _forward(model, _images())
  reference_logits, _ = _forward(reference, _images())
  assert features["stage2"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  scale = np.abs(reference_logits).max()
  np.testing.assert_allclose(logits, reference_logits, atol=0.05 * scale)


def test_train_mode_uses_batch_statistics_and_updates_running_statistics():
  model = _with_weights(_abstract("resnet8"))
  running_mean = np.asarray(model.bn1.mean[...])
  eval_logits, _ = _forward(model, _images(), train=False)
  np.testing.assert_array_equal(model.bn1.mean[...], running_mean)
  train_logits, _ = _forward(model, _images(), train=True)
  assert not np.allclose(train_logits, eval_logits)
  assert not np.allclose(model.bn1.mean[...], running_mean)


def test_batchnorm_matches_torch_formulas():
  """torch: normalise with the biased batch variance, running stats with momentum 0.1 and the
  unbiased variance; eval mode uses the running statistics."""
  x = np.random.default_rng(2).normal(2.0, 3.0, size=(4, 3, 5, 6)).astype(np.float32)
  bn = layers.BatchNorm2d(6)
  nnx.update(
    bn,
    nnx.State(
      {"scale": nnx.Param(jnp.linspace(0.5, 1.5, 6)), "bias": nnx.Param(jnp.linspace(-1.0, 1.0, 6))}
    ),
  )
  y = bn(jnp.asarray(x), train=True)
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  scale, bias = np.linspace(0.5, 1.5, 6), np.linspace(-1.0, 1.0, 6)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5)
  count = 4 * 3 * 5
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var * count / (count - 1), rtol=1e-6)
  y_eval = bn(jnp.asarray(x), train=False)
  expected = (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var * count / (count - 1) + 1e-5)
  np.testing.assert_allclose(y_eval, expected * scale + bias, rtol=1e-5, atol=1e-5)


def test_sequential_applies_nested_sequentials_and_passes_train_to_batchnorm():
  """torchvision nests Sequentials (Conv2dNormActivation blocks inside InvertedResidual.conv)."""
  inner_bn, outer_bn = layers.BatchNorm2d(3), layers.BatchNorm2d(3)
  x = np.random.default_rng(3).normal(1.0, 2.0, size=(2, 4, 4, 3)).astype(np.float32)
  y = layers.sequential(
    [nnx.List([inner_bn, nnx.relu]), lambda h: 2.0 * h, outer_bn], jnp.asarray(x), train=True
  )

  def normalize(h):
    return (h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + 1e-5)

  hidden = 2.0 * np.maximum(normalize(x), 0.0)
  np.testing.assert_allclose(y, normalize(hidden), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(inner_bn.mean[...], 0.1 * x.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(outer_bn.mean[...], 0.1 * hidden.mean((0, 1, 2)), rtol=1e-5)


def test_conv2d_padding_is_symmetric_like_torch():
  """A 3×3, stride-2, padding-1 conv on 4 px samples pixels 0 and 2 centred (torch); flax 'SAME'
  would centre pixels 1 and 3."""
  conv = nnx.eval_shape(
    lambda: layers.conv2d(1, 1, 3, stride=2, padding=1, bias=False, rngs=nnx.Rngs(0))
  )
  kernel = np.zeros((3, 3, 1, 1), np.float32)
  kernel[1, 1] = 1.0  # Identity at the centre tap.
  nnx.update(conv, nnx.State({"kernel": nnx.Param(jnp.asarray(kernel))}))
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(conv(x)[0, :, :, 0], [[0.0, 2.0], [8.0, 10.0]])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fusion_barrier_is_the_identity_bit_for_bit(dtype):
  # No subnormals: XLA:CPU flushes them to zero in every arithmetic op, this one included.
  x = jnp.asarray([0.0, -0.0, 1.5, -3e38, 1e-37, np.inf, -np.inf, np.nan], dtype)
  anchor = jnp.full((3, 3, 2, 2), 7.0)
  out = jax.jit(layers.fusion_barrier)(x, anchor)
  assert out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out).view(np.uint8), np.asarray(x).view(np.uint8))
  grad = jax.grad(lambda v: jnp.sum(layers.fusion_barrier(v, anchor) * 3.0))(x[:5])
  np.testing.assert_array_equal(grad, np.full(5, 3.0, dtype))


def test_fusion_barrier_keeps_conv_inputs_materialised_and_changes_no_value(monkeypatch):
  """On XLA:CPU every conv input passes through one division (see `layers.fusion_barrier`);
  without the barrier the compiled step computes the same loss and gradients."""
  model = _with_weights(_abstract("resnet8"))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  num_convs = sum(isinstance(m, layers.Conv2d) for _, m in nnx.iter_graph(model))

  def lower_loss_and_grads(params, rest, images):
    def loss(p):  # A new function per call: jit would reuse the first trace of a shared one.
      logits = nnx.merge(graphdef, p, rest, copy=True)(images, train=True)[0]
      return jnp.mean(jax.nn.logsumexp(logits, -1))

    return jax.jit(jax.value_and_grad(loss)).lower(params)

  images = _images()
  with_barrier = lower_loss_and_grads(params, rest, images)
  monkeypatch.setattr(layers, "fusion_barrier", lambda x, anchor: x)
  without_barrier = lower_loss_and_grads(params, rest, images)
  divisions = [
    lowered.as_text().count("stablehlo.divide") for lowered in (with_barrier, without_barrier)
  ]
  assert divisions[0] - divisions[1] >= num_convs  # forward; the backward divides by 1 too
  (loss, grads), (loss_ref, grads_ref) = (
    lowered.compile()(params) for lowered in (with_barrier, without_barrier)
  )
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, grads_ref
  )


def test_initialisers_follow_torch_conventions():
  # RngBitGenerator keys: the distributions do not depend on the PRNG, and an eager draw compiles
  # faster than with threefry.
  keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)
  kernel = layers.kaiming_normal_fan_out(keys[0], (3, 3, 64, 256))
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (3 * 3 * 256)), rtol=0.02)
  weight = layers.torch_default_kernel_init(keys[1], (400, 300))
  bound = 1.0 / np.sqrt(400)
  assert weight.min() >= -bound and weight.max() <= bound and weight.max() > 0.99 * bound
  bias = layers.torch_default_bias_init(400)(keys[2], (300,))
  assert np.abs(bias).max() <= bound
