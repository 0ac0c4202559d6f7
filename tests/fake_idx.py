"""Writes small IDX files (the MNIST / Fashion-MNIST format) for the data and training tests."""
import gzip
import os

import numpy as np


def write_idx(path: str, array: np.ndarray, *, compress: bool) -> None:
  """IDX by hand: 0, 0, type code 0x08 (uint8), number of dims, big-endian sizes, data."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_split(directory, stem: str, num_examples: int, *, compress: bool, seed: int = 0):
  """`<stem>-images-idx3-ubyte` (28×28 uint8) and `<stem>-labels-idx1-ubyte` (0..9).

  Images are noise plus a bright square whose position is the label, so a CNN can learn them.
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, num_examples).astype(np.uint8)
  images = rng.integers(0, 64, (num_examples, 28, 28)).astype(np.uint8)
  for image, label in zip(images, labels):
    row, col = divmod(int(label), 5)
    image[4 + 10 * row:10 + 10 * row, 1 + 5 * col:5 + 5 * col] = 255
  suffix = ".gz" if compress else ""
  write_idx(os.path.join(directory, f"{stem}-images-idx3-ubyte{suffix}"), images, compress=compress)
  write_idx(os.path.join(directory, f"{stem}-labels-idx1-ubyte{suffix}"), labels, compress=compress)
  return images, labels


def write_dataset(directory, num_train: int, num_test: int) -> str:
  """A Fashion-MNIST-shaped dataset: raw train files, gzip'd test files (both forms occur)."""
  write_split(directory, "train", num_train, compress=False, seed=0)
  write_split(directory, "t10k", num_test, compress=True, seed=1)
  return str(directory)
