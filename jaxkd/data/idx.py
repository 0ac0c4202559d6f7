"""Reader for the IDX format of MNIST and Fashion-MNIST (LeCun et al. 1998; Xiao et al. 2017).

An IDX file is a big-endian header — two zero bytes, a type code, the number of dimensions
`d` — then `d` uint32 sizes, then the array in C order. MNIST-style datasets ship four files,
optionally gzip'd, the layout Debian's `dataset-fashion-mnist` installs under
/usr/share/datasets/fashion-mnist/:

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]
"""

import gzip
import os

import numpy as np

# Type codes of the IDX header → numpy dtypes (multi-byte types are big-endian).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Split name → file stem of its images and labels.
_SPLIT_STEMS = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> np.ndarray:
  """The array stored in the IDX file `path` (read through gzip when it ends in `.gz`)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  num_dims = data[3]
  shape = tuple(int(size) for size in np.frombuffer(data, ">u4", count=num_dims, offset=4))
  offset = 4 + 4 * num_dims
  expected_bytes = int(np.prod(shape)) * dtype.itemsize
  if len(data) - offset != expected_bytes:
    raise ValueError(
      f"{path}: header says shape {shape} ({expected_bytes} bytes), file holds {len(data) - offset}"
    )
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def find_file(directory: str, stem: str) -> str | None:
  """Path of `stem` or `stem.gz` in `directory` (raw first), None if neither exists."""
  for name in (stem, stem + ".gz"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_split(directory: str, split: str) -> dict[str, np.ndarray]:
  """`{'image': uint8 [N, H, W, 1], 'label': int32 [N]}` of split 'train' or 'test'.

  Raises FileNotFoundError naming the missing file when `directory` lacks one of the two.
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
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
  return {"image": images[..., None], "label": labels.astype(np.int32)}
