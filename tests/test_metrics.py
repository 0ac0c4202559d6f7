"""jaxkd.metrics: one row per (step, split) across resumes, in metrics.jsonl and TensorBoard;
hparams; a ``gs://`` workdir; the progress line's timing, label and overall ETA."""

import glob
import json
import logging
import os

import jax.numpy as jnp
import pytest
from etils import epath

from jaxkd import metrics

import fake_gcs
import testing_utils


def _rows(workdir) -> list[tuple]:
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [
    (r["step"], r["split"], r.get("loss", r.get("accuracy")))
    for r in map(json.loads, text.splitlines())
  ]


def _tensorboard_view(directory) -> dict:
  """{(tag, step): value} as TensorBoard shows the run: files in name (time) order, and a
  SessionLog START at step s discards the points at steps >= s read so far (TensorBoard's
  purge of orphaned data after a restart)."""
  points = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    for event in testing_utils.tensorboard_events(path):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        points = {key: value for key, value in points.items() if key[1] < event.step}
      for value in event.summary.value:
        if value.HasField("simple_value"):
          points[(value.tag, event.step)] = value.simple_value
  return points


def _write_run(workdir, *, resume_step, steps, offset):
  """Train rows at `steps` (loss = offset + step), an eval row at step 4 if run."""
  with metrics.Writer(workdir, resume_step=resume_step) as writer:
    for step in steps:
      writer.write(step, "train", {"loss": offset + step})
      if step == 4:
        writer.write(step, "eval", {"accuracy": offset + 0.5})


def test_resumed_run_replaces_replayed_steps(tmp_path):
  _write_run(str(tmp_path), resume_step=0, steps=range(1, 7), offset=100)
  # Interrupted after step 6; the newest checkpoint is step 3: steps 4.. run again.
  _write_run(str(tmp_path), resume_step=3, steps=range(4, 9), offset=200)

  expected = [(1, "train", 101), (2, "train", 102), (3, "train", 103), (4, "train", 204)]
  expected += [(4, "eval", 200.5), *[(step, "train", 200 + step) for step in range(5, 9)]]
  assert _rows(tmp_path) == expected
  view = _tensorboard_view(tmp_path / "tensorboard")
  assert view == {
    (f"{split}/{'loss' if split == 'train' else 'accuracy'}", step): value
    for step, split, value in expected
  }


def test_fresh_run_over_a_crashed_one_and_torn_lines(tmp_path):
  _write_run(str(tmp_path), resume_step=0, steps=[1, 2], offset=100)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "split": "tr')  # killed mid-write
  assert metrics.best(str(tmp_path), "train", "loss") == 102
  # No checkpoint was written before the crash: the run starts over from step 0.
  _write_run(str(tmp_path), resume_step=0, steps=[1], offset=300)
  assert _rows(tmp_path) == [(1, "train", 301)]
  # A finished run re-opened without resume_step keeps everything, minus the torn line.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "spl')
  with metrics.Writer(str(tmp_path)) as writer:
    writer.write(1, "eval", {"accuracy": 0.25})
  assert _rows(tmp_path) == [(1, "train", 301), (1, "eval", 0.25)]


def test_hparams(tmp_path):
  with metrics.Writer(str(tmp_path), resume_step=0) as writer:
    writer.write(10, "eval", {"accuracy": 0.5})
    writer.write_hparams(
      {"optimizer": {"learning_rate": 0.1}, "student": {"widths": (4, 8)}, "seed": 3},
      {"best_accuracy": 0.75},
    )
  hparams = testing_utils.tensorboard_hparams(tmp_path / "tensorboard")
  assert hparams["optimizer.learning_rate"].number_value == 0.1
  assert hparams["student.widths"].string_value == "[4, 8]"
  assert hparams["seed"].number_value == 3
  assert _tensorboard_view(tmp_path / "tensorboard")[("hparams/best_accuracy", 10)] == 0.75


def test_gcs_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = fake_gcs.bucket() + "/run"
  _write_run(workdir, resume_step=0, steps=range(1, 7), offset=100)
  _write_run(workdir, resume_step=3, steps=range(4, 6), offset=200)
  assert os.listdir(tmp_path) == []
  assert _rows(workdir) == [
    (1, "train", 101),
    (2, "train", 102),
    (3, "train", 103),
    (4, "train", 204),
    (4, "eval", 200.5),
    (5, "train", 205),
  ]
  assert metrics.best(workdir, "train", "loss") == 205
  local_copy = tmp_path / "tensorboard"
  local_copy.mkdir()
  for event_file in (epath.Path(workdir) / "tensorboard").iterdir():
    (local_copy / event_file.name).write_bytes(event_file.read_bytes())
  assert _tensorboard_view(local_copy)[("train/loss", 5)] == 205
  assert ("train/loss", 6) not in _tensorboard_view(local_copy)


def test_gcs_rows_reach_the_bucket_on_flush():
  workdir = fake_gcs.bucket() + "/run"
  writer = metrics.Writer(workdir, resume_step=0, sync_secs=3600)
  writer.write(1, "train", {"loss": 1.0})
  writer.write(2, "train", {"loss": 2.0})
  assert _rows(workdir) == []  # staged, not yet copied
  writer.flush()
  assert _rows(workdir) == [(1, "train", 1.0), (2, "train", 2.0)]
  writer.close()


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  fake = _Clock()
  monkeypatch.setattr(metrics, "_now", fake)
  return fake


def _lines(caplog) -> list[str]:
  return [record.getMessage() for record in caplog.records if "step " in record.getMessage()]


def test_progress_excludes_compilation_and_evaluation(clock, caplog):
  caplog.set_level(logging.INFO)
  progress = metrics.Progress(total_steps=100, start_step=0, batch_size=32, every=4)

  def step(seconds, loss=1.0):
    clock.now += seconds
    progress.add({"loss": jnp.float32(loss)})

  step(30.0)  # compiles: not counted
  for _ in range(3):
    step(0.5)
  [summary] = progress.summary(4)
  assert summary["examples_per_second"] == pytest.approx(3 * 32 / 1.5)  # 64 ex/s
  # 96 steps left at 0.5 s each.
  assert _lines(caplog)[-1] == "step 4/100 (4%) | loss 1 | 64 ex/s | ETA 48s"

  progress.pause()
  clock.now += 50.0  # an evaluation
  step(2.0)  # refills the pipeline: not counted
  for loss in (1.0, 2.0, 3.0):
    step(0.25, loss)
  [summary] = progress.summary(8)
  assert summary["examples_per_second"] == pytest.approx(3 * 32 / 0.75)  # 128 ex/s
  assert summary["loss"] == pytest.approx(1.75)
  # ETA from all timed steps: 6 steps in 2.25 s, 92 left.
  assert _lines(caplog)[-1] == "step 8/100 (8%) | loss 1.75 | 128 ex/s | ETA 34s"


def test_progress_without_timed_steps_has_no_rate(clock, caplog):
  caplog.set_level(logging.INFO)
  progress = metrics.Progress(total_steps=10, start_step=5, batch_size=8, every=1)
  clock.now += 20.0
  progress.add({"loss": jnp.float32(0.123456)})
  [summary] = progress.summary(6, lr=0.05)
  assert "examples_per_second" not in summary and summary["lr"] == 0.05
  assert _lines(caplog)[-1] == "step 6/10 (60%) | loss 0.1235 | lr 0.05"


def test_progress_label_overall_eta_and_members(clock, caplog):
  caplog.set_level(logging.INFO)
  progress = metrics.Progress(
    total_steps=1000,
    start_step=0,
    batch_size=128,
    every=10,
    members=["a", "b"],
    label="run 2 of 7",
    overall=lambda seconds_left: seconds_left + 5 * 600.0,
  )
  for index in range(11):
    clock.now += 0.1
    progress.add({"loss": jnp.array([1.0, 2.0]) * index})
  summaries = progress.summary(11)
  assert [s["loss"] for s in summaries] == [5.0, 10.0]
  # 10 timed steps in 1 s: 1,280 ex/s; 989 steps left: 98.9 s; all runs: 98.9 + 3000 s.
  assert _lines(caplog)[-2:] == [
    "run 2 of 7 | [a] step 11/1000 (1%) | loss 5 | 1,280 ex/s | ETA 1m39s (all runs 51m39s)",
    "run 2 of 7 | [b] step 11/1000 (1%) | loss 10 | 1,280 ex/s | ETA 1m39s (all runs 51m39s)",
  ]


@pytest.mark.parametrize(
  "seconds, text",
  [
    (0.4, "0s"),
    (41, "41s"),
    (725, "12m05s"),
    (11220, "3h07m"),
    (11250, "3h08m"),
    (187200, "2d04h"),
  ],
)
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text


@pytest.mark.parametrize(
  "rate, text", [(45.34, "45.3"), (3012.4, "3,010"), (12345, "12,300"), (999.6, "1,000"), (0, "0")]
)
def test_format_rate(rate, text):
  assert metrics.format_rate(rate) == text
