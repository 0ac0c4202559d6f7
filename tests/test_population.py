"""Student populations: one vmapped step == P sequential single-student runs (8 devices)."""

import jax
import numpy as np
import optax
import pytest

import tiny_models
from jaxkd import parallel, population
from jaxkd import state as train_state

CONFIG = {"losses": {"ce": 0.1, "kd": 0.9}, "kd": {"temperature": 4.0}}
BASE_LR = 0.1
SWEEP = {
  "size": 3,
  "sweep": {
    "kd.temperature": [1.0, 2.0, 8.0],
    "losses.kd": [0.9, 0.5, 0.1],
    "seed": [3, 4, 5],
    "learning_rate_scale": [1.0, 0.5, 2.0],
  },
}
NUM_STEPS = 2


def _optimizer():
  return population.with_learning_rate_scale(optax.sgd(BASE_LR, momentum=0.9))


def _models(seed=1):
  return tiny_models.tiny_cnn(width=4, seed=seed), tiny_models.tiny_cnn(width=8, seed=2)


def _batches(mesh):
  return [parallel.host_to_global(mesh, tiny_models.batch(16, seed=i)) for i in range(NUM_STEPS)]


def _init(members, student, method, optimizer, mesh, make_student):
  def make_state(seed, new_weights):
    model = make_student(seed) if new_weights else student
    return train_state.create(model, method.adapters, method.initial_state, optimizer, seed)

  states, hparams = population.init(members, make_state, method.hparams, seed=0)
  return parallel.shard_state(mesh, states, leading_axes=1), hparams


@pytest.mark.parametrize("chunk", [None, 1])
def test_population_matches_sequential_single_runs(chunk):
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  student, teacher = _models()
  method = tiny_models.method(CONFIG, student, teacher)
  sources = tiny_models.teacher_sources([teacher], method, mesh)
  make_student = lambda seed: tiny_models.tiny_cnn(width=4, seed=seed)
  members = population.parse(SWEEP)
  assert members.size == 3

  state, hparams = _init(members, student, method, _optimizer(), mesh, make_student)
  train_step = tiny_models.train_step(
    student, method, _optimizer(), mesh, sources.train, state, members=True, chunk=chunk
  )
  for batch in _batches(mesh):
    state, metrics = train_step(state, hparams, sources.state, batch)
  per_member = population.unstack(jax.device_get(metrics))
  member_states = population.unstack(state)

  for index, overrides in enumerate(members.overrides):
    member_student = make_student(overrides["seed"])
    member_config = {
      "losses": {"ce": 0.1, "kd": overrides["losses.kd"]},
      "kd": {"temperature": overrides["kd.temperature"]},
    }
    member_method = tiny_models.method(member_config, member_student, teacher)
    optimizer = optax.sgd(BASE_LR * overrides["learning_rate_scale"], momentum=0.9)
    single = tiny_models.init_state(
      member_student, member_method, optimizer, seed=overrides["seed"], mesh=mesh
    )
    single_step = tiny_models.train_step(
      member_student, member_method, optimizer, mesh, sources.train, single
    )
    for batch in _batches(mesh):
      single, single_metrics = single_step(single, member_method.hparams, sources.state, batch)
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
      jax.device_get(member_states[index].student),
      jax.device_get(single.student),
    )


def test_learning_rate_scale_multiplies_the_update():
  mesh = parallel.make_mesh({"data": 8})
  student, teacher = _models()
  method = tiny_models.method(CONFIG, student, teacher)
  sources = tiny_models.teacher_sources([teacher], method, mesh)
  optimizer = population.with_learning_rate_scale(optax.sgd(0.1))
  members = population.parse({"size": 2, "sweep": {"learning_rate_scale": [1.0, 0.0]}})
  state, hparams = _init(members, student, method, optimizer, mesh, None)
  train_step = tiny_models.train_step(
    student, method, optimizer, mesh, sources.train, state, members=True
  )
  before = jax.device_get(state.student)
  state, _ = train_step(state, hparams, sources.state, _batches(mesh)[0])
  kernel_before = before["head"]["kernel"][...]
  kernel_after = jax.device_get(state.student)["head"]["kernel"][...]
  assert not np.allclose(kernel_after[0], kernel_before[0])
  np.testing.assert_array_equal(kernel_after[1], kernel_before[1])  # scale 0: no update


def test_members_are_named_by_their_sweep_values():
  members = population.parse({"size": 2, "sweep": {"kd": {"temperature": [1.0, 4.0]}}})
  assert members.names == ("kd.temperature=1.0", "kd.temperature=4.0")
  assert population.parse({"size": 1, "sweep": {}}) is None


@pytest.mark.parametrize(
  "sweep, message",
  [
    ({"kd.temprature": [1, 2]}, "cannot sweep 'kd.temprature'; sweepable keys: ce.label_smoothing"),
    ({"kd.temperature": [1, 2, 3]}, "has 3 values for 2 members"),
    ({"kd.temperature": [1, -2]}, r"kd.temperature=-2.0 must be positive"),
    ({"learning_rate_scale": [1, 0]}, "learning_rate_scale=0: must be positive"),
  ],
)
def test_sweep_errors(sweep, message):
  student, teacher = _models()
  method = tiny_models.method(CONFIG, student, teacher)
  with pytest.raises(ValueError, match=message):
    population.check(population.parse({"size": 2, "sweep": sweep}), method.hparams)
