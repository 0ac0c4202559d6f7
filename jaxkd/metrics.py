"""Metrics to the workdir (JSON lines + TensorBoard event files) and a console progress line.

`<workdir>/metrics.jsonl` holds one JSON object per logged step, `{"step": s, "split": ...,
name: value, ...}`, appended across resumed runs; `<workdir>/tensorboard/` holds event files
written with tensorboardX (`clu.metric_writers` would import TensorFlow). Only process 0 writes.
"""

import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Writer:
  """Writes scalars under `workdir`; `close()` (or `with`) flushes the event file."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    # Deferred: tensorboardX pulls in protobuf, which only the writing process needs.
    from tensorboardX import SummaryWriter

    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    """Logs `scalars` of `split` ('train', 'eval', ...) at `step`."""
    if not self.enabled:
      return
    scalars = {name: float(value) for name, value in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def best(workdir: str, split: str, name: str) -> float | None:
  """Largest `name` over the `split` records of `<workdir>/metrics.jsonl` (None if none).

  Reads what process 0 wrote: on other processes of a run without a shared workdir, None.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    values = [
      record[name] for record in map(json.loads, f) if record["split"] == split and name in record
    ]
  return max(values, default=None)


class Progress:
  """Running means of the train metrics and the console line printed every `every` steps:

      step 400/2340 (17%) | loss 0.8123 ce 0.5210 kd 0.3100 | lr 0.0500 | 3,012 ex/s | ETA 0m41s

  For a population (`members` = the member names), each metric carries a leading ``[P]`` axis
  and every member gets its own line, prefixed with its name.
  """

  def __init__(
    self,
    *,
    total_steps: int,
    start_step: int,
    batch_size: int,
    every: int,
    members: Sequence[str] = (),
  ):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.every = every
    self.members = list(members)
    self._pending: list[dict] = []
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def add(self, metrics: dict) -> None:
    """Keeps one step's metrics on device: fetching them every step would stall the dispatch."""
    self._pending.append(metrics)

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.total_steps

  def summary(self, step: int, **extra: float) -> list[dict[str, float]]:
    """Means since the last summary plus `extra` and `examples_per_second`, one dict per member
    (a single one without `members`); prints the line(s)."""
    history = jax.device_get(self._pending)
    # Mean over the logged steps: a scalar per name, or [P] for a population.
    means = {
      name: np.mean([metrics[name] for metrics in history], axis=0)
      for name in (history[0] if history else {})
    }
    now = time.perf_counter()  # after the fetch, which waits for the steps to finish
    examples_per_second = (
      (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
    )
    eta = (self.total_steps - step) * self.batch_size / max(examples_per_second, 1e-9)
    rates = " | ".join(f"{name} {value:.4g}" for name, value in extra.items())
    summaries = []
    for index, prefix in enumerate([f"[{name}] " for name in self.members] or [""]):
      member_means = {
        name: float(value[index] if self.members else value) for name, value in means.items()
      }
      terms = " ".join(f"{name} {value:.4f}" for name, value in member_means.items())
      logging.info(
        f"{prefix}step {step}/{self.total_steps} "
        f"({100 * step / self.total_steps:.0f}%) | {terms}"
        + (f" | {rates}" if rates else "")
        + f" | {examples_per_second:,.0f} ex/s | ETA {_format_duration(eta)}"
      )
      summaries.append({**member_means, **extra, "examples_per_second": examples_per_second})
    self._pending = []
    self._last_step, self._last_time = step, now
    return summaries
