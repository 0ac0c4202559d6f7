"""The quickstart CNN: output and feature shapes, parameter counts by hand, BN modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import models


def _num_params(model) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
  "flatten,head_params", [(False, 32 * 10 + 10), (True, 7 * 7 * 32 * 10 + 10)]
)
def test_shapes_and_parameter_count(flatten, head_params):
  model = models.create("small_cnn", num_classes=10, widths=(8, 16, 32), depth=1, flatten=flatten)
  logits, features = model(jnp.zeros((2, 28, 28, 1)), train=False, return_features=True)
  assert logits.shape == (2, 10)
  assert {name: value.shape for name, value in features.items()} == {
    "stem": (2, 28, 28, 8),
    "preact_stage1": (2, 14, 14, 16),
    "stage1": (2, 14, 14, 16),
    "preact_stage2": (2, 7, 7, 32),
    "stage2": (2, 7, 7, 32),
    "pooled": (2, 7 * 7 * 32 if flatten else 32),
  }
  # conv kernels (no bias) + BN scale and bias, per layer; then the linear head.
  convs = 3 * 3 * 1 * 8 + 2 * 8 + 3 * 3 * 8 * 16 + 2 * 16 + 3 * 3 * 16 * 32 + 2 * 32
  assert _num_params(model) == convs + head_params
  assert model(jnp.zeros((2, 28, 28, 1)))[1] == {}


def test_depth_adds_layers_and_odd_sizes_round_up():
  model = models.create(
    "small_cnn", num_classes=3, widths=(4, 8), depth=3, flatten=True, input_size=9, in_channels=3
  )
  logits, features = model(jnp.zeros((1, 9, 9, 3)), return_features=True)
  assert logits.shape == (1, 3) and features["stage1"].shape == (1, 5, 5, 8)
  assert len(model.stages[0]) == 3


def test_train_mode_updates_batch_statistics_eval_mode_does_not():
  model = models.create("small_cnn", widths=(4, 8), depth=1)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 28, 28, 1)), jnp.float32)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  model(images, train=False)
  jax.tree.map(np.testing.assert_array_equal, before, nnx.state(model, nnx.BatchStat))
  model(images, train=True)
  after = nnx.state(model, nnx.BatchStat)
  assert not np.allclose(before["stem"]["bn"]["mean"], after["stem"]["bn"]["mean"])
