"""The trainer with a student population, a cached teacher and a teacher ensemble, on a tiny
IDX dataset."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxkd import errors, models, train
from jaxkd.models import io as model_io

import testing_utils

pytestmark = pytest.mark.usefixtures("compilation_cache")

TEMPERATURES = (2.0, 8.0)
MEMBER_NAMES = [f"kd.temperature={t}" for t in TEMPERATURES]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """An untrained teacher: KD only needs fixed, non-uniform targets here."""
  directory = str(tmp_path_factory.mktemp("teacher") / "model")
  kwargs = {"widths": (8, 16, 16), "depth": 1, "flatten": True}
  model_io.save(
    directory,
    models.create("small_cnn", num_classes=10, seed=7, **kwargs),
    "small_cnn",
    num_classes=10,
    **kwargs,
  )
  return directory


def _kd_config(idx_dir: str, teacher_dir: str):
  """configs/quickstart.py:smoke on the fake dataset, tiny student, KD from `teacher_dir`:
  64 examples / batch 16 × 1 epoch = 4 steps."""
  config = testing_utils.load_config("quickstart", "smoke,seeds=1")
  config.data.dir = idx_dir
  config.data.train_examples = 64
  config.data.batch_size = 16
  config.data.eval_batch_size = 48  # 96 test examples: two batches, padding-free.
  config.student.kwargs.widths = (4, 8, 8)
  config.teacher.checkpoint = teacher_dir
  config.log_every_steps = 2
  config.checkpoint_every_steps = 100
  return config


def _params(model_dir: str):
  return nnx.state(model_io.load(model_dir), nnx.Param)


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def _records(workdir: str, split: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [record for record in map(json.loads, f) if record["split"] == split]


def test_population_members_match_single_runs(idx_dir, teacher_dir, tmp_path):
  """A 2-member temperature sweep, stopped after step 2 and resumed: each member's metrics,
  evaluation and weights equal those of the single uninterrupted run with its temperature."""
  config = _kd_config(idx_dir, teacher_dir)
  config.population.size = 2
  config.population.sweep = {"kd": {"temperature": list(TEMPERATURES)}}
  workdir = str(tmp_path / "population")
  config.stop_at_step = 2
  assert train.train_and_evaluate(config, workdir) == {}
  config.stop_at_step = 0
  results = train.train_and_evaluate(config, workdir)
  assert list(results["members"]) == MEMBER_NAMES
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["members"] == results["members"]

  for name, temperature in zip(MEMBER_NAMES, TEMPERATURES):
    member_dir = os.path.join(workdir, "members", name)
    single_config = _kd_config(idx_dir, teacher_dir)
    single_config.distill.kd.temperature = temperature
    single_dir = str(tmp_path / f"single_{temperature}")
    single = train.train_and_evaluate(single_config, single_dir)

    assert results["members"][name] == pytest.approx(single, rel=1e-5)
    _assert_close(
      _params(os.path.join(member_dir, "model")), _params(os.path.join(single_dir, "model"))
    )
    member_train, single_train = _records(member_dir, "train"), _records(single_dir, "train")
    assert [r["step"] for r in member_train] == [r["step"] for r in single_train] == [2, 4]
    for member_record, single_record in zip(member_train, single_train):
      for key in ("loss", "ce", "kd", "accuracy", "lr"):
        assert member_record[key] == pytest.approx(single_record[key], rel=1e-5, abs=1e-6)
    assert os.listdir(os.path.join(member_dir, "tensorboard"))
    with open(os.path.join(member_dir, "results.json")) as f:
      assert json.load(f)["accuracy"] == results["members"][name]["accuracy"]

  # The checkpoint holds the stacked population: a single run cannot resume it.
  config.population.size = 1
  config.population.sweep = {}
  with pytest.raises(errors.ConfigError, match="population.size"):
    train.train_and_evaluate(config, workdir)


def test_bad_sweep_is_a_config_error(idx_dir, teacher_dir, tmp_path):
  config = _kd_config(idx_dir, teacher_dir)
  config.population.size = 2
  config.population.sweep = {"kd": {"temperature": [1.0, 2.0, 4.0]}}
  with pytest.raises(errors.ConfigError, match="has 3 values for 2 members"):
    train.train_and_evaluate(config, str(tmp_path))
  config.population.sweep = {"kd": {"temprature": [1.0, 2.0]}}
  with pytest.raises(errors.ConfigError, match="cannot sweep 'kd.temprature'"):
    train.train_and_evaluate(config, str(tmp_path))


def test_cached_teacher_matches_online_teacher(idx_dir, teacher_dir, tmp_path):
  online_dir = str(tmp_path / "online")
  online = train.train_and_evaluate(_kd_config(idx_dir, teacher_dir), online_dir)

  config = _kd_config(idx_dir, teacher_dir)
  cache_dir = str(tmp_path / "cache")
  config.teacher.cache.dir = cache_dir
  cached = train.train_and_evaluate(config, str(tmp_path / "cached"))
  # Evaluation still runs the real teacher: agreement and KL are comparable.
  assert cached == pytest.approx(online, rel=1e-5)
  _assert_close(
    _params(str(tmp_path / "cached" / "model")), _params(os.path.join(online_dir, "model"))
  )

  # A second run reuses the cache instead of writing it again.
  manifest = os.path.join(cache_dir, "manifest.json")
  written = os.stat(manifest).st_mtime_ns
  assert train.train_and_evaluate(config, str(tmp_path / "cached_again")) == pytest.approx(cached)
  assert os.stat(manifest).st_mtime_ns == written

  # Other data than the cache was computed on: one line naming the field.
  config.data.train_examples = 48
  with pytest.raises(errors.ConfigError, match="computed for num_examples 64, this run has 48"):
    train.train_and_evaluate(config, str(tmp_path / "other_data"))


def test_cached_teacher_needs_fixed_views(idx_dir, teacher_dir, tmp_path):
  config = _kd_config(idx_dir, teacher_dir)
  config.teacher.cache.dir = str(tmp_path / "cache")
  config.data.augment = "crop_flip"
  with pytest.raises(errors.ConfigError, match=r"config.data.augment='crop_flip': a cached"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "cache")


@pytest.fixture(scope="module")
def second_teacher_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("teacher2") / "model")
  kwargs = {"widths": (8, 16, 16), "depth": 1, "flatten": True}
  model_io.save(
    directory,
    models.create("small_cnn", num_classes=10, seed=8, **kwargs),
    "small_cnn",
    num_classes=10,
    **kwargs,
  )
  return directory


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
def test_ensemble_of_one_teacher_twice_is_that_teacher(idx_dir, teacher_dir, tmp_path, rule):
  """teacher.checkpoint='T,T': the mean of two copies is T itself, so the run equals T's."""
  single = train.train_and_evaluate(_kd_config(idx_dir, teacher_dir), str(tmp_path / "single"))
  config = _kd_config(idx_dir, teacher_dir)
  config.teacher.checkpoint = f"{teacher_dir},{teacher_dir}"
  config.teacher.ensemble = rule
  ensemble = train.train_and_evaluate(config, str(tmp_path / "ensemble"))
  assert ensemble == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_two_teacher_ensemble_from_the_command_line(
  idx_dir, teacher_dir, second_teacher_dir, tmp_path
):
  """`python -m jaxkd.main` distils from two teachers end to end; evaluation compares the
  student with their mean."""
  workdir = tmp_path / "run"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxkd.main",
      "--config=configs/quickstart.py:smoke",
      f"--workdir={workdir}",
      "--config.experiment=",
      f"--config.data.dir={idx_dir}",
      f"--config.teacher.checkpoint={teacher_dir},{second_teacher_dir}",
      "--config.teacher.ensemble=mean_probs",
      "--config.data.train_examples=64",
      "--config.data.batch_size=16",
      "--config.data.eval_batch_size=48",
    ],
    cwd=testing_utils.REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((workdir / "results.json").read_text())
  assert {"accuracy", "agreement", "kl"} <= set(results)
  train_records = _records(str(workdir), "train")
  assert train_records and "kd" in train_records[-1]
