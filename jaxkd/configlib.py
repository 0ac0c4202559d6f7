"""The training config: every field with its default and meaning, and its validation.

Config files (configs/*.py) start from `base_config()` and override what their experiment
changes; `python -m jaxkd.main` locks the result, so `--config.x=y` can change a field but a
misspelt one is an error. `validate` runs before anything is built or compiled and raises
`ConfigError` with one line naming the offending field.
"""

import ml_collections

from jaxkd import data, optim
from jaxkd.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment: a supervised run of a small CNN on Fashion-MNIST."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds the student's init, the data order and the augmentation.

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"  # A key of jaxkd.data.DATASETS: 'fashion_mnist', 'cifar100'.
  config.data.source = "idx"  # 'idx': four IDX files in data.dir; 'tfds': prepared array_record.
  config.data.dir = ""  # '' = the default place (Debian's IDX directory / the TFDS data dir).
  config.data.train_examples = 0  # 0 = the whole train split; N = its first N examples.
  config.data.batch_size = 128  # Global batch (split over all devices of all processes).
  config.data.eval_batch_size = 1000  # Global batch of the test-split evaluation.
  config.data.augment = "none"  # A name in jaxkd.data.AUGMENTATIONS, applied inside the step.
  config.data.num_threads = 2  # grain threads reading and normalising host batches.

  # The model being trained; jaxkd.models.create(model, num_classes=<dataset's>, **kwargs).
  config.student = ml_collections.ConfigDict()
  config.student.model = "small_cnn"  # A name in jaxkd.models.names().
  config.student.kwargs = ml_collections.ConfigDict()  # Extra create() arguments (widths, ...).

  # The teacher: a jaxkd.models.io directory (what every finished run exports to
  # <workdir>/model, or `python -m jaxkd.tools.import_torch` writes). Without one, the run is
  # plain supervised training; with one, evaluation also reports agreement and KL with it.
  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = ""  # Expected architecture name (checked against the directory).
  config.teacher.checkpoint = ""  # '' = no teacher.
  config.teacher.kwargs = ml_collections.ConfigDict()  # create() arguments when a run trains it.
  # Cached teacher (jaxkd.teacher_cache): with a dir, the teacher's outputs on every training
  # example are computed once into it (if absent; reused and verified against the data and the
  # teacher weights otherwise) and training reads them instead of running the teacher. Only for
  # fixed views (data.augment='none'); evaluation still runs the teacher.
  config.teacher.cache = ml_collections.ConfigDict()
  config.teacher.cache.dir = ""  # '' = run the teacher inside every step.
  config.teacher.cache.topk = 0  # 0 = dense logits; k = the k largest log-probabilities.

  # The distillation method (jaxkd.distill): loss name → weight, and one settings dict per loss.
  config.distill = ml_collections.ConfigDict()
  config.distill.losses = ml_collections.ConfigDict({"ce": 1.0})

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # 'sgd' (PyTorch SGD: coupled L2 decay) or 'adamw'.
  config.optimizer.lr = 0.05  # Peak learning rate.
  config.optimizer.momentum = 0.9  # SGD momentum (0 = plain SGD).
  config.optimizer.nesterov = False  # SGD with Nesterov momentum.
  config.optimizer.b1 = 0.9  # AdamW β1.
  config.optimizer.b2 = 0.999  # AdamW β2.
  config.optimizer.weight_decay = 5e-4  # SGD: L2 added to the gradient; AdamW: decoupled.
  config.optimizer.schedule = "cosine"  # 'step', 'cosine' or 'constant'.
  config.optimizer.decay_epochs = ()  # 'step': epochs after which lr is multiplied by…
  config.optimizer.decay_factor = 0.1  # … this factor.
  config.optimizer.warmup_epochs = 0.0  # Linear warm-up from 0, in (fractional) epochs.

  # Student population (jaxkd.population): `size` students trained in one compiled step, sharing
  # the data order, the views and the teacher forward; member i takes the i-th value of every
  # sweep key. Keys nest (a ConfigDict refuses dots): {'kd': {'temperature': [1., 2., 4., 8.]}},
  # {'losses': {'kd': [...]}}, 'seed' (RNG stream and initial weights), 'learning_rate_scale'.
  # Each member gets <workdir>/members/<name>/ (metrics, TensorBoard, model, results).
  config.population = ml_collections.ConfigDict()
  config.population.size = 1  # 1 = one student, the plain run.
  config.population.sweep = ml_collections.ConfigDict()  # Key → list of `size` values.

  config.num_epochs = 10  # Length of the run; steps = num_epochs · (train examples // batch).
  config.stop_at_step = 0  # 0 = run to the end; N = checkpoint and exit after step N (job limits).
  config.log_every_steps = 100  # Console line + metrics.jsonl/TensorBoard train scalars.
  config.eval_every_epochs = 0  # 0 = evaluate at the end only.
  config.checkpoint_every_steps = 1000  # Also at the end and at stop_at_step.
  config.keep_checkpoints = 2  # Older checkpoints are deleted.

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # -1: all remaining devices.
  # Multi-process runs: '' = single process, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  # JAX_PROCESS_ID from the environment; 'auto' = let JAX detect the cluster (SLURM, Cloud TPU).
  config.distributed = ""
  return config


def _check(condition: bool, field: str, value, why: str) -> None:
  if not condition:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _check_choice(field: str, value, choices) -> None:
  _check(value in choices, field, value, f"must be one of {', '.join(map(str, choices))}")


def validate(config) -> None:
  """Static checks of `config` (no data read, no model built); ConfigError on the first failure."""
  from jaxkd import distill, models  # Importing the zoo and the methods registers their names.
  from jaxkd import population

  _check_choice("data.name", config.data.name, tuple(data.DATASETS))
  _check_choice("data.source", config.data.source, data.SOURCES)
  _check_choice("data.augment", config.data.augment, data.AUGMENTATIONS)
  for field, value in (
    ("data.batch_size", config.data.batch_size),
    ("data.eval_batch_size", config.data.eval_batch_size),
    ("num_epochs", config.num_epochs),
    ("log_every_steps", config.log_every_steps),
    ("checkpoint_every_steps", config.checkpoint_every_steps),
    ("keep_checkpoints", config.keep_checkpoints),
  ):
    _check(value > 0, field, value, "must be positive")
  _check(
    config.data.train_examples >= 0,
    "data.train_examples",
    config.data.train_examples,
    "must be 0 (all) or positive",
  )
  _check_choice("student.model", config.student.model, models.names())
  if config.teacher.model:
    _check_choice("teacher.model", config.teacher.model, models.names())

  _check(
    len(config.distill.losses) > 0,
    "distill.losses",
    dict(config.distill.losses),
    "name at least one loss",
  )
  for name in config.distill.losses:
    _check_choice(f"distill.losses.{name}", name, distill.names())

  _check_choice("optimizer.name", config.optimizer.name, optim.OPTIMIZERS)
  _check_choice("optimizer.schedule", config.optimizer.schedule, optim.SCHEDULES)
  _check(config.optimizer.lr > 0, "optimizer.lr", config.optimizer.lr, "must be positive")
  decay_epochs = tuple(config.optimizer.decay_epochs)
  _check(
    list(decay_epochs) == sorted(decay_epochs)
    and all(0 < epoch < config.num_epochs for epoch in decay_epochs),
    "optimizer.decay_epochs",
    decay_epochs,
    f"must increase within (0, num_epochs={config.num_epochs})",
  )
  _check(
    config.optimizer.warmup_epochs < config.num_epochs,
    "optimizer.warmup_epochs",
    config.optimizer.warmup_epochs,
    f"must be shorter than num_epochs={config.num_epochs}",
  )
  _check(config.stop_at_step >= 0, "stop_at_step", config.stop_at_step, "must be 0 or positive")

  population_size = population_config(config)["size"]
  _check(
    population_size >= 1, "population.size", population_size, "must be 1 (one student) or more"
  )
  try:
    population.member_overrides(population_config(config))
  except ValueError as error:
    raise ConfigError(f"config.population.sweep: {error}") from None
  cache = teacher_cache_config(config)
  _check(
    cache["topk"] >= 0, "teacher.cache.topk", cache["topk"], "must be 0 (dense logits) or positive"
  )
  if cache["dir"]:
    _check(
      config.data.augment == "none",
      "data.augment",
      config.data.augment,
      "a cached teacher (teacher.cache.dir) holds the outputs of fixed views: use 'none'",
    )
    _check(
      bool(config.teacher.checkpoint),
      "teacher.checkpoint",
      config.teacher.checkpoint,
      "teacher.cache.dir needs the teacher the cache is computed from (and evaluated with)",
    )


def population_config(config) -> dict:
  """`config.population` as the plain dict `jaxkd.population` reads; a config built without
  the field (not from `base_config`) is a population of one."""
  return config.population.to_dict() if "population" in config else {"size": 1, "sweep": {}}


def teacher_cache_config(config) -> dict:
  """`config.teacher.cache` as a plain dict; without the field, no cache."""
  return config.teacher.cache.to_dict() if "cache" in config.teacher else {"dir": "", "topk": 0}


def check_teacher_given(config) -> None:
  """Teacher-reading losses need `teacher.checkpoint` (checked after the data, the first hurdle)."""
  from jaxkd import distill

  for name in config.distill.losses:
    _check(
      not distill.get(name).needs_teacher or config.teacher.checkpoint,
      "teacher.checkpoint",
      config.teacher.checkpoint,
      f"loss {name!r} needs a teacher: set a jaxkd.models.io "
      "directory (a finished run's <workdir>/model)",
    )


def check_batch_sizes(config, num_devices: int) -> None:
  """Global batches must split evenly over the devices (and hence over the processes)."""
  for field in ("batch_size", "eval_batch_size"):
    value = config.data[field]
    _check(
      value % num_devices == 0,
      f"data.{field}",
      value,
      f"must be a multiple of the {num_devices} devices",
    )


def check_data_size(config, num_train: int) -> None:
  _check(
    config.data.train_examples <= num_train,
    "data.train_examples",
    config.data.train_examples,
    f"the train split has only {num_train} examples",
  )
  _check(
    (config.data.train_examples or num_train) >= config.data.batch_size,
    "data.batch_size",
    config.data.batch_size,
    "is larger than the training set",
  )


def check_model(field: str, model, spec: data.DatasetSpec) -> None:
  """Runs `model` abstractly on one batch of the dataset's shape: the input must fit and the
  logits must have one entry per class of the dataset."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, state = nnx.split(model)

  def forward(state, images):
    return nnx.merge(graphdef, state)(images, train=False)[0]

  images = jax.ShapeDtypeStruct((2, *spec.image_shape), jnp.float32)
  try:
    logits = jax.eval_shape(forward, state, images)
  except (TypeError, ValueError) as error:
    raise ConfigError(
      f"config.{field}: the model does not accept images of shape "
      f"{spec.image_shape} ({type(error).__name__}: "
      f"{str(error).splitlines()[0]})"
    ) from None
  _check(
    logits.shape == (2, spec.num_classes),
    field,
    logits.shape[-1],
    f"the model has {logits.shape[-1]} outputs, the dataset {spec.num_classes} classes",
  )


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style config argument: `configs/x.py:key=value,flag` → typed fields.

  Every key must be one of `defaults`, and its value is converted to the default's type; a
  bare `flag` sets the boolean `flag` to True. `parse_arg('smoke', smoke=False, seeds=3)` gives
  `{'smoke': True, 'seeds': 3}`.
  """
  parsed = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(
        f"unknown config argument {key!r}; this config takes {', '.join(sorted(defaults))}"
      )
    kind = type(defaults[key])
    if kind is bool:
      parsed[key] = (value.lower() in ("1", "true", "yes")) if has_value else True
    else:
      parsed[key] = kind(value)
  return ml_collections.ConfigDict(parsed)
