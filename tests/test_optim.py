"""Optimiser: the RepDistiller step schedule in steps, SGD = torch.optim.SGD with L2 decay, WSD and
scalar schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import configlib, optim


def _optimizer_config(**overrides):
  config = configlib.base_config().optimizer
  config.update(overrides)
  return config


def test_step_schedule_matches_repdistiller():
  """lr 0.05, ×0.1 after epochs 150, 180, 210 (RepDistiller's adjust_learning_rate)."""
  config = _optimizer_config(schedule="step", lr=0.05, decay_epochs=(150, 180, 210))
  steps_per_epoch = 10
  schedule = optim.learning_rate_schedule(config, steps_per_epoch, 240 * steps_per_epoch)
  # The update of step s (0-based) belongs to epoch s // steps_per_epoch.
  for epoch, expected in [
    (0, 0.05),
    (149, 0.05),
    (150, 0.005),
    (179, 0.005),
    (180, 5e-4),
    (210, 5e-5),
    (239, 5e-5),
  ]:
    np.testing.assert_allclose(schedule(epoch * steps_per_epoch), expected, rtol=1e-6)
    np.testing.assert_allclose(schedule(epoch * steps_per_epoch + 9), expected, rtol=1e-6)


def test_warmup_then_cosine():
  config = _optimizer_config(schedule="cosine", lr=0.1, warmup_epochs=1.0)
  schedule = optim.learning_rate_schedule(config, 10, 110)
  np.testing.assert_allclose(
    [schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
    [0.0, 0.05, 0.1, 0.05, 0.0],
    atol=1e-7,
  )


def test_sgd_matches_torch_sgd_with_weight_decay():
  """torch.optim.SGD(lr, momentum, weight_decay): b ← μb + (g + λθ); θ ← θ − η b."""
  torch = pytest.importorskip("torch")
  config = _optimizer_config(schedule="constant", lr=0.05, momentum=0.9, weight_decay=5e-4)
  optimizer = optim.build(config, optim.learning_rate_schedule(config, 1, 10))
  rng = np.random.default_rng(0)
  theta = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(3)]

  params = jnp.asarray(theta)
  state = optimizer.init(params)
  for grad in grads:
    updates, state = optimizer.update(jnp.asarray(grad), state, params)
    params = optax.apply_updates(params, updates)

  torch_param = torch.nn.Parameter(torch.tensor(theta))
  torch_sgd = torch.optim.SGD([torch_param], lr=0.05, momentum=0.9, weight_decay=5e-4)
  for grad in grads:
    torch_param.grad = torch.tensor(grad)
    torch_sgd.step()
  np.testing.assert_allclose(np.asarray(params), torch_param.detach().numpy(), rtol=1e-6)


def test_adamw_builds():
  config = _optimizer_config(name="adamw", lr=1e-3, weight_decay=0.05, schedule="constant")
  optimizer = optim.build(config, optim.learning_rate_schedule(config, 1, 10))
  params = {"w": jnp.ones(3)}
  updates, _ = optimizer.update({"w": jnp.ones(3)}, optimizer.init(params), params)
  assert np.all(np.asarray(updates["w"]) < 0)


# ---------------------------------------------------------------------------------------------
# Warmup-stable-decay and scalar schedules (exact values at the phase boundaries)
# ---------------------------------------------------------------------------------------------


def _values(schedule, steps):
  return [float(schedule(step)) for step in steps]


@pytest.mark.parametrize(
  "decay_shape, mid_decay",
  [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - 0.5**0.5)],
)
def test_wsd_schedule_boundaries(decay_shape, mid_decay):
  # W = 10, T = 100, D = 20: warm-up 0 → 1 over steps 0..10, 1 until step 80, decay to 0 at 100.
  schedule = optim.wsd_schedule(1.0, 100, warmup_steps=10, decay_steps=20, decay_shape=decay_shape)
  np.testing.assert_allclose(
    _values(schedule, [0, 5, 9, 10, 50, 80, 90, 100, 130]),
    [0.0, 0.5, 0.9, 1.0, 1.0, 1.0, mid_decay, 0.0, 0.0],
    atol=1e-6,
  )


def test_wsd_exponential_decay_and_end_value():
  # MiniCPM's exponential annealing from 1 to 0.01 over 20 steps: 0.1 halfway (log-space midpoint).
  schedule = optim.wsd_schedule(
    1.0, 100, warmup_steps=0, decay_steps=20, end_value=0.01, decay_shape="exponential"
  )
  np.testing.assert_allclose(
    _values(schedule, [0, 80, 90, 100, 101]), [1.0, 1.0, 0.1, 0.01, 0.01], rtol=1e-5
  )


def test_wsd_rejects_bad_phases():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.wsd_schedule(1.0, 10, warmup_steps=6, decay_steps=5)
  with pytest.raises(ValueError, match="decay shape"):
    optim.wsd_schedule(1.0, 10, decay_steps=5, decay_shape="step")
  with pytest.raises(ValueError, match="positive"):
    optim.wsd_schedule(1.0, 10, decay_steps=5, decay_shape="exponential")


def test_wsd_learning_rate_from_config():
  """lr 0.1, one warm-up epoch of 10 steps, 100 steps, the last 20% decayed linearly to lr/10."""
  config = _optimizer_config(schedule="wsd", lr=0.1, warmup_epochs=1.0)
  config.decay_fraction = 0.2
  config.decay_shape = "linear"
  config.end_lr_factor = 0.1
  schedule = optim.learning_rate_schedule(config, 10, 100)
  np.testing.assert_allclose(
    _values(schedule, [0, 5, 10, 79, 80, 90, 100]),
    [0.0, 0.05, 0.1, 0.1, 0.1, 0.055, 0.01],
    rtol=1e-5,
    atol=1e-8,
  )


@pytest.mark.parametrize(
  "kind, kwargs, steps, expected",
  [
    ("constant", dict(peak_value=0.9), [0, 100], [0.9, 0.9]),
    (
      "linear",
      dict(init_value=0.0, end_value=1.0, total_steps=100),
      [0, 25, 100, 150],
      [0.0, 0.25, 1.0, 1.0],
    ),
    (
      "linear",
      dict(init_value=1.0, end_value=0.0, total_steps=100),
      [0, 25, 100, 150],
      [1.0, 0.75, 0.0, 0.0],
    ),
    (
      "wsd",
      dict(peak_value=0.9, total_steps=100, warmup_steps=50, decay_steps=10),
      [0, 25, 50, 90, 95, 100],
      [0.0, 0.45, 0.9, 0.9, 0.45, 0.0],
    ),
  ],
)
def test_scalar_schedule_alpha(kind, kwargs, steps, expected):
  """α of (1 − α)·LM + α·KD at the phase boundaries; jit-compatible as an optax schedule."""
  schedule = optim.scalar_schedule(kind, **kwargs)
  np.testing.assert_allclose(_values(schedule, steps), expected, atol=1e-6)
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(steps[1])), expected[1], atol=1e-6)


def test_scalar_schedule_rejects_unknown_kind():
  with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
    optim.scalar_schedule("cosine", total_steps=10)
