"""Input data: random-access sources, the deterministic batch pipeline, in-step augmentations.

Images come from IDX files or TFDS (`sources.py`; ImageNet's JPEGs are cut to views on the host,
`imagenet.py`); text from local corpora or TFDS, packed into language-model examples (`text.py`). `config.data.source` names which: 'idx' and 'tfds' are
image sources, 'text' and 'tfds_text' text sources (`TEXT_SOURCES`).
"""

from jaxkd.data.augment import AUGMENTATIONS, MIXING_AUGMENTATIONS, build as build_augment
from jaxkd.data.imagenet import JpegSource
from jaxkd.data.pipeline import (
  eval_batches,
  global_batch_indices,
  normalize,
  num_worker_processes,
  train_batches,
)
from jaxkd.data.sources import (
  DATASETS,
  SOURCES,
  ArraySource,
  DataUnavailableError,
  DatasetSpec,
  RandomViewSource,
  RecordSource,
  open_split,
)
from jaxkd.data.text import LOCAL_CORPORA, TextSource, open_text_split
from jaxkd.data.tokenizer import ByteTokenizer, Tokenizer

# config.data.source → the source of `open_text_split`.
TEXT_SOURCES = {"text": "local", "tfds_text": "tfds"}

__all__ = [
  "AUGMENTATIONS",
  "MIXING_AUGMENTATIONS",
  "ByteTokenizer",
  "LOCAL_CORPORA",
  "TEXT_SOURCES",
  "TextSource",
  "Tokenizer",
  "open_text_split",
  "DATASETS",
  "SOURCES",
  "ArraySource",
  "DataUnavailableError",
  "DatasetSpec",
  "JpegSource",
  "RandomViewSource",
  "RecordSource",
  "build_augment",
  "eval_batches",
  "global_batch_indices",
  "normalize",
  "num_worker_processes",
  "open_split",
  "train_batches",
]
