"""Hugging Face `tokenizer.json` tokenizers behind jaxkd's tokenizer protocol.

`load_tokenizer(directory)` wraps the `tokenizers` library (the Rust tokenizer every Hugging
Face "fast" tokenizer is) with what the language-model data path needs: `vocab_size`, `bos_id`,
`eos_id`, `pad_id`, `encode` (no special tokens added), `decode`, `token_bytes` and
`fingerprint` (see `jaxkd.data.tokenizer`).

Special ids: tokenizer_config.json's `bos_token` / `eos_token` / `pad_token` (a string or an
AddedToken dict; an explicit null means none), else generation_config.json's, else
config.json's `*_token_id` (the first of a list).

token_bytes: the UTF-8 length of the text each token decodes to, from the vocabulary strings.
Byte-level BPE (GPT-2, Llama 3, Qwen; a `ByteLevel` decoder) writes one character per byte, so
the length is the number of characters. SentencePiece-style vocabularies (Llama 2, Gemma) write a
space as '▁' and a byte-fallback token as '<0xNN>' (one byte). Special tokens count 0 bytes.
For SentencePiece-style tokenizers that prepend '▁' to a text, a document counts one byte more
than its UTF-8 length.
"""

import hashlib
import json
import os
import re

import numpy as np
from etils import epath

TOKENIZER_FILE = "tokenizer.json"
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIAL_NAMES = ("bos", "eos", "pad")


def _uses_byte_level(component) -> bool:
  """Whether a tokenizer.json decoder (or a Sequence of them) maps characters to bytes."""
  if not component:
    return False
  if component.get("type") == "ByteLevel":
    return True
  return any(_uses_byte_level(part) for part in component.get("decoders", ()))


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _read_json(path: epath.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the jaxkd tokenizer protocol; build with `load_tokenizer`.

  `vocabulary_fingerprint` identifies the id ↔ text mapping (vocabulary, merges, added tokens,
  normaliser, pre-tokeniser, decoder); `fingerprint` adds the special ids (a different EOS
  packs different batches).
  """

  def __init__(self, tokenizer, spec: dict, *, bos_id, eos_id, pad_id, name: str = ""):
    """tokenizer: a `tokenizers.Tokenizer`; spec: its tokenizer.json as a dict."""
    self._tokenizer = tokenizer
    self.name = name
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    vocabulary = {
      key: spec.get(key)
      for key in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")
    }
    self.vocabulary_fingerprint = _digest(vocabulary)
    self.fingerprint = _digest([self.vocabulary_fingerprint, bos_id, eos_id, pad_id])
    self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    token_bytes = self._token_bytes(_uses_byte_level(spec.get("decoder")))
    token_bytes.setflags(write=False)
    self.token_bytes = token_bytes

  def _token_bytes(self, byte_level: bool) -> np.ndarray:
    added = self._tokenizer.get_added_tokens_decoder()
    lengths = np.zeros(self.vocab_size, np.int32)
    for token_id in range(self.vocab_size):
      if token_id in added:
        token = added[token_id]
        # Added tokens hold their text as is, not in the byte-level alphabet.
        lengths[token_id] = 0 if token.special else len(token.content.encode("utf-8"))
        continue
      piece = self._tokenizer.id_to_token(token_id)
      if piece is None:
        continue
      if byte_level:
        lengths[token_id] = len(piece)
      elif _BYTE_FALLBACK.fullmatch(piece):
        lengths[token_id] = 1
      else:
        lengths[token_id] = len(piece.replace("▁", " ").encode("utf-8"))
    return lengths

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids of `text`, no special tokens added (bytes are decoded as UTF-8, invalid
    sequences replaced by U+FFFD: the `tokenizers` library encodes text, not bytes)."""
    if not isinstance(text, str):
      text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    """The text of `ids`, special tokens dropped."""
    return self._tokenizer.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _special_ids(directory: epath.Path, token_to_id) -> dict[str, int | None]:
  tokenizer_config = _read_json(directory / "tokenizer_config.json")
  fallbacks = [
    _read_json(directory / "generation_config.json"),
    _read_json(directory / "config.json"),
  ]
  ids = {}
  for name in _SPECIAL_NAMES:
    key = f"{name}_token"
    if key in tokenizer_config:
      token = tokenizer_config[key]
      if isinstance(token, dict):
        token = token.get("content")
      token_id = None if token is None else token_to_id(token)
      if token is not None and token_id is None:
        raise ValueError(
          f"{directory}/tokenizer_config.json {key}={token!r} is not in the vocabulary"
        )
      ids[name] = token_id
      continue
    values = [config[f"{key}_id"] for config in fallbacks if config.get(f"{key}_id") is not None]
    value = values[0] if values else None
    ids[name] = value[0] if isinstance(value, list) else value
  return ids


def load_tokenizer(directory) -> HFTokenizer:
  """The tokenizer of a Hugging Face model directory (its tokenizer.json), an `etils.epath` path
  or a string."""
  from tokenizers import Tokenizer  # the hf extra, imported when used

  path = epath.Path(directory)
  if not (path / TOKENIZER_FILE).exists():
    raise FileNotFoundError(
      f"{directory} has no {TOKENIZER_FILE} (only Hugging Face fast tokenizers are supported)"
    )
  definition = (path / TOKENIZER_FILE).read_text()
  tokenizer = Tokenizer.from_str(definition)
  specials = _special_ids(path, tokenizer.token_to_id)
  return HFTokenizer(
    tokenizer,
    json.loads(definition),
    bos_id=specials["bos"],
    eos_id=specials["eos"],
    pad_id=specials["pad"],
    name=str(directory),
  )


def check_same_tokenizer(teacher, student) -> None:
  """Raises unless `teacher` and `student` tokenize text into the same ids.

  Arguments are tokenizers or Hugging Face model directories. The models' vocabulary sizes may
  differ (embedding rows padded past the tokenizer, e.g. Qwen2.5-7B's 152064 vs 0.5B's 151936),
  and so may the special ids; only the id ↔ text mapping must agree.

  Raises:
    ValueError: one line, for different tokenizers (cross-tokenizer distillation is not
      supported).
  """
  tokenizers = [
    load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    for tokenizer in (teacher, student)
  ]
  prints = [getattr(t, "vocabulary_fingerprint", t.fingerprint) for t in tokenizers]
  if prints[0] != prints[1]:
    described = [
      f"{tokenizer!r} (vocabulary {fingerprint[:12]})"
      for tokenizer, fingerprint in zip(tokenizers, prints)
    ]
    raise ValueError(
      f"teacher and student tokenizers differ: {described[0]} vs {described[1]}; "
      "cross-tokenizer distillation is not supported"
    )
