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
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from jaxkd import checkpoint, data, distill, models, optim, parallel, population, sampling
from jaxkd import tasks, teachers
from jaxkd.errors import ConfigError
from jaxkd.models import hf


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run, resolved.

  Attributes:
    config: the config the plan was resolved from (for provenance; read nothing else from it).
    task: how the step reads a batch (`jaxkd.tasks`).
    student_model, student_kwargs: the student's `jaxkd.models.create` name and arguments.
    spec: an image dataset's static facts (`jaxkd.data.DatasetSpec`); None for text.
    num_classes: the models' head size (classes, or the tokenizer's vocabulary).
    tokenizer: text only: the tokenizer of the corpus (`jaxkd.data.Tokenizer`).
    train_source, test_source: the opened data splits.
    num_train: training examples used (``data.train_examples`` or the whole split).
    steps_per_epoch, total_steps: the schedule's length in steps.
    stop_step: the last step this invocation runs (``stop_at_step`` or the end).
    eval_every_steps: 0 = evaluate at the end only.
    eval_batch_size: `data.eval_batch_size`, cut to what the evaluated (and cached) examples
      need, a multiple of the devices.
    mesh_shape: ``{'data': d, 'fsdp': f}`` with the -1 resolved.
    method: the checked distillation method (`jaxkd.distill.MethodPlan`).
    teacher: the teacher sources' settings (`jaxkd.teachers.Settings`).
    members: the population (`jaxkd.population.Members`), or None for one student.
    population_chunk: members updated together (None = one vmap); see `population.train_step`.
    sampler: how training batches are generated (`jaxkd.sampling`), or None.
    run_record: what a checkpoint of this run is; a resumed run must match it.
    set_aside_previous_run: the workdir holds another run, to be moved aside before starting
      (`config.workdir_mismatch='fresh'`).
    run_dirs: where each student's metrics, model and results go (one per member).
  """

  config: ml_collections.ConfigDict
  task: tasks.Task
  student_model: str
  student_kwargs: Mapping[str, Any]
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
  eval_batch_size: int
  mesh_shape: Mapping[str, int]
  method: distill.MethodPlan
  teacher: teachers.Settings
  members: population.Members | None
  population_chunk: int | None
  sampler: sampling.Sampler | None
  run_record: Mapping[str, Any]
  set_aside_previous_run: bool
  run_dirs: tuple[str, ...]


def _error(field: str, value, why: str) -> ConfigError:
  return ConfigError(f"config.{field}={value!r}: {why}")


def _require(condition: bool, field: str, value, why: str) -> None:
  if not condition:
    raise _error(field, value, why)


def _choice(field: str, value, choices) -> None:
  _require(value in choices, field, value, f"must be one of {', '.join(map(str, choices))}")


def _check_sampling(config) -> None:
  """`config.sampling`: token data, one student, one live teacher to sample and score with."""
  options = config.sampling
  _choice("sampling.kind", options.kind, sampling.KINDS)
  checkpoints = [path for path in config.teacher.checkpoint.split(",") if path.strip()]
  why_not = (
    "sampling generates token continuations: the data must be text"
    if config.data.source not in data.TEXT_SOURCES
    else "a population's stacked students cannot each generate in one step"
    if config.population.size > 1
    else "the step must score the samples with a live teacher: set teacher.checkpoint "
    "(one model, not an ensemble, no teacher.cache.dir)"
    if len(checkpoints) != 1 or config.teacher.cache.dir
    else ""
  )
  _require(not why_not, "sampling.kind", options.kind, why_not)
  _require(
    0 <= options.prompt_len <= config.data.seq_len,
    "sampling.prompt_len",
    options.prompt_len,
    f"must be in [1, data.seq_len={config.data.seq_len}], or 0 for half of it",
  )


def check(config) -> None:
  """The static checks: every value that can be judged from the config alone."""
  _choice("data.source", config.data.source, (*data.SOURCES, *data.TEXT_SOURCES))
  if config.data.source == "text":
    _choice("data.name", config.data.name, tuple(data.LOCAL_CORPORA))
  elif config.data.source in data.SOURCES:
    _choice("data.name", config.data.name, tuple(data.DATASETS))
  _choice("data.augment", config.data.augment, data.AUGMENTATIONS)
  _choice("nonfinite", config.nonfinite, ("stop", "skip"))
  _require(
    config.data.num_workers >= -1,
    "data.num_workers",
    config.data.num_workers,
    "must be -1 (one per core), 0 (threads only) or positive",
  )
  _choice("workdir_mismatch", config.workdir_mismatch, ("refuse", "fresh", "continue"))
  if config.sampling.kind:
    _check_sampling(config)
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
    ("max_skipped_steps", config.max_skipped_steps),
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
  optimizer = config.optimizer
  for field, low, high, why in (
    ("lr", 0, math.inf, "must be positive and finite"),
    ("momentum", 0, 1, "must be in [0, 1)"),
    ("b1", 0, 1, "must be in [0, 1)"),
    ("b2", 0, 1, "must be in [0, 1)"),
    ("decay_factor", 0, math.inf, "must be positive and finite"),
    ("weight_decay", 0, math.inf, "must be 0 or positive, and finite"),
    ("end_lr_factor", 0, math.inf, "must be 0 or positive, and finite"),
  ):
    value = optimizer[field]
    strict_low = field in ("lr", "decay_factor")
    _require(
      (low < value if strict_low else low <= value) and value < high,
      f"optimizer.{field}",
      value,
      why,
    )
  _require(0 <= config.seed < 2**63, "seed", config.seed, "must be in [0, 2**63)")
  _require(
    config.distributed in ("", "auto") or isinstance(config.distributed, Mapping),
    "distributed",
    config.distributed,
    "must be '' (one process), 'auto' or a mapping of jax.distributed.initialize arguments",
  )
  for axis, size in config.mesh.items():
    _require(size == -1 or size >= 1, f"mesh.{axis}", size, "must be -1 (the rest) or positive")
  decay_epochs = tuple(config.optimizer.decay_epochs)
  _require(
    all(isinstance(epoch, (int, float)) and not isinstance(epoch, bool) for epoch in decay_epochs),
    "optimizer.decay_epochs",
    decay_epochs,
    "must be numbers of epochs",
  )
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


def check_comparison(compare: Mapping[str, Any]) -> None:
  """A comparison experiment's `config.compare` section."""
  for field, low in (("seeds", 1), ("teacher_epochs", 1), ("teacher_train_examples", 0)):
    value = compare[field]
    _require(
      isinstance(value, int) and value >= low,
      f"compare.{field}",
      value,
      "must be positive" if low else "must be 0 (all) or positive",
    )


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


def _abstract_student(model: str, kwargs: Mapping[str, Any], num_classes: int) -> nnx.Module:
  try:
    return nnx.eval_shape(lambda: models.create(model, num_classes=num_classes, **kwargs))
  except (TypeError, ValueError) as error:
    raise ConfigError(f"config.student.kwargs: {str(error).splitlines()[0]}") from None


def _teacher_record(config, settings: teachers.Settings) -> dict | None:
  """The teacher's architecture record (jaxkd or Hugging Face directory), None without one."""
  if not settings.checkpoints:
    return None
  try:
    record = teachers.read_architecture(settings.checkpoints)
  except ValueError as error:
    raise ConfigError(f"config.teacher.checkpoint: {error}") from None
  if config.teacher.model and record["name"] != config.teacher.model:
    raise ConfigError(
      f"config.teacher.model={config.teacher.model!r}, but {settings.checkpoints[0]} holds a "
      f"{record['name']!r}"
    )
  return record


def _teacher_vocabulary(config, settings, teacher_outputs: int, num_classes: int, tokenizer):
  """The classes to slice a teacher's outputs to, or None; a class-count or vocabulary
  mismatch, or another tokenizer than the teacher's, is the one config error line.

  A language-model teacher of the same tokenizer may have more output rows (an embedding padded
  past the tokenizer, e.g. Qwen's 152064 vs 151936): its logits are sliced to the tokenizer's
  (`jaxkd.losses.slice_vocab`).
  """
  directory = settings.checkpoints[0]
  teacher_tokenizer = epath.Path(directory) / "tokenizer.json"
  if tokenizer is not None and teachers.is_hugging_face(directory) and teacher_tokenizer.exists():
    try:
      hf.check_same_tokenizer(directory, tokenizer)
    except ValueError as error:
      raise ConfigError(f"config.data.tokenizer: {error}") from None
    if teacher_outputs > num_classes:
      return num_classes
  if teacher_outputs == num_classes:
    return None
  raise ConfigError(
    f"config.teacher.checkpoint={directory!r}: the teacher has {teacher_outputs} outputs, the "
    f"data {num_classes} classes (vocabulary)"
  )


def _student_architecture(config, teacher_record, num_classes: int) -> tuple[str, dict, int]:
  """`(model name, create kwargs, classes)` of the student: `config.student`, or a copy of the
  teacher keeping the layers `config.student.teacher_layers` (MiniLM / Gemma-style
  initialisation), which keeps the teacher's output rows (a padded vocabulary included)."""
  try:
    layers = [int(layer) for layer in config.student.teacher_layers]
  except (TypeError, ValueError):
    raise _error(
      "student.teacher_layers", config.student.teacher_layers, "must be layer indices"
    ) from None
  if not layers:
    return config.student.model, config.student.kwargs.to_dict(), num_classes
  why = (
    "needs teacher.checkpoint"
    if teacher_record is None
    else "needs a transformer_lm teacher"
    if teacher_record["name"] != "transformer_lm"
    else ""
  )
  _require(not why, "student.teacher_layers", tuple(layers), why)
  kwargs = dict(teacher_record["create_kwargs"])
  num_layers = kwargs.get("num_layers")
  _require(
    layers == sorted(set(layers)) and 0 <= layers[0] and layers[-1] < num_layers,
    "student.teacher_layers",
    tuple(layers),
    f"must be increasing layer indices of the teacher's {num_layers}",
  )
  kwargs["num_layers"] = len(layers)
  if kwargs.get("layer_types"):
    kwargs["layer_types"] = [kwargs["layer_types"][layer] for layer in layers]
  teacher_classes = kwargs.pop("vocab_size")
  _require(
    teacher_classes >= num_classes,
    "student.teacher_layers",
    tuple(layers),
    f"the teacher has {teacher_classes} outputs, fewer than the data's {num_classes} classes",
  )
  return "transformer_lm", kwargs, teacher_classes


def _run_record(config, student_kwargs, num_classes: int, members) -> dict:
  """What a checkpoint's state is and the schedule it follows; a resumed run must match it.

  Passed through JSON, as it is stored, so that tuples compare equal to the lists read back.
  """
  record = {
    "student.model": config.student.model,
    "student.kwargs": dict(student_kwargs),
    "num_classes": num_classes,
    "data.name": config.data.name,
    "data.train_examples": config.data.train_examples,
    "data.batch_size": config.data.batch_size,
    "distill": config.distill.to_dict(),
    "optimizer": config.optimizer.to_dict(),
    "num_epochs": config.num_epochs,
    "seed": config.seed,
  }
  if members is not None:
    record["population.size"] = members.size
  return json.loads(json.dumps(record))


def resolve(config, workdir: str | None) -> Plan:
  """Checks `config` and the run's facts; returns the `Plan` (module docstring). Without a
  `workdir` (a command that trains nothing, e.g. `jaxkd.tools.store_teacher`) the plan has no
  run directories and no earlier run is checked."""
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
  settings = teacher_settings(config, in_step=False)
  teacher_record = _teacher_record(config, settings)
  student_model, student_kwargs, num_classes = _student_architecture(
    config, teacher_record, num_classes
  )
  student = _abstract_student(student_model, student_kwargs, num_classes)
  student_logits, student_features = _probe("student.model", task, student)
  _check_heads("student.model", student_logits, num_classes)
  teacher_features = {}
  if teacher_record is not None:
    try:
      abstract_teacher = teachers.abstract_model(settings.checkpoints[0])
    except ValueError as error:
      raise ConfigError(f"config.teacher.checkpoint: {error}") from None
    teacher_logits, teacher_features = _probe("teacher.checkpoint", task, abstract_teacher)
    settings = dataclasses.replace(
      settings,
      num_classes=_teacher_vocabulary(
        config, settings, teacher_logits.shape[-1], num_classes, tokenizer
      ),
    )

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
  if config.data.augment in data.MIXING_AUGMENTATIONS:
    _require(
      not method.label_terms,
      "data.augment",
      config.data.augment,
      f"a mixed view has no single label, and {method.label_terms[0] if method.label_terms else ''}"
      " reads the labels: distil with teacher terms only (function matching)",
    )
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
      config.data.augment == "none" and not isinstance(train_source, data.RandomViewSource),
      "data.augment",
      config.data.augment,
      "a cached teacher (teacher.cache.dir) holds the outputs of fixed views: use 'none' "
      "with a dataset read without random crops",
    )
    _check_cache_manifest(settings, config.data.name, num_train)

  try:
    members = population.parse(config.population)
    if members is not None:
      population.check(members, method.hparams)
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None

  sampler = _sampler(config, tokenizer, settings)
  run_record = _run_record(config, student_kwargs, num_classes, members)
  set_aside_previous_run = workdir is not None and _check_workdir(
    workdir, run_record, config.workdir_mismatch
  )
  return Plan(
    config=config,
    task=task,
    student_model=student_model,
    student_kwargs=student_kwargs,
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
    # A batch larger than the examples it covers only holds padding.
    eval_batch_size=min(
      config.data.eval_batch_size,
      math.ceil(max(config.data.eval_examples or len(test_source), num_train) / num_devices)
      * num_devices,
    ),
    mesh_shape=mesh_shape,
    method=method,
    teacher=settings,
    members=members,
    # XLA:CPU runs vmapped convolutions as slower grouped ones (population.train_step).
    population_chunk=1 if members is not None and jax.default_backend() == "cpu" else None,
    sampler=sampler,
    run_record=run_record,
    set_aside_previous_run=set_aside_previous_run,
    run_dirs=()
    if workdir is None
    else tuple(os.path.join(workdir, "members", name) for name in members.names)
    if members is not None
    else (workdir,),
  )


def _sampler(config, tokenizer, settings: teachers.Settings):
  """`config.sampling` as a `jaxkd.sampling.Sampler` (None when off)."""
  options = config.sampling
  if not options.kind:
    return None  # `_check_sampling` judged the rest from the config
  _require(
    settings.train_source == "live",
    "sampling.kind",
    options.kind,
    "the step scores the samples with the teacher: config.distill.losses needs a teacher term",
  )
  prompt_len = options.prompt_len or config.data.seq_len // 2
  default = lambda value: None if value < 0 else value  # -1 = the kind's default
  try:
    return sampling.Sampler(
      kind=options.kind,
      prompt_len=prompt_len,
      token_bytes=tokenizer.token_bytes,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id or 0,
      fraction=default(options.fraction),
      temperature=default(options.temperature),
      top_k=options.top_k,
      top_p=default(options.top_p),
      teacher_temperature=options.teacher_temperature,
      teacher_top_p=options.teacher_top_p,
      speculative_k=options.speculative_k,
      draft_tokens=options.draft_tokens,
    )
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None


def _open_data(config):
  """``(spec, tokenizer, train_source, test_source)``: an image dataset's spec and no tokenizer,
  or no spec and the tokenizer of a text corpus."""
  spec = data.DATASETS.get(config.data.name) if config.data.source in data.SOURCES else None
  tokenizer = open_tokenizer(config)
  train_source, test_source = (open_split(config, split, tokenizer) for split in ("train", "test"))
  return spec, tokenizer, train_source, test_source


def open_tokenizer(config):
  """The tokenizer of a text corpus ('bytes', or a Hugging Face directory, 'teacher' the
  teacher's); None for image data."""
  if config.data.source not in data.TEXT_SOURCES:
    return None
  directory = tokenizer_directory(config)
  if directory == "bytes":
    return data.ByteTokenizer()
  try:
    return hf.load_tokenizer(directory)
  except (OSError, ValueError) as error:
    raise ConfigError(f"config.data.tokenizer={directory!r}: {error}") from None


def open_split(config, split: str, tokenizer):
  """The random-access source of one split of the config's data (`tokenizer`: `open_tokenizer`'s)."""
  if tokenizer is None:
    return data.open_split(config.data.name, config.data.source, split, config.data.dir)
  try:
    return data.open_text_split(
      config.data.name,
      split,
      seq_len=config.data.seq_len,
      source=data.TEXT_SOURCES[config.data.source],
      data_dir=config.data.dir,
      tokenizer=tokenizer,
      text_key=config.data.text_key,
    )
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None


def tokenizer_directory(config) -> str:
  """`config.data.tokenizer` with 'teacher' resolved to the teacher's directory."""
  if config.data.tokenizer == "teacher":
    return config.teacher.checkpoint.split(",")[0]
  return config.data.tokenizer


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


def _check_workdir(workdir: str, run_record: Mapping[str, Any], policy: str) -> bool:
  """Whether the workdir's earlier run must be set aside for a fresh start.

  A workdir whose checkpoints were written by another run (another model, data, method,
  optimiser, batch size or schedule) is refused, naming the first field that differs, unless
  `config.workdir_mismatch` says 'fresh' (start over; the earlier run is kept aside) or
  'continue' (resume its weights under the new settings).
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return False  # a new run: nothing to compare, and nothing created
  saved = checkpoint.Checkpointer(workdir).run_info()
  if saved is None:
    return False
  difference = _first_difference(saved, run_record)
  if difference is None or policy == "continue":
    return False
  if policy == "fresh":
    return True
  key, was, asked = difference
  raise ConfigError(
    f"the workdir's checkpoints were written for {key} = {was!r}, the config asks for "
    f"{asked!r}; use another --workdir, or --config.workdir_mismatch=fresh (start over, the "
    "earlier run kept in <workdir>/previous-<n>/) or =continue (resume its weights with the new "
    "settings)"
  )


_ABSENT = "(absent)"


def _first_difference(saved: Mapping, asked: Mapping, prefix: str = "") -> tuple | None:
  """(dotted key, saved value, asked value) of the first leaf where two run records differ,
  descending into nested dicts so that the one line names `optimizer.schedule`, not the whole
  optimizer; None if they are equal."""
  for key in {**saved, **asked}:
    was, now = saved.get(key, _ABSENT), asked.get(key, _ABSENT)
    if was == now:
      continue
    if isinstance(was, Mapping) and isinstance(now, Mapping):
      return _first_difference(was, now, f"{prefix}{key}.")
    return f"{prefix}{key}", was, now
  return None
