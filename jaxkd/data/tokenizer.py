"""Tokenizers for language-model data: the protocol every data path relies on, and a byte-level one.

A tokenizer maps text to integer ids without adding special tokens; the data path (text.py)
adds BOS/EOS around each document. What jaxkd needs of it (`Tokenizer`):

  * `vocab_size`, and the special ids `bos_id`, `eos_id`, `pad_id` (ints, or None if absent);
  * `encode(text: str | bytes) -> int32 [n]` and `decode(ids) -> str`;
  * `token_bytes`: int32 [vocab_size], the UTF-8 byte length each id stands for (0 for
    specials), so that a loss in nats per token converts to bits per byte,
    bpb = Σ nll / (ln 2 · Σ token_bytes[targets]);
  * `fingerprint`: a string that changes whenever the id ↔ text mapping does (caches of
    packed data and of teacher outputs are keyed on it).
"""

import hashlib
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  """What the language-model data path needs of a tokenizer (see the module docstring)."""

  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  token_bytes: np.ndarray
  fingerprint: str

  def encode(self, text: str | bytes) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are the byte values, then BOS = 256, EOS = 257, PAD = 258.

  vocab_size is 259, not rounded up to a multiple of 64 or 128: every id is a real token, so
  the softmax has no never-seen classes for a student to waste probability on or for a
  logit-distillation loss to compare, and teacher and student agree on V by construction. XLA
  pads the [D, V] unembedding matmul to its tiles internally, and at V = 259 that matmul is a
  negligible part of a transformer step.

  The round trip is exact for arbitrary bytes, not only valid UTF-8: `decode` maps bytes that
  are not UTF-8 to lone surrogates (Python's "surrogateescape", PEP 383) and `encode` maps them
  back, so `encode(decode(encode(b))) == encode(b)` for every `b`. Special ids stand for no text
  and `decode` drops them (`decode_bytes` gives the raw bytes).
  """

  vocab_size = 259
  bos_id = 256
  eos_id = 257
  pad_id = 258

  def __init__(self):
    token_bytes = np.zeros(self.vocab_size, np.int32)
    token_bytes[:256] = 1
    token_bytes.setflags(write=False)
    self.token_bytes = token_bytes
    description = f"bytes:256;bos={self.bos_id};eos={self.eos_id};pad={self.pad_id}"
    self.fingerprint = hashlib.sha256(description.encode()).hexdigest()

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode_bytes(self, ids) -> bytes:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(
        f"token ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}"
      )
    return ids[ids < 256].astype(np.uint8).tobytes()

  def decode(self, ids) -> str:
    return self.decode_bytes(ids).decode("utf-8", "surrogateescape")

  def __repr__(self) -> str:
    return f"ByteTokenizer(vocab_size={self.vocab_size})"
