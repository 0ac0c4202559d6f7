"""Language-model distillation through the trainer, on the standard library's sources:
every `configs/lm_kd.py` method runs end to end from one tiny teacher (stored top-p-k logits,
α schedules, on-policy GKD, sequence-level KD, speculative KD, the chunked loss)."""

import json
import os

import numpy as np
import pytest

from jaxkd import errors, train
from jaxkd.experiments import compare
from jaxkd.tools import store_teacher

import testing_utils

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _config(method: str):
  return testing_utils.load_config("lm_kd", f"smoke,seeds=1,method={method}")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lm_teacher")
  results = train.train_and_evaluate(compare.teacher_config(_config("kd")), str(workdir))
  assert 0 < results["bits_per_byte"] < 9
  return str(workdir / "model")


@pytest.mark.parametrize("method", ["kd", "pretrain", "gkd", "seq_kd", "skd", "chunked"])
def test_every_run_of_the_recipe_is_checked_and_only_the_kd_students_distil(method, tmp_path):
  """`configs/lm_kd.py:method=M` checks all its runs before the first starts; the teacher and
  the scratch students train on the data as it is, with cross-entropy alone."""
  configs = compare.run_configs(_config(method), str(tmp_path))
  assert list(configs) == ["teacher", "scratch/seed_0", "kd/seed_0"]
  for name, config in configs.items():
    if name != "kd/seed_0":
      assert config.sampling.kind == "" and dict(config.distill.losses) == {"ce": 1.0}, name
  assert configs["kd/seed_0"].sampling.kind == _config(method).sampling.kind


def test_a_sampling_recipe_runs_its_whole_comparison(tmp_path):
  """The teacher, scratch and on-policy GKD students of `lm_kd.py:smoke,method=gkd`."""
  summary = compare.run(_config("gkd"), str(tmp_path))
  assert np.isfinite(summary["runs"]["kd"][0]["bits_per_byte"])
  assert all("sampled" in record for record in _records(tmp_path / "kd" / "seed_0"))
  assert not any("sampled" in record for record in _records(tmp_path / "scratch" / "seed_0"))


def _records(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [record for record in map(json.loads, f) if record["split"] == split]


def _student(method, teacher_dir, tmp_path):
  config = compare.student_config(_config(method), "kd", 0, teacher_dir)
  if config.teacher.cache.topk:
    config.teacher.cache.dir = str(tmp_path / "cache")
  workdir = str(tmp_path / method)
  return train.train_and_evaluate(config, workdir), _records(workdir)


def test_stored_top_p_k_teacher(teacher_dir, tmp_path):
  """'kd': `jaxkd.tools.store_teacher` writes the teacher's truncated distributions once
  (float16, uint16 ids); the student's run reads them back without rewriting; evaluation
  compares with the live teacher."""
  config = compare.student_config(_config("kd"), "kd", 0, teacher_dir)
  config.teacher.cache.dir = str(tmp_path / "cache")
  described = store_teacher.store(config)
  # 259 byte-level classes: dense float32 1,036 bytes; 50 × (uint16 id + float16) = 200 bytes.
  assert "top-p 0.95 then top-50 at T 1, float16" in described
  assert (
    "× 200 bytes" in described and "dense float32: 1,036 bytes per position, 5.18×" in described
  )
  written = os.path.getmtime(tmp_path / "cache" / "manifest.json")

  results, records = _student("kd", teacher_dir, tmp_path)
  assert os.path.getmtime(tmp_path / "cache" / "manifest.json") == written
  with open(tmp_path / "cache" / "manifest.json") as f:
    manifest = json.load(f)
  assert (manifest["k"], manifest["top_p"], manifest["dtype"]) == (50, 0.95, "float16")
  assert manifest["num_classes"] == 259
  assert {"bits_per_byte", "agreement", "kl"} <= set(results)
  assert all(np.isfinite(record["kd"]) for record in records)


def test_pretraining_distillation_alpha_follows_its_schedule(teacher_dir, tmp_path):
  """'pretrain': α warms up, holds 0.9 and decays (WSD), beside a WSD learning rate."""
  _, records = _student("pretrain", teacher_dir, tmp_path)
  alphas = [record["alpha"] for record in records]
  assert max(alphas) == pytest.approx(0.9) and alphas[0] < 0.9
  for record in records:
    mixed = (1 - record["alpha"]) * record["ce"] + record["alpha"] * record["kd"]
    assert record["loss"] == pytest.approx(mixed, rel=1e-4)


@pytest.mark.parametrize("method", ["gkd", "seq_kd", "skd"])
def test_sampled_continuations(method, teacher_dir, tmp_path):
  """The sampling methods train on generated continuations and log how they were made."""
  results, records = _student(method, teacher_dir, tmp_path)
  assert np.isfinite(results["bits_per_byte"])
  assert all("sampled" in record for record in records)
  if method == "skd":
    assert all(0 <= record["accept_rate"] <= 1 for record in records)
    assert any(record["replace_rate"] > 0 for record in records)


def test_chunked_loss_trains_without_logits(teacher_dir, tmp_path):
  _, records = _student("chunked", teacher_dir, tmp_path)
  for record in records:
    assert record["loss"] == pytest.approx(
      0.5 * record["chunked_lm/ce"] + 0.5 * record["chunked_lm/kd"], rel=1e-4
    )


def test_store_teacher_needs_a_cache_directory(teacher_dir):
  config = compare.student_config(_config("kd"), "kd", 0, teacher_dir)
  with pytest.raises(errors.ConfigError, match="config.teacher.cache.dir is empty"):
    store_teacher.store(config)
