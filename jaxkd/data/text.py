"""Offline text corpora packed into fixed-length language-model examples.

`open_text_split(name, split, seq_len=S, source=...)` gives a random-access `TextSource` whose
`read(indices)` returns the language-model batch of the jaxkd protocol (inputs, targets,
loss_mask, positions, segment_ids, target_bytes). Corpora:

  * source 'local', name 'stdlib': the `*.py` files of the running interpreter's standard library
    (`sysconfig.get_paths()['stdlib']`, or `data_dir`), without site-packages/dist-packages, the
    test directories (`test`, `tests`, `idle_test`: two thirds of the bytes, much of it
    repetitive assertions and deliberately malformed or generated files), `__pycache__` and the
    install-generated build configuration (`_sysconfigdata*.py`, `config-*/`, which hold paths
    of the machine they were built on). 12.1 MB in 732 files on CPython 3.11.7.
  * source 'local', name 'text_files': every non-hidden file under the directory `data_dir`
    (recursively), or the files matching the glob `data_dir` (`**` recurses).
  * source 'tfds', any name: the text feature `text_key` of a TFDS dataset prepared as
    array_record, read with `tfds.data_source(..., download=False)`; TFDS's own splits.

Splits of local corpora are by file: a file goes to 'train', 'validation' or 'test' by
u = (first 8 bytes of sha256(relative POSIX path), big-endian) / 2⁶⁴ against `SPLIT_FRACTIONS`
(u < 0.90 → train, u < 0.95 → validation, else test). Adding or removing a file never moves
another one, and the split is the same on every machine holding the same files.

Packing. Each document (a file, a record) becomes [BOS] + encode(document) + [EOS]; the
documents of a split, in order (files sorted by relative path), are concatenated into one
stream x of T tokens. Example i of a split with sequence length S is the window
w = x[i·S : i·S + S + 1], with inputs = w[:S] and targets = w[1:] (the causal shift is done
here, once), so consecutive windows share one token and every stream token but the first is a
target exactly once. The last window is padded past the end of the stream, not dropped, so that
an evaluation scores every token: there are ⌈(T − 1) / S⌉ examples. Per position t of a row:

  * positions[t]   = offset of inputs[t] from the start (BOS) of its document; 0 on padding;
  * segment_ids[t] = 1 + (document of inputs[t]) − (document of inputs[0]); 0 on padding;
  * loss_mask[t]   = targets[t] is in the stream and in the same document as inputs[t] (so
    the BOS that follows an EOS is never scored, nor is padding);
  * target_bytes[t] = tokenizer.token_bytes[targets[t]] (0 for BOS, EOS and padding).

Padding positions hold PAD in inputs and targets, position 0, segment 0, loss_mask False.

Memory: a split is held once per process as its stream (uint16 ids when the vocabulary fits in
16 bits, else int32; 2 bytes per byte of text with the byte tokenizer) and the stream offsets of
its documents; a batch is a gather of B·(S + 1) tokens and a binary search of their documents.
The whole split must fit in host memory: this path is meant for corpora up to a few GB.
"""

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from jaxkd.data.tokenizer import ByteTokenizer, Tokenizer
from jaxkd.errors import DataUnavailableError

SPLITS = ("train", "validation", "test")
# Fraction of the files of a local corpus in each split, in the order of SPLITS.
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
TEXT_SOURCES = ("local", "tfds")

_STDLIB_SKIPPED_DIRS = frozenset(
  {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def split_of(relative_path: str) -> str:
  """The split ('train', 'validation' or 'test') a file with this relative POSIX path is in."""
  digest = hashlib.sha256(relative_path.encode("utf-8", "surrogateescape")).digest()
  fraction = int.from_bytes(digest[:8], "big") / 2**64
  end = 0.0
  for split, split_fraction in zip(SPLITS, SPLIT_FRACTIONS):
    end += split_fraction
    if fraction < end:
      return split
  return SPLITS[-1]


def _walk_files(root: str, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]):
  """Sorted relative POSIX paths of the files under `root` that pass the filters."""
  paths = []
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = [d for d in subdirectories if keep_dir(d)]
    relative = os.path.relpath(directory, root)
    prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
    paths += [prefix + f for f in files if keep_file(f)]
  return sorted(paths)


def stdlib_files(root: str) -> list[str]:
  """The standard-library sources under `root` that the 'stdlib' corpus holds (module docstring)."""
  return _walk_files(
    root,
    keep_dir=lambda d: d not in _STDLIB_SKIPPED_DIRS and not d.startswith((".", "config-")),
    keep_file=lambda f: f.endswith(".py") and not f.startswith("_sysconfigdata"),
  )


def text_files(directory_or_glob: str) -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the 'text_files' corpus at `directory_or_glob`.

  A directory holds every file under it whose path has no hidden (dot) component. For a glob,
  the root is its longest leading part without wildcards, so paths (and hence splits) do not
  depend on which other files match.
  """
  pattern = os.path.expanduser(directory_or_glob)
  if os.path.isdir(pattern):
    hidden = lambda name: name.startswith(".")
    return pattern, _walk_files(pattern, lambda d: not hidden(d), lambda f: not hidden(f))
  parts = pattern.split(os.sep)
  fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
  root = os.sep.join(parts[:fixed]) or ("." if not pattern.startswith(os.sep) else os.sep)
  matches = [path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path)]
  return root, sorted(os.path.relpath(path, root).replace(os.sep, "/") for path in matches)


def _list_stdlib(data_dir: str) -> tuple[str, list[str]]:
  root = os.path.expanduser(data_dir) if data_dir else sysconfig.get_paths()["stdlib"]
  files = stdlib_files(root) if os.path.isdir(root) else []
  if not files:
    raise DataUnavailableError(
      f"No Python sources under {root}: the 'stdlib' corpus reads the *.py files of a Python "
      "standard library, and this one is missing or ships without its sources (some minimal "
      "and embedded installs keep only bytecode). Install a full Python, or point "
      "`--config.data.dir` at a standard library with sources (e.g. the Lib/ directory of a "
      "CPython source tree), or use `--config.data.name=text_files` with a directory of text."
    )
  return root, files


def _list_text_files(data_dir: str) -> tuple[str, list[str]]:
  if not data_dir:
    raise ValueError(
      "data.dir: the 'text_files' corpus needs a directory or glob of text files "
      "(e.g. `--config.data.dir='~/books/**/*.txt'`)."
    )
  root, files = text_files(data_dir)
  if not files:
    raise DataUnavailableError(
      f"No files at {data_dir!r}: the 'text_files' corpus reads every non-hidden file under a "
      "directory (recursively) or the files matching a glob ('DIR/**/*.txt'). Point "
      "`--config.data.dir` at one, or use `--config.data.name=stdlib`, which needs no data."
    )
  return root, files


LOCAL_CORPORA: dict[str, Callable[[str], tuple[str, list[str]]]] = {
  "stdlib": _list_stdlib,
  "text_files": _list_text_files,
}


@dataclasses.dataclass(frozen=True)
class PackedSplit:
  """A split as one token stream: its documents, each [BOS] + tokens + [EOS], in order."""

  tokens: np.ndarray  # uint16 or int32 [T]
  document_starts: np.ndarray  # int64 [num_documents], stream offset of each document
  document_names: tuple[str, ...]  # relative paths, or 'split[i]' for TFDS records
  num_bytes: int  # bytes of text in the documents
  content_fingerprint: str  # sha256 over the documents' lengths and bytes, in order


def _stream_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def pack_documents(documents: Iterable[tuple[str, bytes]], tokenizer: Tokenizer) -> PackedSplit:
  """Tokenize (name, text) documents and concatenate them, each as [BOS] + ids + [EOS].

  BOS or EOS is left out when the tokenizer has none; document boundaries are kept in
  `document_starts` either way, never inferred from token values.
  """
  dtype = _stream_dtype(tokenizer.vocab_size)
  bos = np.asarray([] if tokenizer.bos_id is None else [tokenizer.bos_id], dtype)
  eos = np.asarray([] if tokenizer.eos_id is None else [tokenizer.eos_id], dtype)
  pieces, starts, names = [], [], []
  num_tokens = num_bytes = 0
  content = hashlib.sha256()
  for name, text in documents:
    content.update(len(text).to_bytes(8, "little") + text)
    ids = np.asarray(tokenizer.encode(text))
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
      raise ValueError(f"{name}: token ids outside [0, {tokenizer.vocab_size})")
    pieces += [bos, ids.astype(dtype), eos]
    starts.append(num_tokens)
    names.append(name)
    num_tokens += len(bos) + len(ids) + len(eos)
    num_bytes += len(text)
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
  document_starts = np.asarray(starts, np.int64)
  for array in (tokens, document_starts):
    array.setflags(write=False)  # Shared by every source of the split (and reader threads).
  return PackedSplit(tokens, document_starts, tuple(names), num_bytes, content.hexdigest())


def _read_files(root: str, relative_paths: list[str]) -> Iterator[tuple[str, bytes]]:
  for path in relative_paths:
    with open(os.path.join(root, *path.split("/")), "rb") as f:
      yield path, f.read()


def _how_to_prepare(name: str, text_key: str, problem: str) -> str:
  """The one paragraph printed when a TFDS text dataset cannot be read."""
  return (
    f"{problem} jaxkd reads TFDS {name!r} as array_record files through `tfds.data_source` "
    f"and never downloads at training time. Prepare it once, on a machine with network access "
    f"and TensorFlow installed: `pip install tensorflow tensorflow-datasets && tfds build "
    f"{name} --file_format=array_record --data_dir=DIR`, copy DIR here if needed, then pass "
    f"`--config.data.dir=DIR`; its records must hold the text in the feature {text_key!r}. "
    "To train without it, use a local corpus: `--config.data.source=local "
    "--config.data.name=stdlib` (the Python standard library's own sources, always present) "
    "or `--config.data.name=text_files --config.data.dir=DIR_OR_GLOB`."
  )


def _tfds_records(name: str, split: str, data_dir: str, text_key: str):
  """`tfds.data_source` of a prepared array_record dataset, or DataUnavailableError saying why."""
  import tensorflow_datasets as tfds  # Deferred: seconds of imports the local corpora skip.

  data_dir = os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR
  # TFDS would answer a missing dataset with a puzzling "TFRECORD is not supported".
  infos = sorted(glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json")))
  if not infos:
    problem = f"No prepared TFDS {name!r} under {data_dir} (no {name}/<version>/dataset_info.json)."
    raise DataUnavailableError(_how_to_prepare(name, text_key, problem))
  with open(infos[-1]) as f:
    file_format = json.load(f).get("fileFormat", "tfrecord")
  if file_format != "array_record":
    problem = (
      f"TFDS {name!r} under {data_dir} is prepared as {file_format}, which has no random "
      "access; it must be rebuilt as array_record."
    )
    raise DataUnavailableError(_how_to_prepare(name, text_key, problem))
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def _as_bytes(value) -> bytes:
  """A text feature as TFDS returns it (bytes, a 0-d numpy array, or str) → bytes."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def record_texts(
  records, split: str, text_key: str, chunk: int = 1024
) -> Iterator[tuple[str, bytes]]:
  """('split[i]', text) of every record of a random-access source (`len` and `__getitems__`, or
  `__getitem__`), read in chunks of `chunk` records."""
  for start in range(0, len(records), chunk):
    keys = list(range(start, min(start + chunk, len(records))))
    batch = (
      records.__getitems__(keys)
      if hasattr(records, "__getitems__")
      else [records[key] for key in keys]
    )
    for key, record in zip(keys, batch):
      if text_key not in record:
        raise ValueError(
          f"data.text_key: the records of {split!r} have no feature {text_key!r} "
          f"(they have {sorted(record)})."
        )
      yield f"{split}[{key}]", _as_bytes(record[text_key])


class TextSource:
  """Random-access language-model examples of one packed split (see the module docstring).

  `read(indices)` → {'inputs', 'targets', 'positions', 'segment_ids', 'target_bytes'}: int32
  [B, S]; 'loss_mask': bool [B, S].
  """

  def __init__(self, packed: PackedSplit, tokenizer: Tokenizer, seq_len: int):
    if seq_len < 1:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self.packed = packed
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self._token_bytes = np.asarray(tokenizer.token_bytes, np.int32)
    # Padding inputs are masked everywhere; any valid id would do, PAD says what they are.
    pad_ids = (tokenizer.pad_id, tokenizer.eos_id, 0)
    self._pad_id = next(i for i in pad_ids if i is not None)
    self._window = np.arange(seq_len + 1)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def num_tokens(self) -> int:
    """Length T of the split's stream, specials included."""
    return len(self.packed.tokens)

  @property
  def num_documents(self) -> int:
    return len(self.packed.document_starts)

  @property
  def num_bytes(self) -> int:
    return self.packed.num_bytes

  @property
  def num_examples(self) -> int:
    return max(0, -(-(self.num_tokens - 1) // self.seq_len))

  def __len__(self) -> int:
    return self.num_examples

  @property
  def fingerprint(self) -> str:
    """Identifies `read(i)` for every i: the documents, the tokenizer and the sequence length."""
    description = (
      f"{self.packed.content_fingerprint};tokenizer={self.tokenizer.fingerprint};"
      f"seq_len={self.seq_len};bos={self.tokenizer.bos_id};eos={self.tokenizer.eos_id}"
    )
    return hashlib.sha256(description.encode()).hexdigest()

  def _documents(self, offsets: np.ndarray) -> np.ndarray:
    """Index of the document holding each stream offset of the rows `offsets` [B, S + 1].

    Two binary searches per row, not one per token: the document of the row's first token plus
    a running count of the document starts inside the row.
    """
    starts = self.packed.document_starts
    first = np.searchsorted(starts, offsets[:, 0], side="right") - 1
    last = np.searchsorted(starts, offsets[:, -1], side="right") - 1
    counts = last - first  # Documents that start after the row's first token.
    rows = np.repeat(np.arange(len(offsets)), counts)
    inside = np.arange(counts.sum()) + np.repeat(first + 1 - (np.cumsum(counts) - counts), counts)
    boundaries = np.zeros(offsets.shape, np.int32)
    # add.at, not +=: empty documents (no specials, no text) share their start with the next.
    np.add.at(boundaries, (rows, starts[inside] - offsets[rows, 0]), 1)
    return first[:, None] + np.cumsum(boundaries, axis=1)

  def read(self, indices) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"example indices must lie in [0, {len(self)}), got {indices}")
    tokens = self.packed.tokens
    offsets = indices[:, None] * self.seq_len + self._window  # [B, S + 1] stream offsets
    in_stream = offsets < len(tokens)
    # np.take rather than fancy indexing: about twice as fast on these small gathers.
    window = np.where(in_stream, np.take(tokens, offsets, mode="clip"), self._pad_id)
    window = window.astype(np.int32)
    documents = self._documents(offsets)
    input_documents, input_in_stream = documents[:, :-1], in_stream[:, :-1]
    target_in_stream = in_stream[:, 1:]
    positions = offsets[:, :-1] - np.take(self.packed.document_starts, input_documents)
    segment_ids = input_documents - input_documents[:, :1] + 1
    targets = window[:, 1:]
    return {
      "inputs": window[:, :-1],
      "targets": targets,
      "loss_mask": target_in_stream & (documents[:, 1:] == input_documents),
      "positions": np.where(input_in_stream, positions, 0).astype(np.int32),
      "segment_ids": np.where(input_in_stream, segment_ids, 0).astype(np.int32),
      "target_bytes": np.where(target_in_stream, np.take(self._token_bytes, targets), 0),
    }

  def __repr__(self) -> str:
    return (
      f"TextSource({self.num_documents} documents, {self.num_bytes} bytes, "
      f"{self.num_tokens} tokens, {len(self)} examples of {self.seq_len})"
    )


# Packed splits, built once per process: (source, where, what, tokenizer fingerprint) →
# PackedSplit. Bounded: the train, validation and test splits of a corpus fit.
_PACKED_CACHE: collections.OrderedDict[tuple, PackedSplit] = collections.OrderedDict()
_PACKED_CACHE_SIZE = 4


def _cached(key: tuple, build: Callable[[], PackedSplit]) -> PackedSplit:
  if key in _PACKED_CACHE:
    _PACKED_CACHE.move_to_end(key)
    return _PACKED_CACHE[key]
  packed = build()
  _PACKED_CACHE[key] = packed
  while len(_PACKED_CACHE) > _PACKED_CACHE_SIZE:
    _PACKED_CACHE.popitem(last=False)
  return packed


def open_text_split(
  name: str,
  split: str,
  *,
  seq_len: int,
  source: str = "local",
  data_dir: str = "",
  tokenizer: Tokenizer | None = None,
  text_key: str = "text",
) -> TextSource:
  """The `split` of corpus `name` as `seq_len`-token language-model examples.

  Args:
    name: a key of LOCAL_CORPORA ('stdlib', 'text_files') when `source` is 'local', else a
      TFDS dataset name.
    split: 'train', 'validation' or 'test' for local corpora (split by file); any TFDS split
      string for 'tfds'.
    seq_len: S, the tokens per example.
    source: 'local' or 'tfds'.
    data_dir: the stdlib root ('' = this interpreter's), the directory or glob of
      'text_files', or the TFDS data dir ('' = TFDS's default).
    tokenizer: any `Tokenizer`; `ByteTokenizer()` when None.
    text_key: the TFDS feature holding the text.
  """
  tokenizer = tokenizer or ByteTokenizer()
  if source == "local":
    if name not in LOCAL_CORPORA:
      raise ValueError(f"data.name: {name!r} is not a local corpus: one of {list(LOCAL_CORPORA)}")
    if split not in SPLITS:
      raise ValueError(f"split {split!r} is not one of {SPLITS}")
    root, files = LOCAL_CORPORA[name](data_dir)
    split_files = [path for path in files if split_of(path) == split]
    if not split_files:
      raise DataUnavailableError(
        f"The {split!r} split of {name} at {root} holds none of its {len(files)} files: files "
        f"go to train/validation/test by a hash of their path, in proportions {SPLIT_FRACTIONS}; "
        "a corpus needs a few dozen files for every split to get one."
      )
    key = (source, os.path.abspath(root), tuple(split_files), tokenizer.fingerprint)
    packed = _cached(key, lambda: pack_documents(_read_files(root, split_files), tokenizer))
  elif source == "tfds":
    key = (source, name, data_dir, split, text_key, tokenizer.fingerprint)
    packed = _cached(
      key,
      lambda: pack_documents(
        record_texts(_tfds_records(name, split, data_dir, text_key), split, text_key), tokenizer
      ),
    )
  else:
    raise ValueError(f"data.source: {source!r} is not one of {TEXT_SOURCES}")
  return TextSource(packed, tokenizer, seq_len)
