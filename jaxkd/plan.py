"""The config resolved once: every check, before anything is written or compiled.

`resolve(config, workdir)` checks the config's values and the facts only the run knows (the
devices, the data, the models' inputs and heads, the teacher checkpoint, the workdir's earlier
checkpoints) and returns a frozen `Plan`: steps, members, sweep, teacher and cache settings, the
method. It is the only place that raises `jaxkd.errors.ConfigError`, the one line
`python -m jaxkd.main` prints, naming the field; the trainer reads the plan and never re-parses
the config. Nothing is written to the workdir and nothing is compiled before it returns.

`check(config)` is its static half (no devices, data or models): what a comparison runs on
every config before the first run starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxkd import checkpoint, data, distill, models, optim, parallel, population, tasks, teachers
from jaxkd.errors import ConfigError
from jaxkd.models import hf


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run, resolved.

  Attributes:
    config: the config the plan was resolved from (for provenance; read nothing else from it).
    task: how the step reads a batch (`jaxkd.tasks`).
    spec: an image dataset's static facts (`jaxkd.data.DatasetSpec`); None for text.
    num_classes: the models' head size (classes, or the tokenizer's vocabulary).
    tokenizer: text only: the tokenizer of the corpus (`jaxkd.data.Tokenizer`).
    train_source, test_source: the opened data splits.
    num_train: training examples used (``data.train_examples`` or the whole split).
    steps_per_epoch, total_steps: the schedule's length in steps.
    stop_step: the last step this invocation runs (``stop_at_step`` or the end).
    eval_every_steps: 0 = evaluate at the end only.
    mesh_shape: ``{'data': d, 'fsdp': f}`` with the -1 resolved.
    method: the checked distillation method (`jaxkd.distill.MethodPlan`).
    teacher: the teacher sources' settings (`jaxkd.teachers.Settings`).
    members: the population (`jaxkd.population.Members`), or None for one student.
    population_chunk: members updated together (None = one vmap); see `population.train_step`.
    run_record: what a checkpoint of this run is; a resumed run must match it.
    run_dirs: where each student's metrics, model and results go (one per member).
  """

  config: ml_collections.ConfigDict
  task: tasks.Task
  spec: data.DatasetSpec | None
  num_classes: int
  tokenizer: Any
  train_source: Any
  test_source: Any
  num_train: int
  steps_per_epoch: int
  total_steps: int
  stop_step: int
  eval_every_steps: int
  mesh_shape: Mapping[str, int]
  method: distill.MethodPlan
  teacher: teachers.Settings
  members: population.Members | None
  population_chunk: int | None
  run_record: Mapping[str, Any]
  run_dirs: tuple[str, ...]


def _error(field: str, value, why: str) -> ConfigError:
  return ConfigError(f"config.{field}={value!r}: {why}")


def _require(condition: bool, field: str, value, why: str) -> None:
  if not condition:
    raise _error(field, value, why)


def _choice(field: str, value, choices) -> None:
  _require(value in choices, field, value, f"must be one of {', '.join(map(str, choices))}")


def check(config) -> None:
  """The static checks: every value that can be judged from the config alone."""
  _choice("data.source", config.data.source, (*data.SOURCES, *data.TEXT_SOURCES))
  if config.data.source == "text":
    _choice("data.name", config.data.name, tuple(data.LOCAL_CORPORA))
  elif config.data.source in data.SOURCES:
    _choice("data.name", config.data.name, tuple(data.DATASETS))
  _choice("data.augment", config.data.augment, data.AUGMENTATIONS)
  if config.data.source in data.TEXT_SOURCES:
    _require(
      config.data.augment == "none",
      "data.augment",
      config.data.augment,
      "text is not augmented: use 'none'",
    )
  for field in (
    "data.batch_size",
    "data.eval_batch_size",
    "data.num_threads",
    "data.seq_len",
    "num_epochs",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
  ):
    value = config[field.split(".")[0]] if "." not in field else config.data[field[5:]]
    _require(value > 0, field, value, "must be positive")
  for field, value in (
    ("data.train_examples", config.data.train_examples),
    ("data.eval_examples", config.data.eval_examples),
    ("stop_at_step", config.stop_at_step),
    ("eval_every_epochs", config.eval_every_epochs),
  ):
    _require(value >= 0, field, value, "must be 0 or positive")
  _choice("student.model", config.student.model, models.names())
  if config.teacher.model:
    _choice("teacher.model", config.teacher.model, models.names())
  _choice("optimizer.name", config.optimizer.name, optim.OPTIMIZERS)
  _choice("optimizer.schedule", config.optimizer.schedule, optim.SCHEDULES)
  _choice("optimizer.decay_shape", config.optimizer.decay_shape, optim.DECAY_SHAPES)
  _require(
    0 <= config.optimizer.decay_fraction <= 1,
    "optimizer.decay_fraction",
    config.optimizer.decay_fraction,
    "must be in [0, 1]",
  )
  _require(
    config.optimizer.end_lr_factor >= 0,
    "optimizer.end_lr_factor",
    config.optimizer.end_lr_factor,
    "must be 0 or positive",
  )
  _require(config.optimizer.lr > 0, "optimizer.lr", config.optimizer.lr, "must be positive")
  _require(
    config.optimizer.weight_decay >= 0,
    "optimizer.weight_decay",
    config.optimizer.weight_decay,
    "must be 0 or positive",
  )
  decay_epochs = tuple(config.optimizer.decay_epochs)
  _require(
    list(decay_epochs) == sorted(decay_epochs)
    and all(0 < epoch < config.num_epochs for epoch in decay_epochs),
    "optimizer.decay_epochs",
    decay_epochs,
    f"must increase within (0, num_epochs={config.num_epochs})",
  )
  _require(
    0 <= config.optimizer.warmup_epochs < config.num_epochs,
    "optimizer.warmup_epochs",
    config.optimizer.warmup_epochs,
    f"must be in [0, num_epochs={config.num_epochs})",
  )
  unknown_axes = set(config.mesh) - set(parallel.AXIS_NAMES)
  _require(not unknown_axes, "mesh", dict(config.mesh), f"the axes are {parallel.AXIS_NAMES}")
  for name in config.distill.losses:
    _choice(f"distill.losses.{name}", name, distill.names())
  try:
    teacher_settings(config, in_step=False)
    population.parse(config.population)
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None


def check_experiment(name: str, experiments: Mapping[str, Any]) -> None:
  """`config.experiment` is '' (one training run) or one of `experiments`."""
  _choice("experiment", name, ("", *experiments))


def teacher_settings(config, *, in_step: bool) -> teachers.Settings:
  """`config.teacher` resolved (ValueError naming the field, without the ``config.`` prefix)."""
  return teachers.settings(config.teacher, in_step=in_step)


def _check_heads(field: str, logits: jax.ShapeDtypeStruct, num_classes: int) -> None:
  _require(
    logits.shape[-1] == num_classes,
    field,
    logits.shape[-1],
    f"the model has {logits.shape[-1]} outputs, the data {num_classes} classes (vocabulary)",
  )


def _probe(field: str, task: tasks.Task, model) -> tuple[jax.ShapeDtypeStruct, dict]:
  """The model's abstract outputs on a batch of the task, or the one config error line."""
  try:
    return tasks.probe(task, model)
  except (TypeError, ValueError) as error:
    raise ConfigError(
      f"config.{field}: the model does not accept the data's inputs "
      f"({type(error).__name__}: {str(error).splitlines()[0]})"
    ) from None


def _abstract_student(config, num_classes: int) -> nnx.Module:
  try:
    return nnx.eval_shape(
      lambda: models.create(config.student.model, num_classes=num_classes, **config.student.kwargs)
    )
  except (TypeError, ValueError) as error:
    raise ConfigError(f"config.student.kwargs: {str(error).splitlines()[0]}") from None


def _teacher_info(config, settings: teachers.Settings, task, num_classes: int) -> dict:
  """The teacher's feature shapes (checked against the data), {} without a teacher."""
  if not settings.checkpoints:
    return {}
  try:
    record = teachers.read_architecture(settings.checkpoints)
  except ValueError as error:
    raise ConfigError(f"config.teacher.checkpoint: {error}") from None
  if config.teacher.model and record["name"] != config.teacher.model:
    raise ConfigError(
      f"config.teacher.model={config.teacher.model!r}, but {settings.checkpoints[0]} holds a "
      f"{record['name']!r}"
    )
  logits, features = _probe("teacher.checkpoint", task, teachers.abstract_model(record))
  _check_heads("teacher.checkpoint", logits, num_classes)
  return features


def _run_record(config, num_classes: int, members) -> dict:
  """What a checkpoint's state is; passed through JSON, as it is stored, so that tuples compare
  equal to the lists read back."""
  record = {
    "student.model": config.student.model,
    "student.kwargs": config.student.kwargs.to_dict(),
    "num_classes": num_classes,
    "data.name": config.data.name,
  }
  if members is not None:
    record["population.size"] = members.size
  return json.loads(json.dumps(record))


def resolve(config, workdir: str) -> Plan:
  """Checks `config` and the run's facts; returns the `Plan` (module docstring)."""
  check(config)
  parallel.maybe_initialize_distributed(config)
  try:
    mesh_shape = parallel.mesh_shape(config.mesh, jax.device_count())
  except ValueError as error:
    raise ConfigError(f"config.mesh={dict(config.mesh)!r}: {error}") from None
  num_devices = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    value = config.data[field]
    _require(
      value % num_devices == 0,
      f"data.{field}",
      value,
      f"must be a multiple of the {num_devices} devices",
    )

  # Data: opening a split raises DataUnavailableError (its own one paragraph) when absent.
  spec, tokenizer, train_source, test_source = _open_data(config)
  num_classes = spec.num_classes if spec is not None else tokenizer.vocab_size
  _require(
    config.data.train_examples <= len(train_source),
    "data.train_examples",
    config.data.train_examples,
    f"the train split has only {len(train_source)} examples",
  )
  num_train = config.data.train_examples or len(train_source)
  _require(
    config.data.eval_examples <= len(test_source),
    "data.eval_examples",
    config.data.eval_examples,
    f"the test split has only {len(test_source)} examples",
  )
  _require(
    num_train >= config.data.batch_size,
    "data.batch_size",
    config.data.batch_size,
    "is larger than the training set",
  )
  steps_per_epoch = num_train // config.data.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  if spec is None:
    task = tasks.CausalLM(seq_len=config.data.seq_len)
  else:
    task = tasks.Classification(
      image_shape=spec.image_shape, augment=data.build_augment(config.data.augment, spec)
    )

  # Models: the student and the teacher must read the data and have one output per class.
  student = _abstract_student(config, num_classes)
  student_logits, student_features = _probe("student.model", task, student)
  _check_heads("student.model", student_logits, num_classes)
  settings = teacher_settings(config, in_step=False)
  teacher_features = _teacher_info(config, settings, task, num_classes)

  try:
    method = distill.plan(
      config.distill,
      info=distill.FeatureInfo(
        student=student_features, teacher=teacher_features, num_classes=num_classes
      ),
      has_teacher=bool(settings.checkpoints),
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
    )
    if settings.rule == "per_teacher" and len(settings.checkpoints) > 1:
      distill.check_per_teacher(method)
  except ValueError as error:
    raise ConfigError(f"config.distill: {error}") from None
  settings = dataclasses.replace(settings, in_step=method.needs_teacher)
  if method.lm_head:
    _require(
      isinstance(task, tasks.CausalLM),
      "distill.losses",
      list(config.distill.losses),
      "chunked_lm reads a language model's hidden states: the data must be text",
    )
    task = dataclasses.replace(task, lm_head=True)
  if settings.train_source == "cached":
    _require(
      config.data.augment == "none",
      "data.augment",
      config.data.augment,
      "a cached teacher (teacher.cache.dir) holds the outputs of fixed views: use 'none'",
    )
    _check_cache_manifest(settings, config.data.name, num_train)

  try:
    members = population.parse(config.population)
    if members is not None:
      population.check(members, method.hparams)
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None

  run_record = _run_record(config, num_classes, members)
  _check_workdir(workdir, run_record)
  return Plan(
    config=config,
    task=task,
    spec=spec,
    num_classes=num_classes,
    tokenizer=tokenizer,
    train_source=train_source,
    test_source=test_source,
    num_train=num_train,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    stop_step=min(config.stop_at_step or total_steps, total_steps),
    eval_every_steps=config.eval_every_epochs * steps_per_epoch,
    mesh_shape=mesh_shape,
    method=method,
    teacher=settings,
    members=members,
    # XLA:CPU runs vmapped convolutions as slower grouped ones (population.train_step).
    population_chunk=1 if members is not None and jax.default_backend() == "cpu" else None,
    run_record=run_record,
    run_dirs=tuple(os.path.join(workdir, "members", name) for name in members.names)
    if members is not None
    else (workdir,),
  )


def _open_data(config):
  """``(spec, tokenizer, train_source, test_source)``: an image dataset's spec and no tokenizer,
  or no spec and the tokenizer of a text corpus."""
  if config.data.source not in data.TEXT_SOURCES:
    open_split = lambda split: data.open_split(
      config.data.name, config.data.source, split, config.data.dir
    )
    return data.DATASETS[config.data.name], None, open_split("train"), open_split("test")
  tokenizer = _tokenizer(config.data.tokenizer)
  try:
    train_source, test_source = (
      data.open_text_split(
        config.data.name,
        split,
        seq_len=config.data.seq_len,
        source=data.TEXT_SOURCES[config.data.source],
        data_dir=config.data.dir,
        tokenizer=tokenizer,
        text_key=config.data.text_key,
      )
      for split in ("train", "test")
    )
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None
  return None, tokenizer, train_source, test_source


def _tokenizer(name: str):
  """'bytes', or the tokenizer of a Hugging Face directory."""
  if name == "bytes":
    return data.ByteTokenizer()
  try:
    return hf.load_tokenizer(name)
  except (OSError, ValueError) as error:
    raise ConfigError(f"config.data.tokenizer={name!r}: {error}") from None


def _check_cache_manifest(settings: teachers.Settings, dataset: str, num_train: int) -> None:
  """What can be checked of an existing cache without the teacher's weights."""
  try:
    manifest = teachers.cache.read_manifest(settings.cache_dir)
  except teachers.cache.CacheMismatchError as error:
    raise ConfigError(f"config.teacher.cache.dir: {error}") from None
  except FileNotFoundError:
    _require(
      jax.process_count() == 1,
      "teacher.cache.dir",
      settings.cache_dir,
      "holds no cache; write it with a single-process run first (every process would see "
      "only its slice of the data)",
    )
    return
  for field, value in (("dataset", dataset), ("num_examples", num_train)):
    _require(
      getattr(manifest, field) == value,
      "teacher.cache.dir",
      settings.cache_dir,
      f"the cache was computed for {field} {getattr(manifest, field)!r}, this run has {value!r}",
    )
  stored = {
    "topk": (manifest.k or 0, settings.cache_topk),
    "top_p": (manifest.top_p, settings.cache_top_p),
    "temperature": (manifest.temperature, settings.cache_temperature),
    "dtype": (manifest.dtype, settings.cache_dtype),
  }
  for field, (in_cache, asked) in stored.items():
    _require(
      in_cache == asked,
      f"teacher.cache.{field}",
      asked,
      f"the cache at {settings.cache_dir} holds {manifest.kind} outputs with {field} "
      f"{in_cache!r}; use another directory",
    )


def _check_workdir(workdir: str, run_record: Mapping[str, Any]) -> None:
  """A workdir with checkpoints of another run is refused, naming the first field that differs."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return  # a new run: nothing to compare, and nothing created
  saved = checkpoint.Checkpointer(workdir).run_info()
  if saved is None:
    return
  for key in {**saved, **run_record}:  # both ways: a key only one side has differs too
    if saved.get(key) != run_record.get(key):
      raise ConfigError(
        f"the workdir's checkpoints were written for {key} = {saved.get(key)!r}, the config "
        f"asks for {run_record.get(key)!r}; use a fresh --workdir (or delete its checkpoints/) "
        "to start a new run"
      )
