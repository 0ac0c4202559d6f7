"""Input data: random-access sources, the deterministic batch pipeline, in-step augmentations."""

from jaxkd.data.augment import AUGMENTATIONS, build as build_augment
from jaxkd.data.pipeline import eval_batches, global_batch_indices, normalize, train_batches
from jaxkd.data.sources import (
  DATASETS,
  SOURCES,
  ArraySource,
  DataUnavailableError,
  DatasetSpec,
  RecordSource,
  open_split,
)

__all__ = [
  "AUGMENTATIONS",
  "DATASETS",
  "SOURCES",
  "ArraySource",
  "DataUnavailableError",
  "DatasetSpec",
  "RecordSource",
  "build_augment",
  "eval_batches",
  "global_batch_indices",
  "normalize",
  "open_split",
  "train_batches",
]
