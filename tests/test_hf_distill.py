"""A Hugging Face teacher distilled through the trainer, end to end on tiny random models:
`configs/hf_kd.py` with a transformers-made Llama and its own BPE tokenizer, a layer-dropped
student (its weights copied from the teacher), a padded teacher vocabulary sliced to the
tokenizer's, and the student exported back to a directory transformers loads."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxkd import errors, train  # noqa: E402
from jaxkd.models import hf, io as model_io  # noqa: E402
from jaxkd.models.transformer import keep_layers  # noqa: E402

import testing_utils  # noqa: E402

pytestmark = pytest.mark.usefixtures("compilation_cache")

LINES = [
  f"def function_{i}(x):\n    return x * {i} + {i % 7}  # knowledge distillation\n"
  for i in range(200)
]


def _tokenizer(directory, vocab_size=300):
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator(LINES, trainer)
  tokenizer.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
  )
  return tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A random 4-layer Llama whose embedding is padded past its tokenizer (Qwen-style)."""
  directory = tmp_path_factory.mktemp("hf_teacher")
  vocab = _tokenizer(directory)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=vocab + 12,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
  )
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("text")
  for i in range(60):  # files go to train / validation / test by a hash of their name
    (directory / f"file_{i}.py").write_text("".join(LINES[i : i + 40]))
  return directory


def _config(teacher_dir, text_dir, arg="layers=0-2"):
  config = testing_utils.load_config("hf_kd", arg)
  config.teacher.checkpoint = str(teacher_dir)
  config.teacher.dtype = "float32"
  config.data.name = "text_files"
  config.data.dir = str(text_dir)
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.data.train_examples = 16
  config.data.eval_examples = 8
  config.log_every_steps = 1
  return config


def test_layer_dropped_student_of_a_hugging_face_teacher(teacher_dir, text_dir, tmp_path):
  teacher = hf.load_pretrained(teacher_dir, dtype=np.float32)
  expected_start = keep_layers(teacher, (0, 2))
  config = _config(teacher_dir, text_dir)
  config.optimizer.lr = 1e-9  # the student stays (numerically) at its initialisation
  results = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(results["bits_per_byte"]) and 0 <= results["agreement"] <= 1

  student = model_io.load(tmp_path / "model")
  assert student.config.num_layers == 2
  np.testing.assert_allclose(
    student.layers[1].mlp.up_proj.kernel[...],
    expected_start.layers[1].mlp.up_proj.kernel[...],
    atol=1e-6,
  )
  # The exported Hugging Face directory gives transformers the student's logits.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
  tokens = np.random.default_rng(0).integers(0, 300, (2, 9)).astype(np.int32)
  with torch.no_grad():
    theirs = reloaded(torch.from_numpy(tokens).long()).logits.numpy()
  ours = np.asarray(student(jax.numpy.asarray(tokens))[0])
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert hf.load_tokenizer(tmp_path / "hf").vocab_size == 300


def test_scratch_student_with_the_teachers_vocabulary(teacher_dir, text_dir, tmp_path):
  """A fresh small decoder learns from the (padded, sliced) teacher; its head is the
  tokenizer's 300 entries."""
  config = _config(teacher_dir, text_dir, "width=16,depth=1")
  results = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(results["kl"])
  student = model_io.load(tmp_path / "model")
  assert nnx.state(student)["embed_tokens"]["embedding"][...].shape[0] == 300


def test_another_tokenizer_is_refused(teacher_dir, text_dir, tmp_path):
  other = tmp_path / "other_tokenizer"
  other.mkdir()
  _tokenizer(other, vocab_size=290)
  config = _config(teacher_dir, text_dir, "width=16,depth=1")
  config.data.tokenizer = str(other)
  with pytest.raises(errors.ConfigError, match="config.data.tokenizer"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
