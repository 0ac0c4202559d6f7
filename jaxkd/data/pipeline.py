"""Deterministic, resumable input pipeline: batch k is a pure function of (seed, k).

The training stream visits the examples in a fresh permutation each epoch,
`permutation_e = default_rng([seed, e]).permutation(num_examples)`, and global batch k holds
stream positions `k·B … (k+1)·B − 1` (batches run across epoch boundaries, like grain's
`shuffle → repeat → batch`). Hence the data position of a checkpoint is its step: resuming at
step k rebuilds the stream from k and sees exactly the batches an uninterrupted run would.

Each process reads only its own `B / process_count` slice of every global batch; `parallel.
host_to_global` assembles the slices into one global array. grain runs the reads in threads
and prefetches ahead of the accelerator.
"""

import functools
from typing import Iterator

import grain
import jax
import numpy as np

from jaxkd.data.sources import DatasetSpec


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def global_batch_indices(
  seed: int, step: int, num_examples: int, global_batch_size: int
) -> np.ndarray:
  """Example indices of global batch `step` (see the module docstring)."""
  positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  return np.concatenate(
    [
      _epoch_permutation(seed, int(epoch), num_examples)[offsets[epochs == epoch]]
      for epoch in np.unique(epochs)
    ]
  )


def host_slice(global_indices: np.ndarray) -> np.ndarray:
  """The contiguous part of a global batch that this process reads."""
  per_process = len(global_indices) // jax.process_count()
  start = jax.process_index() * per_process
  return global_indices[start : start + per_process]


def normalize(images: np.ndarray, spec: DatasetSpec) -> np.ndarray:
  """uint8 pixels → float32 `(x / 255 − mean) / std`, per channel."""
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return (images.astype(np.float32) / 255.0 - mean) / std


def _read(source, indices: np.ndarray, spec: DatasetSpec | None) -> dict[str, np.ndarray]:
  """The examples at `indices` with their 'index'; images normalised (`spec`), text as read."""
  examples = source.read(indices)
  if spec is not None:
    examples = {"image": normalize(examples["image"], spec), "label": examples["label"]}
  return {**examples, "index": indices.astype(np.int32)}


def _threaded(batches: grain.MapDataset, num_threads: int, prefetch: int) -> Iterator[dict]:
  return iter(
    batches.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
  )


def train_batches(
  source,
  spec: DatasetSpec | None,
  *,
  seed: int,
  start_step: int,
  num_steps: int,
  global_batch_size: int,
  num_examples: int,
  num_threads: int = 2,
  prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
  """Host-local batches `start_step … num_steps − 1` over the first `num_examples` examples.

  Each batch: 'image' float32 [b, H, W, C] normalised and 'label' int32 [b] (images, `spec` a
  DatasetSpec), or the token arrays of `jaxkd.data.text` (text, `spec` None); 'index' int32 [b]
  (the example's index in the split); b = global_batch_size / process_count.
  """

  def host_batch(step: int) -> dict[str, np.ndarray]:
    indices = global_batch_indices(seed, step, num_examples, global_batch_size)
    return _read(source, host_slice(indices), spec)

  return _threaded(
    grain.MapDataset.range(start_step, num_steps).map(host_batch), num_threads, prefetch
  )


def eval_batches(
  source,
  spec: DatasetSpec | None,
  *,
  global_batch_size: int,
  num_examples: int = 0,
  num_threads: int = 2,
  prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
  """The first `num_examples` examples of the split (0 = all) in order, in host-local batches
  with a boolean 'mask'.

  The last global batch is padded (by repeating example 0) to the full size so that every
  batch has one shape and compiles once; padded rows have mask False and count nowhere.
  """
  num_examples = num_examples or len(source)
  num_batches = -(-num_examples // global_batch_size)

  def host_batch(batch_index: int) -> dict[str, np.ndarray]:
    positions = host_slice(
      np.arange(batch_index * global_batch_size, (batch_index + 1) * global_batch_size)
    )
    mask = positions < num_examples
    batch = _read(source, np.where(mask, positions, 0), spec)
    batch["mask"] = mask
    if "loss_mask" in batch:  # a padded row repeats example 0: none of its tokens count
      batch["loss_mask"] &= mask[:, None]
    return batch

  return _threaded(grain.MapDataset.range(num_batches).map(host_batch), num_threads, prefetch)
