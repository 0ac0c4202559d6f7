"""Cached teacher: the teacher's outputs computed once, stored on disk, read back by example index.

For deterministic views (no random augmentation, or a fixed pre-augmented dataset) the teacher
gives the same logits for an example every epoch, so the teacher forward can be paid once. The
cache holds, per example index:

* ``'dense'``: the logits, ``[N, C]`` (``[N, S, V]`` for a language model) (``logits.npy``);
* ``'topk'``: the k largest log-probabilities and their class ids, ``[N, k]`` (``[N, S, k]``) each
  (``topk_logprobs.npy``, ``topk_ids.npy``), the sparse-teacher storage of LLM distillation
  (DistillKit; Peng et al. 2024 keep top-k).

Arrays are ``.npy`` files read with ``mmap_mode='r'``: a batch reads its rows only. A
``manifest.json`` records what the cache was computed from (dataset name, size and a
fingerprint of its data, a fingerprint of the teacher's weights, k, dtype); `open_cache` checks
every field against what the run uses and refuses a mismatch with an error naming the field.

Training from the cache (`jaxkd.teachers`, source ``'cached'``): the host adds the rows to each
batch (`TeacherCache.add_to_batch`, under the batch keys below) and the step reads them instead
of running a teacher. A top-k teacher is the distribution renormalised over its k classes: the
other classes get logit ``-inf`` (probability 0, `dense_logits`), which the logit losses handle
exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.errors import UserError

MANIFEST = "manifest.json"
# The batch keys under which cached outputs travel from the host to the step.
LOGITS_KEY = "teacher_logits"
TOPK_IDS_KEY = "teacher_topk_ids"
TOPK_LOGPROBS_KEY = "teacher_topk_logprobs"
FORMAT_VERSION = 1
Kind = Literal["dense", "topk"]


def fingerprint(tree: Any) -> str:
  """SHA-256 over the shapes, dtypes and bytes of a pytree's leaves (arrays, strings, numbers).

  For the teacher: ``fingerprint(nnx.state(teacher))``. For a dataset: its images and labels in
  index order (or any string that identifies the data version, e.g. a tfds version).
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    if isinstance(leaf, (str, bytes)):
      digest.update(leaf.encode() if isinstance(leaf, str) else leaf)
      continue
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a cache was computed from; every field must match the run that reads it."""

  dataset: str
  num_examples: int
  data_fingerprint: str
  teacher_fingerprint: str
  kind: Kind
  k: int | None
  dtype: str
  num_classes: int
  version: int = FORMAT_VERSION


class CacheMismatchError(UserError, ValueError):
  """A cache computed from other data or another teacher than the run's; the message names the
  field that differs."""


def _files(kind: Kind) -> tuple[str, ...]:
  return ("logits",) if kind == "dense" else ("topk_ids", "topk_logprobs")


def write_cache(
  directory: str,
  *,
  teacher_logits: Callable[[Mapping[str, Any]], jax.Array],
  teacher_fingerprint: str,
  batches: Iterable[Mapping[str, Any]],
  dataset: str,
  num_examples: int,
  data_fingerprint: str,
  kind: Kind = "dense",
  k: int | None = None,
  dtype: str = "float32",
) -> Manifest:
  """Stores ``teacher_logits(batch)`` of every batch by ``batch['index']``.

  Args:
    directory: created if needed; an existing cache there is overwritten.
    teacher_logits: the teacher's float32 logits ``[b, C]`` (``[b, S, V]``) for a host batch, in
      eval mode on the deterministic view (`jaxkd.teachers.Teachers.cache_logits`).
    teacher_fingerprint: `fingerprint` of the teacher's weights.
    batches: host batches with ``'index'`` and a boolean ``'mask'`` marking real rows (padding
      rows are not written). Every index in ``[0, num_examples)`` must appear.
    dataset, num_examples, data_fingerprint: identify the data (see `fingerprint`).
    kind: ``'dense'`` logits or ``'topk'`` log-probabilities.
    k: number of classes kept for ``'topk'``.
    dtype: storage dtype of logits / log-probabilities (``'float32'``, ``'float16'``,
      ``'bfloat16'`` is not a numpy dtype: use float16 to halve the size).
  """
  if kind not in ("dense", "topk"):
    raise ValueError(f"kind must be 'dense' or 'topk', got {kind!r}")
  if (kind == "topk") != (k is not None):
    raise ValueError("k is required for kind='topk' and meaningless for kind='dense'")

  @jax.jit
  def outputs(logits):
    if kind == "dense":
      return (logits,)
    log_probs, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
    return ids.astype(jnp.int32), log_probs

  os.makedirs(directory, exist_ok=True)
  arrays, written, num_classes = None, np.zeros(num_examples, bool), None
  for batch in batches:
    logits = teacher_logits(batch)
    results = [np.asarray(x) for x in outputs(logits)]
    keep = np.asarray(batch["mask"], bool)
    index = np.asarray(batch["index"])[keep]
    if arrays is None:
      num_classes = int(logits.shape[-1])
      arrays = [
        np.lib.format.open_memmap(
          os.path.join(directory, f"{name}.npy"),
          mode="w+",
          dtype=np.int32 if name == "topk_ids" else np.dtype(dtype),
          shape=(num_examples, *result.shape[1:]),
        )
        for name, result in zip(_files(kind), results)
      ]
    for array, result in zip(arrays, results):
      array[index] = result[keep]
    written[index] = True
  if arrays is None or not written.all():
    raise ValueError(f"the batches cover {int(written.sum())} of {num_examples} examples")
  for array in arrays:
    array.flush()
  manifest = Manifest(
    dataset=dataset,
    num_examples=num_examples,
    data_fingerprint=data_fingerprint,
    teacher_fingerprint=teacher_fingerprint,
    kind=kind,
    k=k,
    dtype=str(np.dtype(dtype)),
    num_classes=num_classes,
  )
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump(dataclasses.asdict(manifest), f, indent=2)
  return manifest


@dataclasses.dataclass(frozen=True)
class TeacherCache:
  """An opened cache: the manifest and the memory-mapped arrays."""

  manifest: Manifest
  arrays: Mapping[str, np.ndarray]

  def lookup(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """The batch entries for examples `index`: `LOGITS_KEY` (dense) or `TOPK_IDS_KEY` and
    `TOPK_LOGPROBS_KEY` (top-k)."""
    index = np.asarray(index)
    if self.manifest.kind == "dense":
      return {LOGITS_KEY: np.asarray(self.arrays["logits"][index], np.float32)}
    return {
      TOPK_IDS_KEY: np.asarray(self.arrays["topk_ids"][index], np.int32),
      TOPK_LOGPROBS_KEY: np.asarray(self.arrays["topk_logprobs"][index], np.float32),
    }

  def add_to_batch(self, host_batch: Mapping[str, Any]) -> dict[str, Any]:
    """`host_batch` plus its cached teacher outputs (looked up by ``host_batch['index']``)."""
    return {**host_batch, **self.lookup(host_batch["index"])}


def read_manifest(directory: str) -> Manifest:
  """The manifest of the cache in `directory`; FileNotFoundError if there is none."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no teacher cache at {directory} ({MANIFEST} is missing)")
  with open(path) as f:
    return Manifest(**json.load(f))


def open_cache(
  directory: str,
  *,
  dataset: str,
  num_examples: int,
  data_fingerprint: str,
  teacher_fingerprint: str | None = None,
) -> TeacherCache:
  """Opens a cache after checking it was computed for this dataset (and teacher).

  Args:
    directory: where `write_cache` wrote.
    dataset, num_examples, data_fingerprint: the run's data, as passed to `write_cache`.
    teacher_fingerprint: `fingerprint` of the teacher the run would use (e.g. of its restored
      checkpoint); ``None`` skips the check when the run has no teacher weights at hand.

  Raises:
    FileNotFoundError: no manifest in `directory`.
    CacheMismatchError: a field differs; the message names it with both values.
  """
  manifest = read_manifest(directory)
  expected = {
    "version": FORMAT_VERSION,
    "dataset": dataset,
    "num_examples": num_examples,
    "data_fingerprint": data_fingerprint,
  }
  if teacher_fingerprint is not None:
    expected["teacher_fingerprint"] = teacher_fingerprint
  for field, value in expected.items():
    if getattr(manifest, field) != value:
      raise CacheMismatchError(
        f"teacher cache {directory} does not match this run: {field} is "
        f"{getattr(manifest, field)!r} in the cache, {value!r} here; rebuild it "
        "(delete the directory and run again)"
      )
  arrays = {
    name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
    for name in _files(manifest.kind)
  }
  return TeacherCache(manifest=manifest, arrays=arrays)


def dense_logits(topk_ids: jax.Array, topk_logprobs: jax.Array, num_classes: int) -> jax.Array:
  """``[..., C]`` logits of a top-k teacher (``[..., k]`` ids and log-probabilities: ``[B, k]``
  per example, ``[B, S, k]`` per token): its log-probabilities at the stored ids, ``-inf``
  elsewhere, so a softmax renormalises the teacher over its k classes. Unused slots (id -1, a
  nucleus smaller than k: `jaxkd.losses.truncate_teacher`) write nothing."""
  ids = topk_ids.reshape(-1, topk_ids.shape[-1])
  rows = jnp.arange(ids.shape[0])[:, None]
  ids = jnp.where(ids < 0, num_classes, ids)  # out of bounds: dropped by the scatter
  logits = jnp.full((ids.shape[0], num_classes), -jnp.inf, jnp.float32)
  logits = logits.at[rows, ids].set(
    topk_logprobs.reshape(ids.shape).astype(jnp.float32), mode="drop"
  )
  return logits.reshape(*topk_ids.shape[:-1], num_classes)
