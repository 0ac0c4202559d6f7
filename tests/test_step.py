"""The jitted distillation step: sharded == single device, teacher in eval mode,
one augmented view for both models, eval sums with padding (8 simulated CPU devices)."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tiny_models
from jaxkd import distill, parallel, step as kd_step, tasks
from jaxkd.losses import logit

KD_CONFIG = {"losses": {"ce": 0.1, "kd": 0.9}, "kd": {"temperature": 4.0}}


def _setup(mesh_config, width=8, devices=None, config=KD_CONFIG, teacher=True):
  student = tiny_models.tiny_cnn(width=width, seed=1)
  teacher_model = tiny_models.tiny_cnn(width=width, seed=2) if teacher else None
  method = tiny_models.method(config, student, teacher_model)
  mesh = parallel.make_mesh(mesh_config, devices=devices)
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = tiny_models.init_state(student, method, optimizer, seed=0, mesh=mesh)
  sources = tiny_models.teacher_sources([teacher_model] if teacher else [], method, mesh)
  return student, teacher_model, method, mesh, optimizer, state, sources


def _run(mesh_config, devices=None, num_steps=3, **kwargs):
  student, teacher, method, mesh, optimizer, state, sources = _setup(
    mesh_config, devices=devices, **kwargs
  )
  train_step = tiny_models.train_step(student, method, optimizer, mesh, sources.train, state)
  losses = []
  for i in range(num_steps):
    state, metrics = train_step(
      state,
      method.hparams,
      sources.state,
      parallel.host_to_global(mesh, tiny_models.batch(16, seed=i)),
    )
    losses.append(metrics["loss"])
  return np.asarray(losses), jax.device_get(state)


@functools.cache
def _single_device_run():
  return _run({"data": 1}, devices=jax.devices()[:1])


@pytest.mark.parametrize(
  "mesh_config", [{"data": 8, "fsdp": 1}, {"data": 4, "fsdp": 2}, {"data": 1, "fsdp": 8}]
)
def test_sharded_step_matches_single_device(mesh_config):
  single_losses, single_state = _single_device_run()
  losses, state = _run(mesh_config)
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5, atol=1e-5)
  # Parameters and BatchNorm statistics (over the global batch) agree.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
    state.student,
    single_state.student,
  )
  assert int(state.step) == 3


def _code_lines(function) -> int:
  """Lines of `function` that are code: no docstring, comments or blank lines."""
  lines = inspect.getsource(function).splitlines()
  docstring = function.__doc__ or ""
  code = "\n".join(lines).replace(docstring, "")
  return sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))


def test_step_fits_on_one_screen():
  """The step a reader changes: view → teacher → update, in a few lines each."""
  assert _code_lines(kd_step.train_step) <= 5
  assert _code_lines(kd_step.update) <= 50


def test_fsdp_shards_large_state_arrays():
  _, _, _, mesh, _, state, _ = _setup({"data": 4, "fsdp": 2})
  kernel = state.student["conv2"]["kernel"][...]  # 3x3x8x16
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  # The optimiser's momentum of that kernel is sharded the same way.
  assert kernel.sharding.spec in {leaf.sharding.spec for leaf in jax.tree.leaves(state.opt_state)}


def _reference_loss(student, teacher, images, labels, temperature=4.0):
  """CE 0.1 + KD 0.9 by hand: student in train mode (batch statistics), teacher in eval mode."""
  student = nnx.clone(student)
  student_logits, _ = student(images, train=True)
  teacher_logits, _ = teacher(images, train=False)
  ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
  kd = logit.kd(student_logits, teacher_logits, temperature=temperature)
  return 0.1 * ce + 0.9 * kd


def _flip(rng, images):
  del rng
  return images[:, :, ::-1, :]


def test_loss_uses_eval_mode_teacher_and_one_augmented_view():
  student, teacher, method, mesh, optimizer, state, _ = _setup({"data": 8})
  # A teacher whose running statistics differ from batch statistics, so train mode would show.
  teacher.stem_bn.mean[...] = teacher.stem_bn.mean[...] + 0.5
  sources = tiny_models.teacher_sources([teacher], method, mesh)
  augment_calls = []

  def augment(rng, images):
    augment_calls.append(rng)
    return _flip(rng, images)

  task = tasks.Classification(image_shape=(8, 8, 3), augment=augment)
  sources = tiny_models.teacher_sources([teacher], method, mesh, task=task)
  train_step = tiny_models.train_step(
    student, method, optimizer, mesh, sources.train, state, task=task
  )
  host_batch = tiny_models.batch(16)
  teacher_before = jax.device_get(sources.state)
  _, metrics = train_step(
    state, method.hparams, sources.state, parallel.host_to_global(mesh, host_batch)
  )
  assert len(augment_calls) == 1  # traced once: one view for both models
  expected = _reference_loss(
    student, teacher, _flip(None, jnp.asarray(host_batch["image"])), host_batch["label"]
  )
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  # The teacher's state is an input, never updated (eval mode keeps its statistics).
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sources.state), teacher_before)


def test_supervised_training_without_teacher():
  student, _, method, mesh, optimizer, state, _ = _setup(
    {"data": 4, "fsdp": 2}, config={"losses": {"ce": 1.0}}, teacher=False
  )
  # The trainer passes the (FSDP-sharded) state of the teacher it evaluates with: the step's
  # source is 'none' for a method without teacher terms, and ignores it.
  sources = tiny_models.teacher_sources([tiny_models.tiny_cnn(width=8, seed=2)], method, mesh)
  assert sources.train.source == "none"
  train_step = tiny_models.train_step(student, method, optimizer, mesh, sources.train, state)
  batch = parallel.host_to_global(mesh, tiny_models.batch(16))
  losses = []
  for _ in range(5):
    state, metrics = train_step(state, method.hparams, sources.state, batch)
    losses.append(float(metrics["loss"]))
    assert set(metrics) == {"loss", "ce", "accuracy", "nonfinite", "first_nonfinite_grad"}
    assert metrics["nonfinite"] == 0 and metrics["first_nonfinite_grad"] == -1
  assert losses[-1] < losses[0]


def test_method_needing_a_teacher_without_one_is_an_error():
  student = tiny_models.tiny_cnn()
  with pytest.raises(ValueError, match="needs a teacher"):
    distill.plan(KD_CONFIG, info=distill.feature_info(tiny_models.TASK, student), has_teacher=False)


def test_eval_step_sums_skip_padding():
  student, teacher, method, mesh, _, state, sources = _setup({"data": 8})
  eval_step = tiny_models.eval_step(student, method, mesh, sources.eval)
  host_batch = tiny_models.batch(16)
  host_batch["mask"] = np.arange(16) < 11
  sums = jax.device_get(eval_step(state, sources.state, parallel.host_to_global(mesh, host_batch)))
  student_logits, _ = student(jnp.asarray(host_batch["image"][:11]), train=False)
  teacher_logits, _ = teacher(jnp.asarray(host_batch["image"][:11]), train=False)
  predictions = np.argmax(student_logits, -1)
  assert sums["count"] == 11
  assert sums["correct"] == np.sum(predictions == host_batch["label"][:11])
  assert sums["agree"] == np.sum(predictions == np.argmax(teacher_logits, -1))
  expected_kl = logit.kd(
    student_logits,
    teacher_logits,
    temperature=1.0,
    scale_by_temperature_squared=False,
    reduction="sum",
  )
  np.testing.assert_allclose(sums["kl"], expected_kl, rtol=1e-5)


def test_student_model_carries_trained_weights():
  student, teacher, method, mesh, optimizer, state, sources = _setup({"data": 8})
  train_step = tiny_models.train_step(student, method, optimizer, mesh, sources.train, state)
  state, _ = train_step(
    state, method.hparams, sources.state, parallel.host_to_global(mesh, tiny_models.batch(16))
  )
  exported = kd_step.student_model(nnx.graphdef(student), state)
  np.testing.assert_array_equal(exported.head.kernel[...], state.student["head"]["kernel"][...])
  assert not np.array_equal(exported.head.kernel[...], student.head.kernel[...])


def test_a_non_finite_update_is_held_back():
  """A NaN in the batch: the loss and gradients are not finite; the state keeps its weights,
  BatchNorm statistics and optimiser state (only the step advances), and the metrics name the
  first non-finite gradient."""
  student, _, method, mesh, optimizer, state, sources = _setup({"data": 8})
  paths = kd_step.gradient_paths(state)
  train_step = tiny_models.train_step(
    student, method, optimizer, mesh, sources.train, state, donate=False
  )
  host_batch = tiny_models.batch(16)
  host_batch["image"] = np.array(host_batch["image"])
  host_batch["image"][3, 0, 0, 0] = np.nan
  new_state, metrics = train_step(
    state, method.hparams, sources.state, parallel.host_to_global(mesh, host_batch)
  )
  assert metrics["nonfinite"] == 1 and not np.isfinite(metrics["loss"])
  assert paths[int(metrics["first_nonfinite_grad"])].startswith("['student']")
  assert int(new_state.step) == int(state.step) + 1
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(new_state.replace(step=state.step)),
    jax.device_get(state),
  )
