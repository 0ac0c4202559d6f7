"""Tiny NNX models with the zoo's calling convention, for the engine tests.

``logits, features = model(images, train=..., return_features=...)`` with features 'stem',
'stage1', 'stage2', 'preact_stage1', 'preact_stage2' and 'pooled', like `jaxkd.models`. The
convolutions are the zoo's `layers.Conv2d`, so the sharding, population and multi-host tests
run its fusion barrier too.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkd.models.layers import Conv2d


class TinyCNN(nnx.Module):
  """conv-BN-relu stem, two conv-BN stages (the second strided), mean pool, linear head."""

  def __init__(self, num_classes: int = 10, width: int = 4, *, rngs: nnx.Rngs):
    self.stem = Conv2d(3, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.conv1 = Conv2d(width, width, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.conv2 = Conv2d(width, 2 * width, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(2 * width, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def __call__(self, images, train: bool = False, return_features: bool = False):
    norm = lambda bn, x: bn(x, use_running_average=not train)
    stem = jax.nn.relu(norm(self.stem_bn, self.stem(images)))
    preact1 = norm(self.bn1, self.conv1(stem))
    stage1 = jax.nn.relu(preact1)
    preact2 = norm(self.bn2, self.conv2(stage1))
    stage2 = jax.nn.relu(preact2)
    pooled = jnp.mean(stage2, axis=(1, 2))
    logits = self.head(pooled)
    if not return_features:
      return logits, {}
    return logits, {
      "stem": stem,
      "stage1": stage1,
      "stage2": stage2,
      "preact_stage1": preact1,
      "preact_stage2": preact2,
      "pooled": pooled,
    }


def tiny_cnn(num_classes: int = 10, width: int = 4, seed: int = 0) -> TinyCNN:
  return TinyCNN(num_classes, width, rngs=nnx.Rngs(seed))


def batch(size: int = 16, num_classes: int = 10, image_size: int = 8, seed: int = 0):
  """A random host batch: normalised NHWC images, labels, indices."""
  rng = jax.random.key(seed)
  image_rng, label_rng = jax.random.split(rng)
  import numpy as np

  return {
    "image": np.asarray(jax.random.normal(image_rng, (size, image_size, image_size, 3))),
    "label": np.asarray(jax.random.randint(label_rng, (size,), 0, num_classes), np.int32),
    "index": np.arange(size, dtype=np.int32),
  }


def forward(model, images, train: bool = False, return_features: bool = False):
  """`model(images, ...)` compiled, leaving `model` untouched (train-mode statistics discarded)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images):
    return nnx.merge(graphdef, state, copy=True)(
      images, train=train, return_features=return_features
    )

  return run(state, jnp.asarray(images))
