"""`train_and_evaluate(config, workdir)`: one training run, distillation or plain supervised.

Reads top to bottom: checks → mesh → data → models → method, optimiser, state (restored from
the workdir's latest checkpoint if any) → teacher cache → compiled steps → loop (log, evaluate,
checkpoint) → export. Running it again on a workdir resumes; on a finished workdir it only
evaluates.

Workdir layout:
  checkpoints/<step>/    TrainState + run record (jaxkd.checkpoint)
  metrics.jsonl          train and eval scalars, one JSON object per line (jaxkd.metrics)
  tensorboard/           the same as TensorBoard event files
  model/                 the final student in jaxkd.models.io format, usable as a teacher
  results.json           the final evaluation

A population (`config.population.size` = P > 1, `jaxkd.population`) trains P students in one
compiled step; the checkpoint holds their stacked TrainState, and each member gets the
per-student files above in `members/<name>/` (name from the sweep, e.g. `kd.temperature=4.0`),
with `results.json` in the workdir collecting every member's evaluation.

A cached teacher (`config.teacher.cache.dir`, `jaxkd.teacher_cache`) replaces the teacher
forward of every step by a look-up of its outputs, computed once over the training examples.
"""

import contextlib
import json
import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxkd import (
  checkpoint,
  configlib,
  data,
  distill,
  metrics,
  models,
  optim,
  parallel,
  population,
  teacher_cache,
)
from jaxkd import step as kd_step
from jaxkd.models import io as model_io


def evaluate(eval_step, state, teacher_state, mesh, batches) -> list[dict[str, float]]:
  """Test-split means, one dict per member (one for a single state): top-1 `accuracy`; with a
  teacher also `agreement` (same argmax) and `kl` = KL(teacher ‖ student) at T = 1, in nats per
  example."""
  totals = None
  for host_batch in batches:
    sums = eval_step(state, teacher_state, parallel.host_to_global(mesh, host_batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  # A single state's sums are scalars; a population's are [P].
  members = population.unstack(totals) if np.ndim(totals["count"]) else [totals]
  results = []
  for sums in members:
    member_results = {"accuracy": float(sums["correct"] / sums["count"])}
    if "agree" in sums:
      member_results["agreement"] = float(sums["agree"] / sums["count"])
      member_results["kl"] = float(sums["kl"] / sums["count"])
    results.append(member_results)
  return results


def _run_info(config, spec: data.DatasetSpec, population_size: int | None) -> dict:
  """What a checkpoint's state is; a resumed run must match it (jaxkd.checkpoint).

  Passed through JSON, as it is stored, so that tuples compare equal to the lists read back.
  A population's size is recorded (its state is stacked); a single run's record is unchanged.
  """
  info = {
    "student.model": config.student.model,
    "student.kwargs": config.student.kwargs.to_dict(),
    "num_classes": spec.num_classes,
    "data.name": config.data.name,
  }
  if population_size:
    info["population.size"] = population_size
  return json.loads(json.dumps(info))


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
      f"a {saved_name!r}"
    )
  teacher = model_io.load(config.teacher.checkpoint)
  configlib.check_model("teacher.checkpoint", teacher, spec)
  return teacher


def _open_teacher_cache(
  config, spec: data.DatasetSpec, teacher: nnx.Module, train_source, num_train: int
) -> teacher_cache.TeacherCache:
  """The cache of `teacher`'s outputs on the first `num_train` training examples, written first
  if `config.teacher.cache.dir` holds none; a cache of other data or another teacher is an error.

  The cached view is the normalised image, which is what the step sees with augment 'none'.
  """
  cache_config = configlib.teacher_cache_config(config)
  directory, topk = cache_config["dir"], cache_config["topk"]
  kind, k = ("topk", topk) if topk else ("dense", None)
  examples = data.ArraySource(train_source.read(np.arange(num_train)))
  identity = dict(
    dataset=config.data.name,
    num_examples=num_train,
    data_fingerprint=teacher_cache.fingerprint(examples.arrays),
  )
  if not os.path.exists(os.path.join(directory, teacher_cache.MANIFEST)):
    if jax.process_count() > 1:
      raise configlib.ConfigError(
        f"config.teacher.cache.dir={directory!r}: no cache there; write it with a "
        "single-process run first (every process would see only its slice of the data)"
      )
    logging.info("Writing the teacher cache %s (%d examples, %s)", directory, num_train, kind)
    teacher_cache.write_cache(
      directory,
      teacher=teacher,
      kind=kind,
      k=k,
      **identity,
      batches=data.eval_batches(
        examples,
        spec,
        global_batch_size=config.data.eval_batch_size,
        num_threads=config.data.num_threads,
      ),
    )
  try:
    cache = teacher_cache.open_cache(
      directory, teacher_fingerprint=teacher_cache.fingerprint(nnx.state(teacher)), **identity
    )
  except (FileNotFoundError, ValueError) as error:
    raise configlib.ConfigError(f"config.teacher.cache.dir: {error}") from None
  if cache.manifest.k != k:
    raise configlib.ConfigError(
      f"config.teacher.cache.topk={topk}: the cache at {directory} holds "
      f"{cache.manifest.kind} outputs (k={cache.manifest.k}); use another directory"
    )
  return cache


def _init_population(config, spec, student, method, optimizer, mesh, population_config):
  """The stacked initial state of `config.population` (see jaxkd.population)."""
  swept = population.member_overrides(population_config)[0]
  if population.LEARNING_RATE_SCALE_KEY in swept:
    optimizer = population.with_learning_rate_scale(optimizer)
  make_student = None
  if population.SEED_KEY in swept:  # Swept seeds also draw the members' initial weights.
    make_student = lambda seed: models.create(
      config.student.model, num_classes=spec.num_classes, seed=seed, **config.student.kwargs
    )
  try:
    state = population.init_population(
      student,
      method,
      optimizer,
      population_config,
      seed=config.seed,
      mesh=mesh,
      make_student=make_student,
    )
  except ValueError as error:
    raise configlib.ConfigError(f"config.population.sweep: {error}") from None
  return state, optimizer


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config.student` as `config.distill` says; returns the final test evaluation.

  For a population: ``{'members': {name: evaluation}}``.
  """
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

  population_config = configlib.population_config(config)
  population_size = population_config["size"] if population_config["size"] > 1 else None
  member_names = population.member_names(population_config) if population_size else []
  # Where each student's metrics, model and results go.
  run_dirs = [os.path.join(workdir, "members", name) for name in member_names] or [workdir]

  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  run_info = _run_info(config, spec, population_size)
  checkpointer.check_compatible(run_info)

  # Models. The teacher is frozen: it only ever runs in eval mode.
  student = models.create(
    config.student.model, num_classes=spec.num_classes, seed=config.seed, **config.student.kwargs
  )
  configlib.check_model("student.model", student, spec)
  teacher = _load_teacher(config, spec)

  # Method, optimiser and state.
  try:
    method = distill.build(
      config.distill,
      student=student,
      teacher=teacher,
      num_train_examples=num_train,
      train_labels=lambda: train_source.labels(num_train),
      rngs=nnx.Rngs(config.seed),
      steps_per_epoch=steps_per_epoch,
      input_shape=(2, *spec.image_shape),
    )
  except ValueError as error:
    raise configlib.ConfigError(f"config.distill: {error}") from None
  schedule = optim.learning_rate_schedule(config.optimizer, steps_per_epoch, total_steps)
  optimizer = optim.build(config.optimizer, schedule)
  if population_size:
    initial_state, optimizer = _init_population(
      config, spec, student, method, optimizer, mesh, population_config
    )
  else:
    initial_state = kd_step.init_state(student, method, optimizer, seed=config.seed, mesh=mesh)
  # Loss weights and temperatures come from the config on resume too, like the lr schedule.
  state = checkpointer.restore(initial_state).replace(hparams=initial_state.hparams)
  start_step = int(np.max(state.step))  # Members step together: their counts are equal.
  if start_step:
    logging.info("Resuming %s from step %d/%d", workdir, start_step, total_steps)

  # Compiled steps. A method without teacher terms trains without running the teacher, and so
  # does one reading a cached teacher from the batch; the evaluation still compares with it.
  cache = None
  if configlib.teacher_cache_config(config)["dir"] and method.needs_teacher:
    cache = _open_teacher_cache(config, spec, teacher, train_source, num_train)
  teacher_state = kd_step.teacher_state(teacher, mesh)
  train_teacher = teacher if method.needs_teacher and cache is None else None
  train_step = kd_step.make_train_step(
    student=student,
    teacher=train_teacher,
    method=method,
    optimizer=optimizer,
    mesh=mesh,
    augment=data.build_augment(config.data.augment, spec),
    population_size=population_size,
    # XLA:CPU runs vmapped convolutions as slower grouped ones (docs/engine.md).
    population_chunk=1 if population_size and jax.default_backend() == "cpu" else None,
  )
  eval_step = kd_step.make_eval_step(
    student=student, teacher=teacher, mesh=mesh, population_size=population_size
  )

  def eval_now() -> list[dict[str, float]]:
    return evaluate(
      eval_step,
      state,
      teacher_state,
      mesh,
      data.eval_batches(
        test_source,
        spec,
        global_batch_size=config.data.eval_batch_size,
        num_threads=config.data.num_threads,
      ),
    )

  # Loop. `step` counts the updates applied so far, as `state.step` does.
  eval_every_steps = config.eval_every_epochs * steps_per_epoch
  progress = metrics.Progress(
    total_steps=total_steps,
    start_step=start_step,
    batch_size=config.data.batch_size,
    every=config.log_every_steps,
    members=member_names,
  )
  batches = data.train_batches(
    train_source,
    spec,
    seed=config.seed,
    start_step=start_step,
    num_steps=stop_step,
    global_batch_size=config.data.batch_size,
    num_examples=num_train,
    num_threads=config.data.num_threads,
  )
  if cache is not None:
    batches = map(cache.add_to_batch, batches)
  with contextlib.ExitStack() as stack:
    writers = [stack.enter_context(metrics.Writer(run_dir)) for run_dir in run_dirs]

    def write(step, split, scalars_per_run):
      for writer, scalars in zip(writers, scalars_per_run):
        writer.write(step, split, scalars)

    for step in range(start_step + 1, stop_step + 1):
      state, step_metrics = train_step(
        state,
        teacher_state if train_teacher else None,
        parallel.host_to_global(mesh, next(batches)),
      )
      progress.add(step_metrics)
      if progress.due(step):
        write(step, "train", progress.summary(step, lr=schedule(step - 1)))
      if eval_every_steps and step % eval_every_steps == 0 and step != total_steps:
        write(step, "eval", eval_now())
      if step % config.checkpoint_every_steps == 0 or step == stop_step:
        checkpointer.save(step, state, run_info)
    checkpointer.wait()
    checkpointer.close()
    if stop_step < total_steps:
      logging.info(
        "Stopped at step %d/%d (config.stop_at_step); run again to continue.",
        stop_step,
        total_steps,
      )
      return {}
    results = eval_now()
    if start_step < total_steps:
      write(total_steps, "eval", results)

  member_states = population.unstack(state) if population_size else [state]
  for run_dir, run_results, run_state in zip(run_dirs, results, member_states):
    # RepDistiller reports the last epoch, mdistiller the best: keep both.
    run_results["best_accuracy"] = (
      metrics.best(run_dir, "eval", "accuracy") or run_results["accuracy"]
    )
    logging.info("Final evaluation of %s: %s", run_dir, json.dumps(run_results))
    model_io.save(
      os.path.join(run_dir, "model"),
      kd_step.student_model(student, run_state),
      config.student.model,
      num_classes=spec.num_classes,
      **config.student.kwargs,
    )
    _write_json(os.path.join(run_dir, "results.json"), {"step": total_steps, **run_results})
  if not population_size:
    return results[0]
  members = dict(zip(member_names, results))
  _write_json(os.path.join(workdir, "results.json"), {"step": total_steps, "members": members})
  return {"members": members}


def _write_json(path: str, record: dict) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(record, f, indent=2)
