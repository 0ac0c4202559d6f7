"""Training runs end to end on a tiny IDX dataset: the quickstart comparison, resume, exports."""

import glob
import json
import os

import jax
import numpy as np
import ml_collections
import pytest
from flax import nnx

from jaxkd import checkpoint, distill, errors, train
from jaxkd.data import idx
from jaxkd.experiments import compare
from jaxkd.models import io as model_io

import testing_utils

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def comparison(idx_dir, tmp_path_factory):
  """The quickstart comparison on the fake dataset: its workdir and summary."""
  workdir = tmp_path_factory.mktemp("quickstart")
  return workdir, compare.run(_smoke_config(idx_dir), str(workdir))


def _smoke_config(idx_dir: str):
  """configs/quickstart.py:smoke,seeds=1 on the fake dataset, with tiny models."""
  config = testing_utils.load_config("quickstart", "smoke,seeds=1")
  config.data.dir = idx_dir
  config.data.train_examples = 64
  config.data.batch_size = 16
  config.data.eval_batch_size = 48  # 96 test examples: two batches, padding-free.
  config.compare.teacher_train_examples = 0
  config.teacher.kwargs.widths = (8, 16, 16)
  config.student.kwargs.widths = (4, 8, 8)
  return config


def _params(workdir: str):
  return nnx.state(model_io.load(os.path.join(workdir, "model")), nnx.Param)


def _train_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [record["step"] for record in map(json.loads, f) if record["split"] == "train"]


def test_quickstart_comparison_end_to_end(comparison):
  tmp_path, summary = comparison

  table = (tmp_path / "results.md").read_text()
  for row in ("teacher `small_cnn`", "student from scratch", "student with KD", "KD − scratch"):
    assert row in table
  assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0]
  for run in (summary["teacher"], *summary["runs"]["scratch"], *summary["runs"]["kd"]):
    assert 0.0 <= run["accuracy"] <= 1.0
  for run in (*summary["runs"]["scratch"], *summary["runs"]["kd"]):
    assert 0.0 <= run["agreement"] <= 1.0 and run["kl"] >= 0.0
  for name in ("teacher", "scratch/seed_0", "kd/seed_0"):
    workdir = tmp_path / name
    assert (workdir / "model" / "model.json").exists() and (workdir / "results.json").exists()
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  # Only the KD student trains with the teacher's loss.
  with open(tmp_path / "kd" / "seed_0" / "metrics.jsonl") as f:
    assert "kd" in json.loads(f.readline())
  # TensorBoard's HParams tab: the resolved config and the results of each run.
  hparams = testing_utils.tensorboard_hparams(tmp_path / "kd" / "seed_0" / "tensorboard")
  assert hparams["method"].string_value == "kd"
  assert hparams["distill.kd.temperature"].number_value == 4.0
  assert hparams["data.train_examples"].number_value == 64


def test_results_table_mean_and_std():
  runs = lambda accuracies: [{"accuracy": a, "agreement": a, "kl": 1.0} for a in accuracies]
  table = compare.results_table(
    {
      "teacher": {"model": "t", "parameters": 1000, "accuracy": 0.9},
      "student": {"model": "s", "parameters": 10},
      "runs": {"scratch": runs([0.80, 0.82]), "kd": runs([0.83, 0.84])},
    }
  )
  assert "| 81.00 ± 1.41 |" in table  # sample std (ddof = 1) of 80 and 82
  assert "| KD − scratch, paired by seed | | +2.50 ± 0.71 |" in table


def test_resume_matches_an_uninterrupted_run(idx_dir, comparison, tmp_path):
  """Stop after 3 of 8 steps, run again: same final weights as one uninterrupted run.

  KD from the comparison's exported teacher with random crop+flip, so the restored RNG and
  the data position both matter.
  """
  config = compare.student_config(
    _smoke_config(idx_dir), "kd", seed=0, teacher_dir=str(comparison[0] / "teacher" / "model")
  )
  config.num_epochs = 2  # 64 examples / batch 16 → 8 steps.
  config.data.augment = "crop_flip"
  config.log_every_steps = 1
  config.checkpoint_every_steps = 100
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))

  workdir = str(tmp_path / "resumed")
  config.stop_at_step = 3
  assert train.train_and_evaluate(config, workdir) == {}
  assert checkpoint.Checkpointer(workdir).latest_step() == 3
  config.stop_at_step = 0
  resumed = train.train_and_evaluate(config, workdir)
  assert _train_steps(workdir) == list(range(1, 9))
  assert resumed == pytest.approx(uninterrupted, rel=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    _params(workdir),
    _params(str(tmp_path / "uninterrupted")),
  )

  # A finished run does not train again; it re-evaluates.
  assert train.train_and_evaluate(config, workdir) == pytest.approx(resumed)
  assert _train_steps(workdir) == list(range(1, 9))

  config.student.kwargs.widths = (4, 8, 16)
  with pytest.raises(errors.ConfigError, match="student.kwargs"):
    train.train_and_evaluate(config, workdir)


def test_crd_with_other_class_negatives_reads_the_training_labels(
  idx_dir, comparison, tmp_path, monkeypatch
):
  """RepDistiller's CRD recipe ('other_class' negatives) through the trainer: the labels come
  from the training source, the memory banks cover the training examples."""
  built = []
  build = distill.build
  monkeypatch.setattr(distill, "build", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
  config = compare.student_config(
    _smoke_config(idx_dir), "kd", seed=0, teacher_dir=str(comparison[0] / "teacher" / "model")
  )
  config.num_epochs = 1
  config.distill = ml_collections.ConfigDict(
    {
      "losses": {"ce": 1.0, "crd": 0.8},
      "crd": {"num_negatives": 8, "feat_dim": 16, "negatives": "other_class"},
    }
  )
  evaluation = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= evaluation["accuracy"] <= 1.0
  (method,) = built
  expected = idx.load_split(idx_dir, "train")["label"][: config.data.train_examples]
  np.testing.assert_array_equal(method.train_labels, expected)
  assert method.initial_state["crd"].student_bank.shape == (config.data.train_examples, 16)
