"""Runs survive faults: SIGTERM and SIGKILL at random moments resume bit for bit, a non-finite
step stops the run (or is skipped) without ever reaching a checkpoint, metrics keep one row per
step across resumes, and a workdir of another run is refused or set aside on request."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jaxkd import checkpoint, errors, models, preemption, train
from jaxkd.models import io as model_io
from jaxkd.experiments import compare

import testing_utils

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """An untrained teacher: KD only needs fixed, non-uniform targets here."""
  directory = str(tmp_path_factory.mktemp("teacher") / "model")
  kwargs = {"widths": (8, 16, 16), "depth": 1, "flatten": True}
  model = models.create("small_cnn", num_classes=10, seed=7, **kwargs)
  model_io.save(directory, model, "small_cnn", num_classes=10, **kwargs)
  return directory


def _config(idx_dir: str, teacher_dir: str):
  """A tiny KD run: 64 examples / batch 8 × 3 epochs = 24 steps, crop+flip views."""
  config = testing_utils.load_config("quickstart", "smoke,seeds=1")
  config.experiment = ""
  config.teacher.checkpoint = teacher_dir
  config.data.dir = idx_dir
  config.data.train_examples = 64
  config.data.batch_size = 8
  config.data.eval_batch_size = 48
  config.data.augment = "crop_flip"
  config.student.kwargs.widths = (4, 8, 8)
  config.num_epochs = 3
  config.log_every_steps = 4
  config.checkpoint_every_steps = 5
  return config


def _state_arrays(workdir: str) -> dict:
  """The latest checkpoint's TrainState leaves (params, BN statistics, optimiser state, ...)."""
  manager = checkpoint.Checkpointer(workdir)
  restored = manager.read(manager.latest_step())
  manager.close()
  return {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
  }


def _train_rows(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [record["step"] for record in map(json.loads, f) if record["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(idx_dir, teacher_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train.train_and_evaluate(_config(idx_dir, teacher_dir), workdir)
  return workdir


def _assert_same_final_state(workdir: str, reference: str) -> None:
  ours, theirs = _state_arrays(workdir), _state_arrays(reference)
  assert ours.keys() == theirs.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.mark.parametrize("delays", [(0.5, 2.0), (1.5,)])
def test_sigterm_checkpoints_and_resumes_bit_for_bit(
  idx_dir, teacher_dir, uninterrupted, tmp_path, delays
):
  """SIGTERM at (seeded) random moments: the run stops at a step boundary with that step
  checkpointed; running again resumes; the final state equals the uninterrupted run's."""
  workdir = str(tmp_path / "run")
  stops = []
  for delay in delays:
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
      train.train_and_evaluate(_config(idx_dir, teacher_dir), workdir)
    except preemption.Preempted as stopped:
      stops.append(stopped.step)
      assert checkpoint.Checkpointer(workdir).latest_step() == stopped.step
    finally:
      timer.cancel()
  train.train_and_evaluate(_config(idx_dir, teacher_dir), workdir)
  assert stops, "no SIGTERM landed inside a run"
  _assert_same_final_state(workdir, uninterrupted)
  assert _train_rows(workdir) == _train_rows(uninterrupted)


def _cli_args(idx_dir: str, teacher_dir: str, workdir: str) -> list[str]:
  """`python -m jaxkd.main` running `_config` (one CPU device, XLA:CPU options of jaxkd.main)."""
  config = _config(idx_dir, teacher_dir)
  return [
    sys.executable,
    "-m",
    "jaxkd.main",
    "--config=configs/quickstart.py:smoke,seeds=1",
    f"--workdir={workdir}",
    "--config.experiment=",
    f"--config.data.dir={idx_dir}",
    f"--config.teacher.checkpoint={teacher_dir}",
    f"--config.data.train_examples={config.data.train_examples}",
    f"--config.data.batch_size={config.data.batch_size}",
    f"--config.data.eval_batch_size={config.data.eval_batch_size}",
    f"--config.data.augment={config.data.augment}",
    "--config.student.kwargs.widths=(4, 8, 8)",
    f"--config.num_epochs={config.num_epochs}",
    f"--config.log_every_steps={config.log_every_steps}",
    f"--config.checkpoint_every_steps={config.checkpoint_every_steps}",
  ]


_CLI_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def test_sigkill_anywhere_resumes_bit_for_bit(idx_dir, teacher_dir, tmp_path):
  """`python -m jaxkd.main` killed with SIGKILL at 5 or more random moments (some during
  checkpoint writes: every 5th step is saved), then run to the end: the final parameters and
  optimiser state equal those of the same command run without interruption, and metrics.jsonl
  holds one row per logged step."""
  reference = str(tmp_path / "reference")
  result = subprocess.run(
    _cli_args(idx_dir, teacher_dir, reference),
    cwd=testing_utils.REPO,
    env=_CLI_ENV,
    capture_output=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  workdir = str(tmp_path / "killed")
  args = _cli_args(idx_dir, teacher_dir, workdir)
  rng = np.random.default_rng(0)
  kills = 0
  for _ in range(12):
    process = subprocess.Popen(
      args, cwd=testing_utils.REPO, env=_CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # Wait until training started (the first metrics), then kill at a random moment.
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
      if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        break
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    if process.poll() is None:
      process.send_signal(signal.SIGKILL)
      process.wait()
      kills += 1
    else:
      assert process.returncode == 0, process.stderr.read().decode()[-2000:]
      if kills >= 5:
        break
  result = subprocess.run(
    args, cwd=testing_utils.REPO, env=_CLI_ENV, capture_output=True, timeout=300
  )
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  assert kills >= 5
  _assert_same_final_state(workdir, reference)
  rows = _train_rows(workdir)
  assert rows == sorted(set(rows)) == _train_rows(reference)


def test_nonfinite_loss_stops_the_run_and_never_reaches_a_checkpoint(
  idx_dir, teacher_dir, tmp_path
):
  """lr = 1e6 diverges: the run ends with one line naming the step, the loss terms and the
  gradient; the checkpoints hold finite states only; no model is exported."""
  config = _config(idx_dir, teacher_dir)
  config.optimizer.lr = 1e6
  config.checkpoint_every_steps = 2
  workdir = str(tmp_path / "diverged")
  with pytest.raises(errors.NonFiniteError, match=r"step \d+: the loss or a gradient") as error:
    train.train_and_evaluate(config, workdir)
  assert "first non-finite gradient ['student']" in str(error.value)
  assert "\n" not in str(error.value)
  manager = checkpoint.Checkpointer(workdir)
  for step in manager.steps():
    assert checkpoint.first_non_finite(manager.read(step)) is None
  manager.close()
  assert not os.path.exists(os.path.join(workdir, "model"))


def test_nonfinite_skip_policy_counts_and_limits(idx_dir, teacher_dir, tmp_path):
  config = _config(idx_dir, teacher_dir)
  config.optimizer.lr = 1e6
  config.nonfinite = "skip"
  config.max_skipped_steps = 3
  with pytest.raises(errors.NonFiniteError, match="more than config.max_skipped_steps=3"):
    train.train_and_evaluate(config, str(tmp_path / "skipped"))


@pytest.mark.parametrize(
  "field, value",
  [
    ("optimizer.name", "adamw"),
    ("distill.losses.ce", 0.5),
    ("data.batch_size", 16),
    ("num_epochs", 4),
  ],
)
def test_a_workdir_of_another_run_is_refused_untouched(
  idx_dir, teacher_dir, uninterrupted, tmp_path, field, value
):
  workdir = tmp_path / "copy"
  subprocess.run(["cp", "-a", uninterrupted, str(workdir)], check=True)
  before = {path: os.stat(path).st_mtime_ns for path in _files(workdir)}
  config = _config(idx_dir, teacher_dir)
  *parents, name = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  setattr(node, name, value)
  with pytest.raises(errors.ConfigError, match=rf"written for {re.escape(field)} = "):
    train.train_and_evaluate(config, str(workdir))
  assert {path: os.stat(path).st_mtime_ns for path in _files(workdir)} == before


def test_fresh_and_continue_overrides(idx_dir, teacher_dir, uninterrupted, tmp_path):
  workdir = tmp_path / "copy"
  subprocess.run(["cp", "-a", uninterrupted, str(workdir)], check=True)
  config = _config(idx_dir, teacher_dir)
  config.num_epochs = 4
  config.workdir_mismatch = "fresh"
  train.train_and_evaluate(config, str(workdir))
  assert (workdir / "previous-1" / "checkpoints").is_dir()
  assert checkpoint.Checkpointer(str(workdir)).latest_step() == 32
  config.num_epochs = 5  # continue the 4-epoch run's weights under a 5-epoch schedule
  config.workdir_mismatch = "continue"
  train.train_and_evaluate(config, str(workdir))
  assert checkpoint.Checkpointer(str(workdir)).latest_step() == 40


def _files(directory) -> list[str]:
  return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]


def test_compare_reports_preemption(idx_dir, tmp_path):
  """An experiment stopped by SIGTERM stops at once: the Preempted of its current run."""
  config = testing_utils.load_config("quickstart", "smoke,seeds=1")
  config.data.dir = idx_dir
  config.data.train_examples = 64
  config.data.batch_size = 16
  config.data.eval_batch_size = 48
  config.compare.teacher_train_examples = 0
  timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  try:
    with pytest.raises(preemption.Preempted):
      compare.run(config, str(tmp_path))
  finally:
    timer.cancel()
