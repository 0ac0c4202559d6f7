"""Optimiser: the RepDistiller step schedule in steps, and SGD = torch.optim.SGD with L2 decay."""

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
