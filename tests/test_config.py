"""Configs: loading, `:arg` variants, validation messages, and the command line's error paths."""

import os
import subprocess
import sys

import pytest

from jaxkd import configlib, errors, plan

import testing_utils


def _main(*args: str, cwd: str = testing_utils.REPO) -> subprocess.CompletedProcess:
  """`python -m jaxkd.main ARGS` on one CPU device (the command a user types)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run(
    [sys.executable, "-m", "jaxkd.main", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "name,arg",
  [
    ("quickstart", None),
    ("quickstart", "smoke"),
    ("quickstart", "seeds=5"),
    ("cifar_kd", None),
    ("cifar_kd", "teacher=wrn_40_2,student=wrn_16_2"),
    ("cifar_kd", "method=ce,student=resnet32x4"),
  ],
)
def test_configs_validate(name, arg):
  plan.check(testing_utils.load_config(name, arg))


def test_cifar_config_follows_the_reference_recipe():
  config = testing_utils.load_config("cifar_kd")
  assert (config.teacher.model, config.student.model) == ("resnet32x4", "resnet8x4")
  assert config.data.batch_size == 64 and config.num_epochs == 240
  assert tuple(config.optimizer.decay_epochs) == (150, 180, 210)
  assert config.optimizer.lr == 0.05 and config.optimizer.weight_decay == 5e-4
  assert dict(config.distill.losses) == {"ce": 0.1, "kd": 0.9}
  assert config.distill.kd.temperature == 4.0
  assert testing_utils.load_config("cifar_kd", "student=ShuffleV1").optimizer.lr == 0.01


def test_parse_arg():
  assert configlib.parse_arg("smoke,seeds=5", smoke=False, seeds=3).to_dict() == {
    "smoke": True,
    "seeds": 5,
  }
  assert configlib.parse_arg(None, smoke=False).smoke is False
  assert configlib.parse_arg("smoke=false", smoke=True).smoke is False
  with pytest.raises(errors.ConfigError, match="unknown config argument 'smok'"):
    configlib.parse_arg("smok", smoke=False)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("data.name", "cifar10", "config.data.name='cifar10': must be one of"),
    ("student.model", "resnet8x5", "config.student.model='resnet8x5'"),
    ("data.batch_size", 0, "config.data.batch_size=0: must be positive"),
    ("optimizer.decay_epochs", (180, 150), "config.optimizer.decay_epochs"),
    ("optimizer.schedule", "linear", "config.optimizer.schedule='linear'"),
  ],
)
def test_validate_names_the_field(field, value, message):
  config = testing_utils.load_config("cifar_kd")
  parent, name = field.rsplit(".", 1)
  setattr(config[parent], name, value)
  with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(")):
    plan.check(config)


def test_unknown_loss_names_the_field():
  config = testing_utils.load_config("quickstart")
  config.distill.losses = {"ce": 1.0, "kdd": 1.0}
  with pytest.raises(errors.ConfigError, match="config.distill.losses.kdd='kdd'"):
    plan.check(config)


def test_command_line_errors_are_one_line(tmp_path):
  """A misspelt override, a bad value, and a missing config file: status 1, no traceback."""
  for args, expected in [
    (("--config.data.batch_sizee=3",), 'Did you mean "batch_size"'),
    (("--config.data.augment=flip",), "config.data.augment='flip': must be one of"),
  ]:
    result = _main("--config=configs/quickstart.py:smoke", f"--workdir={tmp_path}", *args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and expected in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_missing_cifar_says_how_to_get_it(tmp_path):
  empty_data_dir = tmp_path / "tfds"
  empty_data_dir.mkdir()
  result = _main(
    "--config=configs/cifar_kd.py",
    f"--config.data.dir={empty_data_dir}",
    f"--workdir={tmp_path / 'run'}",
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, result.stderr
  for hint in (
    "tfds build cifar100 --file_format=array_record",
    "--config.data.dir",
    "configs/quickstart.py",
  ):
    assert hint in error_lines[0]
  assert not (tmp_path / "run" / "checkpoints").exists()
