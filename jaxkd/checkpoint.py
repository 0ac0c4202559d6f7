"""Checkpoints of a training run: orbax `CheckpointManager` under `<workdir>/checkpoints/`.

Each checkpoint `<workdir>/checkpoints/<step>/` holds two items:

* `state`: the whole `jaxkd.step.TrainState` (student parameters and BatchNorm statistics,
  adapters, optimiser state, step, RNG key data, method state such as CRD memory banks);
* `run`: JSON describing what the state is (student model and its create arguments, number of
  classes, dataset), compared with the config before anything is compiled.

The data position is the step itself: the pipeline makes batch k a pure function of
(seed, k) (jaxkd/data/pipeline.py), so restoring step k and rebuilding the stream from k
continues exactly where the interrupted run stopped.
"""

import os

import jax
import orbax.checkpoint as ocp

from jaxkd.errors import IncompatibleCheckpointError


def _manager(workdir: str, *, keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    item_names=("state", "run"),
  )


class Checkpointer:
  """Saves and restores the TrainState of one workdir."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self._manager = _manager(workdir, keep=keep)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def run_info(self) -> dict | None:
    """The `run` record of the latest checkpoint, None without checkpoints."""
    step = self.latest_step()
    if step is None:
      return None
    return self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]

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
    """The latest checkpoint restored onto the structure and shardings of `state`.

    Returns `state` itself when the workdir has no checkpoint.
    """
    step = self.latest_step()
    if step is None:
      return state
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored["state"]

  def save(self, step: int, state, run_info: dict) -> None:
    """Starts an asynchronous save; `wait()` before reading it back or exiting."""
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run_info)),
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
