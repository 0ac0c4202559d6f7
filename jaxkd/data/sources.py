"""Random-access data sources: what a dataset is (`DatasetSpec`) and where its examples come from.

A source maps example indices to a batch, `source.read(indices) -> {'image': uint8 [B, H, W, C],
'label': int32 [B]}`, so that the pipeline (pipeline.py) can make batch k a pure function of
(seed, k). Three kinds:

  * `ArraySource`: arrays in memory (Fashion-MNIST from IDX files, 47 MB).
  * `RecordSource`: a TFDS `data_source` on array_record files (CIFAR-100), read record by
    record without TensorFlow.
  * `imagenet.JpegSource`: a TFDS `data_source` of variable-size JPEGs (ImageNet), cut to
    fixed-size views on the host: `read` gives evaluation views, `read_train(indices, rngs)`
    random training views (a `RandomViewSource`).
"""

import dataclasses
import glob
import json
import os
from typing import Protocol, runtime_checkable

import numpy as np

from jaxkd.data import idx, imagenet
from jaxkd.errors import DataUnavailableError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts a config is checked against before anything is compiled."""

  num_classes: int
  image_shape: tuple[int, int, int]  # H, W, C of what the models see
  # Per-channel normalisation of [0, 1] pixels, the constants the reference recipes use.
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # The TFDS split that jaxkd's 'test' reads ('validation' where the test split has no labels).
  test_split: str = "test"
  # 0: images stored at `image_shape`. N: variable-size JPEGs, cut on the host to `image_shape`
  # (`jaxkd.data.imagenet`): random resized crops for training, Resize(N) + CenterCrop to test.
  eval_resize_size: int = 0


@runtime_checkable
class RandomViewSource(Protocol):
  """A source whose training views are random and cut on the host (`imagenet.JpegSource`):
  `read` gives the deterministic evaluation view, `read_train` a view drawn from each example's
  numpy Generator (the pipeline derives them from the seed and the stream position)."""

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...

  def read_train(self, indices: np.ndarray, rngs) -> dict[str, np.ndarray]: ...


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
  # ILSVRC-2012 with torchvision's constants (every ImageNet KD reference uses them); the
  # 50,000 labelled validation images are the test split.
  "imagenet2012": DatasetSpec(
    num_classes=1000,
    image_shape=(224, 224, 3),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    test_split="validation",
    eval_resize_size=256,
  ),
}

# What preparing a dataset needs before `tfds build` can run.
_MANUAL_DOWNLOADS = {
  "imagenet2012": (
    "TFDS cannot download ImageNet: register at https://image-net.org, download "
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (about 150 GB) into DIR/downloads/manual/ "
    "(or pass `--manual_dir` to `tfds build`), then"
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
  manual = _MANUAL_DOWNLOADS.get(name)
  prepare = (
    f"{manual} prepare it once, on a machine with TensorFlow installed"
    if manual
    else "Prepare it once, on a machine with network access and TensorFlow installed"
  )
  return (
    f"{problem} jaxkd reads {name} through TFDS as array_record files and never downloads "
    f"at training time. {prepare}: `pip install tensorflow tensorflow-datasets && tfds build {name} "
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


def _tfds_source(name: str, split: str, data_dir: str):
  """`tfds.data_source` on prepared array_record files, or DataUnavailableError saying why not.

  A JPEG dataset (`eval_resize_size` set) becomes an `imagenet.JpegSource`.
  """
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

  spec = DATASETS[name]
  records = tfds.data_source(
    name,
    split=spec.test_split if split == "test" else split,
    data_dir=data_dir,
    download=False,
    # JPEGs stay encoded: the worker that cuts a view decodes it.
    decoders={"image": tfds.decode.SkipDecoding()} if spec.eval_resize_size else None,
  )
  if spec.eval_resize_size:
    return imagenet.JpegSource(records, size=spec.image_shape[0], resize_size=spec.eval_resize_size)
  return RecordSource(records)


def write_tfds(data_dir: str, name: str, version: str, features: dict, splits: dict) -> None:
  """Writes a TFDS dataset `name` `version` as array_record files under `data_dir`.

  Synthetic stand-ins for prepared datasets (the tests, `benchmarks/input_pipeline.py`); needs
  tensorflow-datasets but no TensorFlow.

  Args:
    data_dir: the TFDS data dir (the dataset lands in `data_dir/name/version`).
    name, version: the dataset, as `tfds.data_source` will look it up.
    features: feature name → TFDS feature (`tfds.features.Image(...)`, `ClassLabel(...)`).
    splits: split name → list of examples, each a dict of `features`' values.
  """
  import tensorflow_datasets as tfds

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(version)
    code_path = None  # No source directory of checksums or metadata to look up.

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
      for index, example in enumerate(splits[split]):
        yield f"{split}_{index}", example

  Builder.name = name
  Builder(data_dir=data_dir, file_format="array_record").download_and_prepare()


def _idx_source(name: str, split: str, data_dir: str) -> ArraySource:
  directory = os.path.expanduser(data_dir or DEBIAN_FASHION_MNIST_DIR)
  try:
    spec = DATASETS[name]
    return ArraySource(
      idx.load_split(
        directory, split, image_shape=spec.image_shape[:2], num_classes=spec.num_classes
      )
    )
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
