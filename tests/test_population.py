"""Student populations: one vmapped step == P sequential single-student runs (8 devices)."""

import jax
import numpy as np
import optax
import pytest

import tiny_models
from jaxkd import distill, parallel, population, step as kd_step

IMAGE_SHAPE = (2, 8, 8, 3)
CONFIG = {"losses": {"ce": 0.1, "kd": 0.9}, "kd": {"temperature": 4.0}}
SWEEP = {
  "size": 3,
  "sweep": {
    "kd.temperature": [1.0, 2.0, 8.0],
    "losses.kd": [0.9, 0.5, 0.1],
    "seed": [3, 4, 5],
    "learning_rate": [0.1, 0.05, 0.2],
  },
}
NUM_STEPS = 2


def _optimizer():
  return optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)


def _models(seed=1):
  return tiny_models.tiny_cnn(width=4, seed=seed), tiny_models.tiny_cnn(width=8, seed=2)


def _batches(mesh):
  return [parallel.host_to_global(mesh, tiny_models.batch(16, seed=i)) for i in range(NUM_STEPS)]


def test_population_matches_sequential_single_runs():
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  student, teacher = _models()
  method = distill.build(CONFIG, student=student, teacher=teacher, input_shape=IMAGE_SHAPE)
  teacher_state = kd_step.teacher_state(teacher, mesh)
  make_student = lambda seed: tiny_models.tiny_cnn(width=4, seed=seed)

  state = population.init_population(
    student, method, _optimizer(), SWEEP, mesh=mesh, make_student=make_student
  )
  assert population.size(state) == 3
  train_step = kd_step.make_train_step(
    student=student,
    teacher=teacher,
    method=method,
    optimizer=_optimizer(),
    mesh=mesh,
    population_size=3,
  )
  for batch in _batches(mesh):
    state, metrics = train_step(state, teacher_state, batch)
  per_member = population.member_metrics(metrics)

  for index, overrides in enumerate(population.member_overrides(SWEEP)):
    member_student = make_student(overrides["seed"])
    member_config = {
      "losses": {"ce": 0.1, "kd": overrides["losses.kd"]},
      "kd": {"temperature": overrides["kd.temperature"]},
    }
    member_method = distill.build(
      member_config, student=member_student, teacher=teacher, input_shape=IMAGE_SHAPE
    )
    optimizer = optax.sgd(overrides["learning_rate"], momentum=0.9)
    single = kd_step.init_state(
      member_student, member_method, optimizer, seed=overrides["seed"], mesh=mesh
    )
    single_step = kd_step.make_train_step(
      student=member_student, teacher=teacher, method=member_method, optimizer=optimizer, mesh=mesh
    )
    for batch in _batches(mesh):
      single, single_metrics = single_step(single, teacher_state, batch)
    for name in ("loss", "ce", "kd"):
      np.testing.assert_allclose(
        per_member[index][name],
        single_metrics[name],
        rtol=1e-5,
        atol=1e-6,
        err_msg=f"member {index} {name}",
      )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      jax.device_get(population.member(state, index).student),
      jax.device_get(single.student),
    )


def test_learning_rate_scale_multiplies_the_update():
  mesh = parallel.make_mesh({"data": 8})
  student, teacher = _models()
  method = distill.build(CONFIG, student=student, teacher=teacher, input_shape=IMAGE_SHAPE)
  optimizer = population.with_learning_rate_scale(optax.sgd(0.1))
  config = {"size": 2, "sweep": {"learning_rate_scale": [1.0, 0.0]}}
  state = population.init_population(student, method, optimizer, config, mesh=mesh)
  train_step = kd_step.make_train_step(
    student=student,
    teacher=teacher,
    method=method,
    optimizer=optimizer,
    mesh=mesh,
    population_size=2,
  )
  before = jax.device_get(state.student)
  state, _ = train_step(state, kd_step.teacher_state(teacher, mesh), _batches(mesh)[0])
  kernel_before = before["head"]["kernel"][...]
  kernel_after = jax.device_get(state.student)["head"]["kernel"][...]
  assert not np.allclose(kernel_after[0], kernel_before[0])
  np.testing.assert_array_equal(kernel_after[1], kernel_before[1])  # scale 0: no update


@pytest.mark.parametrize(
  "sweep, message",
  [
    ({"kd.temprature": [1, 2]}, "cannot sweep 'kd.temprature'; sweepable keys: ce.label_smoothing"),
    ({"kd.temperature": [1, 2, 3]}, "has 3 values for 2 members"),
    ({"learning_rate": [0.1, 0.2]}, "optax.inject_hyperparams"),
  ],
)
def test_sweep_errors(sweep, message):
  student, teacher = _models()
  method = distill.build(CONFIG, student=student, teacher=teacher, input_shape=IMAGE_SHAPE)
  with pytest.raises(ValueError, match=message):
    population.init_population(student, method, optax.sgd(0.1), {"size": 2, "sweep": sweep})


def test_member_helpers():
  config = {"size": 2, "sweep": {"kd.temperature": [1, 4]}}
  assert population.member_names(config) == ["kd.temperature=1", "kd.temperature=4"]
  import ml_collections

  nested = ml_collections.ConfigDict(
    {"size": 2, "sweep": {"kd": {"temperature": [1, 4]}, "seed": [0, 1]}}
  )
  assert population.member_overrides(nested) == [
    {"kd.temperature": 1, "seed": 0},
    {"kd.temperature": 4, "seed": 1},
  ]
  stacked = {"loss": np.array([1.0, 2.0])}
  assert population.member_metrics(stacked) == [{"loss": 1.0}, {"loss": 2.0}]
  assert [m["loss"] for m in population.unstack(stacked)] == [1.0, 2.0]


def test_chunked_population_matches_one_vmap():
  """Groups of 2 (+ a group of 1) unrolled == all 3 members vmapped at once."""
  mesh = parallel.make_mesh({"data": 8})
  student, teacher = _models()
  method = distill.build(CONFIG, student=student, teacher=teacher, input_shape=IMAGE_SHAPE)
  config = {"size": 3, "sweep": {"kd.temperature": [1.0, 2.0, 8.0], "seed": [3, 4, 5]}}
  results = []
  for chunk in (None, 2):
    state = population.init_population(student, method, _optimizer(), config, mesh=mesh)
    train_step = kd_step.make_train_step(
      student=student,
      teacher=teacher,
      method=method,
      optimizer=_optimizer(),
      mesh=mesh,
      population_size=3,
      population_chunk=chunk,
    )
    for batch in _batches(mesh):
      state, metrics = train_step(state, kd_step.teacher_state(teacher, mesh), batch)
    results.append((jax.device_get(metrics), jax.device_get(state.student)))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results[0], results[1]
  )
