"""Deterministic, resumable input pipeline: batch k is a pure function of (seed, k).

The training stream visits the examples in a fresh permutation each epoch,
`permutation_e = default_rng([seed, e]).permutation(num_examples)`, and global batch k holds
stream positions `k·B … (k+1)·B − 1` (batches run across epoch boundaries, like grain's
`shuffle → repeat → batch`). Hence the data position of a checkpoint is its step: resuming at
step k rebuilds the stream from k and sees exactly the batches an uninterrupted run would.

Each process reads only its own `B / process_count` slice of every global batch; `parallel.
host_to_global` assembles the slices into one global array.

Views cut on the host. A `RandomViewSource` (ImageNet's variable-size JPEGs) cuts each training
example's view on the host, drawing from `default_rng([seed, HOST_VIEW_STREAM, p])` where
p = k·B + i is the example's stream position (row i of global batch k): the view too is a pure
function of (seed, k), whatever the process count or the number of workers.

Workers. grain threads (`num_threads`) read and normalise batches ahead of the accelerator. With
`num_workers` > 0 the batches are computed in that many worker processes (grain `mp_prefetch`,
spawned; they never start a JAX backend): worker w computes batches w, w + n, w + 2n, ... and
grain interleaves them back in order, so the stream does not depend on n. Cutting a JPEG view
costs milliseconds of CPU per example (decode, resize, normalise); processes spread it over the
host's cores without sharing one interpreter's GIL. Each worker holds about `num_threads` + 1
batches at a time, in shared memory.
"""

import functools
import os
from typing import Iterator

import grain
import jax
import numpy as np
from absl import flags

from jaxkd.data.sources import DatasetSpec, RandomViewSource

# Seeds the host views with (seed, HOST_VIEW_STREAM, position): never the (seed, epoch) of the
# epoch permutations.
HOST_VIEW_STREAM = 1


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


def host_slice(global_values: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """The contiguous part of a global batch that process `process_index` reads."""
  per_process = len(global_values) // process_count
  start = process_index * per_process
  return global_values[start : start + per_process]


def normalize(images: np.ndarray, spec: DatasetSpec) -> np.ndarray:
  """uint8 pixels → float32 `(x / 255 − mean) / std`, per channel."""
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return (images.astype(np.float32) / 255.0 - mean) / std


def view_rngs(seed: int, positions: np.ndarray) -> list[np.random.Generator]:
  """The Generators of the host views at stream `positions` (see the module docstring)."""
  return [np.random.default_rng([seed, HOST_VIEW_STREAM, int(p)]) for p in positions]


def _batch(examples: dict, indices: np.ndarray, spec: DatasetSpec | None) -> dict[str, np.ndarray]:
  """`examples` with their 'index'; images normalised (`spec`), text as read."""
  if spec is not None:
    examples = {"image": normalize(examples["image"], spec), "label": examples["label"]}
  return {**examples, "index": indices.astype(np.int32)}


def num_worker_processes(num_workers: int) -> int:
  """`num_workers`, with -1 = one per CPU core this process may use."""
  if num_workers != -1:
    return num_workers
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _iterate(
  batches: grain.MapDataset, num_threads: int, prefetch: int, num_workers: int
) -> Iterator[dict]:
  """The batches in order, computed by threads, or by worker processes with threads each."""
  num_workers = num_worker_processes(num_workers)
  # In workers, prefetch only what the threads compute: every worker already runs ahead.
  buffer = num_threads if num_workers else prefetch
  dataset = batches.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer)
  )
  if num_workers:
    if not flags.FLAGS.is_parsed():
      # mp_prefetch reads grain's absl flags, unparsed outside an absl app (tests, notebooks):
      # take their defaults.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(dataset)


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
  num_workers: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Host-local batches `start_step … num_steps − 1` over the first `num_examples` examples.

  Each batch: 'image' float32 [b, H, W, C] normalised and 'label' int32 [b] (images, `spec` a
  DatasetSpec), or the token arrays of `jaxkd.data.text` (text, `spec` None); 'index' int32 [b]
  (the example's index in the split); b = global_batch_size / process_count. `num_workers`:
  worker processes (0 = threads of this process only, -1 = one per CPU core).
  """
  # Read here: the worker processes have no JAX backend, and must not start one.
  process = (jax.process_index(), jax.process_count())
  random_views = isinstance(source, RandomViewSource)

  def host_batch(step: int) -> dict[str, np.ndarray]:
    indices = host_slice(
      global_batch_indices(seed, step, num_examples, global_batch_size), *process
    )
    if not random_views:
      return _batch(source.read(indices), indices, spec)
    positions = host_slice(
      np.arange(step * global_batch_size, (step + 1) * global_batch_size), *process
    )
    return _batch(source.read_train(indices, view_rngs(seed, positions)), indices, spec)

  return _iterate(
    grain.MapDataset.range(start_step, num_steps).map(host_batch),
    num_threads,
    prefetch,
    num_workers,
  )


def eval_batches(
  source,
  spec: DatasetSpec | None,
  *,
  global_batch_size: int,
  num_examples: int = 0,
  num_threads: int = 2,
  prefetch: int = 4,
  num_workers: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """The first `num_examples` examples of the split (0 = all) in order, in host-local batches
  with a boolean 'mask'; their evaluation views (`source.read`).

  The last global batch is padded (by repeating example 0) to the full size so that every
  batch has one shape and compiles once; padded rows have mask False and count nowhere.
  """
  num_examples = num_examples or len(source)
  num_batches = -(-num_examples // global_batch_size)
  process = (jax.process_index(), jax.process_count())

  def host_batch(batch_index: int) -> dict[str, np.ndarray]:
    positions = host_slice(
      np.arange(batch_index * global_batch_size, (batch_index + 1) * global_batch_size), *process
    )
    mask = positions < num_examples
    indices = np.where(mask, positions, 0)
    batch = _batch(source.read(indices), indices, spec)
    batch["mask"] = mask
    if "loss_mask" in batch:  # a padded row repeats example 0: none of its tokens count
      batch["loss_mask"] &= mask[:, None]
    return batch

  return _iterate(
    grain.MapDataset.range(num_batches).map(host_batch), num_threads, prefetch, num_workers
  )
