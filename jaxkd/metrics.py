"""Metrics to the workdir (JSON lines + TensorBoard event files) and a console progress line.

`<workdir>/metrics.jsonl` holds one JSON object per logged step and split, `{"step": s,
"split": ..., name: value, ...}`; `<workdir>/tensorboard/` holds event files written with
tensorboardX (`clu.metric_writers` would import TensorFlow). Only process 0 writes.

Resumed runs: the trainer opens the writer with `resume_step` = the step it restored. Rows of
later steps, written before the interruption, are dropped (those steps run again), and
TensorBoard is told the same with a purge event at `resume_step + 1`, so each (step, split)
appears once. A half-written last line (a kill mid-write) is dropped too.

Workdirs on a bucket (``gs://``): objects cannot be appended to, so both files are written to a
local staging directory and copied whole to the workdir at most every `sync_secs`, on `flush()`
and on `close()` (rewriting a few hundred kB of scalars is cheap). The trainer calls `flush()`
before each checkpoint so the rows of every checkpointed step are on the bucket.
"""

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

_JSONL = "metrics.jsonl"
_TENSORBOARD = "tensorboard"
_now = time.perf_counter  # Progress's clock (a module attribute: tests replace it)


def _records(path: epath.Path) -> list[dict]:
  """The parseable rows of a metrics.jsonl (none if it is absent); a torn line is skipped."""
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and "step" in record and "split" in record:
      records.append(record)
  return records


def _hparam_value(value):
  """A TensorBoard hparam value: bool, int, float or str (sequences and None as text)."""
  if isinstance(value, (bool, int, float, str)):
    return value
  return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def _flatten(hparams: Mapping, prefix: str = "") -> dict:
  flat = {}
  for key, value in hparams.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = _hparam_value(value)
  return flat


class Writer:
  """Writes scalars under `workdir` (local or ``gs://``); `close()` (or `with`) flushes.

  Args:
    workdir: the run's directory.
    resume_step: the step the run restarts from (0 for a fresh run): rows and events of later
      steps are dropped. None keeps everything (appending, as for a finished run's re-evaluation).
    sync_secs: for a bucket workdir, how often the staged files are copied there.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    resume_step: int | None = None,
    sync_secs: float = 60.0,
  ):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    # Deferred: tensorboardX pulls in protobuf, which only the writing process needs.
    from tensorboardX import SummaryWriter

    self._workdir = epath.Path(workdir)
    self._remote = "://" in os.fspath(workdir)
    self._staging = (
      epath.Path(tempfile.mkdtemp(prefix="jaxkd-metrics-")) if self._remote else self._workdir
    )
    self._staging.mkdir(parents=True, exist_ok=True)
    self._sync_secs = sync_secs
    self._last_sync = time.monotonic()

    records = _records(self._workdir / _JSONL)
    if resume_step is not None:
      records = [record for record in records if record["step"] <= resume_step]
    self._last_step = max((int(record["step"]) for record in records), default=0)
    staged_jsonl = self._staging / _JSONL
    text = "".join(json.dumps(record) + "\n" for record in records)
    if not staged_jsonl.exists() or staged_jsonl.read_text() != text:
      # Written aside and renamed: a kill now leaves the old file or the new one, never half.
      partial = self._staging / f"{_JSONL}.partial"
      partial.write_text(text)
      partial.replace(staged_jsonl)
    self._jsonl = staged_jsonl.open("a")
    self._tensorboard = SummaryWriter(
      os.fspath(self._staging / _TENSORBOARD),
      purge_step=None if resume_step is None else resume_step + 1,
      # Event files are named after the second they are opened: a run resumed within the
      # same second would overwrite the previous file. The suffix keeps them apart, in order.
      filename_suffix=f".{time.time_ns()}",
    )
    if self._remote:
      (self._workdir / _TENSORBOARD).mkdir(parents=True, exist_ok=True)
      self._sync()

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    """Logs `scalars` of `split` ('train', 'eval', ...) at `step`."""
    if not self.enabled:
      return
    scalars = {name: float(value) for name, value in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))
    self._last_step = max(self._last_step, int(step))
    if self._remote and time.monotonic() - self._last_sync >= self._sync_secs:
      self.flush()

  def write_hparams(
    self, hparams: Mapping, metrics: Mapping[str, float], step: int | None = None
  ) -> None:
    """Records the run's hyper-parameters and result metrics for TensorBoard's HParams tab.

    Args:
      hparams: nested mappings are flattened to dotted names ('optimizer.learning_rate');
        values other than bool/int/float/str are shown as text.
      metrics: result values, e.g. ``{'accuracy': 0.91}``, logged as scalars 'hparams/<name>'.
      step: the step to log `metrics` at (default: the largest step written so far).
    """
    if not self.enabled:
      return
    from tensorboardX.summary import hparams as hparams_summaries

    tags = {f"hparams/{name}": float(value) for name, value in metrics.items()}
    file_writer = self._tensorboard.file_writer
    for summary in hparams_summaries(_flatten(hparams), tags):
      file_writer.add_summary(summary)
    for tag, value in tags.items():
      self._tensorboard.add_scalar(tag, value, self._last_step if step is None else int(step))

  def flush(self) -> None:
    """Makes everything written so far durable in the workdir."""
    if not self.enabled:
      return
    self._jsonl.flush()
    self._tensorboard.flush()
    if self._remote:
      self._sync()

  def _sync(self) -> None:
    """Copies the staged files whole to the bucket workdir (objects are replaced atomically)."""
    (self._workdir / _JSONL).write_bytes((self._staging / _JSONL).read_bytes())
    for event_file in (self._staging / _TENSORBOARD).iterdir():
      (self._workdir / _TENSORBOARD / event_file.name).write_bytes(event_file.read_bytes())
    self._last_sync = time.monotonic()

  def close(self) -> None:
    if not self.enabled:
      return
    self._jsonl.close()
    self._tensorboard.close()
    if self._remote:
      self._sync()
      shutil.rmtree(os.fspath(self._staging), ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def best(workdir: str | os.PathLike, split: str, name: str) -> float | None:
  """Largest `name` over the `split` records of `<workdir>/metrics.jsonl` (None if none).

  Reads what process 0 wrote: on other processes of a run without a shared workdir, None.
  """
  values = [
    record[name]
    for record in _records(epath.Path(workdir) / _JSONL)
    if record["split"] == split and name in record
  ]
  return max(values, default=None)


def format_duration(seconds: float) -> str:
  """'41s', '12m05s', '3h07m', '2d04h': two units at most, rounded to the smaller one."""
  seconds = int(round(max(seconds, 0.0)))
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes}m{seconds:02d}s"
  hours, minutes = divmod(minutes + (seconds >= 30), 60)
  if hours < 24:
    return f"{hours}h{minutes:02d}m"
  days, hours = divmod(hours + (minutes >= 30), 24)
  return f"{days}d{hours:02d}h"


def format_rate(value: float) -> str:
  """Three significant digits: '45.3', '3,010', '12,300'."""
  if value <= 0 or not math.isfinite(value):
    return "0"
  if value < 100:
    return f"{value:.3g}"
  digits = int(math.floor(math.log10(value))) - 2
  return f"{round(value, -digits):,.0f}"


class Progress:
  """Running means of the train metrics and the console line printed every `every` steps:

      run 2 of 7 | step 400/2340 (17%) | loss 0.8123 ce 0.521 kd 0.31 | lr 0.05 | 3,010 ex/s |
      ETA 41s (all runs 1h12m)

  Throughput and ETA count only steady-state time: the clock starts at the end of the first
  step after the start (or a resume), which includes compilation, and restarts at the end of
  the first step after each `pause()` (call it before an evaluation or anything else that is
  not a train step). The ETA uses the mean time per step over all timed steps of this run.

  For a population (`members` = the member names), each metric carries a leading ``[P]`` axis
  and every member gets its own line, prefixed with its name.

  Args:
    total_steps, start_step, batch_size, every: the run's length, where it (re)starts, the
      global batch size and the logging interval.
    members: population member names.
    label: prefix of every line, e.g. 'run 2 of 7' for one run of an experiment.
    overall: for multi-run experiments, ``overall(this_run_seconds_left) -> seconds`` left for
      the whole experiment, shown after the run's ETA.
  """

  def __init__(
    self,
    *,
    total_steps: int,
    start_step: int,
    batch_size: int,
    every: int,
    members: Sequence[str] = (),
    label: str = "",
    overall: Callable[[float], float] | None = None,
  ):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.every = every
    self.members = list(members)
    self.label = label
    self.overall = overall
    self._pending: list[dict] = []
    self._step = start_step  # steps added so far
    # The clock: None until the end of the first step after a start, resume or pause.
    self._clock: tuple[int, float] | None = None
    self._window: tuple[int, float] = (0, 0.0)  # timed (steps, seconds) since the last line
    self._timed: tuple[int, float] = (0, 0.0)  # timed (steps, seconds) over the whole run

  def add(self, metrics: dict) -> None:
    """Keeps one step's metrics on device: fetching them every step would stall the dispatch.

    The first step after a start or `pause()` is waited for, to start the clock at its end.
    """
    self._pending.append(metrics)
    self._step += 1
    if self._clock is None:
      jax.block_until_ready(metrics)
      self._clock = (self._step, _now())

  def pause(self) -> None:
    """Stops the clock at the end of the steps dispatched so far (waiting for them); it restarts
    at the end of the next step."""
    if self._pending:
      jax.block_until_ready(self._pending[-1])
    self._stop_clock()

  def _stop_clock(self) -> None:
    if self._clock is None:
      return
    clock_step, clock_time = self._clock
    steps, seconds = self._step - clock_step, _now() - clock_time
    self._window = (self._window[0] + steps, self._window[1] + seconds)
    self._timed = (self._timed[0] + steps, self._timed[1] + seconds)
    self._clock = None

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.total_steps

  def summary(self, step: int, **extra: float) -> list[dict[str, float]]:
    """Means since the last summary plus `extra` and, once timed, `examples_per_second`, one
    dict per member (a single one without `members`); prints the line(s)."""
    history = jax.device_get(self._pending)  # waits for the steps to finish
    # Mean over the logged steps: a scalar per name, or [P] for a population.
    means = {
      name: np.mean([metrics[name] for metrics in history], axis=0)
      for name in (history[0] if history else {})
    }
    running = self._clock is not None
    self._stop_clock()
    if running:  # keep timing from here
      self._clock = (self._step, _now())
    window_steps, window_seconds = self._window
    self._window = (0, 0.0)
    timing = {}
    if window_steps:
      timing["examples_per_second"] = window_steps * self.batch_size / max(window_seconds, 1e-9)
    rates = " | ".join(f"{name} {value:.3g}" for name, value in extra.items())
    summaries = []
    for index, prefix in enumerate([f"[{name}] " for name in self.members] or [""]):
      member_means = {
        name: float(value[index] if self.members else value) for name, value in means.items()
      }
      terms = " ".join(f"{name} {value:.4g}" for name, value in member_means.items())
      parts = [
        *([self.label] if self.label else []),
        f"{prefix}step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)",
        *([terms] if terms else []),
        *([rates] if rates else []),
        *([f"{format_rate(timing['examples_per_second'])} ex/s"] if timing else []),
        *([self._eta(step)] if self._timed[0] else []),
      ]
      logging.info(" | ".join(parts))
      summaries.append({**member_means, **extra, **timing})
    self._pending = []
    return summaries

  def _eta(self, step: int) -> str:
    timed_steps, timed_seconds = self._timed
    seconds_left = (self.total_steps - step) * timed_seconds / timed_steps
    text = f"ETA {format_duration(seconds_left)}"
    if self.overall is not None:
      text += f" (all runs {format_duration(self.overall(seconds_left))})"
    return text


def summarize(sums: dict) -> dict[str, float]:
  """Evaluation means from the sums of `jaxkd.step.evaluate`.

  ``accuracy`` (top-1) and ``top5``; ``loss`` (cross-entropy, nats per example or token) and,
  for language models, ``bits_per_byte`` (total nats / ln 2 / bytes of the scored text); with a
  teacher ``agreement`` (same argmax) and ``kl`` (KL(teacher ‖ student) at T = 1, nats).
  """
  count = max(float(sums["count"]), 1.0)
  results = {"accuracy": float(sums["correct"]) / count, "loss": float(sums["nll"]) / count}
  if "correct_top5" in sums:
    results["top5"] = float(sums["correct_top5"]) / count
  if "bytes" in sums:
    results["bits_per_byte"] = float(sums["nll"]) / math.log(2) / max(float(sums["bytes"]), 1.0)
  if "agree" in sums:
    results["agreement"] = float(sums["agree"]) / count
    results["kl"] = float(sums["kl"]) / count
  return results
