"""Checkpoints of a training run: orbax `CheckpointManager` under `<workdir>/checkpoints/`.

Each checkpoint `<workdir>/checkpoints/<step>/` holds two items:

* `state`: the whole `jaxkd.state.TrainState` (student parameters and BatchNorm statistics,
  adapters, optimiser state, step, RNG key data, method state such as CRD memory banks);
* `run`: JSON describing what the state is (student model and its create arguments, number of
  classes, dataset), compared with the config before anything is compiled.

The data position is the step itself: the pipeline makes batch k a pure function of
(seed, k) (jaxkd/data/pipeline.py), so restoring step k and rebuilding the stream from k
continues exactly where the interrupted run stopped.

Paths go through `etils.epath` and tensorstore, so the workdir may be local or on a bucket
(``gs://bucket/run``). Faults a preemptible run meets are handled here:

* A checkpoint that cannot be read (a truncated data file, `_METADATA` or `run` record, a
  missing piece) is renamed `<step>.unreadable` (never deleted, never counted by the rotation),
  with one warning line, and `restore` falls back to the newest readable one. A checkpoint whose
  array layout differs from the state's is a different run, not damage: that is an
  `IncompatibleCheckpointError`, and nothing is moved.
* A save that fails (disk full, read-only or unwritable directory) is one `CheckpointError`
  naming the path and the OS error, raised by `save` or `wait` (orbax writes in the background);
  its unfinished directory is removed, and saving works again once the cause is gone.
* States with NaN or infinity are never written (`save` raises `NonFiniteError`), so the
  rotation (`keep` newest) only ever deletes good checkpoints for newer good ones. The trainer
  checks `first_non_finite(state)` itself before saving to decide what to do.

Restoring onto a state of another mesh (8 devices → 1, 1 → 8, data parallel ↔ FSDP) reads each
array into the layout of that state: the saved sharding is not needed.
"""

import contextlib
import errno
import functools
import gc
import inspect
import logging as python_logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxkd.errors import (  # noqa: F401  (IncompatibleCheckpointError: re-exported)
  CheckpointError,
  IncompatibleCheckpointError,
  NonFiniteError,
)

T = TypeVar("T")

UNREADABLE_SUFFIX = ".unreadable"
# orbax's names of unfinished saves: `<step>.orbax-checkpoint-tmp[-<timestamp>]` on a file
# system; on GCS the step directory itself until its `commit_success.txt` is written.
_TMP_MARKER = ".orbax-checkpoint-tmp"
_COMMIT_MARKER = "commit_success.txt"


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`; local paths made absolute (orbax needs them absolute), bucket
  paths (``gs://``, ``s3://``) kept as they are."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def describe_error(error: BaseException) -> str:
  """One line for an I/O failure: the OS error's text when there is one, else tensorstore's
  status, else the message.

  tensorstore reports an OS error inside a long status message ending in
  ``[os_error_code='28']``; that code is turned back into "No space left on device (ENOSPC)".
  """
  for cause in _causes(error):
    if isinstance(cause, OSError) and cause.errno:
      return f"{os.strerror(cause.errno)} ({errno.errorcode.get(cause.errno, cause.errno)})"
  for cause in _causes(error):
    code = re.search(r"os_error_code='?(\d+)", str(cause))
    if code:
      number = int(code.group(1))
      return f"{os.strerror(number)} ({errno.errorcode.get(number, number)})"
  # orbax wraps tensorstore's status ("OUT_OF_RANGE: Error reading ...") in a message holding
  # the whole store spec; the status says what went wrong.
  statuses = [cause for cause in _causes(error) if re.match(r"[A-Z][A-Z_]+: ", str(cause))]
  text = str(statuses[0] if statuses else error)
  text = " ".join(text.split(" [tensorstore_spec=")[0].split()) or type(error).__name__
  return text if len(text) <= 300 else text[:297] + "..."


def _causes(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


class _DropOrbaxErrorRecords(python_logging.Filter):
  """orbax logs each failure of its background threads at ERROR, with a traceback (six of them
  for one full disk), before the failure reaches the caller, where this module and
  `jaxkd.models.io` report it as one line; those records are dropped."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return not (from_orbax and record.levelno >= python_logging.ERROR)


_ORBAX_ERROR_FILTER = _DropOrbaxErrorRecords()


def quiet_orbax_errors() -> None:
  """Installs the filter above on absl's logger (once; orbax logs through absl)."""
  logger = logging.get_absl_logger()
  if _ORBAX_ERROR_FILTER not in logger.filters:
    logger.addFilter(_ORBAX_ERROR_FILTER)


class _DropOrphanedFailures(python_logging.Filter):
  """A failed read leaves the futures of its sibling reads failed and unretrieved; asyncio logs
  each at ERROR, with the whole tensorstore spec, when it is collected."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _is_callback_into_closed_loop(unraisable) -> bool:
  exception = unraisable.exc_value
  return isinstance(exception, RuntimeError) and str(exception) == "Event loop is closed"


def _ignore_callbacks_into_closed_loops() -> None:
  """Installs (once) an unraisable-exception hook dropping "Event loop is closed".

  The reads beside a failed one can finish after orbax has closed their event loop;
  tensorstore's completion callbacks, on its own threads, then find it closed, and each is
  printed with a traceback, at any time after the failure. Nothing else raises that error."""
  if getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
    return
  report_unraisable = sys.unraisablehook

  def hook(unraisable):
    if not _is_callback_into_closed_loop(unraisable):
      report_unraisable(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def _aftermath_dropped():
  """Drops, while open, the reports of what a failed orbax operation leaves behind.

  A failed read or write strands the coroutines and futures of the operations running beside
  it. When they are collected, asyncio logs each future ("exception was never retrieved", with
  the whole tensorstore spec), Python prints each coroutine's traceback ("Exception ignored
  in") or warns that it "was never awaited": tens of screens for one truncated file.
  """
  _ignore_callbacks_into_closed_loops()
  asyncio_logger = python_logging.getLogger("asyncio")
  orphans_filter = _DropOrphanedFailures()
  report_unraisable = sys.unraisablehook

  def drop_stranded_coroutines(unraisable):
    if not inspect.iscoroutine(unraisable.object):
      report_unraisable(unraisable)

  asyncio_logger.addFilter(orphans_filter)
  sys.unraisablehook = drop_stranded_coroutines
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
      yield
  finally:
    sys.unraisablehook = report_unraisable
    asyncio_logger.removeFilter(orphans_filter)


def quietly(operation: Callable[[], T], errors=(Exception,)) -> tuple[T | None, str | None]:
  """``(operation(), None)``, or ``(None, reason)`` if it raises one of `errors`: the reason is
  one line (`describe_error`), and what the failure stranded is collected without reports."""
  with _aftermath_dropped():
    try:
      return operation(), None
    except errors as error:
      reason = describe_error(error)
    # The exception, whose frames hold the stranded coroutines, is gone: collect them now.
    gc.collect()
  return None, reason


def _release(threads: list[threading.Thread]) -> None:
  """Cancels and wakes the orbax threads of a failed save that still wait for a signal (the
  directory creation that failed would have sent it), so that they end now rather than at
  orbax's timeout, minutes later, holding up the interpreter's exit. Cancelled, they raise
  CancelledError to whatever waits for them: nothing of the failed save is committed."""
  try:
    from orbax.checkpoint._src.futures import future as orbax_future

    for thread in threads:
      if isinstance(thread, orbax_future._SignalingThread) and thread.is_alive():
        thread.cancel()
        orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
        # Thread.join itself: the subclass's join raises CancelledError.
        threading.Thread.join(thread, timeout=10)
  except (ImportError, AttributeError):  # another orbax: the probe in `save` still applies
    pass


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process: all must agree before a checkpoint is moved aside."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def first_non_finite(tree) -> str | None:
  """The path (`jax.tree_util.keystr`) of the first floating leaf of `tree` holding NaN or ±inf,
  None if every one is finite.

  One compiled reduction over all leaves and one transfer of a bool per leaf, so it is cheap to
  call before every save. Integer leaves, PRNG key data and non-array leaves are skipped.
  """
  paths, leaves = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
      paths.append(path)
      leaves.append(leaf)
  if not leaves:
    return None
  bad = np.flatnonzero(~np.asarray(_finite_flags(leaves)))
  return jax.tree_util.keystr(paths[bad[0]]) if bad.size else None


def layout_difference(saved, expected) -> str | None:
  """How a saved array tree (orbax metadata) differs from `expected` (arrays or abstract arrays):
  the first missing, unexpected or differently shaped leaf, None if they match. Dtypes may
  differ (restoring casts)."""
  saved, expected = ocp.tree.to_flat_dict(saved), ocp.tree.to_flat_dict(expected)
  name = lambda key: ".".join(map(str, key))
  missing = sorted(expected.keys() - saved.keys(), key=name)
  if missing:
    return f"{name(missing[0])} is missing"
  unexpected = sorted(saved.keys() - expected.keys(), key=name)
  if unexpected:
    return f"{name(unexpected[0])} is saved but not expected"
  for key in sorted(expected, key=name):
    saved_shape, expected_shape = tuple(saved[key].shape), tuple(expected[key].shape)
    if saved_shape != expected_shape:
      return f"{name(key)} is saved with shape {saved_shape}, {expected_shape} is expected"
  return None


class Checkpointer:
  """Saves and restores the TrainState of one workdir (local or ``gs://``)."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 2):
    self.directory = as_path(workdir) / "checkpoints"
    self._keep = keep
    self._saving_step: int | None = None  # the save that may still fail in the background
    self._save_threads: list[threading.Thread] = []  # the threads orbax started for it
    quiet_orbax_errors()
    self._manager = self._open_manager()

  def _open_manager(self) -> ocp.CheckpointManager:
    try:
      return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=self._keep, create=True, cleanup_tmp_directories=True
        ),
        item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "run": ocp.JsonCheckpointHandler(),
        },
      )
    except OSError as error:
      raise CheckpointError(
        f"cannot use {self.directory} for checkpoints: {describe_error(error)}"
      ) from error

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (readable or not: `restore` finds out), None without any."""
    return self._manager.latest_step()

  def run_info(self) -> dict | None:
    """The `run` record of the newest readable checkpoint, None without checkpoints."""
    for step in self._steps_newest_first():
      restored = self._read(step, run=ocp.args.JsonRestore())
      if restored is not None:
        return restored["run"]
    return None

  def check_compatible(self, run_info: dict) -> None:
    """Raises IncompatibleCheckpointError naming the first field where the workdir differs."""
    saved = self.run_info()
    if saved is None:
      return
    # Both ways: a key only one side has (a population's size) differs too.
    for key in {**saved, **run_info}:
      value = run_info.get(key)
      if saved.get(key) != value:
        raise IncompatibleCheckpointError(
          f"the workdir's checkpoint at step {self.latest_step()} was written for {key} = "
          f"{saved.get(key)!r}, the config asks for {value!r}; use a fresh --workdir (or "
          "delete its checkpoints/) to start a new run"
        )

  def restore(self, state):
    """The newest readable checkpoint restored onto the structure and shardings of `state`.

    Returns `state` itself when the workdir has no (readable) checkpoint. Unreadable ones are
    moved aside on the way (see the module docstring).

    Raises:
      IncompatibleCheckpointError: a checkpoint's arrays differ from the state's (other model).
    """
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in self._steps_newest_first():
      saved_layout, reason = quietly(functools.partial(self._state_layout, step))
      if not _all_processes(reason is None):
        self._set_aside(step, reason)
        continue
      difference = layout_difference(saved_layout, abstract_state)
      if difference:
        raise IncompatibleCheckpointError(
          f"the checkpoint at {self.directory / str(step)} does not match this run's state: "
          f"{difference}; use a fresh --workdir to start a new run"
        )
      restored = self._read(
        step, state=ocp.args.StandardRestore(abstract_state), run=ocp.args.JsonRestore()
      )
      if restored is not None:
        return restored["state"]
    return state

  def steps(self) -> list[int]:
    """The steps of the workdir's checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def read(self, step: int):
    """Checkpoint `step`'s state as saved (a tree of arrays, without a target structure): for
    inspecting a workdir, not for resuming (`restore`)."""
    return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
      "state"
    ]

  def _steps_newest_first(self) -> list[int]:
    return sorted(self._manager.all_steps(), reverse=True)

  def _read(self, step: int, **items):
    """The restored `items` of `step`, or None after moving the unreadable checkpoint aside."""
    restored, reason = quietly(
      lambda: self._manager.restore(step, args=ocp.args.Composite(**items))
    )
    if _all_processes(reason is None):
      return restored
    self._set_aside(step, reason)
    return None

  def _state_layout(self, step: int):
    layout = self._manager.item_metadata(step)["state"]
    if layout is None:
      raise FileNotFoundError(errno.ENOENT, "no state metadata")
    return layout

  def _set_aside(self, step: int, reason: str | None) -> None:
    """Renames checkpoint `step` to `<step>.unreadable[.n]` and logs one line saying so."""
    source = self.directory / str(step)
    target = self.directory / f"{step}{UNREADABLE_SUFFIX}"
    index = 1
    while target.exists():
      index += 1
      target = self.directory / f"{step}{UNREADABLE_SUFFIX}.{index}"
    if jax.process_index() == 0:
      try:
        source.rename(target)
      except OSError as error:
        raise CheckpointError(
          f"checkpoint step {step} at {source} cannot be read ({reason}) nor moved aside "
          f"({describe_error(error)}); move or delete it to resume from an earlier one"
        ) from None
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxkd_checkpoint_set_aside_{step}")
    logging.warning(
      "Checkpoint step %d at %s cannot be read (%s); moved it to %s, trying the previous one",
      step,
      source,
      reason or "it cannot be read on another process",
      target.name,
    )
    self._manager.reload()

  def save(self, step: int, state, run_info: dict) -> None:
    """Starts an asynchronous save; `wait()` before reading it back or exiting.

    Raises:
      NonFiniteError: `state` holds NaN or infinity (nothing is written).
      CheckpointError: this save, or the previous one still in flight, could not be written.
    """
    bad_leaf = first_non_finite(state)
    if bad_leaf is not None:
      latest = self.latest_step()
      kept = f"step {latest}" if latest is not None else "none"
      raise NonFiniteError(
        f"step {step}: the train state holds NaN or inf in {bad_leaf}; not checkpointed (newest "
        f"checkpoint kept: {kept}); training diverged, lower the learning rate"
      )
    self._write(step, lambda: self._start_save(step, state, run_info))

  def _start_save(self, step: int, state, run_info: dict) -> None:
    # orbax raises a background failure of the previous save here: `_saving_step` names it.
    self._manager.check_for_errors()
    self._saving_step = step
    self._check_writable()
    threads_before = set(threading.enumerate())
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run_info)),
    )
    self._save_threads = [t for t in threading.enumerate() if t not in threads_before]

  def _check_writable(self) -> None:
    """Writes and removes a small file (on every process: each writes its own shards).

    orbax creates a save's directories in the background, and when that fails (read-only or
    full disk, a file in the way) the threads waiting for them are left waiting until its
    timeout (minutes), holding the interpreter's exit; this catches those causes first.
    """
    probe = self.directory / f".write-probe-{jax.process_index()}"
    try:
      if not self.directory.exists():
        self.directory.mkdir(parents=True)
      probe.write_bytes(bytes(4096))  # a block: a full disk still has inodes for empty files
      probe.unlink()
      error = None
    except OSError as probe_error:
      error = probe_error
    if not _all_processes(error is None):
      raise error or OSError(errno.EIO, "the checkpoint directory is not writable elsewhere")

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises CheckpointError if it failed."""

    def wait_and_check():
      self._manager.wait_until_finished()
      self._manager.check_for_errors()

    self._write(self._saving_step, wait_and_check)
    self._saving_step = None

  def close(self) -> None:
    self._write(self._saving_step, self._manager.close)
    self._saving_step = None

  def _write(self, step: int | None, operation: Callable[[], None]) -> None:
    """Runs `operation`; a failed write becomes one CheckpointError, after removing what it
    left behind. The error names the save in flight if there is one, else `step`."""
    _, reason = quietly(operation, errors=(OSError, ValueError))
    if reason is None:
      return
    failed_step = self._saving_step if self._saving_step is not None else step
    self._saving_step = None
    self._discard_unfinished()
    where = self.directory / str(failed_step) if failed_step is not None else self.directory
    raise CheckpointError(f"cannot write checkpoint {where}: {reason}")

  def _discard_unfinished(self) -> None:
    """Removes unfinished step directories and starts a fresh manager (the failed one may hold
    a broken background thread), so the next save can succeed once the cause is gone."""
    _release(self._save_threads)
    self._save_threads = []
    with _aftermath_dropped():
      with contextlib.suppress(Exception):
        self._manager.close()
      self._manager = None
      gc.collect()
    if jax.process_index() == 0:
      with contextlib.suppress(OSError):
        for path in self.directory.iterdir():
          unfinished_on_gcs = (
            str(path).startswith("gs://")
            and path.name.isdigit()
            and not (path / _COMMIT_MARKER).exists()
          )
          if _TMP_MARKER in path.name or unfinished_on_gcs:
            path.rmtree()
    self._manager = self._open_manager()
