"""`train_and_evaluate(config, workdir)`: one training run, distillation or plain supervised.

Reads top to bottom: plan (every check) → mesh → models, teacher sources, method, optimiser →
state (restored from the workdir's latest checkpoint if any) → compiled steps → loop (log,
evaluate, checkpoint) → export. Running it again on a workdir resumes; on a finished workdir it
only evaluates.

Workdir layout:
  checkpoints/<step>/    TrainState + run record (jaxkd.checkpoint)
  metrics.jsonl          train and eval scalars, one JSON object per line (jaxkd.metrics)
  tensorboard/           the same as TensorBoard event files
  model/                 the final student in jaxkd.models.io format, usable as a teacher
  results.json           the final evaluation

A population (`config.population`, `jaxkd.population`) trains its students in one compiled step;
the checkpoint holds their stacked TrainState, and each member gets the per-student files above
in `members/<name>/`, with `results.json` in the workdir collecting every member's evaluation.
"""

import contextlib
import functools
import json
import math
import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxkd import checkpoint, data, distill, metrics, models, optim, parallel, plan, population
from jaxkd import provenance
from jaxkd import state as train_state
from jaxkd import step, teachers
from jaxkd.models import io as model_io


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config.student` as `config.distill` says; returns the final test evaluation.

  For a population: ``{'members': {name: evaluation}}``.
  """
  run = plan.resolve(config, workdir)
  mesh = parallel.make_mesh(run.mesh_shape)
  _record_provenance(config, workdir)

  # Models, teacher sources, method and optimiser.
  spec, members = run.spec, run.members
  make_student = functools.partial(
    models.create, config.student.model, num_classes=run.num_classes, **config.student.kwargs
  )
  student = make_student(seed=config.seed)
  teacher = teachers.load(
    run.teacher,
    task=run.task,
    feature_names=run.method.teacher_features,
    mesh=mesh,
    cache_identity=lambda: _cache_identity(run),
    cache_batches=lambda: data.eval_batches(
      data.ArraySource(run.train_source.read(np.arange(run.num_train))),
      spec,
      global_batch_size=config.data.eval_batch_size,
      num_threads=config.data.num_threads,
    ),
  )
  method = distill.build(
    run.method,
    rngs=nnx.Rngs(config.seed),
    num_train_examples=run.num_train,
    train_labels=lambda: run.train_source.labels(run.num_train),
  )
  schedule = optim.learning_rate_schedule(config.optimizer, run.steps_per_epoch, run.total_steps)
  optimizer = population.optimizer(members, optim.build(config.optimizer, schedule))
  learner = step.Learner.create(student, method, optimizer, run.task)

  # State: a fresh one, or the workdir's latest checkpoint restored onto its layout.
  def fresh_state(seed: int, new_weights: bool = False) -> train_state.TrainState:
    model = make_student(seed=seed) if new_weights else student
    return train_state.create(model, method.adapters, method.initial_state, optimizer, seed)

  if members is None:
    initial_state, hparams = fresh_state(config.seed), method.hparams
  else:
    initial_state, hparams = population.init(members, fresh_state, method.hparams, seed=config.seed)
  leading_axes = int(members is not None)
  initial_state = parallel.shard_state(mesh, initial_state, leading_axes)
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  state = checkpointer.restore(initial_state)
  start_step = int(np.max(state.step))  # members step together: their counts are equal
  if start_step:
    logging.info("Resuming %s from step %d/%d", workdir, start_step, run.total_steps)

  # Compiled steps: the one-student step, or the population's around it.
  if members is None:
    train_fn = functools.partial(step.train_step, learner)
    eval_fn = functools.partial(step.eval_step, learner)
  else:
    train_fn = functools.partial(population.train_step, learner, chunk=run.population_chunk)
    eval_fn = functools.partial(population.eval_step, learner)
  abstract_state = jax.eval_shape(lambda: initial_state)
  train_step = step.jit_train_step(
    train_fn, teacher.train, mesh, abstract_state, leading_axes=leading_axes
  )
  eval_step = step.jit_eval_step(eval_fn, teacher.eval, mesh)

  def eval_now() -> list[dict[str, float]]:
    batches = data.eval_batches(
      run.test_source,
      spec,
      global_batch_size=config.data.eval_batch_size,
      num_examples=config.data.eval_examples,
      num_threads=config.data.num_threads,
    )
    sums = _sum_batches(eval_step, state, teacher.state, mesh, batches)
    return [summarize(member_sums) for member_sums in _per_member(sums, members)]

  # Loop. `step_index` counts the updates applied so far, as `state.step` does.
  progress = metrics.Progress(
    total_steps=run.total_steps,
    start_step=start_step,
    batch_size=config.data.batch_size,
    every=config.log_every_steps,
    members=members.names if members is not None else (),
  )
  batches = data.train_batches(
    run.train_source,
    spec,
    seed=config.seed,
    start_step=start_step,
    num_steps=run.stop_step,
    global_batch_size=config.data.batch_size,
    num_examples=run.num_train,
    num_threads=config.data.num_threads,
  )
  with contextlib.ExitStack() as stack:
    writers = [stack.enter_context(metrics.Writer(run_dir)) for run_dir in run.run_dirs]

    def write(step_index, split, scalars_per_run):
      for writer, scalars in zip(writers, scalars_per_run):
        writer.write(step_index, split, scalars)

    for step_index in range(start_step + 1, run.stop_step + 1):
      host_batch = teacher.add_to_batch(next(batches))
      state, step_metrics = train_step(
        state, hparams, teacher.state, parallel.host_to_global(mesh, host_batch)
      )
      progress.add(step_metrics)
      if progress.due(step_index):
        write(step_index, "train", progress.summary(step_index, lr=schedule(step_index - 1)))
      if (
        run.eval_every_steps
        and step_index % run.eval_every_steps == 0
        and step_index != run.total_steps
      ):
        write(step_index, "eval", eval_now())
      if step_index % config.checkpoint_every_steps == 0 or step_index == run.stop_step:
        checkpointer.save(step_index, state, run.run_record)
    checkpointer.wait()
    checkpointer.close()
    if run.stop_step < run.total_steps:
      logging.info(
        "Stopped at step %d/%d (config.stop_at_step); run again to continue.",
        run.stop_step,
        run.total_steps,
      )
      return {}
    results = eval_now()
    if start_step < run.total_steps:
      write(run.total_steps, "eval", results)

  member_states = population.unstack(state) if members is not None else [state]
  for run_dir, run_results, run_state in zip(run.run_dirs, results, member_states):
    # RepDistiller reports the last epoch, mdistiller the best: keep both.
    run_results["best_accuracy"] = (
      metrics.best(run_dir, "eval", "accuracy") or run_results["accuracy"]
    )
    logging.info("Final evaluation of %s: %s", run_dir, json.dumps(run_results))
    model_io.save(
      os.path.join(run_dir, "model"),
      step.student_model(learner.student, run_state),
      config.student.model,
      num_classes=run.num_classes,
      **config.student.kwargs,
    )
    _write_json(os.path.join(run_dir, "results.json"), {"step": run.total_steps, **run_results})
  if members is None:
    return results[0]
  by_member = dict(zip(members.names, results))
  _write_json(
    os.path.join(workdir, "results.json"), {"step": run.total_steps, "members": by_member}
  )
  return {"members": by_member}


def _record_provenance(config, workdir: str) -> None:
  """Writes what produced the run (`jaxkd.provenance`); a resumed run says what changed."""
  record = provenance.collect(config)
  if jax.process_index() != 0:
    return
  saved = provenance.read(workdir)
  for change in provenance.differences(saved, record) if saved else ():
    logging.warning("Changed since this workdir's run started: %s", change)
  provenance.write(workdir, record)


def _cache_identity(run: plan.Plan) -> dict:
  """What a teacher cache over the run's training examples is computed from."""
  source = run.train_source
  if isinstance(source, data.TextSource):  # its fingerprint covers content and tokenizer
    data_fingerprint = source.fingerprint
  else:
    data_fingerprint = teachers.cache.fingerprint(source.read(np.arange(run.num_train)))
  return dict(
    dataset=run.config.data.name, num_examples=run.num_train, data_fingerprint=data_fingerprint
  )


def _sum_batches(eval_step, state, teacher_state, mesh, batches) -> dict:
  totals = None
  for host_batch in batches:
    sums = eval_step(state, teacher_state, parallel.host_to_global(mesh, host_batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return jax.device_get(totals)


def _per_member(sums: dict, members) -> list[dict]:
  return population.unstack(sums) if members is not None else [sums]


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


def _write_json(path: str, record: dict) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(record, f, indent=2)
