"""Mesh construction, the FSDP sharding rule and host → global batches (8 simulated devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jaxkd import parallel


@pytest.mark.parametrize(
  "config, shape",
  [
    (None, {"data": 8, "fsdp": 1}),
    ({"data": -1, "fsdp": 1}, {"data": 8, "fsdp": 1}),
    ({"data": 4, "fsdp": 2}, {"data": 4, "fsdp": 2}),
    ({"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4}),
    ({"fsdp": 8}, {"data": 1, "fsdp": 8}),
  ],
)
def test_make_mesh_shapes(config, shape):
  mesh = parallel.make_mesh(config)
  assert dict(mesh.shape) == shape
  assert mesh.axis_names == ("data", "fsdp")
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_make_mesh_on_given_devices():
  mesh = parallel.make_mesh({"data": -1}, devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1}


@pytest.mark.parametrize(
  "config, message",
  [
    ({"data": 3, "fsdp": 2}, "needs 6 devices"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": -1, "fsdp": 3}, "do not divide"),
    ({"model": 2}, "unknown mesh axes"),
  ],
)
def test_make_mesh_errors(config, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(config)


@pytest.mark.parametrize(
  "shape, fsdp, leading, spec",
  [
    ((3, 3, 16, 32), 2, 0, P(None, None, None, "fsdp")),  # largest divisible dim
    ((3, 3, 64, 32), 2, 0, P(None, None, "fsdp", None)),
    ((200, 10), 4, 0, P("fsdp", None)),  # 10 is not divisible by 4
    ((31, 33), 2, 0, P()),  # nothing divisible
    ((16,), 2, 0, P()),  # too small: replicated
    ((64, 64), 1, 0, P()),  # no fsdp axis
    ((4, 64, 64), 2, 1, P(None, "fsdp", None)),  # stacking axis never split
  ],
)
def test_fsdp_spec(shape, fsdp, leading, spec):
  assert parallel.fsdp_spec(shape, fsdp, leading) == spec


def test_state_shardings_are_shape_determined():
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  tree = {"w": np.zeros((64, 32)), "mu": {"w": np.zeros((64, 32))}, "b": np.zeros(32)}
  shardings = parallel.state_shardings(mesh, tree)
  assert shardings["w"] == shardings["mu"]["w"]
  assert shardings["w"].spec == P("fsdp", None)
  assert shardings["b"].spec == P()
  placed = parallel.shard_state(mesh, tree)
  assert placed["w"].sharding.spec == P("fsdp", None)
  np.testing.assert_array_equal(np.asarray(placed["w"]), tree["w"])


def test_host_to_global_single_process():
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  host_batch = {
    "image": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3),
    "label": np.arange(16, dtype=np.int32),
  }
  global_batch = parallel.host_to_global(mesh, host_batch)
  for key, value in host_batch.items():
    assert global_batch[key].shape == value.shape
    assert global_batch[key].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(global_batch[key]), value)
  # Every device holds 2 of the 16 examples.
  assert {shard.data.shape[0] for shard in global_batch["label"].addressable_shards} == {2}


def test_maybe_initialize_distributed_is_a_no_op_without_settings(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert not parallel.maybe_initialize_distributed(None)
  assert not parallel.maybe_initialize_distributed({"distributed": None})
