"""jaxkd.models.io: exported models load on any mesh, on ``gs://``, and a directory that
disagrees with itself is one line naming the path and the difference."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import models, parallel
from jaxkd.errors import CheckpointError, CheckpointNotFoundError
from jaxkd.models import io as model_io

import fake_gcs

# A failed read must not leave stranded coroutines to report themselves later.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

# Widths (8, 16, 32): the second stage's kernels are large enough for the FSDP rule to split.
KWARGS = {"num_classes": 10, "widths": [8, 16, 32]}
IMAGES = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype(np.float32)


def _model(seed: int = 0) -> nnx.Module:
  """small_cnn with every weight and BatchNorm statistic drawn from `seed` (variances positive),
  so each one shows in the outputs. Built abstractly and filled on the host: initialising it
  would compile one kernel per shape."""
  model = nnx.eval_shape(lambda: models.create("small_cnn", **KWARGS))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    values = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    is_variance = jax.tree_util.keystr(path).endswith("['var']")
    return jnp.asarray(np.abs(values) + 0.5 if is_variance else 0.3 * values)

  state = nnx.to_pure_dict(nnx.state(model))
  nnx.update(model, jax.tree_util.tree_map_with_path(fill, state))
  return model


def _logits(model: nnx.Module) -> np.ndarray:
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images)[0])
  return np.asarray(run(state, IMAGES))


def _weights(model: nnx.Module) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _placed(model: nnx.Module, mesh) -> nnx.Module:
  """A copy of `model` with its state laid out on `mesh` by the FSDP rule."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, parallel.shard_state(mesh, state))


def _assert_same_weights(loaded, reference):
  jax.tree.map(np.testing.assert_array_equal, _weights(loaded), _weights(reference))


@pytest.fixture(scope="module")
def reference():
  model = _model()
  return model, _logits(model)


FSDP = {"data": 1, "fsdp": 8}


@pytest.mark.parametrize("mesh_config", [{"data": 8}, FSDP], ids=["data", "fsdp"])
def test_exported_from_8_devices_loads_on_1(mesh_config, reference, tmp_path):
  model, logits = reference
  model_io.save(tmp_path, _placed(model, parallel.make_mesh(mesh_config)), "small_cnn", **KWARGS)

  loaded = model_io.load(tmp_path)
  for leaf in jax.tree.leaves(nnx.state(loaded)):
    assert leaf.sharding.device_set == {jax.local_devices()[0]}
  _assert_same_weights(loaded, model)
  np.testing.assert_allclose(_logits(loaded), logits, rtol=1e-6, atol=1e-6)


def test_exported_from_1_device_loads_sharded_on_8(reference, tmp_path):
  model, logits = reference
  one_device = parallel.make_mesh(None, devices=jax.devices()[:1])
  model_io.save(tmp_path, _placed(model, one_device), "small_cnn", **KWARGS)

  mesh = parallel.make_mesh(FSDP)
  loaded = model_io.load(tmp_path, mesh=mesh)
  kernel = nnx.state(loaded)["stages"][1][0]["conv"]["kernel"][...]
  assert kernel.sharding.spec == parallel.fsdp_spec(kernel.shape, 8)
  assert "fsdp" in kernel.sharding.spec  # the rule splits this one
  assert len(kernel.sharding.device_set) == 8
  _assert_same_weights(loaded, model)
  np.testing.assert_allclose(_logits(loaded), logits, rtol=1e-5, atol=1e-6)


def test_save_replaces_a_model(reference, tmp_path):
  model_io.save(tmp_path, _model(seed=1), "small_cnn", **KWARGS)
  model_io.save(tmp_path, reference[0], "small_cnn", **KWARGS)
  assert model_io.read_metadata(tmp_path) == {"name": "small_cnn", "create_kwargs": KWARGS}
  _assert_same_weights(model_io.load(tmp_path), reference[0])


def test_gcs_model_directory(reference, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  directory = fake_gcs.bucket() + "/teacher"
  model_io.save(directory, reference[0], "small_cnn", **KWARGS)
  assert os.listdir(tmp_path) == []  # nothing written under ./gs:/...
  assert model_io.read_metadata(directory)["name"] == "small_cnn"
  np.testing.assert_allclose(_logits(model_io.load(directory)), reference[1], rtol=1e-6)


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory):
  directory = tmp_path_factory.mktemp("saved")
  model_io.save(directory, reference[0], "small_cnn", **KWARGS)
  return directory


def _write_record(record):
  return lambda directory: (directory / "model.json").write_text(json.dumps(record))


def _truncate_weights(directory):
  files = glob.glob(str(directory / "state" / "**" / "d" / "*"), recursive=True)
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _remove(path):
  return lambda directory: os.remove(directory / path)


DAMAGE = {
  "other widths": (
    _write_record({"name": "small_cnn", "create_kwargs": {**KWARGS, "widths": [8, 16, 16]}}),
    r"model.json describes small_cnn\(num_classes=10, widths=\[8, 16, 16\]\), but the weights in "
    r".*/state do not match it: head.kernel is saved with shape \(32, 10\), \(16, 10\) is "
    r"expected",
  ),
  "other depth": (
    _write_record({"name": "small_cnn", "create_kwargs": {**KWARGS, "depth": 1}}),
    r"do not match it: stages\.0\.1\..* is saved but not expected",
  ),
  "other architecture": (
    _write_record({"name": "resnet8", "create_kwargs": {"num_classes": 10}}),
    r"model.json describes resnet8\(num_classes=10\), but .* do not match it: .* is missing",
  ),
  "unknown model": (
    _write_record({"name": "small_cnm", "create_kwargs": {}}),
    r"model.json names a model that cannot be built, small_cnm\(\): unknown model .small_cnm.",
  ),
  "unknown argument": (
    _write_record({"name": "small_cnn", "create_kwargs": {"widht": 3}}),
    r"model.json names a model that cannot be built, small_cnn\(widht=3\): .*widht",
  ),
  "garbled model.json": (
    lambda directory: (directory / "model.json").write_text('{"name": "small_c'),
    r"model.json is not valid JSON \(Unterminated string.*\); re-export the model",
  ),
  "not a record": (
    _write_record(["small_cnn"]),
    r"model.json is not a model record: expected \{'name': str, 'create_kwargs': dict\}",
  ),
  "truncated weights": (_truncate_weights, r"cannot read the weights in .*/state: "),
  "missing weights metadata": (_remove("state/_METADATA"), r"cannot read the weights in .*/state"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_model_directory_is_one_line(damage, saved, tmp_path, capfd):
  directory = tmp_path / "model"
  directory.mkdir()
  os.system(f"cp -r {saved}/. {directory}")
  make_damage, message = DAMAGE[damage]
  make_damage(directory)
  with pytest.raises(CheckpointError, match=message) as info:
    model_io.load(directory)
  assert "\n" not in str(info.value) and str(directory) in str(info.value)
  if damage != "truncated weights":  # the others show before any weight is read
    with pytest.raises(CheckpointError, match=message):
      model_io.abstract_model(directory)
  assert "Traceback" not in capfd.readouterr().err  # nor the stranded reads' reports


def test_abstract_model_reads_no_weights(saved):
  model = model_io.abstract_model(saved)
  kernel = nnx.state(model)["head"]["kernel"].get_value()
  assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.shape == (32, 10)


def test_missing_model_is_a_file_not_found_error(tmp_path):
  """Callers that ask "is there a model?" catch FileNotFoundError."""
  with pytest.raises(CheckpointNotFoundError, match="is not a jaxkd model checkpoint") as info:
    model_io.read_metadata(tmp_path)
  assert isinstance(info.value, FileNotFoundError)


def test_unwritable_model_directory_is_one_line(reference, tmp_path):
  (tmp_path / "model").write_text("")
  with pytest.raises(CheckpointError) as info:
    model_io.save(tmp_path / "model", reference[0], "small_cnn", **KWARGS)
  assert str(info.value).startswith(f"cannot write the model to {tmp_path}/model: ")
  assert "\n" not in str(info.value)
