"""`train_and_evaluate(config, workdir)`: one training run, distillation or plain supervised.

Reads top to bottom: checks → mesh → data → models → method, optimiser, state (restored from the
workdir's latest checkpoint if any) → compiled steps → loop (log, evaluate, checkpoint) →
export. Running it again on a workdir resumes; on a finished workdir it only evaluates.

Workdir layout:
  checkpoints/<step>/    TrainState + run record (jaxkd.checkpoint)
  metrics.jsonl          train and eval scalars, one JSON object per line (jaxkd.metrics)
  tensorboard/           the same as TensorBoard event files
  model/                 the final student in jaxkd.models.io format, usable as a teacher
  results.json           the final evaluation
"""
import json
import os

import jax
from absl import logging
from flax import nnx

from jaxkd import checkpoint, configlib, data, distill, metrics, models, optim, parallel
from jaxkd import step as kd_step
from jaxkd.models import io as model_io


def evaluate(eval_step, state, teacher_state, mesh, batches) -> dict[str, float]:
  """Test-split means: top-1 `accuracy`; with a teacher also `agreement` (same argmax) and
  `kl` = KL(teacher ‖ student) at T = 1, in nats per example."""
  totals = None
  for host_batch in batches:
    sums = eval_step(state, teacher_state, parallel.host_to_global(mesh, host_batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = {name: float(value) for name, value in jax.device_get(totals).items()}
  results = {"accuracy": totals["correct"] / totals["count"]}
  if "agree" in totals:
    results["agreement"] = totals["agree"] / totals["count"]
    results["kl"] = totals["kl"] / totals["count"]
  return results


def _run_info(config, spec: data.DatasetSpec) -> dict:
  """What a checkpoint's state is; a resumed run must match it (jaxkd.checkpoint).

  Passed through JSON, as it is stored, so that tuples compare equal to the lists read back.
  """
  return json.loads(json.dumps({
      "student.model": config.student.model, "student.kwargs": config.student.kwargs.to_dict(),
      "num_classes": spec.num_classes, "data.name": config.data.name}))


def _load_teacher(config, spec: data.DatasetSpec) -> nnx.Module | None:
  if not config.teacher.checkpoint:
    return None
  try:
    saved_name = model_io.read_metadata(config.teacher.checkpoint)["name"]
  except FileNotFoundError as error:
    raise configlib.ConfigError(f"config.teacher.checkpoint: {error}") from None
  if config.teacher.model and saved_name != config.teacher.model:
    raise configlib.ConfigError(
        f"config.teacher.model={config.teacher.model!r}, but {config.teacher.checkpoint} holds "
        f"a {saved_name!r}")
  teacher = model_io.load(config.teacher.checkpoint)
  configlib.check_model("teacher.checkpoint", teacher, spec)
  return teacher


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config.student` as `config.distill` says; returns the final test evaluation."""
  configlib.validate(config)
  parallel.maybe_initialize_distributed(config)
  mesh = parallel.make_mesh(config.mesh)
  configlib.check_batch_sizes(config, mesh.size)

  # Data: random-access sources; batch k is a pure function of (seed, k).
  spec = data.DATASETS[config.data.name]
  train_source = data.open_split(config.data.name, config.data.source, "train", config.data.dir)
  test_source = data.open_split(config.data.name, config.data.source, "test", config.data.dir)
  configlib.check_data_size(config, len(train_source))
  configlib.check_teacher_given(config)
  num_train = config.data.train_examples or len(train_source)
  steps_per_epoch = num_train // config.data.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  stop_step = min(config.stop_at_step or total_steps, total_steps)

  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  run_info = _run_info(config, spec)
  checkpointer.check_compatible(run_info)

  # Models. The teacher is frozen: it only ever runs in eval mode.
  student = models.create(config.student.model, num_classes=spec.num_classes, seed=config.seed,
                          **config.student.kwargs)
  configlib.check_model("student.model", student, spec)
  teacher = _load_teacher(config, spec)

  # Method, optimiser and state.
  try:
    method = distill.build(config.distill, student=student, teacher=teacher,
                           num_train_examples=num_train, rngs=nnx.Rngs(config.seed),
                           steps_per_epoch=steps_per_epoch, input_shape=(2, *spec.image_shape))
  except ValueError as error:
    raise configlib.ConfigError(f"config.distill: {error}") from None
  schedule = optim.learning_rate_schedule(config.optimizer, steps_per_epoch, total_steps)
  optimizer = optim.build(config.optimizer, schedule)
  initial_state = kd_step.init_state(student, method, optimizer, seed=config.seed, mesh=mesh)
  # Loss weights and temperatures come from the config on resume too, like the lr schedule.
  state = checkpointer.restore(initial_state).replace(hparams=initial_state.hparams)
  start_step = int(state.step)
  if start_step:
    logging.info("Resuming %s from step %d/%d", workdir, start_step, total_steps)

  # Compiled steps. A method without teacher terms trains without running the teacher; the
  # evaluation still compares with it.
  teacher_state = kd_step.teacher_state(teacher, mesh)
  train_teacher = teacher if method.needs_teacher else None
  train_step = kd_step.make_train_step(
      student=student, teacher=train_teacher, method=method, optimizer=optimizer, mesh=mesh,
      augment=data.build_augment(config.data.augment, spec))
  eval_step = kd_step.make_eval_step(student=student, teacher=teacher, mesh=mesh)

  def eval_now():
    return evaluate(eval_step, state, teacher_state, mesh, data.eval_batches(
        test_source, spec, global_batch_size=config.data.eval_batch_size,
        num_threads=config.data.num_threads))

  # Loop. `step` counts the updates applied so far, as `state.step` does.
  eval_every_steps = config.eval_every_epochs * steps_per_epoch
  progress = metrics.Progress(total_steps=total_steps, start_step=start_step,
                              batch_size=config.data.batch_size, every=config.log_every_steps)
  batches = data.train_batches(
      train_source, spec, seed=config.seed, start_step=start_step, num_steps=stop_step,
      global_batch_size=config.data.batch_size, num_examples=num_train,
      num_threads=config.data.num_threads)
  with metrics.Writer(workdir) as writer:
    for step in range(start_step + 1, stop_step + 1):
      state, step_metrics = train_step(
          state, teacher_state if train_teacher else None,
          parallel.host_to_global(mesh, next(batches)))
      progress.add(step_metrics)
      if progress.due(step):
        writer.write(step, "train", progress.summary(step, lr=schedule(step - 1)))
      if eval_every_steps and step % eval_every_steps == 0 and step != total_steps:
        writer.write(step, "eval", eval_now())
      if step % config.checkpoint_every_steps == 0 or step == stop_step:
        checkpointer.save(step, state, run_info)
    checkpointer.wait()
    checkpointer.close()
    if stop_step < total_steps:
      logging.info("Stopped at step %d/%d (config.stop_at_step); run again to continue.",
                   stop_step, total_steps)
      return {}
    results = eval_now()
    if start_step < total_steps:
      writer.write(total_steps, "eval", results)
  # RepDistiller reports the last epoch, mdistiller the best: keep both.
  results["best_accuracy"] = metrics.best(workdir, "eval", "accuracy") or results["accuracy"]

  logging.info("Final evaluation of %s: %s", workdir, json.dumps(results))
  model_io.save(os.path.join(workdir, "model"), kd_step.student_model(student, state),
                config.student.model, num_classes=spec.num_classes, **config.student.kwargs)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"step": total_steps, **results}, f, indent=2)
  return results
