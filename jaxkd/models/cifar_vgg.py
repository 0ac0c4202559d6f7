"""VGG with BatchNorm for CIFAR: vgg8, vgg11, vgg13, vgg16, vgg19.

Same architecture, parameter names and initialisation as RepDistiller / mdistiller `vgg.py`
(whose registry maps 'vgg8' → `vgg8_bn`, …: every jaxkd VGG is the `_bn` variant; the names without
BatchNorm are not provided). Five conv blocks `block0..4` (torch `nn.Sequential`s of conv-BN-ReLU
with the last ReLU removed), 2×2 max pools after blocks 0-2 (and 3 for 64-px inputs), global mean,
one `classifier` Linear(512, num_classes) — the FC layers of ImageNet VGG are removed. Convolutions
(with bias) start from N(0, 2 / (kh·kw·out)) and zero bias, BatchNorm from (1, 0), the classifier
from N(0, 0.01²) and zero bias.

Features (`return_features=True`), as RepDistiller's `is_feat` / `preact=True` lists:
`stem` (relu(block0), before its pool), `stage1..4` (relu(block k), before the pool),
`preact_stage1..4` (block k's BN output before that ReLU), `pooled` (classifier input).
"""

import jax.numpy as jnp
from flax import nnx

from jaxkd.models import layers
from jaxkd.models.registry import register

# Conv widths per block (RepDistiller `cfg`); 'S' is vgg8.
_CONFIGS = {
  "vgg8": ((64,), (128,), (256,), (512,), (512,)),  # 'S'
  "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # 'A'
  "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # 'B'
  "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),  # 'D'
  "vgg19": (
    (64, 64),
    (128, 128),
    (256, 256, 256, 256),
    (512, 512, 512, 512),
    (512, 512, 512, 512),
  ),  # 'E'
}


def _conv_block(
  widths: tuple[int, ...], in_channels: int, *, dtype, param_dtype, rngs: nnx.Rngs
) -> nnx.List:
  """RepDistiller `_make_layers(cfg, batch_norm=True)`: [conv, BN, ReLU] per width, minus the
  last ReLU."""
  block = []
  for width in widths:
    block += [
      layers.conv2d(
        in_channels,
        width,
        3,
        padding=1,
        kernel_init=layers.kaiming_normal_fan_out,
        bias_init=nnx.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      ),
      layers.BatchNorm2d(width, dtype=dtype, param_dtype=param_dtype),
      nnx.relu,
    ]
    in_channels = width
  return nnx.List(block[:-1])


def _max_pool(x):
  return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG(nnx.Module):
  """VGG-BN for 32×32 (or 64×64) inputs."""

  def __init__(
    self,
    config: tuple[tuple[int, ...], ...],
    *,
    num_classes: int,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    in_channels = 3
    for index, widths in enumerate(config):
      setattr(
        self,
        f"block{index}",
        _conv_block(widths, in_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
      )
      in_channels = widths[-1]
    self.classifier = layers.linear(
      in_channels,
      num_classes,
      kernel_init=nnx.initializers.normal(0.01),
      bias_init=nnx.initializers.zeros,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x, train: bool = False, return_features: bool = False):
    collect = layers.FeatureCollector(return_features)
    # The reference pools after block 3 only for 64-px inputs (Tiny-ImageNet), so that block 4 runs
    # on a 4×4 map either way.
    pool_after_block3 = x.shape[1] == 64
    x = nnx.relu(layers.sequential(self.block0, x, train=train))
    collect("stem", x)
    x = _max_pool(x)
    for index, block in enumerate((self.block1, self.block2, self.block3, self.block4), start=1):
      x = layers.sequential(block, x, train=train)
      collect(f"preact_stage{index}", x)
      x = nnx.relu(x)
      collect(f"stage{index}", x)
      if index < 3 or (index == 3 and pool_after_block3):
        x = _max_pool(x)
    pooled = layers.global_avg_pool(x)
    collect("pooled", pooled)
    return self.classifier(pooled).astype(jnp.float32), collect.features


def _register_vgg(name: str) -> None:
  @register(name)
  def build(
    *, num_classes: int = 100, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ) -> VGG:
    return VGG(
      _CONFIGS[name], num_classes=num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  build.__name__ = build.__qualname__ = name
  build.__doc__ = f"RepDistiller's `{name}` (= its `{name}_bn`)."


for _name in _CONFIGS:
  _register_vgg(_name)
