"""`python -m jaxkd.main` on Cloud Storage end to end, against a GCS emulator on 127.0.0.1
(tests/fake_gcs.py, no network): a gs:// workdir, a gs:// teacher and a gs:// teacher cache.
Everything lands in the bucket, nothing in the local working directory, and a second run of
the same command resumes from the bucket's checkpoint."""

import json
import os
import subprocess
import sys
import uuid

from etils import epath

from jaxkd import models
from jaxkd.models import io as model_io

import fake_gcs
import testing_utils


def test_quickstart_student_on_a_bucket(idx_dir, tmp_path):
  root = f"{fake_gcs.bucket()}/{uuid.uuid4().hex}"
  kwargs = {"widths": (8, 16, 16), "depth": 1, "flatten": True}
  teacher = models.create("small_cnn", num_classes=10, seed=7, **kwargs)
  model_io.save(f"{root}/teacher", teacher, "small_cnn", num_classes=10, **kwargs)
  command = [
    sys.executable,
    "-m",
    "jaxkd.main",
    f"--config={testing_utils.REPO}/configs/quickstart.py:smoke,seeds=1",
    f"--workdir={root}/run",
    "--config.experiment=",
    f"--config.data.dir={idx_dir}",
    "--config.data.train_examples=64",
    "--config.data.batch_size=16",
    "--config.data.eval_batch_size=48",
    "--config.student.kwargs.widths=(4, 8, 8)",
    f"--config.teacher.checkpoint={root}/teacher",
    f"--config.teacher.cache.dir={root}/cache",
    "--config.teacher.cache.topk=3",
    "--config.stop_at_step=2",
  ]
  env = {**os.environ, **fake_gcs.environment(), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  for stop in ("2", "0"):  # stop after step 2, then resume to the end
    command[-1] = f"--config.stop_at_step={stop}"
    result = subprocess.run(
      command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(tmp_path) == []  # nothing under ./gs:/...
  run = epath.Path(root) / "run"
  results = json.loads((run / "results.json").read_text())
  assert {"accuracy", "agreement", "kl"} <= set(results)
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  keys = [(row["split"], row["step"]) for row in rows]
  assert len(keys) == len(set(keys)) and {("train", 4), ("eval", 4)} <= set(keys)
  for name in ("checkpoints", "model/model.json", "provenance.json", "tensorboard"):
    assert (run / name).exists(), name
  manifest = json.loads((epath.Path(root) / "cache" / "manifest.json").read_text())
  assert manifest["k"] == 3 and manifest["num_examples"] == 64
