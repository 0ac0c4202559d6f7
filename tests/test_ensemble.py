"""Teacher ensembles: stacked teacher states, vmapped teacher forward, the three combine rules,
sharded == single device (8 simulated devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_models
from jaxkd import parallel, teachers as teacher_sources
from jaxkd.losses import logit

CONFIG = {"losses": {"ce": 0.1, "kd": 0.9}, "kd": {"temperature": 4.0}}


def _setup(mesh_config, devices=None):
  student = tiny_models.tiny_cnn(width=4, seed=1)
  teachers = [tiny_models.tiny_cnn(width=8, seed=seed) for seed in (2, 3, 4)]
  method = tiny_models.method(CONFIG, student, teachers[0])
  mesh = parallel.make_mesh(mesh_config, devices=devices)
  return student, teachers, method, mesh


def _first_step_metrics(rule):
  student, teachers, method, mesh = _setup({"data": 8})
  optimizer = optax.sgd(0.1)
  state = tiny_models.init_state(student, method, optimizer, mesh=mesh)
  sources = tiny_models.teacher_sources(teachers, method, mesh, rule=rule)
  train_step = tiny_models.train_step(student, method, optimizer, mesh, sources.train, state)
  host_batch = tiny_models.batch(16)
  _, metrics = train_step(
    state, method.hparams, sources.state, parallel.host_to_global(mesh, host_batch)
  )
  images = jnp.asarray(host_batch["image"])
  teacher_logits = jnp.stack([tiny_models.forward(teacher, images)[0] for teacher in teachers])
  student_logits, _ = tiny_models.forward(student, images, train=True)
  return metrics, student_logits, teacher_logits


def test_teacher_state_is_stacked():
  _, teachers, method, mesh = _setup({"data": 8})
  state = tiny_models.teacher_sources(teachers, method, mesh).state
  np.testing.assert_array_equal(state["head"]["kernel"][...][1], teachers[1].head.kernel[...])
  assert state["head"]["kernel"][...].shape[0] == 3


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs", "per_teacher"])
def test_combine_rules(rule):
  metrics, student_logits, teacher_logits = _first_step_metrics(rule)
  if rule == "mean_logits":
    expected = logit.kd(student_logits, teacher_logits.mean(0), temperature=4.0)
  elif rule == "mean_probs":
    mean_probs = jax.nn.softmax(teacher_logits, -1).mean(0)
    expected = logit.kd(student_logits, jnp.log(mean_probs), temperature=4.0)
  else:
    expected = np.mean([logit.kd(student_logits, t, temperature=4.0) for t in teacher_logits])
  np.testing.assert_allclose(metrics["kd"], expected, rtol=2e-5)


def test_sharded_ensemble_matches_single_device():
  results = []
  for mesh_config, devices in (({"data": 1}, jax.devices()[:1]), ({"data": 4, "fsdp": 2}, None)):
    student, teachers, method, mesh = _setup(mesh_config, devices)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = tiny_models.init_state(student, method, optimizer, mesh=mesh)
    sources = tiny_models.teacher_sources(teachers, method, mesh, rule="per_teacher")
    train_step = tiny_models.train_step(student, method, optimizer, mesh, sources.train, state)
    losses = []
    for i in range(2):
      state, metrics = train_step(
        state,
        method.hparams,
        sources.state,
        parallel.host_to_global(mesh, tiny_models.batch(16, seed=i)),
      )
      losses.append(metrics["loss"])
    results.append((np.asarray(losses), jax.device_get(state.student)))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    results[1][1],
    results[0][1],
  )


def test_eval_step_with_ensemble_uses_the_mean_teacher():
  student, teachers, method, mesh = _setup({"data": 8})
  state = tiny_models.init_state(student, method, optax.sgd(0.1), mesh=mesh)
  sources = tiny_models.teacher_sources(teachers, method, mesh, rule="per_teacher")
  eval_step = tiny_models.eval_step(student, method, mesh, sources.eval)
  host_batch = tiny_models.batch(16)
  sums = eval_step(state, sources.state, parallel.host_to_global(mesh, host_batch))
  images = jnp.asarray(host_batch["image"])
  mean_teacher = jnp.stack([tiny_models.forward(t, images)[0] for t in teachers]).mean(0)
  predictions = jnp.argmax(tiny_models.forward(student, images)[0], -1)
  assert sums["agree"] == np.sum(predictions == jnp.argmax(mean_teacher, -1))


def test_unknown_rule_and_per_teacher_with_adapters_are_errors():
  student, teachers, method, mesh = _setup({"data": 8})
  with pytest.raises(ValueError, match="unknown ensemble rule"):
    tiny_models.teacher_sources(teachers, method, mesh, rule="vote")
  fitnet = tiny_models.method({"losses": {"fitnet": 1.0}}, student, teachers[0])
  sources = tiny_models.teacher_sources(teachers, fitnet, mesh, rule="per_teacher")
  state = tiny_models.init_state(student, fitnet, optax.sgd(0.1), mesh=mesh)
  train_step = tiny_models.train_step(student, fitnet, optax.sgd(0.1), mesh, sources.train, state)
  with pytest.raises(ValueError, match="per_teacher"):
    train_step(
      state, fitnet.hparams, sources.state, parallel.host_to_global(mesh, tiny_models.batch(16))
    )


def test_combine_keeps_per_teacher_outputs_stacked():
  logits = jnp.arange(12.0).reshape(3, 2, 2)
  outputs = teacher_sources.combine(logits, {}, "per_teacher")
  assert outputs.per_teacher and outputs.logits.shape == (3, 2, 2)
