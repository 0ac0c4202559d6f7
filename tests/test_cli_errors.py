"""Every bad input of `python -m jaxkd.main` ends in one clear line.

The product rule (`jaxkd.errors`): a mistake the user fixes (the command line, the config, the
data, a teacher or workdir on disk) ends the program with

* exit status 1 and no traceback;
* one `error:` line on stderr naming the field, path or value, the last non-empty line printed
  (nothing on stdout, no line of jax probing a TPU without libtpu);
* nothing compiled and the workdir untouched: a new one is not created, an existing one keeps
  every file byte for byte.

`test_one_error_line` checks that rule on a table of cases, each a fresh interpreter running the
command a user types: the quickstart's smoke config as one run (`--config.experiment=`), or
`configs/lm_kd.py:smoke` for text, on the fake IDX dataset, with teacher directories and
damaged copies of the dataset written here, and 'trained' workdirs: copies of one holding the
checkpoint of a one-step run. All selected cases start together, one process per core, when the
first one is asked for. `test_accepted_value_runs` runs the odd values that must work.

`test_config_fuzz` draws any leaf of the quickstart's config and a bad value (wrong type,
negative, zero, huge, nan, empty, unknown name, random text), applies it as the command line
does (`jaxkd.cli.read_flags` on ml_collections' override flags) and resolves the plan in this
process: only a `UserError`, or success, may come out, and the workdir is not created. What it
found is kept as regression cases (`_FOUND_BY_FUZZ`, `test_plan_refuses`).
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from jaxkd import errors, experiments, models, plan
from jaxkd import cli
from jaxkd.data import idx
from jaxkd.models import io as model_io

import testing_utils

# ml_collections loads config files with the deprecated `load_module`.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

# The quickstart's smoke config as one training run (not its comparison) on the fake dataset
# (128 training images: the students' 256 would not fit), with a 10-class teacher.
_QUICKSTART = (
  "--config=configs/quickstart.py:smoke",
  "--config.experiment=",
  "--config.data.dir=<data>",
  "--config.data.train_examples=64",
  "--config.teacher.checkpoint=<teacher>",
)
_LM = ("--config=configs/lm_kd.py:smoke", "--config.experiment=")
_TEACHER_KWARGS = {"widths": (8, 16, 32), "depth": 1, "flatten": True}  # small: only read
_LM_TEACHER_KWARGS = {"num_layers": 1, "width": 32, "num_heads": 2}  # lm_kd.py:smoke's teacher


@dataclasses.dataclass(frozen=True)
class Case:
  """One command and what its error line must name.

  args: appended to `base`; `<name>` stands for the path `name` of the `assets` fixture.
  names: substrings of the `error:` line (the field, path or value).
  workdir: 'new' (must not be created), 'trained' (a copy of a workdir holding a checkpoint,
    which must keep its files byte for byte) or 'started' (a failure only the run can find: it
    writes the workdir, and logs before the error line).
  env: environment variables for the command (None: unset).
  xfail: why the case fails today, with the fix it waits for (a strict xfail); '' if it passes.
  """

  id: str
  args: tuple[str, ...]
  names: tuple[str, ...]
  base: tuple[str, ...] = _QUICKSTART
  workdir: str = "new"
  env: tuple[tuple[str, str | None], ...] = ()
  xfail: str = ""


_CASES = (
  # The command line and the config file.
  Case("misspelt_field", ("--config.data.batch_sizee=32",), ('Did you mean "batch_size"',)),
  Case("wrong_type_int", ("--config.num_epochs=abc",), ("--config.num_epochs=abc",)),
  Case("wrong_type_float_for_int", ("--config.data.batch_size=1.5",), ("batch_size=1.5",)),
  Case(
    "unknown_config_argument",
    ("--config=configs/quickstart.py:smok",),
    ("unknown config argument 'smok'",),
    base=(),
  ),
  Case(
    "missing_config_file",
    ("--config=configs/quickstar.py", "--config.seed=1"),
    ("configs/quickstar.py",),
    base=(),
  ),
  Case("unexpected_argument", ("extra",), ("unexpected arguments: extra",)),
  Case("workdir_is_a_file", ("--workdir=<data>/train-images-idx3-ubyte",), ("is a file",)),
  Case("unknown_experiment", ("--config.experiment=compar",), ("config.experiment='compar'",)),
  # Config values.
  Case("unknown_student", ("--config.student.model=resnet9",), ("config.student.model='resnet9'",)),
  Case(
    "unknown_loss",
    ('--config.distill.losses={"ce": 0.1, "kdd": 0.9}',),
    ("config.distill.losses.kdd='kdd'",),
    workdir="trained",
  ),
  Case(
    "missing_feature",
    (
      '--config.distill={"losses": {"ce": 1.0, "fitnet": 1.0}, "fitnet": {"features": ["stage7"]}}',
    ),
    ("config.distill", "fitnet", "'stage7'"),
  ),
  Case("temperature_zero", ("--config.distill.kd.temperature=0",), ("kd.temperature=0",)),
  Case("temperature_negative", ("--config.distill.kd.temperature=-1",), ("kd.temperature=-1",)),
  Case("negative_loss_weight", ("--config.distill.losses.kd=-0.5",), ("losses.kd=-0.5",)),
  Case(
    "jsd_beta_above_one",
    ('--config.distill={"losses": {"ce": 1.0, "jsd": 1.0}, "jsd": {"beta": 1.5}}',),
    ("jsd.beta=1.5",),
  ),
  Case("population_size_zero", ("--config.population.size=0",), ("config.population.size=0",)),
  Case(
    "bad_sweep_key",
    (
      "--config.population.size=2",
      '--config.population.sweep={"kd": {"temperatur": [1.0, 2.0]}}',
    ),
    ("config.population.sweep", "'kd.temperatur'"),
  ),
  Case(
    "batch_not_divisible_by_devices",
    ("--config.data.batch_size=12",),
    ("config.data.batch_size=12", "8 devices"),
    env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),),
  ),
  # Teachers.
  Case(
    "teacher_missing",
    ("--config.teacher.checkpoint=<tmp>/no_teacher",),
    ("config.teacher.checkpoint", "no_teacher"),
  ),
  Case(
    "teacher_not_a_model_directory",
    ("--config.teacher.checkpoint=<data>",),
    ("config.teacher.checkpoint", "<data>", "model.json"),
  ),
  Case(
    "teacher_of_another_architecture",
    ("--config.teacher.model=resnet8",),
    ("config.teacher.model='resnet8'", "'small_cnn'"),
    # The only case that starts the backends with JAX_PLATFORMS unset: jax probes the TPU.
    env=(("JAX_PLATFORMS", None),),
  ),
  Case(
    "teacher_class_count",
    ("--config.teacher.checkpoint=<teacher_7_classes>",),
    ("config.teacher.checkpoint", "<teacher_7_classes>", "7 outputs", "10 classes"),
  ),
  Case(
    "teacher_vocabulary",
    ("--config.teacher.checkpoint=<lm_teacher_300>",),
    ("config.teacher.checkpoint", "<lm_teacher_300>", "300 outputs", "259"),
    base=_LM,
  ),
  Case(
    "sampling_without_a_teacher",
    ("--config.sampling.kind=on_policy",),
    ("config.sampling.kind='on_policy'", "live teacher"),
    base=_LM,
  ),
  Case(
    "sampling_images",
    ("--config.sampling.kind=seq_kd", "--config.teacher.checkpoint=<teacher>"),
    ("config.sampling.kind='seq_kd'", "must be text"),
  ),
  Case(
    "sampling_kind_unknown",
    ("--config.sampling.kind=onpolicy",),
    ("config.sampling.kind='onpolicy'", "on_policy"),
    base=_LM,
  ),
  Case(
    "teacher_model_json_disagrees_with_weights",
    ("--config.teacher.checkpoint=<teacher_wrong_json>",),
    ("<teacher_wrong_json>/model.json", "weights"),
    workdir="trained",
  ),
  Case(
    "teacher_model_json_unknown_argument",
    ("--config.teacher.checkpoint=<teacher_bad_kwarg>",),
    ("<teacher_bad_kwarg>", "bogus"),
  ),
  # Data.
  Case(
    "missing_data_directory",
    ("--config.data.dir=<tmp>/no_data",),
    ("no_data/train-images-idx3-ubyte", "does not exist"),
  ),
  Case(
    "idx_garbage_bytes",
    ("--config.data.dir=<garbage>",),
    ("<garbage>/train-images-idx3-ubyte", "not an IDX file"),
    workdir="trained",
  ),
  Case(
    "idx_truncated",
    ("--config.data.dir=<truncated>",),
    ("<truncated>/train-labels-idx1-ubyte", "header says shape"),
  ),
  Case(
    "idx_gz_not_gzip",
    ("--config.data.dir=<not_gzip>",),
    ("<not_gzip>/t10k-images-idx3-ubyte.gz", "not gzip"),
  ),
  Case(
    "idx_gz_truncated",
    ("--config.data.dir=<truncated_gzip>",),
    ("<truncated_gzip>/t10k-labels-idx1-ubyte.gz", "truncated or damaged gzip"),
  ),
  Case(
    "idx_wrong_magic",
    ("--config.data.dir=<wrong_magic>",),
    ("<wrong_magic>/train-images-idx3-ubyte", "bad magic number 00004203"),
  ),
  Case(
    "idx_images_of_another_size",
    ("--config.data.dir=<images_32x32>",),
    ("<images_32x32>/train-images-idx3-ubyte", "28×28"),
  ),
  Case(
    "idx_labels_out_of_range",
    ("--config.data.dir=<labels_out_of_range>",),
    ("<labels_out_of_range>/train-labels-idx1-ubyte", "10 classes"),
  ),
  # The workdir.
  Case(
    "workdir_of_another_run",
    ("--config.student.kwargs.widths=(4, 8, 16)",),
    ("student.kwargs", "[8, 16, 32]", "[4, 8, 16]", "--workdir"),
    workdir="trained",
  ),
  # What only the run can find: the line still comes last, after the step lines.
  Case(
    "training_diverges",
    ("--config.optimizer.lr=1e30", "--config.log_every_steps=1"),
    ("step 2", "not finite"),
    workdir="started",
  ),
  # The comparison.
  Case(
    "compare_without_seeds",
    ("--config.compare.teacher_train_examples=64", "--config.compare.seeds=0"),
    ("config.compare.seeds=0",),
    base=_QUICKSTART[:1] + _QUICKSTART[2:4],  # the comparison itself
  ),
)


# --- Fixtures: teachers and damaged datasets (in this process), a trained workdir. ---


def _save_model(directory, name: str, **create_kwargs) -> str:
  """A model directory of `name` with zero weights (what matters here is its layout)."""
  model = nnx.eval_shape(lambda: models.create(name, **create_kwargs))
  state = nnx.state(model)
  zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, zeros)
  nnx.update(model, state)
  model_io.save(directory, model, name, **create_kwargs)
  return str(directory)


def _edited_model_json(source: str, directory, **create_kwargs) -> str:
  """A copy of the model directory `source` whose model.json has `create_kwargs` updated."""
  shutil.copytree(source, directory)
  path = os.path.join(directory, "model.json")
  with open(path) as f:
    record = json.load(f)
  record["create_kwargs"].update(create_kwargs)
  with open(path, "w") as f:
    json.dump(record, f)
  return str(directory)


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(np.uint8).tobytes()


def _damaged_datasets(idx_dir: str, root) -> dict[str, str]:
  """Copies of the fake dataset, each with one file replaced: name → directory."""
  with open(os.path.join(idx_dir, "train-labels-idx1-ubyte"), "rb") as f:
    labels = f.read()
  with open(os.path.join(idx_dir, "t10k-labels-idx1-ubyte.gz"), "rb") as f:
    gzip_labels = f.read()
  damages = {
    "garbage": ("train-images-idx3-ubyte", b"\xff" + os.urandom(64)),
    "truncated": ("train-labels-idx1-ubyte", labels[: len(labels) // 2]),
    "not_gzip": ("t10k-images-idx3-ubyte.gz", b"this is not gzip data"),
    "truncated_gzip": ("t10k-labels-idx1-ubyte.gz", gzip_labels[: len(gzip_labels) // 2]),
    "wrong_magic": ("train-images-idx3-ubyte", bytes([0, 0, 0x42, 3]) + bytes(64)),
    "images_32x32": ("train-images-idx3-ubyte", _idx_bytes(np.zeros((128, 32, 32)))),
    "labels_out_of_range": ("train-labels-idx1-ubyte", _idx_bytes(np.full(128, 12))),
  }
  directories = {}
  for name, (file_name, content) in damages.items():
    directories[name] = str(root / name)
    shutil.copytree(idx_dir, directories[name])
    with open(os.path.join(directories[name], file_name), "wb") as f:
      f.write(content)
  return directories


@pytest.fixture(scope="module")
def assets(idx_dir, tmp_path_factory) -> dict[str, str]:
  """The paths a case's `<name>` stands for (but 'trained': `outcomes` makes it)."""
  root = tmp_path_factory.mktemp("cli_errors")
  teacher = _save_model(root / "teacher", "small_cnn", num_classes=10, **_TEACHER_KWARGS)
  return {
    "tmp": str(root),
    "data": idx_dir,
    "teacher": teacher,
    "teacher_7_classes": _save_model(
      root / "teacher_7", "small_cnn", num_classes=7, **_TEACHER_KWARGS
    ),
    "lm_teacher_300": _save_model(
      root / "lm_teacher", "transformer_lm", num_classes=300, **_LM_TEACHER_KWARGS
    ),
    "teacher_wrong_json": _edited_model_json(
      teacher, root / "teacher_wrong_json", widths=[4, 16, 32]
    ),
    "teacher_bad_kwarg": _edited_model_json(teacher, root / "teacher_bad_kwarg", bogus=1),
    **_damaged_datasets(idx_dir, root),
  }


def _substitute(args, paths: dict[str, str]) -> tuple[str, ...]:
  return tuple(re.sub(r"<(\w+)>", lambda match: paths[match.group(1)], arg) for arg in args)


def _main(args, env=()) -> subprocess.CompletedProcess:
  """`python -m jaxkd.main ARGS` on one CPU device, with `env` changes (None: unset)."""
  environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  for name, value in env:
    if value is None:
      environment.pop(name, None)
    else:
      environment[name] = value
  return subprocess.run(
    [sys.executable, "-m", "jaxkd.main", *args],
    cwd=testing_utils.REPO,
    env=environment,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _train_briefly(paths: dict[str, str], workdir: str) -> str:
  """The 'trained' workdir: one step of a cross-entropy run (no teacher), checkpointed."""
  result = _main(
    (
      *_substitute(_QUICKSTART, paths),
      '--config.distill={"losses": {"ce": 1.0}}',
      "--config.stop_at_step=1",
      f"--workdir={workdir}",
    )
  )
  assert result.returncode == 0, result.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1")), os.listdir(workdir)
  return workdir


def _snapshot(directory: str) -> dict[str, str] | None:
  """{relative path: sha256 of the content} of every file ('/'-ended paths: directories)."""
  if not os.path.exists(directory):
    return None
  entries = {}
  for parent, dirnames, filenames in os.walk(directory):
    for name in dirnames:
      entries[os.path.relpath(os.path.join(parent, name), directory) + "/"] = ""
    for name in filenames:
      path = os.path.join(parent, name)
      with open(path, "rb") as f:
        entries[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return entries


@dataclasses.dataclass(frozen=True)
class Outcome:
  result: subprocess.CompletedProcess
  before: dict[str, str] | None  # the workdir's snapshot before the command
  after: dict[str, str] | None


def _run_case(case: Case, paths: dict[str, str], trained, workdir: str) -> Outcome:
  if case.workdir == "trained":
    shutil.copytree(trained.result(), workdir)
  before = _snapshot(workdir)
  args = (*case.base, f"--workdir={workdir}", *case.args)  # a case's own --workdir comes last
  result = _main(_substitute(args, paths), case.env)
  return Outcome(result, before, _snapshot(workdir))


@pytest.fixture(scope="module")
def outcomes(request, assets, tmp_path_factory):
  """id → Future[Outcome] of every selected case, all started on first use, one per core."""
  selected = {
    item.callspec.params["case"].id
    for item in request.session.items
    if item.originalname == "test_one_error_line"
  }
  root = tmp_path_factory.mktemp("workdirs")
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
    trained = pool.submit(_train_briefly, assets, str(root / "trained"))
    yield {
      case.id: pool.submit(_run_case, case, assets, trained, str(root / case.id))
      for case in _CASES
      if case.id in selected
    }


def _params(cases):
  return [
    pytest.param(
      case,
      id=case.id,
      marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [],
    )
    for case in cases
  ]


@pytest.mark.parametrize("case", _params(_CASES))
def test_one_error_line(case, outcomes, assets):
  outcome = outcomes[case.id].result()
  stderr = outcome.result.stderr
  assert outcome.result.returncode == 1, stderr
  assert "Traceback" not in stderr, stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error: "), stderr
  assert sum(line.startswith("error: ") for line in lines) == 1, stderr
  for name in _substitute(case.names, assets):
    assert name in lines[-1], lines[-1]
  assert not outcome.result.stdout.strip(), outcome.result.stdout
  # jax's probe of a TPU without libtpu is not shown (jaxkd.main._is_noise).
  assert "Unable to initialize backend" not in stderr, stderr
  if case.workdir == "new":
    assert outcome.after is None, sorted(outcome.after)
  elif case.workdir == "trained":
    assert outcome.after == outcome.before
  else:
    assert any(" step 1/" in line for line in lines[:-1]), stderr


# --- The config fuzzed in this process, as the command line would set it. ---


def _fields(config, prefix: str = "") -> list[str]:
  """Dotted paths of every leaf of `config` (an empty ConfigDict is a leaf)."""
  paths = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value:
      paths += _fields(value, f"{prefix}{key}.")
    else:
      paths.append(f"{prefix}{key}")
  return paths


# Values the fuzz found that once raised something other than a UserError, or ended the run after
# it started; each is now refused by the plan, naming the field.
_FOUND_BY_FUZZ = {
  "distributed": "abc",
  "mesh.fsdp": "0",
  "optimizer.decay_epochs": "abc",
  "population.size": "3",
  "population.sweep": "{'a': 1}",
  "student.kwargs.depth": "0",
  "student.kwargs.widths": "()",
  "student.teacher_layers": "abc",
  "seed": "-1",
  "optimizer.momentum": "nan",
  "distill.kd.temperature": "inf",
}

_QUICKSTART_FIELDS = tuple(_fields(testing_utils.load_config("quickstart", "smoke")))
_FUZZED_FIELDS = _QUICKSTART_FIELDS
_BAD_VALUES = st.one_of(
  st.sampled_from(
    ("", "abc", "resnet8", "0", "-1", "-0.5", "1.5", "1e30", "10000000000000", "nan", "inf")
    + ("-inf", "true", "None", "()", "[]", "{}", "(0, -1)", "{'a': 1}", "[0.5, 'a']")
  ),
  st.integers(min_value=-(2**70), max_value=2**70).map(str),
  st.floats().map(repr),
  st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
)


def _command_line_config(argv: list[str]) -> ml_collections.ConfigDict:
  """The config of `python -m jaxkd.main ARGV`, parsed in this process as the command line's is:
  `jaxkd.cli.read_flags` on fresh flags holding ml_collections' locked config flag."""
  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
    "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  cli.read_flags(argv, flag_values, config_flag)
  return config_flag.value


def _resolve_command_line(argv: list[str], workdir: str) -> bool:
  """What `python -m jaxkd.main ARGV` checks before its first step: the config, the experiment
  and the plan (`jaxkd.plan.resolve`). Returns whether it was one training run (a comparison
  trains its teacher first: it is not resolved here)."""
  config = _command_line_config(argv)
  plan.check_experiment(config.experiment, experiments.EXPERIMENTS)
  if config.experiment:
    return False
  plan.resolve(config, workdir)
  return True


@pytest.fixture(scope="module")
def quickstart_argv(assets) -> list[str]:
  base = (f"--config={testing_utils.REPO}/configs/quickstart.py:smoke", *_QUICKSTART[1:])
  return ["jaxkd.main", *_substitute(base, assets)]


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(field=st.sampled_from(_FUZZED_FIELDS), value=_BAD_VALUES)
def test_config_fuzz(quickstart_argv, assets, field, value):
  """Any one override of the quickstart's config resolves or raises a UserError."""
  workdir = os.path.join(assets["tmp"], "never_created")
  hypothesis.assume(not (field == "distributed" and value == "auto"))  # would start a cluster
  one_run = True
  try:
    one_run = _resolve_command_line([*quickstart_argv, f"--config.{field}={value}"], workdir)
  except errors.UserError as error:
    assert str(error).strip()
  assert not os.path.exists(workdir)
  hypothesis.assume(one_run)


@pytest.mark.parametrize("field,value", list(_FOUND_BY_FUZZ.items()))
def test_plan_refuses(quickstart_argv, assets, field, value):
  """`--config.FIELD=VALUE` is a UserError naming the field before anything runs."""
  with pytest.raises(errors.UserError, match=re.escape(field.split(".")[-1])):
    _resolve_command_line(
      [*quickstart_argv, f"--config.{field}={value}"], os.path.join(assets["tmp"], "never")
    )


def test_eval_batch_is_cut_to_the_test_split(quickstart_argv, assets):
  """A huge evaluation batch (the fuzz's 10**13) would pad the 96 test examples to 10**13 rows;
  the plan cuts it to what the evaluated and cached examples need, rounded up to the devices."""
  config = _command_line_config([*quickstart_argv, "--config.data.eval_batch_size=10000000000000"])
  # 96 test examples, more than the training examples (a cache covers those with this batch).
  assert plan.resolve(config, os.path.join(assets["tmp"], "never")).eval_batch_size == 96


def test_the_fuzz_findings_name_fields_of_the_config():
  assert set(_FOUND_BY_FUZZ) <= set(_QUICKSTART_FIELDS), set(_FOUND_BY_FUZZ) - set(
    _QUICKSTART_FIELDS
  )


def test_load_split_checks_the_image_shape_and_the_classes(assets):
  """What `idx.load_split` checks when the dataset's spec is passed (the IDX source passes it:
  the case table's `idx_images_of_another_size` and `idx_labels_out_of_range`)."""
  spec = dict(image_shape=(28, 28), num_classes=10)
  assert idx.load_split(assets["data"], "train", **spec)["image"].shape == (128, 28, 28, 1)
  with pytest.raises(idx.CorruptFileError, match=r"\(128, 32, 32\), not N images of 28×28"):
    idx.load_split(assets["images_32x32"], "train", **spec)
  with pytest.raises(idx.CorruptFileError, match=r"labels in \[12, 12\], the dataset has 10"):
    idx.load_split(assets["labels_out_of_range"], "train", **spec)
  # Without the spec, the files are read as they are.
  assert idx.load_split(assets["images_32x32"], "train")["image"].shape == (128, 32, 32, 1)
