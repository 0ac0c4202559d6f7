"""Stored teacher outputs: computed once, memory-mapped, read back by example index.

For deterministic views (no random augmentation; token windows) the teacher gives the same
outputs for an example every epoch, so its forward can be paid once. A cache holds, per example:

* ``'dense'``: the logits, ``[N, C]`` (``[N, S, V]`` for a language model);
* ``'topk'``: the pre-training distillation storage (Peng et al. 2024, "Pre-training
  Distillation for Large Language Models: A Design Space Exploration"): the teacher's
  distribution at temperature τ truncated to its top-p nucleus, then to its top k
  (`jaxkd.losses.truncate_teacher`), ``[N, k]`` (``[N, S, k]``) ids and full-vocabulary
  log-probabilities in compact dtypes (`jaxkd.losses.encode_sparse_teacher`: uint16 ids below
  65,536 classes, else int32; float16 / bfloat16 / float32 log-probabilities). Unused slots (a
  nucleus smaller than k) hold the padding id and -inf.

Layout (local or ``gs://``; a remote cache is copied to local disk when opened, since memory maps
need a local file): ``manifest.json`` (what the cache was computed from: dataset name, size and fingerprint,
the teacher's weights' fingerprint, kind, k, top-p, τ, dtypes, classes) and one shard per
writing process, ``shard-<p>-of-<P>/``, holding ``index.npy`` (the example indices it covers)
and the arrays, in `.npy` files read with ``mmap_mode='r'``: a batch reads its rows only. Each
process of a multi-host run writes the rows of its own slice of every batch, so the work and the
bytes are sharded by host; a reader opens every shard (a shared filesystem) and maps an example
index to its shard and row. `open_cache` checks every identity field against the run and
refuses a mismatch naming the field.

Training from the cache (`jaxkd.teachers`, source ``'cached'``): the host adds the rows to each
batch (`TeacherCache.add_to_batch`, under the batch keys below) and the step reads them instead
of running a teacher. A top-k teacher is the distribution renormalised over its kept classes:
the others get logit ``-inf`` (probability 0, `dense_logits`), which the logit losses handle
exactly, and `sparse_topk_kd` reads the sparse pair itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxkd.errors import UserError
from jaxkd.losses import sequence

MANIFEST = "manifest.json"
# The batch keys under which cached outputs travel from the host to the step.
LOGITS_KEY = "teacher_logits"
TOPK_IDS_KEY = "teacher_topk_ids"
TOPK_LOGPROBS_KEY = "teacher_topk_logprobs"
FORMAT_VERSION = 2
Kind = Literal["dense", "topk"]
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


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
  """What a cache was computed from and how it is stored.

  The identity fields (dataset, num_examples, data_fingerprint, teacher_fingerprint) must match
  the run that reads it; k, top_p, temperature and dtype describe the stored outputs.
  """

  dataset: str
  num_examples: int
  data_fingerprint: str
  teacher_fingerprint: str
  kind: Kind
  num_classes: int
  dtype: str = "float32"
  k: int | None = None
  top_p: float = 1.0
  temperature: float = 1.0
  num_shards: int = 1
  version: int = FORMAT_VERSION

  @property
  def bytes_per_position(self) -> int:
    """Stored bytes per example (per token for a language model)."""
    if self.kind == "dense":
      return self.num_classes * np.dtype(_numpy_dtype(self.dtype)).itemsize
    return sequence.sparse_bytes_per_token(self.num_classes, self.k, self.dtype)


class CacheMismatchError(UserError, ValueError):
  """A cache computed from other data or another teacher than the run's; the message names the
  field that differs."""


def _numpy_dtype(dtype: str):
  """numpy stores bfloat16 as its 16 bits (np.save has no bfloat16)."""
  return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)


def _shard_dir(directory: str, process: int, num_shards: int) -> epath.Path:
  return epath.Path(directory) / f"shard-{process:05d}-of-{num_shards:05d}"


def _save(path: epath.Path, array: np.ndarray) -> None:
  with path.open("wb") as f:
    np.save(f, array)


def _load(path: epath.Path, staging: str | None) -> np.ndarray:
  """The array at `path`, memory-mapped; a remote one (``gs://``) is first copied into the
  local `staging` directory (memory maps need a local file)."""
  if "://" in os.fspath(path):
    local = os.path.join(staging, path.parent.name, path.name)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    path.copy(local, overwrite=True)
    path = local
  return np.load(os.fspath(path), mmap_mode="r")


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
  top_p: float = 1.0,
  temperature: float = 1.0,
  dtype: str = "float32",
) -> Manifest:
  """Stores the teacher's outputs on every example of `batches`, by ``batch['index']``.

  Args:
    directory: created if needed; an existing cache there is overwritten.
    teacher_logits: the teacher's float32 logits ``[b, C]`` (``[b, S, V]``) for a host batch, in
      eval mode on the deterministic view.
    teacher_fingerprint: `fingerprint` of the teacher's weights.
    batches: this process's host batches, with ``'index'`` and a boolean ``'mask'`` marking
      real rows (padding rows are not written). Over all processes, every index in
      ``[0, num_examples)`` must appear.
    dataset, num_examples, data_fingerprint: identify the data (see `fingerprint`).
    kind: ``'dense'`` logits or ``'topk'`` truncated log-probabilities.
    k, top_p, temperature: ``'topk'``: keep the top-`top_p` nucleus, then at most `k` classes, of
      the distribution at `temperature` (`jaxkd.losses.truncate_teacher`).
    dtype: storage dtype of logits / log-probabilities: 'float32', 'float16' or 'bfloat16'.
  """
  if kind not in ("dense", "topk"):
    raise ValueError(f"kind must be 'dense' or 'topk', got {kind!r}")
  if (kind == "topk") != (k is not None):
    raise ValueError("k is required for kind='topk' and meaningless for kind='dense'")
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")

  @jax.jit
  def truncated(logits):
    teacher = sequence.truncate_teacher(logits, top_p=top_p, top_k=k, temperature=temperature)
    return teacher.ids, teacher.logprobs

  process, num_shards = jax.process_index(), jax.process_count()
  shard = _shard_dir(directory, process, num_shards)
  shard.mkdir(parents=True, exist_ok=True)
  parts: dict[str, list[np.ndarray]] = {"index": []}
  num_classes = None
  for batch in batches:
    logits = teacher_logits(batch)
    num_classes = int(logits.shape[-1])
    keep = np.asarray(batch["mask"], bool)
    if kind == "dense":
      arrays = {"logits": np.asarray(logits, np.float32).astype(jnp.dtype(dtype))}
    else:
      ids, logprobs = sequence.encode_sparse_teacher(
        sequence.SparseTeacher(*truncated(logits)), num_classes, dtype
      )
      arrays = {"topk_ids": ids, "topk_logprobs": logprobs}
    parts["index"].append(np.asarray(batch["index"], np.int64)[keep])
    for name, array in arrays.items():
      parts.setdefault(name, []).append(array[keep])
  if num_classes is None:
    raise ValueError("no batches to cache")
  for name, chunks in parts.items():
    array = np.concatenate(chunks)
    if array.dtype == jnp.bfloat16:
      array = array.view(np.uint16)
    _save(shard / f"{name}.npy", array)
  if num_shards > 1:
    multihost_utils.sync_global_devices("jaxkd teacher cache shards written")
  covered = np.zeros(num_examples, bool)
  for p in range(num_shards):
    with (_shard_dir(directory, p, num_shards) / "index.npy").open("rb") as f:
      covered[np.load(f)] = True
  if not covered.all():
    raise ValueError(f"the batches cover {int(covered.sum())} of {num_examples} examples")
  manifest = Manifest(
    dataset=dataset,
    num_examples=num_examples,
    data_fingerprint=data_fingerprint,
    teacher_fingerprint=teacher_fingerprint,
    kind=kind,
    num_classes=num_classes,
    dtype=dtype,
    k=k,
    top_p=top_p,
    temperature=temperature,
    num_shards=num_shards,
  )
  if process == 0:
    (epath.Path(directory) / MANIFEST).write_text(
      json.dumps(dataclasses.asdict(manifest), indent=2)
    )
  if num_shards > 1:
    multihost_utils.sync_global_devices("jaxkd teacher cache manifest written")
  return manifest


@dataclasses.dataclass(frozen=True)
class TeacherCache:
  """An opened cache: the manifest, the memory-mapped shards and where each example lives."""

  manifest: Manifest
  shards: tuple[Mapping[str, np.ndarray], ...]
  shard_of: np.ndarray  # [N] the shard of example i
  row_of: np.ndarray  # [N] its row in that shard

  def lookup(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """The batch entries for examples `index`: `LOGITS_KEY` (dense, float32) or `TOPK_IDS_KEY`
    and `TOPK_LOGPROBS_KEY` (top-k: int32 ids, -1 unused; float32 log-probabilities)."""
    index = np.asarray(index)
    shards, rows = self.shard_of[index], self.row_of[index]
    names = _files(self.manifest.kind)
    gathered = {name: [] for name in names}
    order = np.empty(len(index), np.int64)
    start = 0
    for shard in np.unique(shards):  # rows of one shard in one fancy-indexing read
      selected = np.flatnonzero(shards == shard)
      order[selected] = np.arange(start, start + len(selected))
      start += len(selected)
      for name in names:
        gathered[name].append(self.shards[shard][name][rows[selected]])
    arrays = {name: np.concatenate(parts)[order] for name, parts in gathered.items()}
    if self.manifest.dtype == "bfloat16":
      key = "logits" if self.manifest.kind == "dense" else "topk_logprobs"
      arrays[key] = arrays[key].view(jnp.bfloat16)
    if self.manifest.kind == "dense":
      return {LOGITS_KEY: arrays["logits"].astype(np.float32)}
    teacher = sequence.decode_sparse_teacher(
      arrays["topk_ids"], arrays["topk_logprobs"], self.manifest.num_classes
    )
    return {TOPK_IDS_KEY: teacher.ids, TOPK_LOGPROBS_KEY: teacher.logprobs}

  def add_to_batch(self, host_batch: Mapping[str, Any]) -> dict[str, Any]:
    """`host_batch` plus its cached teacher outputs (looked up by ``host_batch['index']``)."""
    return {**host_batch, **self.lookup(host_batch["index"])}

  def describe(self) -> str:
    """What is stored and its size against dense float32 logits, e.g. 'top-p 0.95 then top-50
    at T 1, float16: 16,777,216 positions × 300 bytes = 4.69 GiB (dense float32: 1,028 bytes per
    position, 3.4× as much)'."""
    manifest = self.manifest
    positions = sum(
      int(np.prod(shard[_files(manifest.kind)[0]].shape[:-1])) for shard in self.shards
    )
    dense = manifest.num_classes * 4
    stored = manifest.bytes_per_position
    what = (
      "dense logits"
      if manifest.kind == "dense"
      else f"top-p {manifest.top_p:g} then top-{manifest.k} at T {manifest.temperature:g}"
    )
    return (
      f"{what}, {manifest.dtype}: {positions:,} positions × {stored:,} bytes = "
      f"{positions * stored / 2**30:.3g} GiB (dense float32: {dense:,} bytes per position, "
      f"{dense / stored:.3g}× as much)"
    )


def read_manifest(directory: str) -> Manifest:
  """The manifest of the cache in `directory`; FileNotFoundError if there is none."""
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"no teacher cache at {directory} ({MANIFEST} is missing)")
  record = json.loads(path.read_text())
  if record.get("version") != FORMAT_VERSION:
    raise CacheMismatchError(
      f"teacher cache {directory} has format version {record.get('version')!r}, this jaxkd "
      f"reads {FORMAT_VERSION}; rebuild it (delete the directory and run again)"
    )
  return Manifest(**record)


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
  shards, shard_of, row_of = [], np.full(num_examples, -1), np.full(num_examples, -1)
  staging = tempfile.mkdtemp(prefix="jaxkd-teacher-cache-") if "://" in directory else None
  for p in range(manifest.num_shards):
    path = _shard_dir(directory, p, manifest.num_shards)
    index = _load(path / "index.npy", staging)
    shard_of[index], row_of[index] = p, np.arange(len(index))
    shards.append({name: _load(path / f"{name}.npy", staging) for name in _files(manifest.kind)})
  return TeacherCache(manifest=manifest, shards=tuple(shards), shard_of=shard_of, row_of=row_of)


def dense_logits(topk_ids: jax.Array, topk_logprobs: jax.Array, num_classes: int) -> jax.Array:
  """``[..., C]`` logits of a top-k teacher (``[..., k]`` ids and log-probabilities: ``[B, k]``
  per example, ``[B, S, k]`` per token): its log-probabilities at the stored ids, ``-inf``
  elsewhere, so a softmax renormalises the teacher over its kept classes. Unused slots (id -1)
  write nothing."""
  ids = topk_ids.reshape(-1, topk_ids.shape[-1])
  rows = jnp.arange(ids.shape[0])[:, None]
  ids = jnp.where(ids < 0, num_classes, ids)  # out of bounds: dropped by the scatter
  logits = jnp.full((ids.shape[0], num_classes), -jnp.inf, jnp.float32)
  logits = logits.at[rows, ids].set(
    topk_logprobs.reshape(ids.shape).astype(jnp.float32), mode="drop"
  )
  return logits.reshape(*topk_ids.shape[:-1], num_classes)
