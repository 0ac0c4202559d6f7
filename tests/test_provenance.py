"""jaxkd.provenance: the record of a run (config, versions, git state, devices, command), its
config file, the resumed-run differences, TensorBoard hparams and population members."""

import hashlib
import importlib.util
import json
import platform
import socket
import subprocess

import flax
import jax
import optax
import pytest

from jaxkd import provenance

import testing_utils

CIFAR_METHODS = (
  "kd",
  "fitnet",
  "at",
  "sp",
  "cc",
  "vid",
  "rkd",
  "pkt",
  "nst",
  "crd",
  "dkd",
  "reviewkd",
  "dist",
  "kd_ls",
  "dkd_ls",
)


def _git(root, *args) -> str:
  command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root), *args]
  return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _load_config_file(path):
  spec = importlib.util.spec_from_file_location("saved_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_collect_records_the_run(tmp_path):
  config = testing_utils.load_config("quickstart")
  config.optimizer.lr = 0.1
  argv = [
    "python",
    "-m",
    "jaxkd.main",
    "--config=configs/quickstart.py",
    "--config.optimizer.lr=0.1",
  ]
  record = provenance.collect(config, argv=argv)

  assert record["config"] == json.loads(json.dumps(config.to_dict()))
  assert record["config"]["student"]["kwargs"]["widths"] == [8, 16, 32]
  assert record["method"] == "kd"
  versions = record["versions"]
  assert versions["python"] == platform.python_version()
  assert (versions["jax"], versions["jaxlib"]) == (jax.__version__, jax.lib.__version__)
  assert (versions["flax"], versions["optax"]) == (flax.__version__, optax.__version__)
  assert versions["orbax-checkpoint"] and versions["jaxkd"]
  assert record["devices"] == {
    "platform": "cpu",
    "kind": jax.devices()[0].device_kind,
    "count": 8,  # tests/conftest.py
    "local_count": 8,
    "process_count": 1,
  }
  assert record["hostname"] == socket.gethostname()
  assert record["command"] == argv
  assert "members" not in record
  # The config file rebuilds the config exactly: tuples stay tuples.
  (tmp_path / "config.py").write_text(record["config_py"])
  rebuilt = _load_config_file(tmp_path / "config.py")
  assert rebuilt.to_dict() == config.to_dict()
  assert rebuilt.student.kwargs.widths == (8, 16, 32)


def test_git_state_of_this_checkout():
  root = provenance.source_root()
  try:
    commit = _git(root, "rev-parse", "HEAD").strip()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("jaxkd does not run from a git checkout here")
  state = provenance.git_state(root)
  assert state["commit"] == commit
  # Other work may change the tree meanwhile; dirty or not, the record's shape follows it.
  assert state["dirty"] == (state["diff"] is not None)
  assert state["diff"] is None or len(state["diff"]) == 12


def test_git_state_commit_dirty_and_diff(tmp_path):
  _git(tmp_path, "init", "-q")
  (tmp_path / "a.py").write_text("x = 1\n")
  _git(tmp_path, "add", "a.py")
  _git(tmp_path, "commit", "-q", "-m", "a")
  commit = _git(tmp_path, "rev-parse", "HEAD").strip()
  assert provenance.git_state(str(tmp_path)) == {"commit": commit, "dirty": False, "diff": None}
  (tmp_path / "a.py").write_text("x = 2\n")
  diff = hashlib.sha256(_git(tmp_path, "diff", "HEAD").encode()).hexdigest()[:12]
  assert provenance.git_state(str(tmp_path)) == {"commit": commit, "dirty": True, "diff": diff}


def test_git_state_never_fails(tmp_path, monkeypatch):
  assert provenance.git_state(str(tmp_path)) is None  # not a checkout
  _git(tmp_path, "init", "-q")
  (tmp_path / "site-packages").mkdir()
  # A package installed inside some other project's checkout is not a jaxkd checkout.
  assert provenance.git_state(str(tmp_path / "site-packages")) is None
  assert provenance.git_state(str(tmp_path)) is None  # a checkout without commits
  # Without git at all; a copied tree then reads the state its launcher left.
  monkeypatch.setenv("PATH", str(tmp_path / "no_bin"))
  assert provenance.git_state(str(tmp_path / "site-packages")) is None
  synced = {"commit": "0123456789abcdef", "dirty": True, "diff": "aaaaaaaaaaaa"}
  (tmp_path / provenance.SOURCE_FILENAME).write_text(json.dumps(synced))
  assert provenance.git_state(str(tmp_path)) == synced


def test_write_read_and_history(tmp_path):
  workdir = tmp_path / "run"
  assert provenance.read(workdir) is None
  first = {"config": {"seed": 0}, "config_py": "# first\n", "time": "t1"}
  provenance.write(str(workdir), first)
  assert provenance.read(workdir) == first
  assert (workdir / provenance.CONFIG_FILENAME).read_text() == "# first\n"
  second = {"config": {"seed": 0}, "config_py": "# second\n", "time": "t2"}
  provenance.write(workdir, second)
  third = {"config": {"seed": 1}, "time": "t3"}  # A member's record: no config file.
  provenance.write(workdir, third)
  assert provenance.read(workdir) == {**third, "history": [first, second]}
  assert (workdir / provenance.CONFIG_FILENAME).read_text() == "# second\n"


def test_differences_for_a_resumed_run():
  saved = {
    "config": {
      "optimizer": {"lr": 0.05, "name": "sgd"},
      "student": {"kwargs": {"widths": [8, 16]}},
    },
    "versions": {"python": "3.11.7", "jax": "0.10.2", "flax": "0.12.8"},
    "git": {"commit": "abc123abc123abc1", "dirty": False, "diff": None},
    "devices": {"platform": "tpu", "kind": "TPU v4", "count": 8, "process_count": 2},
    "hostname": "a",
    "time": "t1",
  }
  current = {
    "config": {
      "method": "kd",
      "optimizer": {"lr": 0.1, "name": "sgd"},
      "student": {"kwargs": {"widths": [16, 32]}},
    },
    "versions": {"python": "3.11.7", "jax": "0.11.0", "flax": "0.12.8", "libtpu": "0.0.9"},
    "git": {"commit": "def456def456def4", "dirty": True, "diff": "0123456789ab"},
    "devices": {"platform": "tpu", "kind": "TPU v4", "count": 16, "process_count": 4},
    "hostname": "b",
    "time": "t2",
  }
  assert provenance.differences(saved, current) == [
    'config.method: (absent) → "kd"',
    "config.optimizer.lr: 0.05 → 0.1",
    "config.student.kwargs.widths: [8, 16] → [16, 32]",
    "jax 0.10.2 → 0.11.0",
    "libtpu (not installed) → 0.0.9",
    "git abc123abc123 → def456def456 (dirty 0123456789ab)",
    "devices 8× TPU v4 (2 processes) → 16× TPU v4 (4 processes)",
  ]
  assert provenance.differences(current, {**current, "hostname": "c", "time": "t3"}) == []
  assert provenance.differences({**saved, "git": None}, saved) == [
    "git (no git checkout) → abc123abc123"
  ]


def test_hparams_are_flat_scalars():
  config = testing_utils.load_config("quickstart")
  hparams = provenance.hparams(provenance.collect(config, argv=[]))
  assert hparams["optimizer.lr"] == 0.05 and hparams["seed"] == 0
  assert hparams["data.name"] == "fashion_mnist" and hparams["method"] == "kd"
  assert hparams["student.kwargs.widths"] == "[8, 16, 32]"
  assert hparams["distill.kd.temperature"] == 4.0
  assert hparams["optimizer.decay_epochs"] == "[]"
  assert all(isinstance(value, (bool, int, float, str)) for value in hparams.values())


@pytest.mark.parametrize("method", CIFAR_METHODS)
def test_method_label_derived_from_the_losses(method):
  config = testing_utils.load_config("cifar_kd", f"method={method}")
  # configs/cifar_kd.py's method names, from the losses and their settings alone.
  assert provenance.method_label({"distill": config.distill.to_dict()}) == method


def test_method_label_cases():
  assert provenance.method_label({"distill": {"losses": {"ce": 1.0}}}) == "scratch"
  assert provenance.method_label({"method": "", "distill": {"losses": {"ce": 1.0}}}) == "scratch"
  crd_kd = {"distill": {"losses": {"ce": 1.0, "kd": 1.0, "crd": 0.8}}}
  assert provenance.method_label(crd_kd) == "crd+kd"
  assert provenance.method_label({**crd_kd, "method": "crd_plus_kd"}) == "crd_plus_kd"


def test_population_members():
  config = testing_utils.load_config("cifar_kd", "method=kd")
  config.population = {
    "size": 3,
    "sweep": {"kd": {"temperature": (1.0, 2.0, 4.0)}, "learning_rate_scale": (1.0, 0.5, 2.0)},
  }
  record = provenance.collect(config, argv=[])
  assert record["members"] == {
    "kd.temperature=1.0,learning_rate_scale=1.0": {
      "seed": 0,
      "distill.kd.temperature": 1.0,
      "optimizer.lr": 0.05,
    },
    "kd.temperature=2.0,learning_rate_scale=0.5": {
      "seed": 1,  # Unswept: config.seed + member index (jaxkd.population.member_seeds).
      "distill.kd.temperature": 2.0,
      "optimizer.lr": 0.025,
    },
    "kd.temperature=4.0,learning_rate_scale=2.0": {
      "seed": 2,
      "distill.kd.temperature": 4.0,
      "optimizer.lr": 0.1,
    },
  }
  member = provenance.member_record(record, "kd.temperature=2.0,learning_rate_scale=0.5")
  assert member["config"]["distill"]["kd"]["temperature"] == 2.0
  assert (member["config"]["optimizer"]["lr"], member["config"]["seed"]) == (0.025, 1)
  assert member["config"]["population"] == {"size": 1, "sweep": {}}
  assert member["member"] == "kd.temperature=2.0,learning_rate_scale=0.5"
  assert "members" not in member and "config_py" not in member
  assert record["config"]["distill"]["kd"]["temperature"] == 4.0  # The record is unchanged.

  config.population = {"size": 2, "sweep": {"seed": (3, 5)}}
  record = provenance.collect(config, argv=[])
  assert record["members"] == {"seed=3": {"seed": 3}, "seed=5": {"seed": 5}}
