"""Random-access data sources: what a dataset is (`DatasetSpec`) and where its examples come from.

A source maps example indices to a batch, `source.read(indices) -> {'image': uint8 [B, H, W, C],
'label': int32 [B]}`, so that the pipeline (pipeline.py) can make batch k a pure function of
(seed, k). Two kinds:

  * `ArraySource`: arrays in memory (Fashion-MNIST from IDX files, 47 MB).
  * `RecordSource`: a TFDS `data_source` on array_record files (CIFAR-100, ImageNet), read record
    by record without TensorFlow.
"""

import dataclasses
import glob
import json
import os

import numpy as np

from jaxkd.data import idx
from jaxkd.errors import DataUnavailableError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts a config is checked against before anything is compiled."""

  num_classes: int
  image_shape: tuple[int, int, int]  # H, W, C
  # Per-channel normalisation of [0, 1] pixels, the constants the reference recipes use.
  mean: tuple[float, ...]
  std: tuple[float, ...]


# Keys are also the TFDS names.
DATASETS = {
  # Mean and std of the 60,000 training images (Xiao et al. 2017 give no constants).
  "fashion_mnist": DatasetSpec(
    num_classes=10, image_shape=(28, 28, 1), mean=(0.2860,), std=(0.3530,)
  ),
  # RepDistiller / mdistiller constants (their CIFAR-100 data loaders).
  "cifar100": DatasetSpec(
    num_classes=100,
    image_shape=(32, 32, 3),
    mean=(0.5071, 0.4867, 0.4408),
    std=(0.2675, 0.2565, 0.2761),
  ),
}

# Where Debian's `dataset-fashion-mnist` package puts the four gzip'd IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class ArraySource:
  """A dataset held in memory as arrays with a leading example axis, e.g.
  `{'image': [N, H, W, C] uint8, 'label': [N] int32}`."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {key: array[indices] for key, array in self.arrays.items()}

  def labels(self, num_examples: int) -> np.ndarray:
    """The labels of examples 0 .. num_examples - 1."""
    return np.asarray(self.arrays["label"][:num_examples], np.int32)


class RecordSource:
  """A TFDS random-access source; records are dicts with 'image' (uint8 HWC) and 'label'."""

  def __init__(self, data_source):
    self.data_source = data_source

  def __len__(self) -> int:
    return len(self.data_source)

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = self.data_source.__getitems__([int(i) for i in indices])
    return {
      "image": np.stack([np.asarray(r["image"], np.uint8) for r in records]),
      "label": np.asarray([r["label"] for r in records], np.int32),
    }

  def labels(self, num_examples: int, chunk: int = 4096) -> np.ndarray:
    """The labels of examples 0 .. num_examples - 1: a pass over the records (each holds its
    image too), in chunks to bound memory."""
    return np.concatenate(
      [
        self.read(np.arange(start, min(start + chunk, num_examples)))["label"]
        for start in range(0, num_examples, chunk)
      ]
    )


def _how_to_get(name: str, problem: str) -> str:
  """The one paragraph printed when a dataset cannot be read."""
  return (
    f"{problem} jaxkd reads {name} through TFDS as array_record files and never downloads "
    f"at training time. Prepare it once, on a machine with network access and TensorFlow "
    f"installed: `pip install tensorflow tensorflow-datasets && tfds build {name} "
    f"--file_format=array_record --data_dir=DIR`, copy DIR here if needed, then pass "
    f"`--config.data.dir=DIR`. To try jaxkd without it, run the offline quickstart on "
    f"Fashion-MNIST: `sudo apt-get install -y dataset-fashion-mnist && python -m jaxkd.main "
    f"--config=configs/quickstart.py --workdir=/tmp/jaxkd_quickstart`."
  )


def _tfds_data_dir(data_dir: str) -> str:
  if data_dir:
    return os.path.expanduser(data_dir)
  import tensorflow_datasets as tfds  # Deferred: 2 s of imports the IDX path does not need.

  return tfds.core.constants.DATA_DIR


def _tfds_source(name: str, split: str, data_dir: str) -> RecordSource:
  """`tfds.data_source` on prepared array_record files, or DataUnavailableError saying why not."""
  data_dir = _tfds_data_dir(data_dir)
  # TFDS would otherwise answer a missing dataset with a puzzling "TFRECORD is not supported".
  infos = sorted(glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json")))
  if not infos:
    raise DataUnavailableError(
      _how_to_get(
        name,
        f"No prepared TFDS {name!r} under {data_dir} (no "
        f"{os.path.join(data_dir, name, '<version>', 'dataset_info.json')}).",
      )
    )
  with open(infos[-1]) as f:
    file_format = json.load(f).get("fileFormat", "tfrecord")
  if file_format != "array_record":
    raise DataUnavailableError(
      _how_to_get(
        name,
        f"TFDS {name!r} under {data_dir} is prepared as {file_format}, which has no "
        "random access; it must be rebuilt as array_record.",
      )
    )
  import tensorflow_datasets as tfds

  return RecordSource(tfds.data_source(name, split=split, data_dir=data_dir, download=False))


def _idx_source(name: str, split: str, data_dir: str) -> ArraySource:
  directory = os.path.expanduser(data_dir or DEBIAN_FASHION_MNIST_DIR)
  try:
    return ArraySource(idx.load_split(directory, split))
  except FileNotFoundError as error:
    raise DataUnavailableError(
      f"{error}. The {name} IDX files are missing from {directory}: install them with "
      f"`sudo apt-get install -y dataset-fashion-mnist` (they land in "
      f"{DEBIAN_FASHION_MNIST_DIR}), or point `--config.data.dir` at any directory holding "
      "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
      "t10k-labels-idx1-ubyte (gzip'd or not), or use `--config.data.source=tfds` where TFDS "
      f"{name!r} has been prepared."
    ) from None


_READERS = {"idx": _idx_source, "tfds": _tfds_source}
SOURCES = tuple(_READERS)


def open_split(name: str, source: str, split: str, data_dir: str = ""):
  """The `split` ('train' or 'test') of dataset `name` read from `source` ('idx' or 'tfds')."""
  return _READERS[source](name, split, data_dir)
