"""Language-model data: the byte tokenizer, packing with document boundaries, the corpora."""

import hashlib
import json
import os
import sysconfig

import numpy as np
import pytest

from jaxkd.data import text
from jaxkd.data.tokenizer import ByteTokenizer
from jaxkd.errors import DataUnavailableError

BOS, EOS, PAD = 256, 257, 258
_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids", "target_bytes")


class _NoSpecialsTokenizer(ByteTokenizer):
  """Bytes without BOS, EOS or PAD: boundaries must come from the document offsets alone."""

  vocab_size = 256
  bos_id = eos_id = pad_id = None


class _WideTokenizer(ByteTokenizer):
  """Bytes shifted past 2¹⁶, for the int32 stream."""

  vocab_size = 70_000
  bos_id, eos_id, pad_id = 69_997, 69_998, 69_999

  def __init__(self):
    super().__init__()
    self.token_bytes = np.zeros(self.vocab_size, np.int32)
    self.token_bytes[65_536 : 65_536 + 256] = 1
    self.fingerprint = "wide"

  def encode(self, data):
    return super().encode(data) + 65_536


# --- tokenizer -------------------------------------------------------------------------------


def test_byte_tokenizer_ids_and_specials():
  tokenizer = ByteTokenizer()
  assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
    259,
    256,
    257,
    258,
  )
  ids = tokenizer.encode("Aé\x00")
  assert ids.dtype == np.int32 and ids.tolist() == [0x41, 0xC3, 0xA9, 0x00]
  assert tokenizer.encode(b"\xff\x80").tolist() == [255, 128]
  assert tokenizer.token_bytes.dtype == np.int32
  assert tokenizer.token_bytes.tolist() == [1] * 256 + [0, 0, 0]
  assert tokenizer.decode([BOS, 0x68, 0x69, EOS, PAD]) == "hi"  # specials stand for no text


def test_byte_tokenizer_round_trips_arbitrary_bytes():
  tokenizer = ByteTokenizer()
  data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
  data += b"\xc3(\xed\xa0\x80 snow \xe2\x98\x83"  # invalid UTF-8 next to valid
  ids = tokenizer.encode(data)
  np.testing.assert_array_equal(ids, np.frombuffer(data, np.uint8))
  assert tokenizer.decode_bytes(ids) == data
  np.testing.assert_array_equal(tokenizer.encode(tokenizer.decode(ids)), ids)
  assert tokenizer.decode(tokenizer.encode("snow ☃ ünïcode")) == "snow ☃ ünïcode"
  with pytest.raises(ValueError, match="token ids must lie in"):
    tokenizer.decode([259])


def test_byte_tokenizer_fingerprint_identifies_the_vocabulary():
  assert ByteTokenizer().fingerprint == ByteTokenizer().fingerprint
  assert len(ByteTokenizer().fingerprint) == 64
  assert _NoSpecialsTokenizer().fingerprint != ByteTokenizer().fingerprint


# --- packing ---------------------------------------------------------------------------------


def _source(documents, seq_len, tokenizer=None):
  tokenizer = tokenizer or ByteTokenizer()
  return text.TextSource(text.pack_documents(documents, tokenizer), tokenizer, seq_len)


def test_packing_three_documents_exactly():
  # Stream: B a b E | B c d e E | B f E (12 tokens), S = 5 → windows of 6 at 0, 5, 10.
  a, b, c, d, e, f = b"abcdef"
  source = _source([("1", b"ab"), ("2", b"cde"), ("3", b"f")], seq_len=5)
  assert (source.num_tokens, source.num_documents, source.num_bytes, len(source)) == (12, 3, 6, 3)
  assert source.packed.tokens.dtype == np.uint16
  expected = {
    # Window 0 = B a b E B c: the next document's BOS is a target and is not scored.
    0: dict(
      inputs=[BOS, a, b, EOS, BOS],
      targets=[a, b, EOS, BOS, c],
      loss_mask=[1, 1, 1, 0, 1],
      positions=[0, 1, 2, 3, 0],
      segment_ids=[1, 1, 1, 1, 2],
      target_bytes=[1, 1, 0, 0, 1],
    ),
    # Window 1 = c d e E B f: starts inside document 2, so its positions do not start at 0.
    1: dict(
      inputs=[c, d, e, EOS, BOS],
      targets=[d, e, EOS, BOS, f],
      loss_mask=[1, 1, 1, 0, 1],
      positions=[1, 2, 3, 4, 0],
      segment_ids=[1, 1, 1, 1, 2],
      target_bytes=[1, 1, 0, 0, 1],
    ),
    # Window 2 = f E, then padding.
    2: dict(
      inputs=[f, EOS, PAD, PAD, PAD],
      targets=[EOS, PAD, PAD, PAD, PAD],
      loss_mask=[1, 0, 0, 0, 0],
      positions=[1, 2, 0, 0, 0],
      segment_ids=[1, 1, 0, 0, 0],
      target_bytes=[0, 0, 0, 0, 0],
    ),
  }
  batch = source.read(np.array([2, 0, 1]))
  assert set(batch) == set(_KEYS)
  for key in _KEYS:
    dtype = np.bool_ if key == "loss_mask" else np.int32
    assert batch[key].dtype == dtype and batch[key].shape == (3, 5), key
    np.testing.assert_array_equal(
      batch[key], np.asarray([expected[i][key] for i in (2, 0, 1)], dtype), err_msg=key
    )
  with pytest.raises(IndexError):
    source.read(np.array([3]))


def _reference_rows(documents, tokenizer, seq_len):
  """Every example, built token by token from the definition (module docstring of text.py)."""
  stream, document_of, position_of = [], [], []
  for index, (_, data) in enumerate(documents):
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids += tokenizer.encode(data).tolist()
    ids += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    stream += ids
    document_of += [index] * len(ids)
    position_of += list(range(len(ids)))
  pad = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
  rows = []
  for start in range(0, len(stream) - 1, seq_len):
    row = {key: [] for key in _KEYS}
    for t in range(start, start + seq_len):
      has_input, has_target = t < len(stream), t + 1 < len(stream)
      target = stream[t + 1] if has_target else pad
      row["inputs"].append(stream[t] if has_input else pad)
      row["targets"].append(target)
      row["loss_mask"].append(has_target and document_of[t + 1] == document_of[t])
      row["positions"].append(position_of[t] if has_input else 0)
      first_document = document_of[start]
      row["segment_ids"].append(document_of[t] - first_document + 1 if has_input else 0)
      row["target_bytes"].append(int(tokenizer.token_bytes[target]) if has_target else 0)
    rows.append(row)
  return rows


@pytest.mark.parametrize(
  "tokenizer, seq_len", [(ByteTokenizer(), 7), (_NoSpecialsTokenizer(), 4), (_WideTokenizer(), 16)]
)
def test_packing_matches_a_token_by_token_reference(tokenizer, seq_len):
  rng = np.random.default_rng(1)
  lengths = [0, 3, 0, 0, 11, 1, 25, 2, 0, 9]  # empty documents, documents shorter than a row
  documents = [
    (str(i), rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for i, n in enumerate(lengths)
  ]
  source = _source(documents, seq_len, tokenizer)
  expected = _reference_rows(documents, tokenizer, seq_len)
  assert len(source) == len(expected)
  batch = source.read(np.arange(len(source)))
  for key in _KEYS:
    np.testing.assert_array_equal(batch[key], [row[key] for row in expected], err_msg=key)
  assert source.packed.tokens.dtype == (np.int32 if tokenizer.vocab_size > 2**16 else np.uint16)
  # Every byte of text is a scored target exactly once (bits per byte covers the split), but
  # for the first byte of each document when there is no BOS to predict it from.
  first_bytes = 0 if tokenizer.bos_id is not None else sum(n > 0 for n in lengths)
  assert source.num_bytes == sum(lengths)
  assert (batch["target_bytes"] * batch["loss_mask"]).sum() == sum(lengths) - first_bytes


def test_fingerprint_follows_content_tokenizer_and_length():
  documents = [("a", b"hello"), ("b", b"world")]
  base = _source(documents, 4).fingerprint
  assert _source(documents, 4).fingerprint == base
  assert _source([("a", b"hellp"), ("b", b"world")], 4).fingerprint != base
  assert _source([("a", b"hellow"), ("b", b"orld")], 4).fingerprint != base  # boundaries count
  assert _source(documents, 5).fingerprint != base
  assert _source(documents, 4, _NoSpecialsTokenizer()).fingerprint != base


# --- splits and local corpora ----------------------------------------------------------------


def _reference_split(path):
  fraction = int(hashlib.sha256(path.encode()).hexdigest()[:16], 16) / 2**64
  return "train" if fraction < 0.9 else "validation" if fraction < 0.95 else "test"


def test_split_of_is_a_hash_of_the_path():
  paths = [f"pkg{i % 7}/module_{i}.py" for i in range(4000)]
  splits = [text.split_of(path) for path in paths]
  assert splits == [_reference_split(path) for path in paths]
  counts = {split: splits.count(split) for split in text.SPLITS}
  # Binomial: validation and test ~ 200 ± 14 each.
  assert 3500 < counts["train"] < 3700 and all(
    140 < counts[s] < 260 for s in ("validation", "test")
  )


def _write_corpus(root, num_files=100):
  contents = {}
  for i in range(num_files):
    relative = f"part{i % 3}/doc{i}.txt" if i % 2 else f"doc{i}.md"
    contents[relative] = f"document {i}\n".encode() * (i % 5) + bytes([i])
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(contents[relative])
  (root / ".hidden").write_text("not a document")
  (root / ".git").mkdir()
  (root / ".git" / "HEAD").write_text("not a document")
  return contents


def _documents(source):
  """{name: bytes} of a source's documents, cut back out of its stream."""
  tokens, starts = source.packed.tokens, source.packed.document_starts
  ends = np.append(starts[1:], len(tokens))
  return {
    name: ByteTokenizer().decode_bytes(tokens[start + 1 : end - 1])
    for name, start, end in zip(source.packed.document_names, starts, ends)
  }


def test_text_files_split_by_file_disjoint_and_complete(tmp_path):
  contents = _write_corpus(tmp_path)
  seen = {}
  for split in text.SPLITS:
    source = text.open_text_split("text_files", split, seq_len=32, data_dir=str(tmp_path))
    documents = _documents(source)
    assert documents and list(documents) == sorted(documents)
    assert all(_reference_split(name) == split for name in documents)
    assert not set(documents) & set(seen)
    seen.update(documents)
  assert seen == contents  # every non-hidden file, byte for byte, in exactly one split


def test_text_files_glob_keeps_paths_relative_to_its_fixed_part(tmp_path):
  contents = _write_corpus(tmp_path)
  txt = {name: data for name, data in contents.items() if name.endswith(".txt")}
  names = []
  for split in text.SPLITS:
    source = text.open_text_split(
      "text_files", split, seq_len=32, data_dir=str(tmp_path / "**" / "*.txt")
    )
    names += source.packed.document_names
    assert all(_reference_split(name) == split for name in source.packed.document_names)
  assert sorted(names) == sorted(txt)


def test_split_packs_once_per_process(tmp_path):
  _write_corpus(tmp_path)
  first = text.open_text_split("text_files", "train", seq_len=32, data_dir=str(tmp_path))
  again = text.open_text_split("text_files", "train", seq_len=64, data_dir=str(tmp_path))
  assert again.packed is first.packed and len(again) == -(-(first.num_tokens - 1) // 64)


def test_missing_or_empty_local_data_is_reported(tmp_path):
  with pytest.raises(DataUnavailableError, match="No files at"):
    text.open_text_split("text_files", "train", seq_len=8, data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="data.dir"):
    text.open_text_split("text_files", "train", seq_len=8)
  with pytest.raises(DataUnavailableError, match="No Python sources under"):
    text.open_text_split("stdlib", "train", seq_len=8, data_dir=str(tmp_path))
  (tmp_path / "only.txt").write_text("one file")
  empty_split = next(s for s in text.SPLITS if s != _reference_split("only.txt"))
  with pytest.raises(DataUnavailableError, match="holds none of its 1 files"):
    text.open_text_split("text_files", empty_split, seq_len=8, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="not a local corpus"):
    text.open_text_split("stdlb", "train", seq_len=8)
  with pytest.raises(ValueError, match="data.source"):
    text.open_text_split("stdlib", "train", seq_len=8, source="idx")
  with pytest.raises(ValueError, match="split"):
    text.open_text_split("stdlib", "dev", seq_len=8)


def _reference_stdlib_files():
  root = sysconfig.get_paths()["stdlib"]
  skipped = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
  files = []
  for directory, _, names in os.walk(root):
    parts = os.path.relpath(directory, root).split(os.sep)
    if skipped & set(parts) or any(p.startswith((".", "config-")) for p in parts if p != "."):
      continue
    for name in names:
      if name.endswith(".py") and not name.startswith("_sysconfigdata"):
        files.append("/".join([*(p for p in parts if p != "."), name]))
  return root, files


def test_stdlib_corpus_splits():
  root, files = _reference_stdlib_files()
  assert len(files) > 500  # the library proper: ~730 files on CPython 3.11
  by_split = {
    split: sorted(f for f in files if _reference_split(f) == split) for split in text.SPLITS
  }
  for split in text.SPLITS:
    source = text.open_text_split("stdlib", split, seq_len=256)
    assert list(source.packed.document_names) == by_split[split]
    assert source.num_documents == len(by_split[split]) > 0
    sizes = sum(os.path.getsize(os.path.join(root, *f.split("/"))) for f in by_split[split])
    assert source.num_bytes == sizes
    assert source.num_tokens == sizes + 2 * source.num_documents
    assert len(source) == -(-(source.num_tokens - 1) // 256)
    assert source.vocab_size == 259 and source.seq_len == 256 and len(source.fingerprint) == 64
  # A known module, byte for byte, wherever its hash put it.
  source = text.open_text_split("stdlib", _reference_split("abc.py"), seq_len=256)
  with open(os.path.join(root, "abc.py"), "rb") as f:
    assert _documents(source)["abc.py"] == f.read()


# --- TFDS ------------------------------------------------------------------------------------


class _FakeTextDataSource:
  """What `tfds.data_source` returns for a text dataset: `len` and record dicts by index."""

  def __init__(self, texts, batched=True):
    # TFDS gives text features as bytes; accept the other forms a custom source may use.
    forms = (lambda t: t.encode(), lambda t: np.asarray(t.encode(), object), lambda t: t)
    self.records = [{"text": forms[i % 3](t), "id": i} for i, t in enumerate(texts)]
    if batched:
      self.__getitems__ = lambda keys: [self.records[key] for key in keys]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, key):
    return self.records[key]


def _prepare_tfds(tmp_path, monkeypatch, name, fake, file_format="array_record"):
  tfds = pytest.importorskip("tensorflow_datasets")
  version_dir = tmp_path / name / "1.0.0"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(json.dumps({"fileFormat": file_format}))
  calls = []

  def data_source(dataset_name, **kwargs):
    calls.append((dataset_name, kwargs))
    return fake

  monkeypatch.setattr(tfds, "data_source", data_source)
  return calls


@pytest.mark.parametrize("batched", [True, False])
def test_tfds_text_records_are_packed(tmp_path, monkeypatch, batched):
  texts = ["first record", "zweiter Datensatz ü", "", "third ☃"]
  fake = _FakeTextDataSource(texts, batched)
  calls = _prepare_tfds(tmp_path, monkeypatch, "my_text", fake)
  source = text.open_text_split(
    "my_text", "validation", seq_len=8, source="tfds", data_dir=str(tmp_path)
  )
  assert calls == [("my_text", dict(split="validation", data_dir=str(tmp_path), download=False))]
  assert _documents(source) == {f"validation[{i}]": t.encode() for i, t in enumerate(texts)}
  reference = _source([(str(i), t.encode()) for i, t in enumerate(texts)], seq_len=8)
  for key in _KEYS:
    np.testing.assert_array_equal(
      source.read(np.arange(len(source)))[key], reference.read(np.arange(len(reference)))[key]
    )


def test_tfds_records_without_the_text_feature(tmp_path, monkeypatch):
  _prepare_tfds(tmp_path, monkeypatch, "no_text", _FakeTextDataSource(["a"]))
  with pytest.raises(ValueError, match="no feature 'content'"):
    text.open_text_split(
      "no_text", "train", seq_len=8, source="tfds", data_dir=str(tmp_path), text_key="content"
    )


def test_tfds_missing_or_unusable_says_how_to_prepare(tmp_path, monkeypatch):
  with pytest.raises(DataUnavailableError) as error:
    text.open_text_split("absent_text", "train", seq_len=8, source="tfds", data_dir=str(tmp_path))
  message = str(error.value)
  assert "No prepared TFDS 'absent_text'" in message
  assert "tfds build absent_text --file_format=array_record" in message
  assert "--config.data.name=stdlib" in message
  _prepare_tfds(tmp_path, monkeypatch, "old_text", None, file_format="tfrecord")
  with pytest.raises(DataUnavailableError, match="prepared as tfrecord"):
    text.open_text_split("old_text", "train", seq_len=8, source="tfds", data_dir=str(tmp_path))
