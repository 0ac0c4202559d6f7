"""jaxkd.checkpoint: unreadable checkpoints set aside, failed saves as one error, non-finite
states refused, restores across device counts, and a ``gs://`` workdir on a local emulator."""

import functools
import glob
import logging
import os
import shutil
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx

from jaxkd import checkpoint, models, parallel
from jaxkd.errors import CheckpointError, IncompatibleCheckpointError, NonFiniteError

import fake_gcs

# A failed read must not leave stranded coroutines to report themselves later.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

RUN = {"student.model": "small_cnn", "num_classes": 10}


@functools.cache
def _abstract_state(widths: tuple[int, ...]):
  def make():
    model = models.create("small_cnn", num_classes=10, widths=widths)
    return {
      "step": jnp.int32(0),
      "student": nnx.state(model),
      "opt_state": optax.adam(1e-3).init(nnx.state(model, nnx.Param)),
      "rng": jax.random.key_data(jax.random.key(0)),
    }

  return jax.eval_shape(make)


def _state(seed: int, widths=(8, 16, 32)) -> dict:
  """A TrainState-shaped tree (model state with BatchNorm statistics, Adam moments, step, key
  data) of values drawn from `seed`: every leaf differs between seeds. Filled on the host, as
  initialising it would compile one kernel per shape. Widths (8, 16, 32) give kernels large
  enough for the FSDP rule to split."""
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32).astype(leaf.dtype))
    return jnp.asarray(rng.integers(0, 1000, leaf.shape).astype(leaf.dtype))

  return jax.tree.map(fill, _abstract_state(tuple(widths)))


def _assert_same(actual, expected):
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), actual, expected
  )


def _warnings(caplog) -> list[str]:
  return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """A workdir with good checkpoints of steps 1, 2, 3 (state = `_state(step)`)."""
  workdir = tmp_path_factory.mktemp("three_steps")
  checkpointer = checkpoint.Checkpointer(str(workdir), keep=5)
  for step in (1, 2, 3):
    checkpointer.save(step, _state(step), {**RUN, "step": step})
  checkpointer.wait()
  checkpointer.close()
  return workdir


def _copy(workdir, tmp_path) -> str:
  shutil.copytree(workdir, tmp_path / "run")
  return str(tmp_path / "run")


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _largest_data_file(step_dir: str) -> str:
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


CORRUPTIONS = {
  "tensorstore data file": lambda d: _truncate(_largest_data_file(d)),
  "state _METADATA": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
  "OCDBT manifest": lambda d: _truncate(os.path.join(d, "state", "manifest.ocdbt")),
  "run record": lambda d: _truncate(os.path.join(d, "run", "metadata")),
  "missing state directory": lambda d: shutil.rmtree(os.path.join(d, "state")),
  "missing run directory": lambda d: shutil.rmtree(os.path.join(d, "run")),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unreadable_latest_checkpoint_is_set_aside(
  corruption, three_steps, tmp_path, caplog, capfd
):
  workdir = _copy(three_steps, tmp_path)
  CORRUPTIONS[corruption](os.path.join(workdir, "checkpoints", "3"))
  caplog.set_level(logging.WARNING)

  checkpointer = checkpoint.Checkpointer(workdir, keep=2)
  assert checkpointer.run_info()["step"] == (2 if "run" in corruption else 3)
  restored = checkpointer.restore(_state(7))

  _assert_same(restored, _state(2))
  [warning] = _warnings(caplog)
  assert "step 3" in warning and os.path.join(workdir, "checkpoints", "3") in warning
  assert "3.unreadable" in warning and "\n" not in warning
  assert "Traceback" not in capfd.readouterr().err
  assert checkpointer.latest_step() == 2
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3.unreadable"))

  # Training goes on from step 2: step 3 is written again; the rotation (keep=2) deletes old
  # good checkpoints, never the one set aside.
  for step in (3, 4):
    checkpointer.save(step, _state(step), RUN)
  checkpointer.wait()
  checkpointer.close()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "3.unreadable", "4"]
  _assert_same(checkpoint.Checkpointer(workdir).restore(_state(7)), _state(4))


def test_every_checkpoint_unreadable_starts_fresh(three_steps, tmp_path, caplog):
  workdir = _copy(three_steps, tmp_path)
  for step in (1, 2, 3):
    _truncate(_largest_data_file(os.path.join(workdir, "checkpoints", str(step))))
  caplog.set_level(logging.WARNING)
  fresh = _state(7)
  assert checkpoint.Checkpointer(workdir).restore(fresh) is fresh
  assert len(_warnings(caplog)) == 3
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
    "1.unreadable",
    "2.unreadable",
    "3.unreadable",
  ]


def test_a_damaged_checkpoint_metadata_file_alone_still_restores(three_steps, tmp_path, caplog):
  """`_CHECKPOINT_METADATA` (timestamps, handler names) is not needed to read the state: the
  checkpoint stays the latest and nothing is logged."""
  workdir = _copy(three_steps, tmp_path)
  _truncate(os.path.join(workdir, "checkpoints", "3", "_CHECKPOINT_METADATA"))
  caplog.set_level(logging.WARNING)
  _assert_same(checkpoint.Checkpointer(workdir).restore(_state(7)), _state(3))
  assert _warnings(caplog) == []


def test_unreadable_name_taken_gets_a_counter(three_steps, tmp_path):
  workdir = _copy(three_steps, tmp_path)
  os.makedirs(os.path.join(workdir, "checkpoints", "3.unreadable"))
  _truncate(os.path.join(workdir, "checkpoints", "3", "run", "metadata"))
  _assert_same(checkpoint.Checkpointer(workdir).restore(_state(7)), _state(2))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3.unreadable.2"))


def test_other_layout_is_incompatible_not_damaged(three_steps, tmp_path):
  """A state of another architecture must not make good checkpoints look damaged."""
  workdir = _copy(three_steps, tmp_path)
  with pytest.raises(IncompatibleCheckpointError, match=r"checkpoints/3 does not match") as info:
    checkpoint.Checkpointer(workdir).restore(_state(7, widths=(8, 16, 16)))
  assert "shape" in str(info.value) and "\n" not in str(info.value)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]


def test_first_non_finite_names_the_leaf():
  tree = {"a": jnp.ones(3), "b": {"c": jnp.arange(4), "d": jnp.array([1.0, jnp.nan])}}
  assert checkpoint.first_non_finite(tree) == "['b']['d']"
  tree["a"] = tree["a"].at[1].set(-jnp.inf)
  assert checkpoint.first_non_finite(tree) == "['a']"
  assert checkpoint.first_non_finite(_state(1)) is None  # ints and key data are skipped
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8})
  sharded = parallel.shard_state(mesh, _state(1))
  kernel = sharded["student"]["head"]["kernel"]
  kernel[...] = kernel[...].at[0, 0].set(jnp.nan)
  assert checkpoint.first_non_finite(sharded) == "['student']['head']['kernel'].value"


def test_non_finite_state_is_never_saved(tmp_path):
  checkpointer = checkpoint.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2):
    checkpointer.save(step, _state(step), RUN)
  bad = _state(3)
  bad["opt_state"] = jax.tree.map(lambda x: x * jnp.inf, bad["opt_state"])
  for step in (3, 4):
    with pytest.raises(NonFiniteError, match=rf"step {step}: .*opt_state.*kept: step 2"):
      checkpointer.save(step, bad, RUN)
  checkpointer.wait()
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


@pytest.mark.parametrize(
  "save_mesh, restore_mesh",
  [({"data": 1, "fsdp": 8}, None), (None, {"data": 2, "fsdp": 4}), ({"data": 8}, {"fsdp": 8})],
  ids=["8-fsdp-to-1", "1-to-8-fsdp", "8-data-to-8-fsdp"],
)
def test_restore_across_device_counts(save_mesh, restore_mesh, tmp_path):
  def mesh(config):
    return parallel.make_mesh(config, devices=None if config else jax.devices()[:1])

  saved = _state(1)
  checkpointer = checkpoint.Checkpointer(str(tmp_path))
  checkpointer.save(1, parallel.shard_state(mesh(save_mesh), saved), RUN)
  checkpointer.close()

  target_mesh = mesh(restore_mesh)
  template = parallel.shard_state(target_mesh, _state(2))
  restored = checkpoint.Checkpointer(str(tmp_path)).restore(template)
  _assert_same(restored, saved)
  # Each array in the layout the target mesh gives it, not the saved one.
  for restored_leaf, template_leaf in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
    assert restored_leaf.sharding.is_equivalent_to(template_leaf.sharding, restored_leaf.ndim)
  kernel = restored["student"]["stages"][1][0]["conv"]["kernel"][...]
  assert len(kernel.sharding.device_set) == target_mesh.devices.size


# Disk full and unwritable directories: a small tmpfs (the tests run as root; root ignores file
# permissions but not a full or read-only file system). Skipped where mounting is not allowed.


@pytest.fixture
def small_disk(tmp_path):
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
  )
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _leftovers(directory) -> list[str]:
  return [name for name in os.listdir(directory) if "orbax-checkpoint-tmp" in name]


def test_disk_full_is_one_error_and_recovers(small_disk, caplog, capfd):
  values = np.random.default_rng(0).random(75_000, np.float32)  # 300 kB, incompressible
  state = {"w": jnp.asarray(values)}
  ballast = small_disk / "ballast"
  ballast.write_bytes(b"\0" * 500_000)
  checkpointer = checkpoint.Checkpointer(str(small_disk), keep=2)
  checkpointer.save(1, state, RUN)
  checkpointer.wait()
  caplog.set_level(logging.WARNING)
  with pytest.raises(CheckpointError) as info:
    checkpointer.save(2, {"w": state["w"] + 1}, RUN)
    checkpointer.wait()
  message = str(info.value)
  assert "\n" not in message
  assert f"{small_disk}/checkpoints/2" in message and "No space left on device (ENOSPC)" in message
  assert _leftovers(small_disk / "checkpoints") == []
  assert _warnings(caplog) == [] and "Traceback" not in capfd.readouterr().err

  ballast.unlink()
  checkpointer.save(2, {"w": state["w"] + 1}, RUN)
  checkpointer.wait()
  checkpointer.close()
  restored = checkpoint.Checkpointer(str(small_disk)).restore(state)
  np.testing.assert_array_equal(restored["w"], values + 1)


def test_read_only_directory_is_one_error_and_recovers(small_disk):
  state = {"w": jnp.ones(10)}
  checkpointer = checkpoint.Checkpointer(str(small_disk))
  checkpointer.save(1, state, RUN)
  checkpointer.wait()
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  try:
    with pytest.raises(CheckpointError, match=r"Read-only file system \(EROFS\)") as info:
      checkpointer.save(2, state, RUN)
      checkpointer.wait()
    assert f"{small_disk}/checkpoints/2" in str(info.value)
  finally:
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
  checkpointer.save(2, state, RUN)
  checkpointer.close()
  assert checkpoint.Checkpointer(str(small_disk)).latest_step() == 2


def _orbax_threads_alive() -> list[str]:
  return [t.name for t in threading.enumerate() if "orbax" in type(t).__module__]


@pytest.mark.parametrize("probe", [True, False], ids=["probed", "failing-inside-orbax"])
def test_file_where_the_checkpoint_directory_should_be(probe, tmp_path, monkeypatch):
  """Runs everywhere (no mount): the directory is a file from the start, or becomes one.

  Without the write probe the failure happens in orbax's background directory creation, whose
  sibling threads must still end (else the interpreter waits for them at exit)."""
  if not probe:
    monkeypatch.setattr(checkpoint.Checkpointer, "_check_writable", lambda self: None)
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "checkpoints").write_text("")
  with pytest.raises(CheckpointError, match=rf"{tmp_path}/a/checkpoints/1: Not a directory"):
    checkpointer = checkpoint.Checkpointer(str(tmp_path / "a"))
    checkpointer.save(1, {"w": jnp.ones(3)}, RUN)
    checkpointer.wait()

  checkpointer = checkpoint.Checkpointer(str(tmp_path / "b"))
  checkpointer.save(1, {"w": jnp.ones(3)}, RUN)
  checkpointer.wait()
  shutil.rmtree(tmp_path / "b" / "checkpoints")
  (tmp_path / "b" / "checkpoints").write_text("")
  with pytest.raises(CheckpointError) as info:
    checkpointer.save(2, {"w": jnp.ones(3)}, RUN)
    checkpointer.wait()
  assert str(info.value) == (
    f"cannot write checkpoint {tmp_path}/b/checkpoints/2: Not a directory (ENOTDIR)"
  )
  deadline = time.monotonic() + 10
  while _orbax_threads_alive() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _orbax_threads_alive() == []


def test_gcs_workdir(tmp_path, monkeypatch, caplog):
  """Save, rotate, restore and set aside on a bucket: nothing is written locally."""
  workdir = fake_gcs.bucket() + "/run"
  monkeypatch.chdir(tmp_path)
  checkpointer = checkpoint.Checkpointer(workdir, keep=2)
  for step in (1, 2, 3):
    checkpointer.save(step, _state(step), {**RUN, "step": step})
  checkpointer.wait()
  checkpointer.close()
  assert os.listdir(tmp_path) == []
  steps = epath.Path(workdir) / "checkpoints"
  assert sorted(path.name for path in steps.iterdir()) == ["2", "3"]
  assert (steps / "3" / "commit_success.txt").exists()

  (steps / "3" / "run" / "metadata").write_text('{"stud')
  caplog.set_level(logging.WARNING)
  checkpointer = checkpoint.Checkpointer(workdir)
  assert checkpointer.run_info()["step"] == 2
  _assert_same(checkpointer.restore(_state(7)), _state(2))
  [warning] = _warnings(caplog)
  assert f"{workdir}/checkpoints/3" in warning
  assert sorted(path.name for path in steps.iterdir()) == ["2", "3.unreadable"]
