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
from collections.abc import Iterable, Mapping

import flax
import jax
from absl import app, flags, logging
from etils import epath
from flax import nnx

from jaxkd import cli, data, errors, metrics, parallel, plan, step, tasks, teachers, xla_flags
from jaxkd.errors import ConfigError, UserError
from jaxkd.models import io as model_io

_FLAGS, _CONFIG = cli.tool_flags()
_MODEL = flags.DEFINE_string(
  "model", None, "The model directory to evaluate (jaxkd.models.io).", flag_values=_FLAGS
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Also write the results as JSON to this path.", flag_values=_FLAGS
)
flags.mark_flags_as_required(["model"], flag_values=_FLAGS)


@flax.struct.dataclass
class _Weights:
  """What `jaxkd.step.evaluate` reads of a train state: the student's `nnx.State`."""

  student: nnx.State


def _open_test_split(config) -> tuple[tasks.Task, data.DatasetSpec | None, int, object]:
  """``(task, spec, num_classes, test_source)`` of the config's data (spec None for text)."""
  source = config.data.source
  if source not in (*data.SOURCES, *data.TEXT_SOURCES):
    raise ConfigError(
      f"config.data.source={source!r}: must be one of "
      f"{', '.join((*data.SOURCES, *data.TEXT_SOURCES))}"
    )
  if source in data.SOURCES and config.data.name not in data.DATASETS:
    raise ConfigError(
      f"config.data.name={config.data.name!r}: must be one of {', '.join(data.DATASETS)}"
    )
  tokenizer = plan.open_tokenizer(config)
  test = plan.open_split(config, "test", tokenizer)
  if tokenizer is not None:
    return tasks.CausalLM(seq_len=config.data.seq_len), None, tokenizer.vocab_size, test
  spec = data.DATASETS[config.data.name]
  return tasks.Classification(image_shape=spec.image_shape), spec, spec.num_classes, test


def _check_fits(what: str, directory: str, task: tasks.Task, num_classes: int) -> None:
  """The model in `directory` reads the task's batches and has one output per class."""
  if teachers.is_hugging_face(directory):
    try:
      record = teachers.read_record(directory)
    except ValueError as error:
      raise UserError(f"{what}: {error}") from None
  else:
    record = model_io.read_metadata(directory)  # CheckpointNotFoundError, CheckpointError
  try:
    logits, _ = tasks.probe(task, teachers.abstract_model(directory))
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
  `jaxkd.metrics.summarize`'s numbers plus what was evaluated ('model', 'architecture',
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
  _check_fits(f"--model {model_dir}", model_dir, task, num_classes)
  if teacher_record is not None:
    _check_fits("config.teacher.checkpoint", settings.checkpoints[0], task, num_classes)

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
    num_workers=config.data.num_workers,
  )
  with contextlib.closing(batches):  # stops the worker processes, if any, now
    sums = _sum(eval_step, _Weights(student=nnx.state(model)), teacher.state, mesh, batches)
  return {
    "model": model_dir,
    "architecture": teachers.read_record(model_dir)["name"],
    "teacher": ",".join(settings.checkpoints) or None,
    "dataset": config.data.name,
    "scored": int(sums["count"]),
    **metrics.summarize(sums),
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  xla_flags.configure_cpu()  # Before the first backend starts, as `jaxkd.main` does.
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they open at INFO
  try:
    results = evaluate(_CONFIG.value, _MODEL.value)
  except errors.UserError as error:
    cli.exit_with_error(error)
  if jax.process_index() != 0:
    return
  print(format_table(results))
  if _OUTPUT.value:
    try:
      epath.Path(_OUTPUT.value).write_text(json.dumps(results, indent=2))
    except OSError as error:
      cli.exit_with_error(UserError(f"--output {_OUTPUT.value}: {error.strerror}"))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.tool_flags_parser(_FLAGS, _CONFIG))
