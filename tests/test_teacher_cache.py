"""Cached teacher: write once keyed by example index, read by memory map, train without running
the teacher (same loss as the live teacher), refuse mismatched data or teacher."""

import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import tiny_models
from jaxkd import parallel, teachers
from jaxkd.losses import logit, sequence
from jaxkd.teachers import cache as teacher_cache

NUM_EXAMPLES = 24


def _dataset():
  data = tiny_models.batch(NUM_EXAMPLES, seed=7)
  return data, teacher_cache.fingerprint({"image": data["image"], "label": data["label"]})


def _batches(data, size=8, seed=0):
  """Shuffled batches: the cache must be keyed by index, not by order."""
  order = np.random.default_rng(seed).permutation(NUM_EXAMPLES)
  for start in range(0, NUM_EXAMPLES, size):
    rows = order[start : start + size]
    yield {key: value[rows] for key, value in data.items()}


def _write(tmp_path, teacher, **kwargs):
  data, data_fingerprint = _dataset()
  return teacher_cache.write_cache(
    str(tmp_path),
    teacher_logits=lambda batch: tiny_models.forward(teacher, batch["image"])[0],
    teacher_fingerprint=teacher_cache.fingerprint(nnx.state(teacher)),
    batches=({**batch, "mask": np.ones(len(batch["index"]), bool)} for batch in _batches(data)),
    dataset="tiny",
    num_examples=NUM_EXAMPLES,
    data_fingerprint=data_fingerprint,
    **kwargs,
  )


def _open(tmp_path, teacher=None, **overrides):
  _, data_fingerprint = _dataset()
  kwargs = dict(
    dataset="tiny",
    num_examples=NUM_EXAMPLES,
    data_fingerprint=data_fingerprint,
    teacher_fingerprint=(teacher_cache.fingerprint(nnx.state(teacher)) if teacher else None),
  )
  kwargs.update(overrides)
  return teacher_cache.open_cache(str(tmp_path), **kwargs)


def test_dense_cache_round_trip(tmp_path):
  teacher = tiny_models.tiny_cnn(width=8, seed=2)
  manifest = _write(tmp_path, teacher)
  assert manifest.kind == "dense" and manifest.num_classes == 10
  cache = _open(tmp_path, teacher)
  assert isinstance(cache.shards[0]["logits"], np.memmap)
  data, _ = _dataset()
  index = np.array([5, 0, 23, 11])
  expected, _ = tiny_models.forward(teacher, data["image"][index])
  np.testing.assert_allclose(cache.lookup(index)["teacher_logits"], expected, rtol=1e-5, atol=1e-6)


def test_topk_cache_keeps_the_largest_log_probabilities(tmp_path):
  teacher = tiny_models.tiny_cnn(width=8, seed=2)
  _write(tmp_path, teacher, kind="topk", k=3, dtype="float16")
  entries = _open(tmp_path, teacher).lookup(np.arange(4))
  data, _ = _dataset()
  logits, _ = tiny_models.forward(teacher, data["image"][:4])
  log_probs = jax.nn.log_softmax(logits)
  expected_ids = np.argsort(-np.asarray(log_probs), axis=-1)[:, :3]
  np.testing.assert_array_equal(entries["teacher_topk_ids"], expected_ids)
  np.testing.assert_allclose(
    entries["teacher_topk_logprobs"],
    np.take_along_axis(np.asarray(log_probs), expected_ids, -1),
    atol=2e-3,
  )
  dense = teacher_cache.dense_logits(
    entries["teacher_topk_ids"], entries["teacher_topk_logprobs"], 10
  )
  assert np.sum(np.isfinite(dense)) == 12
  # KD against the top-k teacher is finite and equals KD against the renormalised top-k.
  student_logits = jax.random.normal(jax.random.key(0), (4, 10))
  value = logit.kd(student_logits, dense, temperature=1.0, reduction="none")
  assert np.all(np.isfinite(value))


def _train_losses(mesh, student, teacher, method, batches, cached):
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = tiny_models.init_state(student, method, optimizer, mesh=mesh)
  sources = tiny_models.teacher_sources([teacher], method, mesh)
  source = teachers.Teacher(source="cached", num_classes=10) if cached else sources.train
  train_step = tiny_models.train_step(student, method, optimizer, mesh, source, state)
  losses = []
  for batch in batches:
    state, metrics = train_step(
      state, method.hparams, sources.state, parallel.host_to_global(mesh, batch)
    )
    losses.append(float(metrics["loss"]))
  return losses


def test_training_from_the_cache_matches_the_live_teacher(tmp_path):
  student, teacher = tiny_models.tiny_cnn(width=4, seed=1), tiny_models.tiny_cnn(width=8, seed=2)
  _write(tmp_path, teacher)
  cache = _open(tmp_path, teacher)
  method = tiny_models.method({"losses": {"ce": 0.1, "kd": 0.9}}, student, teacher)
  mesh = parallel.make_mesh({"data": 8})
  data, _ = _dataset()
  batches = list(_batches(data, size=8, seed=1))[:2]
  live = _train_losses(mesh, student, teacher, method, batches, cached=False)
  cached = _train_losses(
    mesh, student, teacher, method, [cache.add_to_batch(batch) for batch in batches], cached=True
  )
  np.testing.assert_allclose(cached, live, rtol=1e-5)


def test_cached_step_without_cache_entries_is_an_error():
  student, teacher = tiny_models.tiny_cnn(width=4, seed=1), tiny_models.tiny_cnn(width=8, seed=2)
  method = tiny_models.method({"losses": {"kd": 1.0}}, student, teacher)
  mesh = parallel.make_mesh({"data": 8})
  with pytest.raises(ValueError, match="cached teacher"):
    _train_losses(mesh, student, teacher, method, [tiny_models.batch(8)], cached=True)


@pytest.mark.parametrize(
  "field, value",
  [
    ("dataset", "cifar100"),
    ("num_examples", 25),
    ("data_fingerprint", "abc"),
  ],
)
def test_mismatched_data_is_refused(tmp_path, field, value):
  _write(tmp_path, tiny_models.tiny_cnn(width=8, seed=2))
  with pytest.raises(ValueError, match=f"{field} is"):
    _open(tmp_path, **{field: value})


def test_mismatched_teacher_is_refused(tmp_path):
  _write(tmp_path, tiny_models.tiny_cnn(width=8, seed=2))
  with pytest.raises(ValueError, match="teacher_fingerprint"):
    _open(tmp_path, teacher=tiny_models.tiny_cnn(width=8, seed=3))


def test_missing_cache_and_incomplete_batches(tmp_path):
  with pytest.raises(FileNotFoundError):
    _open(tmp_path / "nothing")
  data, data_fingerprint = _dataset()
  with pytest.raises(ValueError, match="cover 8 of 24"):
    teacher = tiny_models.tiny_cnn(width=8, seed=2)
    teacher_cache.write_cache(
      str(tmp_path),
      teacher_logits=lambda batch: tiny_models.forward(teacher, batch["image"])[0],
      teacher_fingerprint=teacher_cache.fingerprint(nnx.state(teacher)),
      batches=[{**b, "mask": np.ones(8, bool)} for b in list(_batches(data))[:1]],
      dataset="tiny",
      num_examples=NUM_EXAMPLES,
      data_fingerprint=data_fingerprint,
    )


def test_training_from_a_full_topk_cache_matches_the_dense_cache(tmp_path):
  """k = C keeps the whole distribution: the sparse path gives the dense loss."""
  student, teacher = tiny_models.tiny_cnn(width=4, seed=1), tiny_models.tiny_cnn(width=8, seed=2)
  _write(tmp_path / "dense", teacher)
  _write(tmp_path / "topk", teacher, kind="topk", k=10)
  method = tiny_models.method({"losses": {"ce": 0.1, "kd": 0.9}}, student, teacher)
  mesh = parallel.make_mesh({"data": 8})
  data, _ = _dataset()
  batches = list(_batches(data, size=8, seed=1))[:1]
  losses = [
    _train_losses(
      mesh,
      student,
      teacher,
      method,
      [_open(tmp_path / kind).add_to_batch(b) for b in batches],
      cached=True,
    )
    for kind in ("dense", "topk")
  ]
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_topk_top_p_cache_stores_the_truncated_teacher_compactly(tmp_path, dtype, atol):
  """Pre-training distillation's storage: top-p nucleus then top-k at temperature τ, uint16 ids
  (10 classes) and `dtype` log-probabilities, equal to `truncate_teacher` of the live teacher."""
  teacher = tiny_models.tiny_cnn(width=8, seed=2)
  manifest = _write(tmp_path, teacher, kind="topk", k=4, top_p=0.5, temperature=0.1, dtype=dtype)
  assert manifest.bytes_per_position == 4 * (2 + (4 if dtype == "float32" else 2))
  cache = _open(tmp_path, teacher)
  assert cache.shards[0]["topk_ids"].dtype == np.uint16
  data, _ = _dataset()
  index = np.array([3, 17, 0])
  logits, _ = tiny_models.forward(teacher, data["image"][index])
  expected = sequence.truncate_teacher(logits, top_p=0.5, top_k=4, temperature=0.1)
  entries = cache.lookup(index)
  np.testing.assert_array_equal(entries["teacher_topk_ids"], expected.ids)
  kept = np.asarray(expected.ids) >= 0
  assert not kept.all()  # the nucleus ended before k for some examples: padded slots
  np.testing.assert_allclose(
    entries["teacher_topk_logprobs"][kept], np.asarray(expected.logprobs)[kept], atol=atol
  )
  assert np.all(entries["teacher_topk_logprobs"][~kept] == -np.inf)


def test_each_process_writes_its_own_shard(tmp_path):
  """A cache written in two shards (two processes' slices) reads back as one."""
  teacher = tiny_models.tiny_cnn(width=8, seed=2)
  data, data_fingerprint = _dataset()
  batches = [{**b, "mask": np.ones(len(b["index"]), bool)} for b in _batches(data)]
  for process in (0, 1):  # what `write_cache` does on each process of a 2-process run
    shard = teacher_cache._shard_dir(str(tmp_path), process, 2)
    os.makedirs(shard)
    rows = [b for i, b in enumerate(batches) if i % 2 == process]
    np.save(os.path.join(shard, "index.npy"), np.concatenate([b["index"] for b in rows]))
    np.save(
      os.path.join(shard, "logits.npy"),
      np.concatenate([tiny_models.forward(teacher, b["image"])[0] for b in rows]),
    )
  manifest = teacher_cache.Manifest(
    dataset="tiny",
    num_examples=NUM_EXAMPLES,
    data_fingerprint=data_fingerprint,
    teacher_fingerprint="t",
    kind="dense",
    num_classes=10,
    num_shards=2,
  )
  with open(os.path.join(tmp_path, teacher_cache.MANIFEST), "w") as f:
    json.dump(dataclasses.asdict(manifest), f)
  cache = _open(tmp_path, dataset="tiny")
  index = np.array([23, 0, 9, 12])
  expected, _ = tiny_models.forward(teacher, data["image"][index])
  np.testing.assert_allclose(cache.lookup(index)["teacher_logits"], expected, rtol=1e-6)
