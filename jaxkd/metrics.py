"""Metrics to the workdir (JSON lines + TensorBoard event files) and a console progress line.

`<workdir>/metrics.jsonl` holds one JSON object per logged step, `{"step": s, "split": ...,
name: value, ...}`, appended across resumed runs; `<workdir>/tensorboard/` holds event files
written with tensorboardX (`clu.metric_writers` would import TensorFlow). Only process 0 writes.
"""
import json
import os
import time

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
    values = [record[name] for record in map(json.loads, f)
              if record["split"] == split and name in record]
  return max(values, default=None)


class Progress:
  """Running means of the train metrics and the console line printed every `every` steps:

      step 400/2340 (17%) | loss 0.8123 ce 0.5210 kd 0.3100 | lr 0.0500 | 3,012 ex/s | ETA 0m41s
  """

  def __init__(self, *, total_steps: int, start_step: int, batch_size: int, every: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.every = every
    self._pending: list[dict] = []
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def add(self, metrics: dict) -> None:
    """Keeps one step's metrics on device: fetching them every step would stall the dispatch."""
    self._pending.append(metrics)

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.total_steps

  def summary(self, step: int, **extra: float) -> dict[str, float]:
    """Means since the last summary plus `extra` and `examples_per_second`; prints the line."""
    history = jax.device_get(self._pending)
    means = {name: float(np.mean([metrics[name] for metrics in history]))
             for name in (history[0] if history else {})}
    now = time.perf_counter()  # after the fetch, which waits for the steps to finish
    examples_per_second = ((step - self._last_step) * self.batch_size
                           / max(now - self._last_time, 1e-9))
    scalars = {**means, **extra, "examples_per_second": examples_per_second}
    eta = (self.total_steps - step) * self.batch_size / max(examples_per_second, 1e-9)
    terms = " ".join(f"{name} {value:.4f}" for name, value in means.items())
    rates = " | ".join(f"{name} {value:.4g}" for name, value in extra.items())
    line = (f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) | {terms}"
            + (f" | {rates}" if rates else "")
            + f" | {examples_per_second:,.0f} ex/s | ETA {_format_duration(eta)}")
    logging.info(line)
    self._pending = []
    self._last_step, self._last_time = step, now
    return scalars
