"""Evaluate a saved model: `python -m jaxkd.evaluate --model DIR --config=configs/<file>.py[:arg]`.

    python -m jaxkd.evaluate --model /runs/kd/model --config=configs/cifar_kd.py \
        --config.teacher.checkpoint=/teachers/resnet32x4 --output /runs/kd/test.json

Evaluates any `jaxkd.models.io` directory (a run's `<workdir>/model`, a converted torchvision or
RepDistiller checkpoint) on the test split of the config's data (its first `data.eval_examples`,
0 = all), in batches of `data.eval_batch_size` over the config's mesh, with the step training
evaluates with (`jaxkd.step.eval_step`): top-1, top-5 (more than 5 classes), cross-entropy,
bits per byte (language models), and, when the config names a teacher (`teacher.checkpoint`,
one directory or an ensemble), agreement (same argmax) and KL(teacher ‖ student) at T = 1.
Images and language models alike; the config's training fields are not read.

Prints a table; `--output PATH` also writes the numbers as JSON. A problem the user fixes (the
config, the data, a model directory, a model that does not fit the data) is one `error:` line
on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Iterable, Mapping

import flax
import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from jaxkd import data, errors, parallel, step, tasks, teachers, xla_flags
from jaxkd.errors import ConfigError, UserError
from jaxkd.models import io as model_io
from jaxkd.train import summarize

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A configs/*.py file (get_config(arg); ':arg' picks a variant).", lock_config=True
)
_MODEL = flags.DEFINE_string("model", None, "The model directory to evaluate (jaxkd.models.io).")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON to this path.")
flags.mark_flags_as_required(["config", "model"])


@flax.struct.dataclass
class _Weights:
  """What `jaxkd.step.evaluate` reads of a train state: the student's `nnx.State`."""

  student: nnx.State


def _open_test_split(config) -> tuple[tasks.Task, data.DatasetSpec | None, int, object]:
  """``(task, spec, num_classes, test_source)`` of the config's data (spec None for text)."""
  source = config.data.source
  if source in data.SOURCES:
    if config.data.name not in data.DATASETS:
      raise ConfigError(
        f"config.data.name={config.data.name!r}: must be one of {', '.join(data.DATASETS)}"
      )
    spec = data.DATASETS[config.data.name]
    test = data.open_split(config.data.name, source, "test", config.data.dir)
    return tasks.Classification(image_shape=spec.image_shape), spec, spec.num_classes, test
  if source not in data.TEXT_SOURCES:
    raise ConfigError(
      f"config.data.source={source!r}: must be one of "
      f"{', '.join((*data.SOURCES, *data.TEXT_SOURCES))}"
    )
  tokenizer = _tokenizer(config.data.tokenizer)
  try:
    test = data.open_text_split(
      config.data.name,
      "test",
      seq_len=config.data.seq_len,
      source=data.TEXT_SOURCES[source],
      data_dir=config.data.dir,
      tokenizer=tokenizer,
      text_key=config.data.text_key,
    )
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None
  return tasks.CausalLM(seq_len=config.data.seq_len), None, tokenizer.vocab_size, test


def _tokenizer(name: str):
  if name == "bytes":
    return data.ByteTokenizer()
  from jaxkd.models import hf  # Deferred: the Hugging Face extra, only for its tokenizers.

  try:
    return hf.load_tokenizer(name)
  except (OSError, ValueError) as error:
    raise ConfigError(f"config.data.tokenizer={name!r}: {error}") from None


def _check_fits(what: str, record: Mapping, task: tasks.Task, num_classes: int) -> None:
  """The model of `record` reads the task's batches and has one output per class."""
  try:
    logits, _ = tasks.probe(task, teachers.abstract_model(record))
  except (TypeError, ValueError) as error:
    raise UserError(
      f"{what} ({record['name']}) does not accept the data's inputs: "
      f"{type(error).__name__}: {str(error).splitlines()[0]}"
    ) from None
  if logits.shape[-1] != num_classes:
    raise UserError(
      f"{what} ({record['name']}) has {logits.shape[-1]} outputs, the data {num_classes} "
      "classes (vocabulary)"
    )


def _check_batching(config, num_devices: int, num_test: int) -> None:
  batch_size, num_examples = config.data.eval_batch_size, config.data.eval_examples
  if batch_size <= 0 or batch_size % num_devices:
    raise ConfigError(
      f"config.data.eval_batch_size={batch_size!r}: must be a positive multiple of the "
      f"{num_devices} devices"
    )
  if not 0 <= num_examples <= num_test:
    raise ConfigError(
      f"config.data.eval_examples={num_examples!r}: must be in [0, {num_test}] (0 = the whole "
      "test split)"
    )


def _sum(eval_step, weights, teacher_state, mesh, batches: Iterable[Mapping]) -> dict:
  totals = None
  for host_batch in batches:
    sums = eval_step(weights, teacher_state, parallel.host_to_global(mesh, host_batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return jax.device_get(totals)


def evaluate(config, model_dir: str) -> dict:
  """The evaluation of the model in `model_dir` (see the module docstring) as a dict:
  `jaxkd.train.summarize`'s numbers plus what was evaluated ('model', 'architecture',
  'teacher', 'dataset', 'scored': examples or tokens counted)."""
  parallel.maybe_initialize_distributed(config)
  try:
    mesh = parallel.make_mesh(parallel.mesh_shape(config.mesh, jax.device_count()))
  except ValueError as error:
    raise ConfigError(f"config.mesh={dict(config.mesh)!r}: {error}") from None
  task, spec, num_classes, test_source = _open_test_split(config)
  _check_batching(config, jax.device_count(), len(test_source))
  try:
    settings = teachers.settings(config.teacher, in_step=False)
    teacher_record = (
      teachers.read_architecture(settings.checkpoints) if settings.checkpoints else None
    )
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None
  if teacher_record is not None and config.teacher.model not in ("", teacher_record["name"]):
    raise ConfigError(
      f"config.teacher.model={config.teacher.model!r}, but {settings.checkpoints[0]} holds a "
      f"{teacher_record['name']!r}"
    )
  record = model_io.read_metadata(model_dir)
  _check_fits(f"--model {model_dir}", record, task, num_classes)
  if teacher_record is not None:
    _check_fits("config.teacher.checkpoint", teacher_record, task, num_classes)

  model = model_io.load(model_dir, mesh=mesh)
  teacher = teachers.load(settings, task=task, feature_names=(), mesh=mesh)
  # Only the student graph and the task are read by `step.eval_step`.
  learner = step.Learner(
    student=nnx.graphdef(model), adapters=None, method=None, optimizer=None, task=task
  )
  eval_step = step.jit_eval_step(functools.partial(step.eval_step, learner), teacher.eval, mesh)
  batches = data.eval_batches(
    test_source,
    spec,
    global_batch_size=config.data.eval_batch_size,
    num_examples=config.data.eval_examples,
    num_threads=config.data.num_threads,
    num_workers=config.data.get("num_workers", 0),
  )
  with contextlib.closing(batches):  # stops the worker processes, if any, now
    sums = _sum(eval_step, _Weights(student=nnx.state(model)), teacher.state, mesh, batches)
  return {
    "model": model_dir,
    "architecture": record["name"],
    "teacher": ",".join(settings.checkpoints) or None,
    "dataset": config.data.name,
    "scored": int(sums["count"]),
    **summarize(sums),
  }


# Table rows: result key → (label, format); percentages for fractions.
_ROWS = {
  "accuracy": ("top-1 (%)", lambda v: f"{100 * v:.2f}"),
  "top5": ("top-5 (%)", lambda v: f"{100 * v:.2f}"),
  "loss": ("cross-entropy (nats)", lambda v: f"{v:.4f}"),
  "bits_per_byte": ("bits per byte", lambda v: f"{v:.4f}"),
  "agreement": ("agreement with the teacher (%)", lambda v: f"{100 * v:.2f}"),
  "kl": ("KL(teacher ‖ student) (nats)", lambda v: f"{v:.4f}"),
}


def format_table(results: Mapping) -> str:
  """A two-column Markdown table of `evaluate`'s results."""
  unit = "tokens" if "bits_per_byte" in results else "examples"
  rows = [
    ("model", f"{results['model']} ({results['architecture']})"),
    *([("teacher", results["teacher"])] if results["teacher"] else []),
    ("data", f"{results['dataset']}, test split, {results['scored']:,} {unit}"),
    *[(label, fmt(results[key])) for key, (label, fmt) in _ROWS.items() if key in results],
  ]
  lines = ["| metric | value |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows]]
  return "\n".join(lines)


def _flag_error_message(error: BaseException) -> str:
  """One line for a command-line error (as `jaxkd.main` words it)."""
  # config_flags re-raises an error of get_config, its traceback pasted into the message, as
  # the same type: the innermost user error of the chain is the one to show.
  user_error, cause = None, error
  while cause is not None:
    if isinstance(cause, UserError):
      user_error = cause
    cause = cause.__cause__ or cause.__context__
  if user_error is not None:
    return str(user_error)
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections' answer to a misspelt `--config.<field>`: AttributeError(KeyError(...)).
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]
    message = str(error.args[0] if error.args else error).replace("\n", ": ")
    return f"--config override of a field the config does not have: {message}"
  return " ".join(str(error).split())


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an error ends the program with one `error:` line and status 1."""
  try:
    remaining_argv = flags.FLAGS(argv)
    _CONFIG.value.get("data")  # A config file that cannot be loaded fails here.
    return remaining_argv
  except (flags.Error, AttributeError, KeyError, OSError) as error:
    print(f"error: {_flag_error_message(error)}", file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  xla_flags.configure_cpu()  # Before the first backend starts, as `jaxkd.main` does.
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they open at INFO
  try:
    results = evaluate(_CONFIG.value, _MODEL.value)
  except errors.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() != 0:
    return
  print(format_table(results))
  if _OUTPUT.value:
    try:
      with open(_OUTPUT.value, "w") as f:
        json.dump(results, f, indent=2)
    except OSError as error:
      print(f"error: --output {_OUTPUT.value}: {error.strerror}", file=sys.stderr)
      sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
