"""Token-level distillation through the method registry and the step: [B, S, V] logits."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tiny_models
from jaxkd import models, parallel, tasks, teachers
from jaxkd.losses import logit, sequence
from jaxkd.teachers import cache as teacher_cache

B, S, V = 3, 5, 11
TASK = tasks.CausalLM(seq_len=S)


@functools.cache
def _lms():
  kwargs = dict(vocab_size=V, num_layers=1, width=16, num_heads=2, num_kv_heads=1, mlp_dim=32)
  return (
    models.create("transformer_lm", seed=0, **kwargs),
    models.create("transformer_lm", seed=1, **kwargs),
  )


def _token_batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (B, S + 1)).astype(np.int32)
  mask = np.ones((B, S), bool)
  mask[0, 3:] = False  # a padded tail
  mask[2, :1] = False
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def _logits(seed):
  keys = jax.random.split(jax.random.key(seed), 2)
  return (3 * jax.random.normal(keys[0], (B, S, V)), 3 * jax.random.normal(keys[1], (B, S, V)))


def _method_loss(config, student_logits, teacher_logits, batch, topk=None):
  student, teacher = _lms()
  method = tiny_models.method(config, student, teacher, task=TASK)
  labels, mask = TASK.targets(jax.tree.map(jnp.asarray, batch))
  return method.loss(
    method.hparams,
    student_logits=student_logits,
    student_features={},
    teacher=teachers.TeacherOutputs(logits=teacher_logits, features={}, topk=topk),
    labels=labels,
    mask=mask,
    index=None,
    adapters=None,
    method_state={},
    step=jnp.int32(0),
    rng=jax.random.key(0),
  )


@pytest.mark.parametrize(
  "name, loss_fn, settings",
  [
    ("kd", logit.kd, {"temperature": 2.0}),
    ("reverse_kl", logit.reverse_kl, {"temperature": 1.0}),
    ("jsd", logit.jsd, {"beta": 0.3, "temperature": 1.0}),
    ("soft_cross_entropy", logit.soft_cross_entropy, {"temperature": 1.5}),
  ],
)
def test_logit_terms_are_masked_token_means(name, loss_fn, settings):
  student_logits, teacher_logits = _logits(1)
  batch = _token_batch()
  loss, metrics, _ = _method_loss(
    {"losses": {name: 1.0}, name: settings}, student_logits, teacher_logits, batch
  )
  expected = sequence.sequence_loss(
    loss_fn, student_logits, teacher_logits, batch["loss_mask"], **settings
  )
  np.testing.assert_allclose(metrics[name], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_ce_is_the_masked_next_token_cross_entropy():
  student_logits, teacher_logits = _logits(2)
  batch = _token_batch()
  _, metrics, _ = _method_loss({"losses": {"ce": 1.0}}, student_logits, teacher_logits, batch)
  per_token = optax.softmax_cross_entropy_with_integer_labels(student_logits, batch["targets"])
  np.testing.assert_allclose(
    metrics["ce"], sequence.token_mean(per_token, batch["loss_mask"]), rtol=1e-5
  )


@pytest.mark.parametrize("missing", ["renormalize", "residual"])
def test_sparse_topk_kd_reads_the_cached_topk_or_takes_the_live_teachers(missing):
  student_logits, teacher_logits = _logits(3)
  batch = _token_batch()
  k = 4
  config = {
    "losses": {"sparse_topk_kd": 1.0},
    "sparse_topk_kd": {"k": k, "missing": missing, "temperature": 2.0},
  }
  sparse = sequence.sparse_teacher_from_logits(teacher_logits, k)
  expected = sequence.sequence_loss(
    sequence.sparse_topk_kd,
    student_logits,
    sparse,
    batch["loss_mask"],
    missing=missing,
    temperature=2.0,
  )
  _, live, _ = _method_loss(config, student_logits, teacher_logits, batch)
  dense_from_cache = teacher_cache.dense_logits(sparse.ids, sparse.logprobs, V)
  _, cached, _ = _method_loss(config, student_logits, dense_from_cache, batch, topk=sparse)
  np.testing.assert_allclose(live["sparse_topk_kd"], expected, rtol=1e-5)
  np.testing.assert_allclose(cached["sparse_topk_kd"], expected, rtol=1e-5)


def test_dense_logits_of_a_per_token_topk_cache():
  ids = np.array([[[2, 0], [1, 3]]], np.int32)
  logprobs = np.log(np.array([[[0.5, 0.25], [0.6, 0.1]]], np.float32))
  dense = np.asarray(teacher_cache.dense_logits(ids, logprobs, 4))
  assert dense.shape == (1, 2, 4)
  np.testing.assert_allclose(dense[0, 0], [np.log(0.25), -np.inf, np.log(0.5), -np.inf])
  np.testing.assert_allclose(dense[0, 1], [-np.inf, np.log(0.6), -np.inf, np.log(0.1)])


def test_language_model_distillation_step():
  """One jitted step of the image runs' `train_step`: LM teacher and student on token ids,
  next-token targets, padded positions masked; the loss equals CE + KD computed from the
  models' own logits."""
  student, teacher = _lms()
  config = {"losses": {"ce": 0.5, "kd": 0.5}, "kd": {"temperature": 2.0}}
  method = tiny_models.method(config, student, teacher, task=TASK)
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  optimizer = optax.sgd(0.1)
  sources = tiny_models.teacher_sources([teacher], method, mesh, task=TASK)
  state = tiny_models.init_state(student, method, optimizer, mesh=mesh)
  train_step = tiny_models.train_step(
    student, method, optimizer, mesh, sources.train, state, task=TASK, donate=False
  )
  host_batch = _token_batch()
  new_state, metrics = train_step(
    state, method.hparams, sources.state, parallel.host_to_global(mesh, host_batch)
  )
  student_logits = student(jnp.asarray(host_batch["inputs"]))[0]
  teacher_logits = teacher(jnp.asarray(host_batch["inputs"]))[0]
  mask = host_batch["loss_mask"]
  ce = sequence.token_mean(
    optax.softmax_cross_entropy_with_integer_labels(student_logits, host_batch["targets"]), mask
  )
  kd = sequence.sequence_loss(logit.kd, student_logits, teacher_logits, mask, temperature=2.0)
  np.testing.assert_allclose(metrics["loss"], 0.5 * ce + 0.5 * kd, rtol=1e-4)
  assert int(new_state.step) == 1
  moved = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)),
    nnx.state(student, nnx.Param),
    nnx.filter_state(new_state.student, nnx.Param),
  )
  assert any(jax.tree.leaves(moved))


def test_an_integer_mask_is_refused():
  """TRL's -100 label convention passed as a mask is an error, not a silent cast."""
  batch = _token_batch()
  batch["loss_mask"] = np.where(batch["loss_mask"], batch["targets"], -100)
  with pytest.raises(TypeError, match="labels != -100"):
    TASK.targets(batch)


def test_cached_topk_language_model_step_equals_the_live_teachers(tmp_path):
  """A top-k cache of an LM teacher ([N, S, k] per token) trains the student without running
  the teacher, with the loss of the live teacher's top-k."""
  student, teacher = _lms()
  k = 4
  config = {"losses": {"ce": 0.5, "sparse_topk_kd": 0.5}, "sparse_topk_kd": {"k": k}}
  method = tiny_models.method(config, student, teacher, task=TASK)
  host_batch = {**_token_batch(), "index": np.arange(B, dtype=np.int32)}
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  live = tiny_models.teacher_sources([teacher], method, mesh, task=TASK)
  cached = teachers.with_cache(
    live,
    str(tmp_path),
    storage=dict(kind="topk", k=k),
    teacher_fingerprint="toy-teacher",
    identity=dict(dataset="toy", num_examples=B, data_fingerprint="toy"),
    batches=lambda: [{**host_batch, "mask": np.ones(B, bool)}],
  )
  assert cached.cache.shards[0]["topk_ids"].shape == (B, S, k)
  optimizer = optax.sgd(0.1)
  losses = []
  for sources in (live, cached):
    state = tiny_models.init_state(student, method, optimizer, mesh=mesh)
    train_step = tiny_models.train_step(
      student, method, optimizer, mesh, sources.train, state, task=TASK, donate=False
    )
    batch = sources.add_to_batch(host_batch)
    _, metrics = train_step(
      state, method.hparams, sources.state, parallel.host_to_global(mesh, batch)
    )
    losses.append(float(metrics["sparse_topk_kd"]))
  assert cached.train.source == "cached"
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def _one_step(config, task, student, teacher, batch):
  method = tiny_models.method(config, student, teacher, task=task, total_steps=10)
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  optimizer = optax.sgd(0.1)
  sources = tiny_models.teacher_sources([teacher], method, mesh, task=task)
  state = tiny_models.init_state(student, method, optimizer, mesh=mesh)
  train_step = tiny_models.train_step(
    student, method, optimizer, mesh, sources.train, state, task=task, donate=False
  )
  return train_step(state, method.hparams, sources.state, parallel.host_to_global(mesh, batch))


def test_chunked_lm_step_equals_the_dense_step():
  """`chunked_lm` (hidden states, chunk by chunk) trains exactly like CE + KD on the logits."""
  student, teacher = _lms()
  batch = _token_batch()
  dense_state, dense = _one_step(
    {
      "losses": {"ce": 0.7, "kd": 0.3},
      "kd": {"temperature": 2.0, "scale_by_temperature_squared": False},
    },
    TASK,
    student,
    teacher,
    batch,
  )
  chunked_state, chunked = _one_step(
    {
      "losses": {"chunked_lm": 1.0},
      "chunked_lm": {"alpha": 0.3, "temperature": 2.0, "chunk_size": 4},
    },
    dataclasses.replace(TASK, lm_head=True),
    student,
    teacher,
    batch,
  )
  np.testing.assert_allclose(chunked["loss"], dense["loss"], rtol=1e-5)
  np.testing.assert_allclose(chunked["chunked_lm/kd"], dense["kd"], rtol=1e-5)
  np.testing.assert_allclose(chunked["chunked_lm/ce"], dense["ce"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    jax.device_get(chunked_state.student),
    jax.device_get(dense_state.student),
  )


@pytest.mark.parametrize(
  "alpha, step, expected",
  [
    ({"schedule": "constant", "peak": 0.9}, 3, 0.9),
    ({"schedule": "linear", "init": 1.0, "end": 0.0}, 4, 0.6),
    ({"schedule": "wsd", "peak": 0.8, "warmup_fraction": 0.2, "decay_fraction": 0.2}, 1, 0.4),
    ({"schedule": "wsd", "peak": 0.8, "warmup_fraction": 0.2, "decay_fraction": 0.2}, 5, 0.8),
    ({"schedule": "wsd", "peak": 0.8, "warmup_fraction": 0.2, "decay_fraction": 0.2}, 9, 0.4),
  ],
)
def test_alpha_schedule_mixes_lm_and_kd(alpha, step, expected):
  """(1 − α(step))·CE + α(step)·KD over a 10-step run (Peng et al. 2024's schedules)."""
  student_logits, teacher_logits = _logits(4)
  batch = _token_batch()
  student, teacher = _lms()
  config = {"losses": {"ce": 1.0, "kd": 1.0}, "kd": {"temperature": 1.0}, "alpha": alpha}
  method = tiny_models.method(config, student, teacher, task=TASK, total_steps=10)
  labels, mask = TASK.targets(jax.tree.map(jnp.asarray, batch))
  loss, metrics, _ = method.loss(
    method.hparams,
    student_logits=student_logits,
    student_features={},
    teacher=teachers.TeacherOutputs(logits=teacher_logits, features={}),
    labels=labels,
    mask=mask,
    index=None,
    adapters=None,
    method_state={},
    step=jnp.int32(step),
    rng=jax.random.key(0),
  )
  np.testing.assert_allclose(metrics["alpha"], expected, rtol=1e-6)
  np.testing.assert_allclose(
    loss, (1 - expected) * metrics["ce"] + expected * metrics["kd"], rtol=1e-6
  )


def test_chunked_lm_with_logit_terms_is_refused():
  student, teacher = _lms()
  with pytest.raises(ValueError, match="chunked_lm reads hidden states"):
    tiny_models.method({"losses": {"chunked_lm": 1.0, "ce": 1.0}}, student, teacher, task=TASK)
