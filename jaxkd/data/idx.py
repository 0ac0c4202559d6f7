"""Reader for the IDX format of MNIST and Fashion-MNIST (LeCun et al. 1998; Xiao et al. 2017).

An IDX file is a big-endian header — two zero bytes, a type code, the number of dimensions
`d` — then `d` uint32 sizes, then the array in C order. MNIST-style datasets ship four files,
optionally gzip'd, the layout Debian's `dataset-fashion-mnist` installs under
/usr/share/datasets/fashion-mnist/:

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

A file that cannot be read as IDX (garbage, truncated, a `.gz` that is not gzip, an unreadable
path) raises `CorruptFileError`, one line naming the path and what is wrong with it.
"""

import gzip
import math
import os
import zlib

import numpy as np

from jaxkd.errors import DataUnavailableError

# Type codes of the IDX header → numpy dtypes (multi-byte types are big-endian).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Split name → file stem of its images and labels.
_SPLIT_STEMS = {"train": "train", "test": "t10k"}

_REPLACE_HINT = "replace it with an intact copy (e.g. reinstall dataset-fashion-mnist)"


class CorruptFileError(DataUnavailableError, ValueError):
  """A data file that cannot be read as what it should be; the message names the path."""


def _read_bytes(path: str) -> bytes:
  """The file's bytes, through gzip when it ends in `.gz`; CorruptFileError when unreadable."""
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise  # the caller says where the dataset comes from
  except gzip.BadGzipFile:
    problem = "is not gzip data, although its name ends in .gz"
  except (EOFError, zlib.error) as error:
    problem = f"is a truncated or damaged gzip file ({error})"
  except OSError as error:
    problem = f"cannot be read: {error.strerror or error}"
  raise CorruptFileError(f"{path} {problem}; {_REPLACE_HINT}")


def read_idx(path: str) -> np.ndarray:
  """The array stored in the IDX file `path` (read through gzip when it ends in `.gz`).

  Raises:
    FileNotFoundError: no file at `path`.
    CorruptFileError: (a ValueError) the file is not a complete IDX file; the message names it.
  """
  data = _read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise CorruptFileError(
      f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'none: empty file'}, "
      f"expected 0000 then a type code and the number of dimensions); {_REPLACE_HINT}"
    )
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  num_dims = data[3]
  offset = 4 + 4 * num_dims
  if len(data) < offset:
    raise CorruptFileError(
      f"{path}: header says {num_dims} dimensions, the file ends after {len(data)} bytes; "
      f"{_REPLACE_HINT}"
    )
  shape = tuple(int(size) for size in np.frombuffer(data, ">u4", count=num_dims, offset=4))
  expected_bytes = math.prod(shape) * dtype.itemsize
  if len(data) - offset != expected_bytes:
    raise CorruptFileError(
      f"{path}: header says shape {shape} ({expected_bytes} bytes), file holds "
      f"{len(data) - offset}; {_REPLACE_HINT}"
    )
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def find_file(directory: str, stem: str) -> str | None:
  """Path of `stem` or `stem.gz` in `directory` (raw first), None if neither exists."""
  for name in (stem, stem + ".gz"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_split(
  directory: str,
  split: str,
  *,
  image_shape: tuple[int, int] | None = None,
  num_classes: int | None = None,
) -> dict[str, np.ndarray]:
  """`{'image': uint8 [N, H, W, 1], 'label': int32 [N]}` of split 'train' or 'test'.

  Args:
    directory: holds the split's two files (raw or gzip'd).
    split: 'train' or 'test'.
    image_shape: the dataset's (H, W), checked when given.
    num_classes: labels must be in [0, num_classes), checked when given.

  Raises:
    FileNotFoundError: naming the missing file when `directory` lacks one of the two.
    CorruptFileError: a file is not IDX, or the images and labels do not make a dataset of
      `image_shape` and `num_classes`; the message names the file.
  """
  stem = _SPLIT_STEMS[split]
  paths = {}
  for key, file_stem in (
    ("image", f"{stem}-images-idx3-ubyte"),
    ("label", f"{stem}-labels-idx1-ubyte"),
  ):
    paths[key] = find_file(directory, file_stem)
    if paths[key] is None:
      raise FileNotFoundError(f"{os.path.join(directory, file_stem)}[.gz] does not exist")
  images, labels = read_idx(paths["image"]), read_idx(paths["label"])
  if images.ndim != 3 or (image_shape is not None and images.shape[1:] != tuple(image_shape)):
    expected = "×".join(map(str, image_shape)) if image_shape is not None else "H×W"
    raise CorruptFileError(
      f"{paths['image']} holds an array of shape {images.shape}, not N images of {expected}"
    )
  if labels.shape != images.shape[:1]:
    raise CorruptFileError(
      f"{paths['label']} holds labels of shape {labels.shape} for the {len(images)} images of "
      f"{paths['image']}"
    )
  if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise CorruptFileError(
      f"{paths['label']} holds labels in [{labels.min()}, {labels.max()}], the dataset has "
      f"{num_classes} classes"
    )
  return {"image": images[..., None], "label": labels.astype(np.int32)}
