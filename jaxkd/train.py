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
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from absl import logging
from etils import epath
from flax import nnx

from jaxkd import checkpoint, data, distill, metrics, models, optim, parallel, plan, population
from jaxkd import errors, preemption, provenance, sampling
from jaxkd import state as train_state
from jaxkd import step, teachers
from jaxkd.models import hf, transformer
from jaxkd.models import io as model_io


def train_and_evaluate(
  config, workdir: str, *, label: str = "", watch: preemption.Watch | None = None
) -> dict:
  """Trains `config.student` as `config.distill` says; returns the final test evaluation.

  For a population: ``{'members': {name: evaluation}}``. `label` prefixes the progress lines
  (an experiment's 'run 2 of 7'); `watch` is an experiment's signal watch, shared by its runs
  (one is made for a lone run).

  Raises:
    jaxkd.preemption.Preempted: SIGTERM or SIGINT (also during the set-up); the step it
      stopped at is checkpointed.
    jaxkd.errors.NonFiniteError: the loss or a gradient was not finite (`config.nonfinite`).
  """
  watch = watch or preemption.Watch(sync_every=config.log_every_steps)
  with watch.active():
    return _train_and_evaluate(config, workdir, label, watch)


def _train_and_evaluate(config, workdir: str, label: str, watch: preemption.Watch) -> dict:
  run = plan.resolve(config, workdir)
  if run.set_aside_previous_run:
    _set_aside_previous_run(workdir)
  mesh = parallel.make_mesh(run.mesh_shape)
  record = _record_provenance(config, workdir)

  # Models, teacher sources, method and optimiser.
  spec, members = run.spec, run.members
  make_student = functools.partial(
    models.create, run.student_model, num_classes=run.num_classes, **run.student_kwargs
  )
  teacher = load_teacher(run, mesh)

  if config.student.teacher_layers:  # the teacher's kept layers, weights copied
    teacher_model = nnx.merge(teacher.eval.graphdef, teacher.state)
    student = transformer.keep_layers(teacher_model, config.student.teacher_layers)
  else:
    student = make_student(seed=config.seed)
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
  if run.sampler is not None:
    sample_batch = sampling.jit_sample(run.sampler, learner.student, teacher.train.graphdef, mesh)

  def eval_now() -> list[dict[str, float]]:
    batches = data.eval_batches(
      run.test_source,
      spec,
      global_batch_size=run.eval_batch_size,
      num_examples=config.data.eval_examples,
      num_threads=config.data.num_threads,
      num_workers=config.data.num_workers,
    )
    sums = _sum_batches(eval_step, state, teacher.state, mesh, batches)
    return [metrics.summarize(member_sums) for member_sums in _per_member(sums, members)]

  # Loop. `step_index` counts the updates applied so far, as `state.step` does.
  progress = metrics.Progress(
    total_steps=run.total_steps,
    start_step=start_step,
    batch_size=config.data.batch_size,
    every=config.log_every_steps,
    members=members.names if members is not None else (),
    label=label,
  )
  guard = _NonFiniteGuard(
    config,
    step.gradient_paths(initial_state if members is None else population.unstack(initial_state)[0]),
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
    num_workers=config.data.num_workers,
  )
  with contextlib.ExitStack() as stack:
    writers = [
      stack.enter_context(metrics.Writer(run_dir, resume_step=start_step))
      for run_dir in run.run_dirs
    ]

    def write(step_index, split, scalars_per_run):
      for writer, scalars in zip(writers, scalars_per_run):
        writer.write(step_index, split, scalars)

    def save(step_index):
      guard.check()
      for writer in writers:  # the metrics of every checkpointed step are on storage first
        writer.flush()
      checkpointer.save(step_index, state, run.run_record)

    for step_index in range(start_step + 1, run.stop_step + 1):
      batch = parallel.host_to_global(mesh, teacher.add_to_batch(next(batches)))
      sample_metrics = {}
      if run.sampler is not None:  # before the step, which donates the state
        key = train_state.step_key(state, step.SAMPLE_STREAM)
        batch, sample_metrics = sample_batch(state.student, teacher.state, batch, key)
      state, step_metrics = train_step(state, hparams, teacher.state, batch)
      progress.add({**guard.add(step_index, step_metrics), **sample_metrics})
      if progress.due(step_index):
        guard.check()
        write(step_index, "train", progress.summary(step_index, lr=schedule(step_index - 1)))
      if (
        run.eval_every_steps
        and step_index % run.eval_every_steps == 0
        and step_index != run.total_steps
      ):
        progress.pause()
        write(step_index, "eval", eval_now())
      checkpoint_due = step_index % config.checkpoint_every_steps == 0
      if checkpoint_due or step_index == run.stop_step:
        save(step_index)
      if watch.stop_requested(step_index, checkpoint_step=checkpoint_due):
        if not checkpoint_due and step_index != run.stop_step:
          save(step_index)
        checkpointer.wait()
        checkpointer.close()
        raise preemption.Preempted(step_index, run.total_steps, watch.received)
    checkpointer.wait()
    checkpointer.close()
    if run.stop_step < run.total_steps:
      logging.info(
        "Stopped at step %d/%d (config.stop_at_step); run again to continue.",
        run.stop_step,
        run.total_steps,
      )
      return {}
    progress.pause()
    results = eval_now()
    if start_step < run.total_steps:
      write(run.total_steps, "eval", results)
    run_records = (
      [record] if members is None else [provenance.member_record(record, n) for n in members.names]
    )
    for writer, run_dir, run_results, run_record in zip(
      writers, run.run_dirs, results, run_records
    ):
      writer.flush()
      # RepDistiller reports the last epoch, mdistiller the best: keep both.
      run_results["best_accuracy"] = (
        metrics.best(run_dir, "eval", "accuracy") or run_results["accuracy"]
      )
      if start_step < run.total_steps:
        writer.write_hparams(provenance.hparams(run_record), run_results, step=run.total_steps)

  member_states = population.unstack(state) if members is not None else [state]
  for run_dir, run_results, run_state in zip(run.run_dirs, results, member_states):
    logging.info("Final evaluation of %s: %s", run_dir, json.dumps(run_results))
    trained = step.student_model(learner.student, run_state)
    model_io.save(
      os.path.join(run_dir, "model"),
      trained,
      run.student_model,
      num_classes=run.num_classes,
      **run.student_kwargs,
    )
    if config.student.export_hugging_face and jax.process_index() == 0:
      tokenizer = plan.tokenizer_directory(config)
      hf.save_pretrained(
        trained,
        os.path.join(run_dir, "hf"),
        tokenizer_directory=None if tokenizer == "bytes" else tokenizer,
      )
    _write_json(os.path.join(run_dir, "results.json"), {"step": run.total_steps, **run_results})
  if members is None:
    return results[0]
  by_member = dict(zip(members.names, results))
  _write_json(
    os.path.join(workdir, "results.json"), {"step": run.total_steps, "members": by_member}
  )
  return {"members": by_member}


# What a run writes in its workdir, moved aside together by `config.workdir_mismatch='fresh'`.
_RUN_FILES = (
  "checkpoints",
  "metrics.jsonl",
  "tensorboard",
  "model",
  "results.json",
  "provenance.json",
  "config.py",
  "members",
)


def _set_aside_previous_run(workdir: str) -> None:
  """Moves the earlier run's files to <workdir>/previous-<n>/ (n = 1, 2, ...)."""
  if jax.process_index() == 0:
    workdir = epath.Path(workdir)
    n = 1
    while (workdir / f"previous-{n}").exists():
      n += 1
    aside = workdir / f"previous-{n}"
    aside.mkdir(parents=True)
    for name in _RUN_FILES:
      if (workdir / name).exists():
        (workdir / name).rename(aside / name)
    logging.warning("The workdir held another run: moved to %s (workdir_mismatch='fresh')", aside)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jaxkd previous run set aside")


def _record_provenance(config, workdir: str) -> dict:
  """Writes what produced the run (`jaxkd.provenance`) and returns it; a resumed run says what
  changed."""
  record = provenance.collect(config)
  if jax.process_index() != 0:
    return record
  saved = provenance.read(workdir)
  for change in provenance.differences(saved, record) if saved else ():
    logging.warning("Changed since this workdir's run started: %s", change)
  provenance.write(workdir, record)
  return record


class _NonFiniteGuard:
  """What the trainer does when a step's loss or gradient is not finite.

  The step itself never applies such an update (`jaxkd.step.update`). With
  `config.nonfinite = 'stop'` the run ends with one line naming the step, the loss terms and
  the first non-finite gradient; with 'skip' it goes on, and ends once more than
  `config.max_skipped_steps` steps were skipped. The flags stay on the device between checks
  (at every log line and before every checkpoint): fetching them each step would stall the
  dispatch.
  """

  def __init__(self, config, gradient_paths: list[str]):
    self.policy = config.nonfinite
    self.max_skipped = config.max_skipped_steps
    self.gradient_paths = gradient_paths
    self.skipped = 0
    self._pending: list[tuple[int, dict]] = []

  def add(self, step_index: int, step_metrics: dict) -> dict:
    """Keeps the step's guard fields; returns the metrics to log."""
    step_metrics = dict(step_metrics)
    flags = {key: step_metrics.pop(key) for key in ("nonfinite", "first_nonfinite_grad")}
    self._pending.append((step_index, {**step_metrics, **flags}))
    return step_metrics

  def check(self) -> None:
    pending, self._pending = jax.device_get(self._pending), []
    for step_index, step_metrics in pending:
      bad = np.atleast_1d(step_metrics["nonfinite"]) > 0  # [P] for a population
      if not bad.any():
        continue
      self.skipped += 1
      if self.policy == "skip" and self.skipped <= self.max_skipped:
        logging.warning("Step %d: non-finite loss or gradient, update skipped", step_index)
        continue
      member = int(np.argmax(bad))
      values = {
        name: float(np.atleast_1d(value)[member])
        for name, value in step_metrics.items()
        if name not in ("nonfinite", "first_nonfinite_grad", "accuracy")
      }
      gradient = self.gradient_paths[
        int(np.atleast_1d(step_metrics["first_nonfinite_grad"])[member])
      ]
      why = (
        f"more than config.max_skipped_steps={self.max_skipped} steps were skipped"
        if self.policy == "skip"
        else "config.nonfinite='stop'"
      )
      terms = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
      raise errors.NonFiniteError(
        f"step {step_index}: the loss or a gradient is not finite ({terms}; first non-finite "
        f"gradient {gradient}); {why}. The update was not applied and the checkpoints hold "
        "the last finite state: lower the learning rate or check the data"
      )


def load_teacher(run: plan.Plan, mesh) -> teachers.Teachers:
  """The run's teacher sources; a cached teacher's outputs are written first if the cache
  directory holds none (over the run's training examples, `_cache_identity`)."""
  config = run.config
  teacher = teachers.load(
    run.teacher,
    task=run.task,
    feature_names=run.method.teacher_features,
    mesh=mesh,
    cache_identity=lambda: _cache_identity(run),
    cache_batches=lambda: data.eval_batches(
      run.train_source,
      run.spec,
      global_batch_size=run.eval_batch_size,
      num_examples=run.num_train,
      num_threads=config.data.num_threads,
      num_workers=config.data.num_workers,
    ),
  )
  if teacher.cache is not None:
    logging.info("Teacher cache %s: %s", run.teacher.cache_dir, teacher.cache.describe())
  return teacher


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


def _write_json(path: str, record: dict) -> None:
  if jax.process_index() == 0:
    epath.Path(path).write_text(json.dumps(record, indent=2))
