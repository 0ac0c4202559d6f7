"""Preemption: SIGTERM and SIGINT end a run cleanly at a step boundary, checkpointed.

Spot reclaims, TPU maintenance and SLURM preemption send SIGTERM (Ctrl-C sends SIGINT). While a
`Watch` is active, either signal only sets a flag; the training loop asks `stop_requested` after
every step, and when it answers yes the loop checkpoints that step, flushes the metrics and
raises `Preempted`, which `python -m jaxkd.main` turns into one line and exit status
`EXIT_CODE`. Running the same command again resumes from that step, bit for bit (the data
position and the randomness are functions of the step).

Multi-host: every process must stop at the same step (they all take part in the checkpoint).
The signal may reach them at different moments, so the processes agree on the flag at every
`sync_every` steps and at every checkpoint step (`multihost_utils.process_allgather`), and stop
at the first such step after any of them was signalled.
"""

import contextlib
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): a temporary failure, the same command should be retried.
EXIT_CODE = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped at `step` on a signal, after checkpointing that step."""

  def __init__(self, step: int, total_steps: int, signal_name: str):
    super().__init__(
      f"stopped by {signal_name} at step {step}/{total_steps}, checkpoint saved; run the same "
      "command to resume"
    )
    self.step = step


class Watch:
  """Catches SIGTERM and SIGINT while active (a context manager); see the module docstring."""

  def __init__(self, sync_every: int = 1):
    self.sync_every = max(int(sync_every), 1)
    self.received: str | None = None

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum).name

  @contextlib.contextmanager
  def active(self):
    previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)

  def stop_requested(self, step: int, *, checkpoint_step: bool = False) -> bool:
    """Whether the loop should stop after `step` (all processes answer alike)."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % self.sync_every and not checkpoint_step:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if np.any(flags) and self.received is None:
      self.received = "SIGTERM (another process)"
    return bool(np.any(flags))
