"""The method registry: config validation, every registered term (jit == eager, finite values and
gradients, equal to the loss function called by hand), schedules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tiny_models
from jaxkd import distill, teachers
from jaxkd.losses import feature, logit, relation

BATCH = 8


@functools.cache
def _models():
  return tiny_models.tiny_cnn(width=4, seed=1), tiny_models.tiny_cnn(width=8, seed=2)


@functools.cache
def _outputs():
  student, teacher = _models()
  host_batch = tiny_models.batch(BATCH)

  @jax.jit
  def forward(student_state, teacher_state, images):
    student_model = nnx.merge(nnx.graphdef(student), student_state, copy=True)
    teacher_model = nnx.merge(nnx.graphdef(teacher), teacher_state, copy=True)
    return (
      *student_model(images, train=True, return_features=True),
      *teacher_model(images, train=False, return_features=True),
    )

  return (*forward(nnx.state(student), nnx.state(teacher), host_batch["image"]), host_batch)


def _loss(method, hparams, adapters, method_state, logits, features, batch, step=0):
  """`Method.loss` the way the step calls it, on the fixed teacher outputs."""
  _, _, teacher_logits, teacher_features, _ = _outputs()
  mask = batch["mask"] if "mask" in batch else jnp.ones(batch["label"].shape, bool)
  return method.loss(
    hparams,
    student_logits=logits,
    student_features={k: features[k] for k in method.plan.student_features},
    teacher=teachers.TeacherOutputs(
      logits=teacher_logits,
      features={k: teacher_features[k] for k in method.plan.teacher_features},
    ),
    labels=batch["label"],
    mask=mask,
    index=batch.get("index"),
    adapters=adapters,
    method_state=method_state,
    step=jnp.int32(step),
    rng=jax.random.key(0),
  )


def _evaluate(method, *, jit, step=0):
  """Method.loss on fixed model outputs; gradients w.r.t. student logits, features, adapters."""
  student_logits, student_features, _, _, host_batch = _outputs()
  batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
  graphdef, adapter_state = nnx.split(method.adapters)
  hparams = method.hparams

  def loss(differentiable, method_state):
    logits, features, adapter_state = differentiable
    adapters = nnx.merge(graphdef, adapter_state, copy=True)
    value, metrics, new_state = _loss(
      method, hparams, adapters, method_state, logits, features, batch, step
    )
    return value, (metrics, new_state)

  fn = jax.value_and_grad(loss, has_aux=True)
  fn = jax.jit(fn) if jit else fn
  (value, (metrics, new_state)), grads = fn(
    (student_logits, student_features, adapter_state), method.initial_state
  )
  return value, metrics, new_state, grads


def _build(config, **kwargs):
  student, teacher = _models()
  return tiny_models.method(
    config, student, teacher, steps_per_epoch=10, num_train_examples=32, **kwargs
  )


# Every term of the image models' registry; `chunked_lm` reads LM hidden states
# (tests/test_distill_sequence.py).
ALL_TERMS = [name for name in distill.names() if name != "ce" and not distill.get(name).lm_head]
# The tiny models have no transformer blocks: hidden-state terms read the pooled features.
TERM_SETTINGS = {
  "hidden_mse": {"features": ["pooled"]},
  "hidden_cosine": {"features": ["pooled"]},
  "crd": {"num_negatives": 16},
}


def test_every_term_is_finite_and_reaches_the_student():
  """All registered terms in one method (one compilation): each term's value and its derivative
  along a random direction of the student's logits and features are finite and the derivative
  is not zero (forward mode: one pass for every term, where a per-term gradient needs one each)."""
  config = {"losses": {"ce": 1.0, **{name: 0.5 for name in ALL_TERMS}}, **TERM_SETTINGS}
  method = _build(config)
  student_logits, student_features, _, _, host_batch = _outputs()
  batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
  hparams = method.hparams
  graphdef, adapter_state = nnx.split(method.adapters)
  primals = (student_logits, dict(student_features))
  leaves, treedef = jax.tree.flatten(primals)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  tangents = jax.tree.unflatten(
    treedef, [jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves)]
  )

  @jax.jit
  def values_and_derivatives(primals, tangents, adapter_state, method_state):
    def metrics(inputs):
      logits, features = inputs
      adapters = nnx.merge(graphdef, adapter_state, copy=True)
      return _loss(method, hparams, adapters, method_state, logits, features, batch)[1]

    return jax.jvp(metrics, (primals,), (tangents,))

  values, derivatives = values_and_derivatives(
    primals, tangents, adapter_state, method.initial_state
  )
  assert set(values) == {"ce", "loss", *ALL_TERMS}
  for name in ALL_TERMS:
    assert np.isfinite(values[name]) and np.isfinite(derivatives[name]), name
    assert derivatives[name] != 0, name


# Eager evaluation is slow (op by op): jit == eager is checked on one term of each kind.
@pytest.mark.parametrize("name", ["kd", "dist", "fitnet", "rkd", "crd"])
def test_jit_matches_eager(name):
  method = _build({"losses": {"ce": 1.0, name: 0.5}, name: TERM_SETTINGS.get(name, {})})
  value, _, _, grads = _evaluate(method, jit=True)
  eager_value, _, _, eager_grads = _evaluate(method, jit=False)
  np.testing.assert_allclose(value, eager_value, rtol=2e-5, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, eager_grads
  )


def test_loss_is_weighted_sum_of_terms_equal_to_the_loss_functions():
  method = _build(
    {
      "losses": {"ce": 0.1, "kd": 0.9, "attention_transfer": 1000.0, "rkd": 1.0},
      "kd": {"temperature": 4.0},
    }
  )
  student_logits, student_features, teacher_logits, teacher_features, batch = _outputs()
  value, metrics, _, _ = _evaluate(method, jit=True)
  ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, batch["label"]).mean()
  kd = logit.kd(student_logits, teacher_logits, temperature=4.0)
  stages = ["stage1", "stage2"]
  at = feature.attention_transfer(
    [student_features[k] for k in stages], [teacher_features[k] for k in stages]
  )
  rkd = relation.rkd(student_features["pooled"], teacher_features["pooled"])
  for name, expected in (("ce", ce), ("kd", kd), ("attention_transfer", at), ("rkd", rkd)):
    np.testing.assert_allclose(metrics[name], expected, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(value, 0.1 * ce + 0.9 * kd + 1000 * at + rkd, rtol=1e-5)


def test_standardize_option_is_kd_plus_ls():
  method = _build({"losses": {"kd": 9.0}, "kd": {"temperature": 2.0, "standardize": True}})
  student_logits, _, teacher_logits, _, _ = _outputs()
  _, metrics, _, _ = _evaluate(method, jit=True)
  expected = logit.kd(
    logit.standardize(student_logits), logit.standardize(teacher_logits), temperature=2.0
  )
  np.testing.assert_allclose(metrics["kd"], expected, rtol=1e-5)


def test_padded_examples_are_left_out_of_per_example_terms():
  student_logits, _, teacher_logits, _, host_batch = _outputs()
  method = _build({"losses": {"ce": 1.0, "kd": 1.0}})
  mask = np.arange(BATCH) < 5
  _, metrics, _ = _loss(
    method, method.hparams, None, {}, student_logits, {}, {**host_batch, "mask": mask}
  )
  np.testing.assert_allclose(
    metrics["kd"], logit.kd(student_logits[:5], teacher_logits[:5], temperature=4.0), rtol=1e-5
  )


@pytest.mark.parametrize(
  "step, factor", [(0, 1 / 20), (9, 1 / 20), (10, 2 / 20), (195, 20 / 20), (10_000, 1.0)]
)
def test_dkd_warmup_follows_mdistiller(step, factor):
  """min(epoch / 20, 1) with the 1-based epoch; 10 steps per epoch here."""
  method = _build({"losses": {"ce": 1.0, "dkd": 1.0}, "dkd": {"beta": 2.0}})
  value, metrics, _, _ = _evaluate(method, jit=True, step=step)
  np.testing.assert_allclose(value, metrics["ce"] + factor * metrics["dkd"], rtol=1e-5)
  student_logits, _, teacher_logits, _, batch = _outputs()
  np.testing.assert_allclose(
    metrics["dkd"], logit.dkd(student_logits, teacher_logits, batch["label"], beta=2.0), rtol=1e-5
  )


def test_crd_updates_memory_and_fixes_the_normaliser():
  method = _build({"losses": {"crd": 0.8}, "crd": {"num_negatives": 16}})
  memory = method.initial_state["crd"]
  assert memory.student_bank.shape == (32, 128)
  _, _, new_state, _ = _evaluate(method, jit=True)
  new_memory = new_state["crd"]
  index = tiny_models.batch(BATCH)["index"]
  untouched = np.setdiff1d(np.arange(32), index)
  assert not np.allclose(new_memory.student_bank[index], memory.student_bank[index])
  np.testing.assert_array_equal(new_memory.student_bank[untouched], memory.student_bank[untouched])
  np.testing.assert_allclose(np.linalg.norm(new_memory.teacher_bank[index], axis=1), 1.0, rtol=1e-5)
  assert new_memory.student_normalizer > 0 and memory.student_normalizer < 0


def test_feature_choices_follow_repdistiller():
  cases = {
    "fitnet": ["stage2"],
    "attention_transfer": ["stage1", "stage2"],
    "similarity_preserving": ["stage2"],
    "rkd": ["pooled"],
    "crd": ["pooled"],
    "review_kd": ["stage1", "stage2", "pooled"],
  }
  for name, expected in cases.items():
    method = _build({"losses": {name: 1.0}})
    assert list(method.plan.student_features) == expected, name
  method = _build({"losses": {"review_kd": 1.0}})
  assert list(method.plan.teacher_features) == ["preact_stage1", "preact_stage2", "pooled"]
  method = _build({"losses": {"fitnet": 1.0}, "fitnet": {"features": (["stage1"], ["stage2"])}})
  assert method.plan.student_features == ("stage1",) and method.plan.teacher_features == ("stage2",)


@pytest.mark.parametrize(
  "config, message",
  [
    (
      {"losses": {"kd": 1.0, "kdd": 1.0}},
      "unknown loss 'kdd'; known losses: akl, attention_transfer",
    ),
    ({"losses": {}}, "losses is empty"),
    ({"losses": {"kd": 1.0}, "kd": {"temprature": 2.0}}, "unknown setting kd.temprature"),
    ({"losses": {"kd": 1.0}, "dkd": {"beta": 2.0}}, "settings for \\['dkd'\\]"),
    (
      {"losses": {"fitnet": 1.0}, "fitnet": {"features": ["stage9"]}},
      "needs the student feature 'stage9'",
    ),
  ],
)
def test_config_errors_are_clear(config, message):
  with pytest.raises(ValueError, match=message):
    _build(config)


@pytest.mark.parametrize(
  "config, message",
  [
    ({"losses": {"kd": 1.0}, "kd": {"temperature": 0.0}}, "kd.temperature=0.0 must be positive"),
    ({"losses": {"kd": 1.0}, "kd": {"temperature": -1.0}}, "kd.temperature=-1.0 must be positive"),
    ({"losses": {"kd": -0.5}}, "losses.kd=-0.5 must be 0 or more"),
    ({"losses": {"jsd": 1.0}, "jsd": {"beta": 1.5}}, r"jsd.beta=1.5 must be in \[0, 1\]"),
    ({"losses": {"crd": 1.0}, "crd": {"negatives": "all"}}, "crd.negatives='all': must be one"),
    ({"losses": {"kd": float("nan")}}, "losses.kd=nan must be 0 or more"),
  ],
)
def test_invalid_hyperparameters_are_refused(config, message):
  with pytest.raises(ValueError, match=message):
    _build(config)


def test_defaults_are_the_loss_functions_own():
  """One place for each default: the registry reads it from the loss function's signature."""
  method = _build({"losses": {"kd": 1.0, "jsd": 1.0, "dkd": 1.0}})
  assert method.plan.hparams["kd"] == {"temperature": 4.0}
  assert method.plan.hparams["jsd"] == {"beta": 0.5, "temperature": 1.0}
  assert method.plan.hparams["dkd"] == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}


def test_hparams_are_traced_floats_options_are_static():
  method = _build({"losses": {"ce": 0.1, "kd": 0.9}, "kd": {"temperature": 2, "standardize": True}})
  assert method.plan.hparams == {
    "losses": {"ce": 0.1, "kd": 0.9},
    "kd": {"temperature": 2.0},
    "ce": {"label_smoothing": 0.0},
  }
  assert jax.tree.map(lambda x: x.dtype, method.hparams)["kd"]["temperature"] == jnp.float32
  assert method.plan.terms[1].options == {
    "warmup_epochs": 0,
    "standardize": True,
    "scale_by_temperature_squared": True,
  }


def test_crd_other_class_negatives_read_the_training_labels(monkeypatch):
  """negatives='other_class' hands every training label to the sampler (RepDistiller's 'exact'
  mode, tested in test_losses_feature); 'uniform' does not, even when the labels are known."""
  labels = np.arange(32) % 10
  calls = []
  sample = relation.crd_sample_contrast_index

  def spy(*args, dataset_labels=None):
    calls.append(dataset_labels)
    return sample(*args, dataset_labels=dataset_labels)

  monkeypatch.setattr(relation, "crd_sample_contrast_index", spy)
  for negatives in ("other_class", "uniform"):
    method = _build(
      {"losses": {"crd": 0.8}, "crd": {"num_negatives": 16, "negatives": negatives}},
      train_labels=lambda: labels,
    )
    value, _, _, _ = _evaluate(method, jit=True)
    assert np.isfinite(value)
  assert calls[0] is not None and calls[0].shape == (32,) and calls[1] is None


@pytest.mark.parametrize(
  "settings, train_labels, message",
  [
    ({"negatives": "other_class"}, None, "crd reads every training label"),
    ({"negatives": "other_class"}, np.zeros(5), r"train_labels has shape \(5,\), expected \(32,\)"),
    ({"negatives": "same_class"}, None, r"crd.negatives='same_class': must be one of \('uniform'"),
  ],
)
def test_crd_negatives_errors(settings, train_labels, message):
  with pytest.raises(ValueError, match=message):
    _build({"losses": {"crd": 0.8}, "crd": settings}, train_labels=train_labels)
