"""`python -m jaxkd.evaluate`: a saved model on the config's test split, against direct numbers.

The expected values are computed here from the raw data and the models' forward passes in
numpy (top-1, top-5, cross-entropy, agreement, KL(teacher ‖ student), bits per byte), not
through the evaluation step.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import data, errors, evaluate, models
from jaxkd.data import idx, text
from jaxkd.models import io as model_io

import testing_utils

pytestmark = pytest.mark.usefixtures("compilation_cache")

_SMALL_CNN = {"widths": (4, 8, 8), "depth": 1, "flatten": True}


def _save_random_model(directory, name, seed, **create_kwargs):
  """Saves model `name` with random weights drawn in numpy (no XLA initialisers to compile):
  kernels N(0, 1/fan_in), norm scales and variances U(0.5, 1.5), the rest N(0, 0.1²)."""
  model = nnx.eval_shape(lambda: models.create(name, **create_kwargs))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    kind = path[-1].key
    if kind in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    std = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if kind in ("kernel", "embedding") else 0.1
    return rng.normal(0, std, leaf.shape).astype(leaf.dtype)

  state = nnx.state(model)
  pure = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, pure))
  nnx.update(model, state)
  model_io.save(directory, model, name, **create_kwargs)
  return directory


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
  """A small_cnn student and a wider small_cnn teacher (random weights), saved."""
  root = tmp_path_factory.mktemp("models")
  return {
    name: _save_random_model(
      str(root / name), "small_cnn", seed, num_classes=10, **{**_SMALL_CNN, "widths": widths}
    )
    for name, seed, widths in (("student", 0, (4, 8, 8)), ("teacher", 1, (8, 8, 16)))
  }


def _image_config(idx_dir, teacher=""):
  config = testing_utils.load_config("quickstart", "smoke")
  config.data.dir = idx_dir
  config.data.eval_batch_size = 32  # 96 test images: three batches on 8 devices
  config.teacher.checkpoint = teacher
  return config


def _log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _logits(directory, inputs, **extras):
  model = model_io.load(directory)
  return np.asarray(model(jnp.asarray(inputs), train=False, **extras)[0], np.float64)


def _expected_image_results(idx_dir, saved_models, num_examples):
  split = idx.load_split(idx_dir, "test")
  images = data.normalize(split["image"][:num_examples], data.DATASETS["fashion_mnist"])
  labels = split["label"][:num_examples]
  student = _logits(saved_models["student"], images)
  teacher = _logits(saved_models["teacher"], images)
  log_q, log_p = _log_softmax(student), _log_softmax(teacher)
  top5 = np.argsort(-student, axis=-1)[:, :5]
  return {
    "accuracy": np.mean(student.argmax(-1) == labels),
    "top5": np.mean(np.any(top5 == labels[:, None], axis=-1)),
    "loss": -np.mean(log_q[np.arange(len(labels)), labels]),
    "agreement": np.mean(student.argmax(-1) == teacher.argmax(-1)),
    "kl": np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)),
  }


@pytest.mark.parametrize("num_examples", [0, 50])
def test_image_model_against_a_direct_computation(idx_dir, saved_models, num_examples):
  config = _image_config(idx_dir, teacher=saved_models["teacher"])
  config.data.eval_examples = num_examples  # 50: the last batch is padded and masked
  results = evaluate.evaluate(config, saved_models["student"])
  expected = _expected_image_results(idx_dir, saved_models, num_examples or 96)
  assert results["scored"] == (num_examples or 96)
  assert results["architecture"] == "small_cnn" and results["teacher"] == saved_models["teacher"]
  for key, value in expected.items():
    assert results[key] == pytest.approx(value, abs=1e-5), key
  table = evaluate.format_table(results)
  assert f"| top-1 (%) | {100 * expected['accuracy']:.2f} |" in table
  assert "agreement with the teacher" in table


def test_without_a_teacher_there_is_no_agreement(idx_dir, saved_models):
  results = evaluate.evaluate(_image_config(idx_dir), saved_models["student"])
  assert "agreement" not in results and "kl" not in results and results["teacher"] is None
  assert "teacher" not in evaluate.format_table(results)


def test_models_that_do_not_fit_the_data_are_user_errors(idx_dir, saved_models, tmp_path):
  _save_random_model(str(tmp_path / "seven"), "small_cnn", 0, num_classes=7, **_SMALL_CNN)
  with pytest.raises(errors.UserError, match="has 7 outputs, the data 10 classes"):
    evaluate.evaluate(_image_config(idx_dir), str(tmp_path / "seven"))
  with pytest.raises(errors.CheckpointNotFoundError, match="no model.json"):
    evaluate.evaluate(_image_config(idx_dir), str(tmp_path / "absent"))
  config = _image_config(idx_dir, teacher=saved_models["teacher"])
  config.teacher.model = "resnet8x4"
  with pytest.raises(errors.ConfigError, match="config.teacher.model='resnet8x4'"):
    evaluate.evaluate(config, saved_models["student"])
  config = _image_config(idx_dir)
  config.data.eval_batch_size = 36
  with pytest.raises(errors.ConfigError, match="multiple of the 8 devices"):
    evaluate.evaluate(config, saved_models["student"])


def _text_corpus(directory, num_test_files=2):
  """Files named so that `num_test_files` of them land in the test split (`text.split_of`)."""
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "eps"]
  written, index = 0, 0
  while written < num_test_files:
    name = f"doc{index}.txt"
    index += 1
    if text.split_of(name) != "test":
      continue
    content = " ".join(rng.choice(words, 40))
    (directory / name).write_text(content)
    written += 1
  return str(directory)


def test_language_model_against_a_direct_computation(tmp_path):
  (tmp_path / "corpus").mkdir()
  corpus = _text_corpus(tmp_path / "corpus")
  config = testing_utils.load_config("lm_kd", "smoke")
  config.data.name, config.data.dir = "text_files", corpus
  config.data.seq_len = 16
  config.data.eval_batch_size, config.data.eval_examples = 8, 0
  kwargs = {"num_layers": 1, "width": 16, "num_heads": 2}
  vocab = data.ByteTokenizer().vocab_size
  model_dir = _save_random_model(
    str(tmp_path / "lm"), "transformer_lm", 0, num_classes=vocab, **kwargs
  )

  results = evaluate.evaluate(config, model_dir)

  split = data.open_text_split("text_files", "test", seq_len=16, data_dir=corpus)
  batch = split.read(np.arange(len(split)))
  logits = _logits(
    model_dir,
    batch["inputs"],
    positions=jnp.asarray(batch["positions"]),
    segment_ids=jnp.asarray(batch["segment_ids"]),
  )
  mask = batch["loss_mask"]
  log_q = _log_softmax(logits)
  nll = -np.take_along_axis(log_q, batch["targets"][..., None], axis=-1)[..., 0]
  assert results["scored"] == mask.sum() > 100
  assert results["loss"] == pytest.approx(nll[mask].mean(), abs=1e-5)
  assert results["accuracy"] == pytest.approx(
    np.mean((logits.argmax(-1) == batch["targets"])[mask]), abs=1e-6
  )
  assert results["bits_per_byte"] == pytest.approx(
    nll[mask].sum() / math.log(2) / batch["target_bytes"][mask].sum(), abs=1e-5
  )
  assert "| bits per byte |" in evaluate.format_table(results)


def _run_cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one device: the CLI as a user runs it
  return subprocess.run(
    [sys.executable, "-m", "jaxkd.evaluate", *args],
    cwd=testing_utils.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_command_line_prints_the_table_and_writes_json(idx_dir, saved_models, tmp_path):
  output = tmp_path / "results.json"
  completed = _run_cli(
    f"--model={saved_models['student']}",
    "--config=configs/quickstart.py:smoke",
    f"--config.data.dir={idx_dir}",
    f"--config.teacher.checkpoint={saved_models['teacher']}",
    "--config.data.eval_batch_size=40",
    f"--output={output}",
  )
  assert completed.returncode == 0, completed.stderr
  written = json.loads(output.read_text())
  expected = _expected_image_results(idx_dir, saved_models, 96)
  for key, value in expected.items():
    assert written[key] == pytest.approx(value, abs=1e-5), key
  assert f"| top-1 (%) | {100 * written['accuracy']:.2f} |" in completed.stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--model=/nonexistent/model"], "error: /nonexistent/model is not a jaxkd model checkpoint"),
    (
      ["--model=/tmp", "--config.data.batch_sizee=3"],
      "error: --config override of a field the config does not have: 'batch_sizee'",
    ),
  ],
)
def test_command_line_errors_are_one_line(idx_dir, args, message):
  completed = _run_cli(
    "--config=configs/quickstart.py:smoke", f"--config.data.dir={idx_dir}", *args
  )
  assert completed.returncode == 1
  lines = completed.stderr.strip().splitlines()
  assert lines[-1].startswith(message), completed.stderr
  assert "Traceback" not in completed.stderr
