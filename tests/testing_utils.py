"""Shared by the data, config and training tests: config loading, small IDX datasets and
TensorBoard event files read back."""

import glob
import gzip
import importlib.util
import os
import struct

import numpy as np
from etils import epath
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  """`configs/<name>.py`'s get_config(arg), as `--config=configs/<name>.py:arg` loads it."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


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
    image[4 + 10 * row : 10 + 10 * row, 1 + 5 * col : 5 + 5 * col] = 255
  suffix = ".gz" if compress else ""
  for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
    write_idx(os.path.join(directory, f"{stem}-{kind}-ubyte{suffix}"), array, compress=compress)
  return images, labels


def write_dataset(directory, num_train: int, num_test: int) -> str:
  """A Fashion-MNIST-shaped dataset: raw train files, gzip'd test files (both forms occur)."""
  write_split(directory, "train", num_train, compress=False, seed=0)
  write_split(directory, "t10k", num_test, compress=True, seed=1)
  return str(directory)


def tensorboard_events(path) -> list:
  """The events of one TFRecord event file: length (u64), crc, payload, crc."""
  data, events, offset = epath.Path(path).read_bytes(), [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset : offset + 8])
    events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
    offset += 12 + length + 4
  return events


def tensorboard_hparams(directory) -> dict:
  """The hparams of the HParams tab's session start in a run's event files: {name: Value}."""
  [path] = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
  values = [value for event in tensorboard_events(path) for value in event.summary.value]
  start = next(v for v in values if v.tag == "_hparams_/session_start_info")
  content = start.metadata.plugin_data.content
  return plugin_hparams_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
