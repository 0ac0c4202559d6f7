"""`jaxkd.models.hf.load_tokenizer` on tokenizers built here with the `tokenizers` library.

Two vocabularies: a byte-level BPE trained on a few sentences (GPT-2 / Llama 3 / Qwen style) and
a hand-written SentencePiece-style BPE with byte fallback (Llama 2 / Gemma style). The byte
counts are checked against the UTF-8 length of the text, which is independent of the vocabulary.
"""

import json

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from jaxkd.models import hf  # noqa: E402

SENTENCES = [
  "Knowledge distillation trains a small student on a large teacher's outputs.",
  "The teacher's logits carry dark knowledge about the similarities between classes.",
  "Naïve students learn faster from soft targets — café au lait, s'il vous plaît.",
  "日本語のテキストも少し含めます。",
]
TEXT = "A naïve student distils the café teacher — 日本語 ✓"


def _byte_level_bpe(directory, sentences=SENTENCES, vocab_size=320, tokenizer_config=None):
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator(sentences, trainer)
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(directory / "tokenizer.json"))
  if tokenizer_config is None:
    tokenizer_config = {
      "bos_token": "<s>",
      "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
    }
  (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  (directory / "config.json").write_text(json.dumps({"pad_token_id": 0, "vocab_size": 384}))
  return tokenizer


def test_byte_level_bpe(tmp_path):
  reference = _byte_level_bpe(tmp_path)
  tokenizer = hf.load_tokenizer(tmp_path)
  assert tokenizer.vocab_size == reference.get_vocab_size() == 320
  # bos/eos from tokenizer_config.json (a string, an AddedToken dict); pad from config.json.
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
  ids = tokenizer.encode(TEXT)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, reference.encode(TEXT, add_special_tokens=False).ids)
  np.testing.assert_array_equal(tokenizer.encode(TEXT.encode("utf-8")), ids)
  assert tokenizer.decode(ids) == TEXT
  assert tokenizer.decode(np.concatenate([[1], ids, [2]])) == TEXT  # specials dropped
  # Every byte of the text is counted once, multi-byte characters split across tokens included.
  assert tokenizer.token_bytes[ids].sum() == len(TEXT.encode("utf-8"))
  assert any(len(reference.decode([i]).encode()) != tokenizer.token_bytes[i] for i in ids)
  np.testing.assert_array_equal(tokenizer.token_bytes[:3], 0)
  assert not tokenizer.token_bytes.flags.writeable


def test_sentencepiece_style_bpe_with_byte_fallback(tmp_path):
  from tokenizers import decoders, models, normalizers

  pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
  pieces += ["▁", "a", "b", "c", "é", "▁a", "▁ab", "bc"]
  merges = [("▁", "a"), ("▁a", "b"), ("b", "c")]
  tokenizer = tokenizers.Tokenizer(
    models.BPE(
      vocab={piece: i for i, piece in enumerate(pieces)},
      merges=merges,
      byte_fallback=True,
      unk_token="<unk>",
      fuse_unk=True,
    )
  )
  tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
  tokenizer.normalizer = normalizers.Sequence(
    [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
  )
  tokenizer.decoder = decoders.Sequence(
    [
      decoders.Replace("▁", " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(" ", 1, 0),
    ]
  )
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 1]}))
  loaded = hf.load_tokenizer(tmp_path)
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, None)
  text = "abc é ü日"  # 'ü' and '日' are not in the vocabulary: byte fallback, 2 + 3 tokens
  ids = loaded.encode(text)
  assert loaded.decode(ids) == text
  byte_tokens = [i for i in ids if 3 <= i < 259]
  assert len(byte_tokens) == 5 and set(loaded.token_bytes[byte_tokens]) == {1}
  # The normaliser prepends '▁' to the text: one byte more than its UTF-8 length.
  assert loaded.token_bytes[ids].sum() == len(text.encode("utf-8")) + 1


def test_same_tokenizer_with_different_model_vocabularies_and_specials(tmp_path):
  _byte_level_bpe(tmp_path / "teacher")
  _byte_level_bpe(tmp_path / "student", tokenizer_config={"bos_token": None, "eos_token": "<s>"})
  (tmp_path / "student" / "config.json").write_text(json.dumps({"vocab_size": 448}))
  teacher, student = (
    hf.load_tokenizer(tmp_path / "teacher"),
    hf.load_tokenizer(tmp_path / "student"),
  )
  assert student.bos_id is None and student.eos_id == 1
  assert teacher.fingerprint != student.fingerprint  # the specials pack different batches
  hf.check_same_tokenizer(str(tmp_path / "teacher"), tmp_path / "student")
  hf.check_same_tokenizer(teacher, student)


def test_different_tokenizers_are_refused(tmp_path):
  _byte_level_bpe(tmp_path / "teacher")
  _byte_level_bpe(tmp_path / "other", sentences=SENTENCES[:2], vocab_size=300)
  with pytest.raises(ValueError, match="tokenizers differ.*cross-tokenizer") as error:
    hf.check_same_tokenizer(tmp_path / "teacher", tmp_path / "other")
  assert "\n" not in str(error.value)


def test_missing_tokenizer_json(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    hf.load_tokenizer(tmp_path)
