"""ImageNet ResNets, MobileNets and ViTs: parameter counts, shapes, feature names, bf16, and
logit parity with PyTorch re-implementations of the reference layouts (torchvision, mdistiller,
timm) after conversion by `torch_import.load_torch_model`.

Models are built abstractly (`nnx.eval_shape`) and given converted or synthetic weights: random
initialisation of a ResNet-50 alone takes tens of seconds on a loaded 2-core CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import models
from jaxkd.models import torch_import

# torchvision / mdistiller / timm parameter counts with 1000 classes.
PARAM_COUNTS = {
  "resnet18": 11_689_512,
  "resnet34": 21_797_672,
  "resnet50": 25_557_032,
  "resnet101": 44_549_160,
  "resnet152": 60_192_808,
  "mobilenet_v1": 4_231_976,
  "mobilenet_v2": 3_504_872,
  "vit_ti16": 5_717_416,
  "vit_s16": 22_050_664,
  "vit_b16": 86_567_656,
}


def _cnn_features(stem, stages, pooled):
  """{name: (spatial size, channels)} at a 224x224 input, as listed in docs/models.md."""
  features = {"stem": stem, "pooled": (None, pooled)}
  for index, stage in enumerate(stages, start=1):
    features[f"stage{index}"] = features[f"preact_stage{index}"] = stage
  return features


_RESNET_BASIC = _cnn_features((112, 64), [(56, 64), (28, 128), (14, 256), (7, 512)], 512)
_RESNET_BOTTLENECK = _cnn_features((112, 64), [(56, 256), (28, 512), (14, 1024), (7, 2048)], 2048)
CNN_FEATURES = {
  "resnet18": _RESNET_BASIC,
  "resnet34": _RESNET_BASIC,
  "resnet50": _RESNET_BOTTLENECK,
  "resnet101": _RESNET_BOTTLENECK,
  "resnet152": _RESNET_BOTTLENECK,
  "mobilenet_v1": _cnn_features((112, 32), [(56, 128), (28, 256), (14, 512), (7, 1024)], 1024),
  "mobilenet_v2": _cnn_features((112, 32), [(56, 24), (28, 32), (14, 96), (7, 320)], 1280),
}


@functools.cache
def _shared_abstract(name):
  """`create(name, dtype=bfloat16)` (1000 classes, float32 params), built abstractly once per name
  and shared by the tests that only read it: building traces every initialiser, seconds for a
  ResNet-152. Shapes do not depend on the compute dtype, so the shape tests also check that every
  layer computes in the requested dtype."""
  return nnx.eval_shape(lambda: models.create(name, dtype=jnp.bfloat16))


def _abstract_outputs(model, image_shape, **call_kwargs):
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  return nnx.eval_shape(lambda m, x: m(x, **call_kwargs), model, images)


def _param_leaves(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _synthetic_model(name, seed=0, **kwargs):
  """`create(name)` with N(0, 0.05) params (numpy draws: no per-initialiser compilation) and
  BatchNorm statistics (0, 1)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.create(name, **kwargs)))
  rng = np.random.default_rng(seed)

  def value(path, variable):
    if isinstance(variable, nnx.BatchStat):
      return np.full(variable.shape, 1.0 if path[-1] == "var" else 0.0)
    return 0.05 * rng.normal(size=variable.shape)

  return nnx.merge(
    graphdef,
    nnx.from_flat_state(
      [
        (path, variable.replace(jax.device_put(np.asarray(value(path, variable), variable.dtype))))
        for path, variable in nnx.to_flat_state(state)
      ]
    ),
  )


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count_matches_reference(name):
  params = _param_leaves(_shared_abstract(name))
  assert sum(leaf.size for leaf in params) == PARAM_COUNTS[name]
  assert {leaf.dtype for leaf in params} == {np.dtype("float32")}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2"])
def test_cnn_shapes_and_feature_names(name):
  logits, features = _abstract_outputs(
    _shared_abstract(name), (2, 224, 224, 3), return_features=True
  )
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  expected = CNN_FEATURES[name]
  assert set(features) == set(expected)
  for feature_name, (size, channels) in expected.items():
    shape = (2, channels) if size is None else (2, size, size, channels)
    assert features[feature_name].shape == shape, feature_name
    assert features[feature_name].dtype == jnp.bfloat16, feature_name


@pytest.mark.parametrize("name,width", [("vit_ti16", 192), ("vit_s16", 384), ("vit_b16", 768)])
def test_vit_shapes_and_feature_names(name, width):
  logits, features = _abstract_outputs(
    _shared_abstract(name), (2, 224, 224, 3), return_features=True
  )
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  expected = {"embed", "pooled"} | {f"block{index}" for index in range(1, 13)}
  assert set(features) == expected
  assert features["embed"].shape == features["block12"].shape == (2, 197, width)
  assert features["pooled"].shape == (2, width)
  assert {value.dtype for value in features.values()} == {np.dtype(jnp.bfloat16)}


def test_vit_image_size_is_configurable():
  model = nnx.eval_shape(lambda: models.create("vit_ti16", image_size=64, num_classes=10))
  logits, features = _abstract_outputs(model, (2, 64, 64, 3), return_features=True)
  assert logits.shape == (2, 10) and features["embed"].shape == (2, 17, 192)
  with pytest.raises(ValueError, match="expected 64x64"):
    _abstract_outputs(model, (2, 32, 32, 3))


def test_features_are_empty_unless_requested():
  _, features = _abstract_outputs(_shared_abstract("mobilenet_v1"), (1, 32, 32, 3))
  assert features == {}


def test_zero_init_residual_zeroes_last_bn_scale():
  # Only the returned scales survive dead-code elimination: the compiled init is tiny.
  @jax.jit
  def last_and_first_bn_scales():
    model = models.create("resnet50", zero_init_residual=True)
    return [
      (block.bn3.scale[...], block.bn1.scale[...])
      for stage in (model.layer1, model.layer4)
      for block in stage
    ]

  for last_scale, first_scale in last_and_first_bn_scales():
    np.testing.assert_array_equal(last_scale, 0.0)
    np.testing.assert_array_equal(first_scale, 1.0)


@nnx.jit(static_argnames="train")
def _forward(model, images, train=False):
  return model(images, train=train, return_features=True)


def _images(batch=2):
  """The smallest input every ImageNet CNN downsamples to a 1x1 final map: 32x32."""
  return np.random.default_rng(1).normal(size=(batch, 32, 32, 3)).astype(np.float32)


def test_bf16_compute_with_f32_params():
  f32_model = _synthetic_model("resnet18", num_classes=10)
  model = nnx.eval_shape(lambda: models.create("resnet18", num_classes=10, dtype=jnp.bfloat16))
  nnx.update(model, nnx.state(f32_model))
  logits, features = _forward(model, _images())
  assert logits.dtype == jnp.float32 and features["stage4"].dtype == jnp.bfloat16
  # Same structure and shapes as the resnet18 parity test: one f32 compilation for both.
  f32_logits, _ = _forward(f32_model, _images())
  np.testing.assert_allclose(logits, f32_logits, rtol=0.05, atol=0.05 * np.abs(f32_logits).max())


def test_train_mode_updates_batch_statistics_only():
  model = _synthetic_model("mobilenet_v1", num_classes=10)

  def params():  # a copy: nnx.state shares the model's variables
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  params_before = params()
  _forward(model, _images(), train=True)
  stem_bn = model.model[0][1]
  assert not np.allclose(stem_bn.mean[...], 0.0) and not np.allclose(stem_bn.var[...], 1.0)
  jax.tree.map(np.testing.assert_array_equal, params_before, params())


# ---------------------------------------------------------------------------------------------
# PyTorch parity. The torch modules below are written from the reference layouts: torchvision
# resnet.py / mobilenetv2.py, mdistiller imagenet/mobilenetv1.py, timm vision_transformer.py.


def _torch_reference(name, num_classes):
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.downsample = downsample

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = torch.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self, block, stage_blocks):
      super().__init__()
      self.inplanes = 64
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      for index, num_blocks in enumerate(stage_blocks):
        setattr(
          self,
          f"layer{index + 1}",
          self._make_layer(block, 64 * 2**index, num_blocks, 1 if index == 0 else 2),
        )
      self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion),
        )
      blocks = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      blocks += [block(self.inplanes, planes) for _ in range(1, num_blocks)]
      return nn.Sequential(*blocks)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(x.mean((2, 3)))

  def conv_bn_relu(inp, oup, kernel, stride=1, groups=1, activation=nn.ReLU):
    return [
      nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
      nn.BatchNorm2d(oup),
      activation(),
    ]

  class MobileNetV1(nn.Module):
    def __init__(self):
      super().__init__()
      blocks = [nn.Sequential(*conv_bn_relu(3, 32, 3, 2))]
      for inp, oup, stride in (
        [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
        + [(512, 512, 1)] * 5
        + [(512, 1024, 2), (1024, 1024, 1)]
      ):
        blocks.append(
          nn.Sequential(*conv_bn_relu(inp, inp, 3, stride, groups=inp), *conv_bn_relu(inp, oup, 1))
        )
      self.model = nn.Sequential(*blocks)
      self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
      return self.fc(self.model(x).mean((2, 3)))

  class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
      super().__init__()
      hidden = inp * expand_ratio
      self.use_res_connect = stride == 1 and inp == oup
      expand = (
        []
        if expand_ratio == 1
        else [nn.Sequential(*conv_bn_relu(inp, hidden, 1, activation=nn.ReLU6))]
      )
      self.conv = nn.Sequential(
        *expand,
        nn.Sequential(*conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6)),
        nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
      )

    def forward(self, x):
      return x + self.conv(x) if self.use_res_connect else self.conv(x)

  class MobileNetV2(nn.Module):
    def __init__(self):
      super().__init__()
      features = [nn.Sequential(*conv_bn_relu(3, 32, 3, 2, activation=nn.ReLU6))]
      inp = 32
      for t, c, n, s in [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
      ]:
        for index in range(n):
          features.append(InvertedResidual(inp, c, s if index == 0 else 1, t))
          inp = c
      features.append(nn.Sequential(*conv_bn_relu(inp, 1280, 1, activation=nn.ReLU6)))
      self.features = nn.Sequential(*features)
      self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
      return self.classifier(self.features(x).mean((2, 3)))

  class Attention(nn.Module):
    def __init__(self, width, num_heads):
      super().__init__()
      self.num_heads = num_heads
      self.qkv = nn.Linear(width, 3 * width)
      self.proj = nn.Linear(width, width)

    def forward(self, x):
      batch, length, width = x.shape
      qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
      query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
      weights = ((query * (width // self.num_heads) ** -0.5) @ key.transpose(-2, -1)).softmax(-1)
      return self.proj((weights @ value).transpose(1, 2).reshape(batch, length, width))

  class Mlp(nn.Module):
    def __init__(self, width):
      super().__init__()
      self.fc1 = nn.Linear(width, 4 * width)
      self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
      return self.fc2(nn.functional.gelu(self.fc1(x)))

  class Block(nn.Module):
    def __init__(self, width, num_heads):
      super().__init__()
      self.norm1 = nn.LayerNorm(width, eps=1e-6)
      self.attn = Attention(width, num_heads)
      self.norm2 = nn.LayerNorm(width, eps=1e-6)
      self.mlp = Mlp(width)

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class PatchEmbed(nn.Module):
    def __init__(self, width):
      super().__init__()
      self.proj = nn.Conv2d(3, width, 16, 16)

    def forward(self, x):
      return self.proj(x).flatten(2).transpose(1, 2)

  class VisionTransformer(nn.Module):
    """timm VisionTransformer(img_size=32, embed_dim=192, depth=12, num_heads=3)."""

    def __init__(self, width=192, num_heads=3, num_patches=4):
      super().__init__()
      self.patch_embed = PatchEmbed(width)
      self.cls_token = nn.Parameter(torch.randn(1, 1, width))
      self.pos_embed = nn.Parameter(torch.randn(1, 1 + num_patches, width))
      self.blocks = nn.Sequential(*[Block(width, num_heads) for _ in range(12)])
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, num_classes)

    def forward(self, x):
      x = self.patch_embed(x)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
      return self.head(self.norm(self.blocks(x))[:, 0])

  constructors = {
    "resnet18": lambda: ResNet(BasicBlock, (2, 2, 2, 2)),
    "resnet50": lambda: ResNet(Bottleneck, (3, 4, 6, 3)),
    "mobilenet_v1": MobileNetV1,
    "mobilenet_v2": MobileNetV2,
    "vit_ti16": VisionTransformer,
  }
  torch.manual_seed(0)
  module = constructors[name]().eval()
  with torch.no_grad():  # non-trivial BatchNorm parameters and running statistics
    for submodule in module.modules():
      if isinstance(submodule, nn.LayerNorm):
        submodule.weight.uniform_(0.5, 1.5)
        submodule.bias.normal_(0.0, 0.1)
      if isinstance(submodule, nn.BatchNorm2d):
        submodule.weight.uniform_(0.5, 1.5)
        submodule.bias.normal_(0.0, 0.1)
        submodule.running_mean.normal_(0.0, 0.1)
        submodule.running_var.uniform_(0.5, 1.5)
  return torch, module


@pytest.mark.parametrize(
  "name", ["resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2", "vit_ti16"]
)
def test_torch_parity_eval_mode(name):
  # A 32x32 ViT has 2x2 patches, the smallest grid with a position embedding to check.
  create_kwargs = dict(image_size=32) if name.startswith("vit") else {}
  torch, reference = _torch_reference(name, num_classes=10)
  images = _images()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  model = torch_import.load_torch_model(
    name, reference.state_dict(), num_classes=10, **create_kwargs
  )
  logits = np.asarray(_forward(model, images)[0])
  scale = np.abs(expected).max()
  print(f"{name}: max |Δlogits| {np.abs(logits - expected).max():.1e} (logit scale {scale:.2f})")
  np.testing.assert_allclose(logits / scale, expected / scale, atol=1e-4)
