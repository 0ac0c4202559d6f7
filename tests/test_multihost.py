"""Multi-host: 2 local processes × 4 CPU devices (gloo collectives) == 1 process × 8 devices.

MULTI-PROCESS TESTS. They start two subprocesses running this file as workers; each calls
`jaxkd.parallel.maybe_initialize_distributed` from the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment.
* 'train': each feeds only its half of every global batch (`host_to_global`) and trains 3 steps
  on a ('data'=4, 'fsdp'=2) mesh spanning both processes. Losses and parameters must equal the
  single-process 8-device run of the same steps.
* 'preempt': only process 1 receives SIGTERM, between two sync points of `preemption.Watch`;
  both processes must stop after the same step, the next sync point.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

NUM_PROCESSES = 2
GLOBAL_BATCH = 16
NUM_STEPS = 3
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _train():
  """The run both setups execute; returns (losses, gathered student state as flat dict)."""
  import jax
  import optax
  from jax.experimental import multihost_utils

  import tiny_models
  from jaxkd import parallel

  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  student, teacher = tiny_models.tiny_cnn(width=8, seed=1), tiny_models.tiny_cnn(width=8, seed=2)
  method = tiny_models.method({"losses": {"ce": 0.1, "kd": 0.9}}, student, teacher)
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = tiny_models.init_state(student, method, optimizer, mesh=mesh)
  sources = tiny_models.teacher_sources([teacher], method, mesh)
  train_step = tiny_models.train_step(student, method, optimizer, mesh, sources.train, state)
  rows_per_process = GLOBAL_BATCH // jax.process_count()
  first_row = jax.process_index() * rows_per_process
  losses = []
  for step in range(NUM_STEPS):
    full_batch = tiny_models.batch(GLOBAL_BATCH, seed=step)
    local_batch = {
      key: value[first_row : first_row + rows_per_process] for key, value in full_batch.items()
    }
    global_batch = parallel.host_to_global(mesh, local_batch)
    # The processes' slices assemble into the global batch in order.
    gathered_index = multihost_utils.process_allgather(global_batch["index"], tiled=True)
    np.testing.assert_array_equal(gathered_index, full_batch["index"])
    state, metrics = train_step(state, method.hparams, sources.state, global_batch)
    losses.append(float(metrics["loss"]))
  student_state = multihost_utils.process_allgather(state.student, tiled=True)
  flat = {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(student_state)[0]
  }
  return np.asarray(losses), flat


# 'preempt': the signal reaches process 1 after this step; the processes compare flags every
# SYNC_EVERY steps, so both stop after the next multiple of it.
SIGNAL_AFTER_STEP, SYNC_EVERY = 5, 4


def _preempt(output_path: str) -> None:
  import signal

  import jax

  from jaxkd import preemption

  watch = preemption.Watch(sync_every=SYNC_EVERY)
  with watch.active():
    for step in range(1, 100):
      if jax.process_index() == 1 and step == SIGNAL_AFTER_STEP:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: only sets the flag
      if watch.stop_requested(step):
        break
  with open(f"{output_path}.{jax.process_index()}", "w") as f:
    f.write(f"{step} {watch.received}")


def _worker(mode: str, output_path: str) -> None:
  from jaxkd import parallel

  assert parallel.maybe_initialize_distributed(None)
  import jax

  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
  if mode == "preempt":
    _preempt(output_path)
    return
  losses, flat = _train()
  if jax.process_index() == 0:
    np.savez(output_path, losses=losses, **flat)


def _run_workers(mode: str, output_path: str) -> None:
  """Runs `_worker(mode, output_path)` in two local processes; fails on a worker's failure."""
  portpicker = pytest.importorskip("portpicker")
  port = portpicker.pick_unused_port()
  env_base = {key: value for key, value in os.environ.items() if not key.startswith("JAX_")}
  env_base.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
    JAX_NUM_PROCESSES=str(NUM_PROCESSES),
    PYTHONPATH=os.pathsep.join(
      [TESTS_DIR, os.path.dirname(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    ),
  )
  workers = [
    subprocess.Popen(
      [sys.executable, __file__, mode, output_path],
      env={**env_base, "JAX_PROCESS_ID": str(process_id)},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for process_id in range(NUM_PROCESSES)
  ]
  try:
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]


def test_two_processes_match_one_process(tmp_path):
  output_path = str(tmp_path / "multihost.npz")
  _run_workers("train", output_path)
  losses, flat = _train()  # this process: 8 simulated devices (tests/conftest.py)
  result = np.load(output_path)
  np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
  for name, value in flat.items():
    np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
  output_path = str(tmp_path / "preempt")
  _run_workers("preempt", output_path)
  stops = [(tmp_path / f"preempt.{index}").read_text() for index in range(NUM_PROCESSES)]
  assert stops == ["8 SIGTERM (another process)", "8 SIGTERM"]


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
