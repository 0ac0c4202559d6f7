"""PyTorch → jaxkd weight import, checked against torch re-implementations of the references.

The torch modules below are written from RepDistiller's `models/*.py` layouts (module names,
Sequential indices, forward order, `is_feat` / `preact` features); converting their random weights
with randomised BatchNorm statistics must reproduce their eval-mode logits and features.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxkd import models  # noqa: E402
from jaxkd.models import cifar_resnet, io, layers, torch_import  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- torch references (NCHW)
# Every forward returns (logits, feats, preact_feats, pooled), feats = [f0, f1, …] as RepDistiller.


class TorchResBlock(nn.Module):
  """resnet.py BasicBlock (shortcut 'downsample') / resnetv2.py Bottleneck (shortcut 'shortcut')."""

  def __init__(self, inplanes, planes, stride, bottleneck, shortcut_name):
    super().__init__()
    self.bottleneck = bottleneck
    expansion = 4 if bottleneck else 1
    if bottleneck:
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
    else:
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut_name = shortcut_name
    projection = None
    if stride != 1 or inplanes != planes * expansion:
      projection = nn.Sequential(
        nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
        nn.BatchNorm2d(planes * expansion),
      )
    setattr(self, shortcut_name, projection)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    if self.bottleneck:
      out = F.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
    else:
      out = self.bn2(self.conv2(out))
    projection = getattr(self, self.shortcut_name)
    preact = out + (x if projection is None else projection(x))
    return F.relu(preact), preact


class TorchResNet(nn.Module):
  """resnet.py ResNet (head 'fc', AvgPool2d(8)) and resnetv2.py ResNet (head 'linear')."""

  def __init__(
    self,
    stem,
    planes,
    blocks,
    *,
    bottleneck=False,
    head="fc",
    shortcut_name="downsample",
    num_classes=100,
  ):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    inplanes, self.num_stages, self.head = stem, len(planes), head
    for index, (width, count) in enumerate(zip(planes, blocks)):
      stage = []
      for block in range(count):
        stage.append(
          TorchResBlock(inplanes, width, 2 if index and not block else 1, bottleneck, shortcut_name)
        )
        inplanes = width * (4 if bottleneck else 1)
      setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
    setattr(self, head, nn.Linear(inplanes, num_classes))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    feats, preacts = [x], [x]
    for index in range(1, self.num_stages + 1):
      for block in getattr(self, f"layer{index}"):
        x, preact = block(x)
      feats.append(x)
      preacts.append(preact)
    if self.head == "fc":
      pooled = nn.AvgPool2d(8)(x).flatten(1)
    else:
      pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return getattr(self, self.head)(pooled), feats, preacts, pooled


class TorchWideBlock(nn.Module):
  """wrn.py BasicBlock (pre-activation)."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal_in_out = in_planes == out_planes
    self.convShortcut = (
      None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
    )

  def forward(self, x):
    if self.equal_in_out:
      out = F.relu(self.bn1(x))
    else:
      x = F.relu(self.bn1(x))
    out = F.relu(self.bn2(self.conv1(out if self.equal_in_out else x)))
    out = self.conv2(out)
    return (x if self.equal_in_out else self.convShortcut(x)) + out


class TorchNetworkBlock(nn.Module):
  def __init__(self, count, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(
      *[
        TorchWideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(count)
      ]
    )

  def forward(self, x):
    return self.layer(x)


class TorchWRN(nn.Module):
  def __init__(self, depth, widen, num_classes=100):
    super().__init__()
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = TorchNetworkBlock(n, widths[0], widths[1], 1)
    self.block2 = TorchNetworkBlock(n, widths[1], widths[2], 2)
    self.block3 = TorchNetworkBlock(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    f0 = self.conv1(x)
    f1 = self.block1(f0)
    f2 = self.block2(f1)
    f3 = self.block3(f2)
    pooled = F.avg_pool2d(F.relu(self.bn1(f3)), 8).flatten(1)
    preacts = [f0, self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3)]
    return self.fc(pooled), [f0, f1, f2, f3], preacts, pooled


class TorchVGG(nn.Module):
  """vgg.py VGG with batch_norm=True."""

  def __init__(self, cfg, num_classes=100):
    super().__init__()
    in_channels = 3
    for index, widths in enumerate(cfg):
      block = []
      for width in widths:
        block += [
          nn.Conv2d(in_channels, width, 3, padding=1),
          nn.BatchNorm2d(width),
          nn.ReLU(inplace=True),
        ]
        in_channels = width
      setattr(self, f"block{index}", nn.Sequential(*block[:-1]))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    x = F.relu(self.block0(x))
    feats, preacts = [x], [x]
    x = F.max_pool2d(x, 2, 2)
    for index in range(1, 5):
      x = getattr(self, f"block{index}")(x)
      preacts.append(x)
      x = F.relu(x)
      feats.append(x)
      if index < 3:
        x = F.max_pool2d(x, 2, 2)
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return self.classifier(pooled), feats, preacts, pooled


class TorchInvertedResidual(nn.Module):
  def __init__(self, inp, oup, stride, t):
    super().__init__()
    self.use_res_connect = stride == 1 and inp == oup
    hidden = inp * t
    self.conv = nn.Sequential(
      nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
      nn.BatchNorm2d(hidden),
      nn.ReLU(inplace=True),
      nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
      nn.BatchNorm2d(hidden),
      nn.ReLU(inplace=True),
      nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
      nn.BatchNorm2d(oup),
    )

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchMobileNetV2(nn.Module):
  """mobilenetv2.py mobile_half: T = 6, width 0.5."""

  def __init__(self, num_classes=100, T=6, width=0.5):
    super().__init__()
    setting = [
      [1, 16, 1, 1],
      [T, 24, 2, 1],
      [T, 32, 3, 2],
      [T, 64, 4, 2],
      [T, 96, 3, 1],
      [T, 160, 3, 2],
      [T, 320, 1, 1],
    ]
    channels = int(32 * width)
    self.conv1 = nn.Sequential(
      nn.Conv2d(3, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
    )
    self.blocks = nn.ModuleList([])
    for t, c, n, s in setting:
      out = int(c * width)
      group = []
      for stride in [s] + [1] * (n - 1):
        group.append(TorchInvertedResidual(channels, out, stride, t))
        channels = out
      self.blocks.append(nn.Sequential(*group))
    self.conv2 = nn.Sequential(
      nn.Conv2d(channels, 1280, 1, 1, 0, bias=False), nn.BatchNorm2d(1280), nn.ReLU(inplace=True)
    )
    self.classifier = nn.Sequential(nn.Linear(1280, num_classes))
    self.avgpool = nn.AvgPool2d(2, ceil_mode=True)

  def forward(self, x):
    x = self.conv1(x)
    feats = [x]
    for index, group in enumerate(self.blocks):
      x = group(x)
      if index in (1, 2, 4, 6):
        feats.append(x)
    pooled = self.avgpool(self.conv2(x)).flatten(1)
    return self.classifier(pooled), feats, feats, pooled


def _torch_shuffle(x, groups):
  n, c, h, w = x.size()
  return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class TorchShuffleV1Block(nn.Module):
  def __init__(self, in_planes, out_planes, stride, groups):
    super().__init__()
    self.stride = stride
    mid = int(out_planes / 4)
    self.g = 1 if in_planes == 24 else groups
    self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g, bias=False)
    self.bn1 = nn.BatchNorm2d(mid)
    self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()

  def forward(self, x):
    out = _torch_shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    res = self.shortcut(x)
    preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
    return F.relu(preact), preact


class TorchShuffleV1(nn.Module):
  def __init__(self, num_classes=100, out_planes=(240, 480, 960), blocks=(4, 8, 4), groups=3):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    in_planes = 24
    for stage, (planes, count) in enumerate(zip(out_planes, blocks), start=1):
      units = []
      for i in range(count):
        units.append(
          TorchShuffleV1Block(
            in_planes, planes - (in_planes if i == 0 else 0), 2 if i == 0 else 1, groups
          )
        )
        in_planes = planes
      setattr(self, f"layer{stage}", nn.Sequential(*units))
    self.linear = nn.Linear(out_planes[2], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    feats, preacts = [x], [x]
    for stage in (self.layer1, self.layer2, self.layer3):
      for unit in stage:
        x, preact = unit(x)
      feats.append(x)
      preacts.append(preact)
    pooled = F.avg_pool2d(x, 4).flatten(1)
    return self.linear(pooled), feats, preacts, pooled


class TorchShuffleV2Block(nn.Module):
  def __init__(self, in_channels):
    super().__init__()
    c = self.c = int(in_channels * 0.5)
    self.conv1 = nn.Conv2d(c, c, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = nn.Conv2d(c, c, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(c)

  def forward(self, x):
    x1, x2 = x[:, : self.c], x[:, self.c :]
    out = F.relu(self.bn1(self.conv1(x2)))
    out = self.bn2(self.conv2(out))
    preact = self.bn3(self.conv3(out))
    out = torch.cat([x1, F.relu(preact)], 1)
    return _torch_shuffle(out, 2), torch.cat([x1, preact], 1)


class TorchShuffleV2Down(nn.Module):
  def __init__(self, in_channels, out_channels):
    super().__init__()
    mid = out_channels // 2
    self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(mid)
    self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
    self.bn4 = nn.BatchNorm2d(mid)
    self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
    self.bn5 = nn.BatchNorm2d(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
    right = F.relu(self.bn5(self.conv5(right)))
    return _torch_shuffle(torch.cat([left, right], 1), 2)


class TorchShuffleV2(nn.Module):
  def __init__(self, num_classes=100, channels=(116, 232, 464, 1024), blocks=(3, 7, 3)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    in_channels = 24
    for stage, (width, count) in enumerate(zip(channels[:3], blocks), start=1):
      units = [TorchShuffleV2Down(in_channels, width)]
      units += [TorchShuffleV2Block(width) for _ in range(count)]
      setattr(self, f"layer{stage}", nn.Sequential(*units))
      in_channels = width
    self.conv2 = nn.Conv2d(channels[2], channels[3], 1, 1, 0, bias=False)
    self.bn2 = nn.BatchNorm2d(channels[3])
    self.linear = nn.Linear(channels[3], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    feats, preacts = [x], [x]
    for stage in (self.layer1, self.layer2, self.layer3):
      x = stage[0](x)
      for unit in stage[1:]:
        x, preact = unit(x)
      feats.append(x)
      preacts.append(preact)
    pooled = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4).flatten(1)
    return self.linear(pooled), feats, preacts, pooled


TORCH_MODELS = {
  "resnet8": lambda: TorchResNet(16, (16, 32, 64), (1, 1, 1)),
  "resnet8x4": lambda: TorchResNet(32, (64, 128, 256), (1, 1, 1)),
  "wrn_16_1": lambda: TorchWRN(16, 1),
  "vgg8": lambda: TorchVGG([[64], [128], [256], [512], [512]]),
  "mobile_half": TorchMobileNetV2,
  "ShuffleV1": TorchShuffleV1,
  "ShuffleV2": TorchShuffleV2,
}
# Stages with a `stage{k}` / `preact_stage{k}` output.
NUM_STAGES = {
  "resnet8": 3,
  "resnet8x4": 3,
  "wrn_16_1": 3,
  "vgg8": 4,
  "mobile_half": 4,
  "ShuffleV1": 3,
  "ShuffleV2": 3,
}


def _randomized(torch_model):
  """Random BatchNorm affine parameters and running statistics, so every BN variable matters."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for module in torch_model.modules():
      if isinstance(module, nn.BatchNorm2d):
        size = module.num_features
        module.weight.copy_(0.5 + torch.rand(size, generator=generator))
        module.bias.copy_(0.4 * torch.rand(size, generator=generator) - 0.2)
        module.running_mean.copy_(0.4 * torch.rand(size, generator=generator) - 0.2)
        module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
        module.num_batches_tracked.fill_(100)
  return torch_model.eval()


def _images(batch=2, size=32):
  return np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)


def _torch_outputs(torch_model, images_nhwc):
  with torch.no_grad():
    logits, feats, preacts, pooled = torch_model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
  return logits.numpy(), [nhwc(f) for f in feats], [nhwc(f) for f in preacts], pooled.numpy()


@nnx.jit
def _forward(model, images):
  return model(images, train=False, return_features=True)


@pytest.mark.parametrize("name", sorted(TORCH_MODELS))
def test_converted_model_matches_torch(name):
  torch.manual_seed(0)
  torch_model = _randomized(TORCH_MODELS[name]())
  images = _images()
  logits, feats, preacts, pooled = _torch_outputs(torch_model, images)

  # num_classes is read off the checkpoint: 100, the default head, whose abstract build is reused.
  model = torch_import.load_torch_model(name, torch_model.state_dict())
  jax_logits, features = _forward(model, images)

  np.testing.assert_allclose(jax_logits, logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(features["pooled"], pooled, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(features["stem"], feats[0], rtol=1e-4, atol=1e-4)
  for stage in range(1, NUM_STAGES[name] + 1):
    np.testing.assert_allclose(features[f"stage{stage}"], feats[stage], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
      features[f"preact_stage{stage}"], preacts[stage], rtol=1e-4, atol=1e-4
    )


def test_bottleneck_resnetv2_layout_matches_torch():
  """resnetv2.py naming ('shortcut', 'linear') and the Bottleneck block, on a narrow network."""
  torch.manual_seed(0)
  torch_model = _randomized(
    TorchResNet(
      8, (4, 8, 8, 8), (2, 1, 1, 1), bottleneck=True, head="linear", shortcut_name="shortcut"
    )
  )
  images = _images()
  logits, feats, preacts, _ = _torch_outputs(torch_model, images)
  model = nnx.eval_shape(
    lambda: cifar_resnet.CifarResNet(
      layers.Bottleneck,
      8,
      (4, 8, 8, 8),
      (2, 1, 1, 1),
      classifier_name="linear",
      shortcut_name="shortcut",
      num_classes=100,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs=nnx.Rngs(0),
    )
  )
  nnx.update(model, torch_import.convert_state_dict(model, torch_model.state_dict()))
  jax_logits, features = _forward(model, images)
  np.testing.assert_allclose(jax_logits, logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(features["preact_stage4"], preacts[4], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(features["stage2"], feats[2], rtol=1e-4, atol=1e-4)


def test_resnet50_keys_and_shapes_match_reference():
  torch_model = TorchResNet(
    64,
    (64, 128, 256, 512),
    (3, 4, 6, 3),
    bottleneck=True,
    head="linear",
    shortcut_name="shortcut",
    num_classes=100,
  )
  state = models.load_torch_state_dict("ResNet50", torch_model.state_dict())
  assert state["linear"]["kernel"].shape == (2048, 100)
  assert state["layer4"][0]["shortcut"][0]["kernel"].shape == (1, 1, 1024, 2048)


def test_torch_key_maps_layer_leaves_and_keeps_bare_parameter_names():
  assert torch_import.torch_key(("layer1", 0, "bn1", "mean")) == "layer1.0.bn1.running_mean"
  assert torch_import.torch_key(("blocks", 3, "norm1", "scale")) == "blocks.3.norm1.weight"
  assert torch_import.torch_key(("embed_tokens", "embedding")) == "embed_tokens.weight"
  # timm ViT's nn.Parameters sit on the model itself: same name, same layout.
  assert torch_import.torch_key(("pos_embed",)) == "pos_embed"
  assert torch_import.torch_key(("cls_token",)) == "cls_token"


def test_checkpoint_wrappers_are_accepted():
  """RepDistiller saves {'model': state_dict, 'epoch': …}; nn.DataParallel prefixes 'module.'."""
  state_dict = TorchResNet(16, (16, 32, 64), (1, 1, 1), num_classes=10).state_dict()
  reference = models.load_torch_state_dict("resnet8", state_dict)
  assert reference["fc"]["kernel"].shape == (64, 10)  # a head other than the default's 100
  wrapped = {"model": {f"module.{key}": value for key, value in state_dict.items()}, "epoch": 240}
  converted = models.load_torch_state_dict("resnet8", wrapped)
  np.testing.assert_array_equal(converted["fc"]["kernel"][...], reference["fc"]["kernel"][...])
  numpy_state = {key: value.numpy() for key, value in state_dict.items()}
  converted = models.load_torch_state_dict("resnet8", numpy_state, num_classes=10)
  np.testing.assert_array_equal(
    converted["layer1"][0]["bn1"]["var"][...], reference["layer1"][0]["bn1"]["var"][...]
  )


def test_layouts_are_transposed():
  state_dict = TORCH_MODELS["resnet8"]().state_dict()
  state = models.load_torch_state_dict("resnet8", state_dict)
  np.testing.assert_array_equal(
    state["conv1"]["kernel"][...], state_dict["conv1.weight"].numpy().transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(state["fc"]["kernel"][...], state_dict["fc.weight"].numpy().T)
  np.testing.assert_array_equal(
    state["layer2"][0]["downsample"][1]["mean"][...],
    state_dict["layer2.0.downsample.1.running_mean"].numpy(),
  )


def test_mismatch_error_lists_every_offending_key():
  state_dict = dict(TORCH_MODELS["resnet8"]().state_dict())
  del state_dict["layer3.0.bn2.running_var"]
  state_dict["layer1.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)
  state_dict["extra.weight"] = torch.zeros(3)
  with pytest.raises(ValueError) as error:
    models.load_torch_state_dict("resnet8", state_dict)
  message = str(error.value)
  assert "missing keys: layer3.0.bn2.running_var" in message
  assert "unexpected keys: extra.weight" in message
  assert "layer1.0.conv1.weight: checkpoint (16, 16, 1, 1), model expects (16, 16, 3, 3)" in message


def test_wrong_architecture_is_reported():
  with pytest.raises(ValueError, match=r"model 'resnet8x4' \(num_classes=100\)") as error:
    models.load_torch_state_dict("resnet8x4", TORCH_MODELS["resnet8"]().state_dict())
  assert "conv1.weight: checkpoint (16, 3, 3, 3), model expects (32, 3, 3, 3)" in str(error.value)
  assert "missing keys: layer1.0.downsample.0.weight" in str(error.value)


def test_cli_end_to_end(tmp_path):
  torch.manual_seed(0)
  torch_model = _randomized(TORCH_MODELS["resnet8"]())
  checkpoint = tmp_path / "ckpt_epoch_240.pth"
  torch.save({"epoch": 240, "model": torch_model.state_dict()}, checkpoint)
  out_dir = tmp_path / "resnet8"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxkd.tools.import_torch",
      "--model",
      "resnet8",
      "--checkpoint",
      str(checkpoint),
      "--out",
      str(out_dir),
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0, result.stderr

  assert io.read_metadata(str(out_dir)) == {
    "name": "resnet8",
    "create_kwargs": {"num_classes": 100},
  }
  # The saved model is the converted one, weight for weight; the converted model's logits and
  # features match torch's (test_converted_model_matches_torch).
  saved = nnx.to_pure_dict(nnx.state(io.load(str(out_dir))))
  converted = nnx.to_pure_dict(
    nnx.state(torch_import.load_torch_model("resnet8", torch_model.state_dict()))
  )
  jax.tree.map(np.testing.assert_array_equal, saved, converted)


@pytest.mark.parametrize(
  "model_name, checkpoint_name, expected",
  [
    ("resnet8", "absent.pth", "checkpoint not found"),
    ("resnet9", "absent.pth", "unknown model 'resnet9'; known models: "),
  ],
)
def test_cli_errors(tmp_path, model_name, checkpoint_name, expected):
  from jaxkd.tools import import_torch  # pylint: disable=import-outside-toplevel

  with pytest.raises((ValueError, FileNotFoundError), match=expected):
    import_torch.import_checkpoint(
      model_name, str(tmp_path / checkpoint_name), str(tmp_path / "out")
    )


def test_cli_reports_one_line_error(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxkd.tools.import_torch",
      "--model",
      "resnet8",
      "--checkpoint",
      str(tmp_path / "absent.pth"),
      "--out",
      str(tmp_path / "out"),
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"import_torch: error: checkpoint not found: {tmp_path / 'absent.pth'}"
  )
