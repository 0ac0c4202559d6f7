"""Logit losses: properties, golden values against torch transcriptions, fuzzing of extremes.

The torch functions in the golden section are transcriptions of the reference implementations
(repository and file named above each); ours must agree to 1e-5 relative in float32, student
gradients to 1e-4.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.losses import logit
from jaxkd.losses import reduction as reduction_lib

RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7
B, C = 10, 10  # B = 2 * 5: [2, 5, C] token logits reshape to [B, C] (one compiled shape)


def _normal(seed, shape, scale=3.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _labels(seed, shape, num_classes=C):
  return np.random.default_rng(seed).integers(0, num_classes, size=shape).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Every loss as f(student, teacher) with its reference defaults.
# ----------------------------------------------------------------------------------------------
def _dkd(s, t, **kw):
  # Labels derived from the teacher keep the function of (s, t) only (jit, vmap, reshapes).
  return logit.dkd(s, t, jnp.argmax(jnp.asarray(t, jnp.float32), axis=-1), **kw)


LOSSES = {
  "kd": logit.kd,
  "reverse_kl": logit.reverse_kl,
  "jsd": logit.jsd,
  "jsd_forward": functools.partial(logit.jsd, beta=0.0),
  "jsd_reverse": functools.partial(logit.jsd, beta=1.0),
  "skew_kl": logit.skew_kl,
  "skew_kl_form_kl": functools.partial(logit.skew_kl, form="kl"),
  "skew_reverse_kl": logit.skew_reverse_kl,
  "tvd": logit.tvd,
  "akl": logit.akl,
  "dkd": _dkd,
  "dist": logit.dist,
  "correlation_kd": logit.correlation_kd,
  "mse_logits": logit.mse_logits,
  "soft_cross_entropy": logit.soft_cross_entropy,
  "kd_standardized": lambda s, t, **kw: logit.kd(
    logit.standardize(s), logit.standardize(t), temperature=2.0, **kw
  ),
}
# The cross-entropy forms differ from a divergence by the teacher entropy: not zero at s == t.
NOT_ZERO_AT_EQUALITY = {"skew_kl", "soft_cross_entropy"}
NOT_SHIFT_INVARIANT = {"mse_logits"}
# dist is batch-level (one scalar, no where / reduction); correlation_kd and kd_standardized take
# no class mask of their own (-inf classes, or the caller masks).
NO_WHERE = {"dist", "correlation_kd", "kd_standardized"}
ALL = sorted(LOSSES)


def _loss(name, reduction=None):
  """The loss with a fixed reduction. Tests run eagerly: op-by-op compilations are shared by all
  losses at a shape, where jitting each configuration costs a full compilation on a busy CPU."""
  if reduction is None:
    return LOSSES[name]
  return functools.partial(LOSSES[name], reduction=reduction)


# ----------------------------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------------------------
def _all_losses(s, t):
  return {name: loss(s, t) for name, loss in LOSSES.items()}


def test_jit_of_vmap_matches_eager_loop_and_returns_float32_scalars():
  # One compilation for all losses, jit and vmap together (a compilation per loss and per
  # transformation would be most of this file's time on a CPU).
  s, t = _normal(0, (3, B, C)), _normal(1, (3, B, C))
  eager = [_all_losses(s[i], t[i]) for i in range(3)]
  jitted_vmapped = jax.jit(jax.vmap(_all_losses))(s, t)
  for name in ALL:
    assert eager[0][name].dtype == jnp.float32 and eager[0][name].shape == (), name
    np.testing.assert_allclose(
      jitted_vmapped[name], [e[name] for e in eager], rtol=1e-5, atol=1e-7, err_msg=name
    )


@pytest.mark.parametrize("name", ALL)
def test_zero_at_equality_and_nonnegative(name):
  loss = _loss(name)
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  assert float(loss(s, t)) >= 0.0
  if name not in NOT_ZERO_AT_EQUALITY:
    # DIST / correlation: eps = 1e-8 in the Pearson denominator leaves ~eps / ||a||^2.
    np.testing.assert_allclose(float(loss(t, t)), 0.0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(set(ALL) - NOT_SHIFT_INVARIANT))
def test_invariant_to_per_example_shift(name):
  loss = _loss(name)
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  shift_s, shift_t = _normal(2, (B, 1), 10.0), _normal(3, (B, 1), 10.0)
  np.testing.assert_allclose(loss(s + shift_s, t + shift_t), loss(s, t), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_bf16_inputs_give_float32_close_to_float32(name):
  loss = _loss(name)
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  value16 = loss(s16, t16)
  assert value16.dtype == jnp.float32
  # Inputs are cast first: a bf16 input gives the loss of its exact float32 upcast.
  np.testing.assert_allclose(
    value16, loss(jnp.asarray(s16, jnp.float32), jnp.asarray(t16, jnp.float32)), rtol=1e-6
  )
  np.testing.assert_allclose(value16, loss(s, t), rtol=5e-2, atol=5e-3)


def _extreme_inputs():
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  one_hot = np.eye(C, dtype=np.float32)[_labels(3, (B,))]
  padded = np.zeros((B, C), bool)
  padded[:, -3:] = True  # vocabulary padding: -inf in both at the same classes
  return {
    "large_logits": (1e4 * np.sign(s), -1e4 * np.sign(t)),
    "large_logits_same_sign": (1e4 * np.sign(s), 1e4 * np.sign(s)),
    "neg_inf_padding": (np.where(padded, -np.inf, s), np.where(padded, -np.inf, t)),
    "one_hot_teacher_log": (s, np.where(one_hot > 0, 0.0, -np.inf).astype(np.float32)),
    "one_hot_teacher_scaled": (s, 1e4 * one_hot),
    "underflowing_student": (np.float32(200.0) * s, t),
  }


@jax.jit
def _all_values_and_grads(s, t, temperature):
  """Value and (student, teacher) gradients of every loss at a (traced) temperature."""
  with_temperature = {
    name: functools.partial(loss, temperature=temperature)
    for name, loss in LOSSES.items()
    if name not in ("mse_logits", "kd_standardized")
  }
  with_temperature["mse_logits"] = logit.mse_logits
  with_temperature["kd_standardized"] = lambda s_, t_: logit.kd(
    logit.standardize(s_), logit.standardize(t_), temperature=temperature
  )
  return {
    name: jax.value_and_grad(loss, argnums=(0, 1))(s, t) for name, loss in with_temperature.items()
  }


@pytest.mark.parametrize("case", sorted(_extreme_inputs()))
def test_finite_value_and_gradients_on_extremes(case):
  s, t = _extreme_inputs()[case]
  for temperature in (1.0, 4.0):
    values_and_grads = _all_values_and_grads(s, t, jnp.float32(temperature))
    for name, (value, (grad_s, grad_t)) in values_and_grads.items():
      assert np.isfinite(value), (name, value)
      assert np.all(np.isfinite(grad_s)) and np.all(np.isfinite(grad_t)), name


# correlation_kd keeps -inf classes (probability 0, lowest rank) in its correlations.
@pytest.mark.parametrize("name", sorted(set(ALL) - {"dist", "correlation_kd"}))
def test_padding_with_neg_inf_equals_where_mask_and_slicing(name):
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  keep = np.ones((B, C), bool)
  keep[:, -3:] = False
  t[:, -3:] -= 100.0  # dkd takes its labels from the teacher's argmax: keep them unmasked
  padded = _loss(name, "none")(np.where(keep, s, -np.inf), np.where(keep, t, -np.inf))
  np.testing.assert_allclose(
    padded, _loss(name, "none")(s[:, :-3], t[:, :-3]), rtol=1e-5, atol=1e-6
  )
  if name not in NO_WHERE:
    np.testing.assert_allclose(padded, _loss(name, "none")(s, t, where=keep), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(set(ALL) - {"dist"}))
def test_token_logits_and_position_mask(name):
  """[B, S, V] works per token; a [B, S] where drops tokens from the batchmean denominator."""
  s, t = _normal(0, (2, 5, C)), _normal(1, (2, 5, C))
  per_token = _loss(name, "none")(s, t)
  assert per_token.shape == (2, 5)
  np.testing.assert_allclose(
    per_token,
    _loss(name, "none")(s.reshape(B, C), t.reshape(B, C)).reshape(2, 5),
    rtol=1e-5,
    atol=1e-7,
  )
  if name in NO_WHERE:
    return
  valid = np.random.default_rng(2).random((2, 5)) > 0.4
  np.testing.assert_allclose(
    _loss(name, "batchmean")(s, t, where=valid), np.asarray(per_token)[valid].mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
    _loss(name, "none")(s, t, where=valid), np.where(valid, per_token, 0.0), rtol=1e-5, atol=1e-7
  )


@pytest.mark.parametrize("name", ["kd", "jsd", "mse_logits"])
def test_reductions_are_consistent(name):
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  per_example = _loss(name, "none")(s, t)
  assert per_example.shape == (B,)
  np.testing.assert_allclose(_loss(name, "sum")(s, t), per_example.sum(), rtol=1e-6)
  np.testing.assert_allclose(_loss(name, "batchmean")(s, t), per_example.mean(), rtol=1e-6)
  np.testing.assert_allclose(_loss(name, "mean")(s, t), per_example.mean() / C, rtol=1e-6)


def test_mean_reduction_rejected_where_undefined():
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  with pytest.raises(ValueError, match="mean"):
    _dkd(s, t, reduction="mean")
  with pytest.raises(ValueError, match="mean"):
    logit.correlation_kd(s, t, reduction="mean")
  with pytest.raises(ValueError, match="reduction"):
    logit.kd(s, t, reduction="average")


def test_reduce_loss_with_no_valid_position_is_zero():
  value = reduction_lib.reduce_loss(jnp.ones(3), "batchmean", positions=jnp.zeros(3, bool))
  assert float(value) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_traced_beta_matches_static(beta):
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  traced = jax.jit(lambda b: logit.jsd(s, t, beta=b))(jnp.float32(beta))
  np.testing.assert_allclose(traced, logit.jsd(s, t, beta=beta), rtol=1e-6)


def test_jsd_endpoints_and_vmapped_temperature_sweep():
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  np.testing.assert_allclose(logit.jsd(s, t, beta=0.0), logit.kd(s, t, temperature=1.0), rtol=1e-6)
  np.testing.assert_allclose(logit.jsd(s, t, beta=1.0), logit.reverse_kl(s, t), rtol=1e-6)
  temperatures = jnp.array([1.0, 2.0, 4.0])
  swept = jax.vmap(lambda temp: logit.kd(s, t, temperature=temp))(temperatures)
  np.testing.assert_allclose(
    swept, [logit.kd(s, t, temperature=x) for x in [1.0, 2.0, 4.0]], rtol=1e-6
  )


def test_skew_forms_differ_by_teacher_entropy_and_alpha_zero_endpoints():
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  log_p = jax.nn.log_softmax(t)
  entropy = -np.sum(np.exp(log_p) * log_p, -1).mean()
  np.testing.assert_allclose(
    logit.skew_kl(s, t) - logit.skew_kl(s, t, form="kl"), entropy, rtol=1e-5
  )
  np.testing.assert_allclose(
    logit.skew_kl(s, t, alpha=0.0, form="kl"), logit.kd(s, t, temperature=1.0), rtol=1e-6
  )
  np.testing.assert_allclose(
    logit.skew_kl(s, t, alpha=0.0), logit.soft_cross_entropy(s, t), rtol=1e-6
  )
  np.testing.assert_allclose(
    logit.skew_reverse_kl(s, t, alpha=0.0), logit.reverse_kl(s, t), rtol=1e-6
  )


def test_akl_student_is_detached_in_the_weights():
  """Gradient = head_w * grad FKL + tail_w * grad RKL with the weights held constant."""
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  p, q = jax.nn.softmax(t), jax.nn.softmax(s)
  order = np.argsort(-np.asarray(p), -1)
  sp = np.take_along_axis(np.asarray(p), order, -1)
  err = np.abs(sp - np.take_along_axis(np.asarray(q), order, -1))
  tail = np.cumsum(sp, -1) > 0.5
  tail[:, 0] = False
  head_w = (err * ~tail).sum(-1) / err.sum(-1)
  tail_w = (err * tail).sum(-1) / err.sum(-1)

  def with_fixed_weights(student):
    return jnp.mean(
      head_w * logit.kd(student, t, temperature=1.0, reduction="none")
      + tail_w * logit.reverse_kl(student, t, reduction="none")
    )

  np.testing.assert_allclose(
    jax.grad(logit.akl)(s, t), jax.grad(with_fixed_weights)(s), rtol=1e-5, atol=1e-7
  )


def test_dkd_exact_mask_and_warmup():
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  np.testing.assert_allclose(_dkd(s, t, gt_logit_offset=jnp.inf), _dkd(s, t), rtol=1e-6)
  # The 1000 offset is not a mask once tempered logits span more than ~1000.
  huge_s, huge_t = 1e4 * s, 1e4 * t
  assert not np.isclose(
    float(_dkd(huge_s, huge_t, gt_logit_offset=jnp.inf)), float(_dkd(huge_s, huge_t))
  )
  np.testing.assert_allclose(
    [logit.dkd_warmup_factor(e) for e in (0, 1, 10, 20, 240)],
    [min(e / 20, 1.0) for e in (0, 1, 10, 20, 240)],
    rtol=1e-7,
  )


def test_standardize_matches_numpy_and_masks():
  x = _normal(0, (B, C))
  expected = (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-7)
  np.testing.assert_allclose(logit.standardize(x), expected, rtol=1e-5, atol=1e-6)
  padded = logit.standardize(np.where(np.arange(C) < C - 3, x, -np.inf))
  np.testing.assert_allclose(padded[:, :-3], logit.standardize(x[:, :-3]), rtol=1e-6, atol=1e-7)
  assert np.all(padded[:, -3:] == -np.inf)
  constant = jnp.ones((B, C))
  np.testing.assert_array_equal(logit.standardize(constant), 0.0)
  assert np.all(np.isfinite(jax.grad(lambda z: jnp.sum(logit.standardize(z) ** 2))(constant)))


def test_soft_rank_torchsort_readme_example():
  # teddykoker/torchsort README: soft_rank([[8, 0, 5, 3, 2, 1, 6, 7, 9]]) at the default l2, 1.0.
  x = np.array([[8, 0, 5, 3, 2, 1, 6, 7, 9]], np.float32)
  np.testing.assert_allclose(logit.soft_rank(x), [[8, 1, 5, 4, 3, 2, 6, 7, 9]], rtol=1e-6)


def test_soft_rank_limits_and_invariants():
  x = _normal(0, (3, C))
  n = C
  hard = np.argsort(np.argsort(x, -1), -1) + 1.0
  gaps = np.diff(np.sort(x, -1), axis=-1)
  # Exact ranks once every gap exceeds ε (up to float32 rounding of x / ε - (x / ε - ρ)).
  small = 0.5 * gaps.min()
  np.testing.assert_allclose(logit.soft_rank(x, regularization_strength=small), hard, atol=1e-4)
  np.testing.assert_allclose(
    logit.soft_rank(x.T, regularization_strength=small, axis=0), hard.T, atol=1e-4
  )
  # Affine once every gap is below ε: x / ε - mean(x / ε) + (n + 1) / 2.
  large = 2.0 * gaps.max()
  affine = x / large - (x / large).mean(-1, keepdims=True) + (n + 1) / 2
  np.testing.assert_allclose(logit.soft_rank(x, regularization_strength=large), affine, rtol=1e-5)
  ranks = np.asarray(logit.soft_rank(x))
  np.testing.assert_allclose(ranks.sum(-1), n * (n + 1) / 2, rtol=1e-6)
  np.testing.assert_allclose(logit.soft_rank(x + 7.0), ranks, atol=1e-5)
  # Order-preserving (weakly: soft ranks tie where the isotonic fit pools).
  order = np.argsort(x, -1)
  assert np.all(np.diff(np.take_along_axis(ranks, order, -1), axis=-1) >= 0)
  # Ties get equal ranks and finite gradients.
  tied = np.array([[1.0, 1.0, 1.0, 0.0, 2.0]], np.float32)
  np.testing.assert_allclose(
    logit.soft_rank(tied, regularization_strength=1e-3), [[3, 3, 3, 1, 5]], atol=1e-6
  )
  grad = jax.grad(lambda v: jnp.sum(jnp.arange(5.0) * logit.soft_rank(v)))(tied)
  assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------------------------
# Hand-computed tiny values (numpy).
# ----------------------------------------------------------------------------------------------
def test_hand_computed_values():
  s = np.array([[0.0, np.log(3.0)]], np.float32)  # q = [1/4, 3/4]
  t = np.array([[0.0, 0.0]], np.float32)  # p = [1/2, 1/2]
  p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
  forward = np.sum(p * np.log(p / q))
  reverse = np.sum(q * np.log(q / p))
  m = 0.5 * p + 0.5 * q
  jsd = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
  np.testing.assert_allclose(logit.kd(s, t, temperature=1.0), forward, rtol=1e-6)
  np.testing.assert_allclose(logit.reverse_kl(s, t), reverse, rtol=1e-6)
  np.testing.assert_allclose(logit.jsd(s, t), jsd, rtol=1e-6)
  np.testing.assert_allclose(logit.tvd(s, t), 0.25, rtol=1e-6)
  np.testing.assert_allclose(logit.soft_cross_entropy(s, t), -np.sum(p * np.log(q)), rtol=1e-6)
  skew_m = 0.1 * p + 0.9 * q
  np.testing.assert_allclose(
    logit.skew_kl(s, t, form="kl"), np.sum(p * np.log(p / skew_m)), rtol=1e-6
  )
  np.testing.assert_allclose(logit.mse_logits(s, t), np.log(3.0) ** 2 / 2, rtol=1e-6)
  # T = 2 with T^2: the tempered softmaxes of [0, 2 log 3] and [0, 0] are q and p again.
  np.testing.assert_allclose(logit.kd(2 * s, t, temperature=2.0), 4 * forward, rtol=1e-6)
  # AKL: sorted teacher [1/2, 1/2] has cumulative [1/2, 1]: class 0 is head, class 1 tail;
  # both gaps are 1/4, so the weights are 1/2 and 1/2.
  np.testing.assert_allclose(logit.akl(s, t), 0.5 * forward + 0.5 * reverse, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Golden values: torch transcriptions of the reference implementations.
# ----------------------------------------------------------------------------------------------
def _torch():
  return pytest.importorskip("torch")


def _assert_matches(ours_fn, ref_fn, student, *others, rtol=RTOL):
  """Value and student gradient of ours (jax) and the reference (torch) on the same inputs."""
  torch = _torch()
  ours, ours_grad = jax.value_and_grad(ours_fn)(jnp.asarray(student), *others)
  student_t = torch.tensor(student, requires_grad=True)
  ref = ref_fn(student_t, *[torch.tensor(np.asarray(o)) for o in others])
  ref.backward()
  np.testing.assert_allclose(float(ours), ref.item(), rtol=rtol)
  np.testing.assert_allclose(ours_grad, student_t.grad.numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL)


# HobbitLong/RepDistiller distiller_zoo/KD.py DistillKL.forward (size_average=False written as
# reduction='sum', its current spelling).
def _repdistiller_kd(y_s, y_t, T):
  F = _torch().nn.functional
  p_s = F.log_softmax(y_s / T, dim=1)
  p_t = F.softmax(y_t / T, dim=1)
  return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


# megvii-research/mdistiller mdistiller/distillers/KD.py kd_loss
def _mdistiller_kd(logits_student, logits_teacher, temperature):
  F = _torch().nn.functional
  log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
  pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
  loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
  loss_kd *= temperature**2
  return loss_kd


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_repdistiller_and_mdistiller(temperature):
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  ours = lambda s_, t_: logit.kd(s_, t_, temperature=temperature)
  _assert_matches(ours, lambda a, b: _repdistiller_kd(a, b, temperature), s, t)
  _assert_matches(ours, lambda a, b: _mdistiller_kd(a, b, temperature), s, t)


# sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py normalize + kd_loss
def _ls_normalize(logit_):
  mean = logit_.mean(dim=-1, keepdims=True)
  stdv = logit_.std(dim=-1, keepdims=True)
  return (logit_ - mean) / (1e-7 + stdv)


def _ls_kd_loss(logits_student_in, logits_teacher_in, temperature, logit_stand=True):
  F = _torch().nn.functional
  logits_student = _ls_normalize(logits_student_in) if logit_stand else logits_student_in
  logits_teacher = _ls_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
  log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
  pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
  loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
  loss_kd *= temperature**2
  return loss_kd


def test_standardized_kd_matches_logit_standardization():
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  _assert_matches(
    lambda s_, t_: LOSSES["kd_standardized"](s_, t_), lambda a, b: _ls_kd_loss(a, b, 2.0), s, t
  )


# huggingface/trl trl/trainer/gkd_trainer.py GKDTrainer.generalized_jsd_loss
def _trl_generalized_jsd_loss(
  student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"
):
  torch = _torch()
  F = torch.nn.functional
  student_logits = student_logits / temperature
  teacher_logits = teacher_logits / temperature
  student_log_probs = F.log_softmax(student_logits, dim=-1)
  teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
  if beta == 0:
    jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
  elif beta == 1:
    jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
  else:
    beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
    mixture_log_probs = torch.logsumexp(
      torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
      dim=0,
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
  if labels is not None:
    mask = labels != -100
    jsd = jsd[mask]
  if reduction == "batchmean":
    return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / jsd.size(0)
  elif reduction == "sum":
    return jsd.sum()
  elif reduction == "mean":
    return jsd.mean()
  else:
    return jsd


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_jsd_matches_trl(beta, reduction):
  s, t = _normal(0, (2, 5, C)), _normal(1, (2, 5, C))
  labels = np.where(np.random.default_rng(2).random((2, 5)) > 0.3, 1, -100)
  _assert_matches(
    lambda s_, t_: logit.jsd(
      s_, t_, beta=beta, temperature=2.0, where=labels != -100, reduction=reduction
    ),
    lambda a, b: _trl_generalized_jsd_loss(a, b, torch_labels(labels), beta, 2.0, reduction),
    s,
    t,
  )


def torch_labels(labels):
  return _torch().tensor(labels)


# jongwooko/distillm distillm/losses.py (forward_kl, reverse_kl, tv_distance, skewed_forward_kl,
# skewed_reverse_kl); no_model_batch["label"] carries the -100 mask.
def _distillm_forward_kl(logits, teacher_logits, no_model_batch):
  torch = _torch()
  F = torch.nn.functional
  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  inf_mask = torch.isinf(logits)
  student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
  prod_probs = torch.masked_fill(teacher_probs * student_logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  mask = (no_model_batch["label"] != -100).int()
  distil_loss = -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
  return distil_loss


def _distillm_reverse_kl(logits, teacher_logits, no_model_batch):
  torch = _torch()
  F = torch.nn.functional
  student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
  student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
  teacher_logprobs = F.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
  inf_mask = torch.isinf(teacher_logits) | torch.isinf(logits)
  prod_probs = torch.masked_fill(student_probs * teacher_logprobs, inf_mask, 0)
  prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  mask = (no_model_batch["label"] != -100).int()
  distil_loss = -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
  return distil_loss


def _distillm_tv_distance(logits, teacher_logits, no_model_batch):
  torch = _torch()
  F = torch.nn.functional
  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
  mask = (no_model_batch["label"] != -100).int()
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  prod_probs = 0.5 * torch.masked_fill(torch.abs(teacher_probs - student_probs), inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  distil_loss = torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
  return distil_loss


def _distillm_skewed_forward_kl(logits, teacher_logits, no_model_batch, lam=0.1):
  torch = _torch()
  F = torch.nn.functional
  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
  mixed_probs = lam * teacher_probs + (1 - lam) * student_probs
  mixed_logprobs = torch.log(mixed_probs)
  mask = (no_model_batch["label"] != -100).int()
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  prod_probs = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  distil_loss = -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
  return distil_loss


def _distillm_skewed_reverse_kl(logits, teacher_logits, no_model_batch, lam=0.1):
  torch = _torch()
  F = torch.nn.functional
  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
  mixed_probs = (1 - lam) * teacher_probs + lam * student_probs
  student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
  mixed_logprobs = torch.log(mixed_probs)
  mask = (no_model_batch["label"] != -100).int()
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
  prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  distil_loss = -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
  return distil_loss


# wutaiqiang/LLM_KD_AKL AKL.py get_ratio / get_kl / AKL (no_model_batch passed in, as in its
# DistiLLM-based training code; AKL.py itself reads it from the enclosing scope and has no return).
def _akl_get_ratio(teacher_logits, logits, mu=0.5):
  torch = _torch()
  F = torch.nn.functional
  teacher_logits = torch.masked_fill(teacher_logits, torch.isinf(teacher_logits), 0).to(
    torch.float32
  )
  logits = torch.masked_fill(logits, torch.isinf(logits), 0).to(torch.float32)
  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  student_probs = F.softmax(logits, dim=-1, dtype=torch.float32).detach()
  re_teacher_probs, idx = teacher_probs.sort(dim=-1, descending=True)
  re_student_probs = student_probs.gather(dim=-1, index=idx)
  errors = torch.abs(re_teacher_probs - re_student_probs)
  cum_sum = torch.cumsum(re_teacher_probs, dim=-1)
  mask = cum_sum > mu
  mask[:, :, 0] = False
  s1 = torch.masked_fill(errors, mask, 0.0).sum(dim=-1)
  s2 = torch.masked_fill(errors, ~mask, 0.0).sum(dim=-1)
  return s1 / (s1 + s2), s2 / (s1 + s2)


def _akl_get_kl(teacher_logits, logits, inf_mask, mask, ratio=None):
  torch = _torch()
  F = torch.nn.functional
  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  teacher_logprobs = F.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
  teacher_prod_probs = torch.masked_fill(teacher_probs * teacher_logprobs, inf_mask, 0)
  teacher_x = torch.sum(teacher_prod_probs, dim=-1).view(-1)
  logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
  prod_probs = torch.masked_fill(teacher_probs * logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  if ratio is None:
    distil_loss = torch.sum((teacher_x - x) * mask.view(-1), dim=0) / torch.sum(
      mask.view(-1), dim=0
    )
  else:
    distil_loss = torch.sum((teacher_x - x) * ratio.view(-1) * mask.view(-1), dim=0) / torch.sum(
      mask.view(-1), dim=0
    )
  return distil_loss


def _akl_reference(teacher_logits, logits, no_model_batch):
  torch = _torch()
  inf_mask = torch.isinf(logits)
  mask = (no_model_batch["label"] != -100).int()
  h_ratio, l_ratio = _akl_get_ratio(teacher_logits, logits)
  return _akl_get_kl(teacher_logits, logits, inf_mask, mask, h_ratio) + _akl_get_kl(
    logits, teacher_logits, inf_mask, mask, l_ratio
  )


def _token_inputs():
  s, t = _normal(0, (2, 5, C)), _normal(1, (2, 5, C))
  labels = np.where(np.random.default_rng(2).random((2, 5)) > 0.3, 1, -100)
  return s, t, labels


@pytest.mark.parametrize(
  "ours, reference",
  [
    (logit.soft_cross_entropy, _distillm_forward_kl),
    (logit.reverse_kl, _distillm_reverse_kl),
    (logit.tvd, _distillm_tv_distance),
    (logit.skew_kl, _distillm_skewed_forward_kl),
    (
      functools.partial(logit.skew_kl, alpha=0.3),
      functools.partial(_distillm_skewed_forward_kl, lam=0.3),
    ),
    (logit.skew_reverse_kl, _distillm_skewed_reverse_kl),
    (
      functools.partial(logit.skew_reverse_kl, alpha=0.3),
      functools.partial(_distillm_skewed_reverse_kl, lam=0.3),
    ),
  ],
)
def test_llm_losses_match_distillm(ours, reference):
  s, t, labels = _token_inputs()
  _assert_matches(
    lambda s_, t_: ours(s_, t_, where=labels != -100),
    lambda a, b: reference(a, b, {"label": torch_labels(labels)}),
    s,
    t,
  )


def test_akl_matches_reference():
  s, t, labels = _token_inputs()
  _assert_matches(
    lambda s_, t_: logit.akl(s_, t_, where=labels != -100),
    lambda a, b: _akl_reference(b, a, {"label": torch_labels(labels)}),
    s,
    t,
  )


# megvii-research/mdistiller mdistiller/distillers/DKD.py dkd_loss and helpers
# (size_average=False written as reduction='sum').
def _mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
  torch = _torch()
  F = torch.nn.functional

  def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()

  def _get_other_mask(logits, target):
    target = target.reshape(-1)
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()

  def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)

  gt_mask = _get_gt_mask(logits_student, target)
  other_mask = _get_other_mask(logits_student, target)
  pred_student = F.softmax(logits_student / temperature, dim=1)
  pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
  pred_student = cat_mask(pred_student, gt_mask, other_mask)
  pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
  log_pred_student = torch.log(pred_student)
  tckd_loss = (
    F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
  )
  pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
  log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
  nckd_loss = (
    F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
    * (temperature**2)
    / target.shape[0]
  )
  return alpha * tckd_loss + beta * nckd_loss


@pytest.mark.parametrize(
  "alpha, beta, temperature", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.5, 2.0, 2.0)]
)
def test_dkd_matches_mdistiller(alpha, beta, temperature):
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  labels = _labels(4, (B,))
  _assert_matches(
    lambda s_, t_: logit.dkd(s_, t_, labels, alpha=alpha, beta=beta, temperature=temperature),
    lambda a, b: _mdistiller_dkd_loss(a, b, torch_labels(labels).long(), alpha, beta, temperature),
    s,
    t,
  )


# hunto/DIST_KD classification/lib/models/losses/dist_kd.py (DIST with tau, as in its current
# version; hunto/image_classification_sota lib/models/losses/dist_kd.py is the same with tau=1).
def _dist_cosine_similarity(a, b, eps=1e-8):
  return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _dist_pearson_correlation(a, b, eps=1e-8):
  return _dist_cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)


def _dist_inter_class_relation(y_s, y_t):
  return 1 - _dist_pearson_correlation(y_s, y_t).mean()


def _dist_intra_class_relation(y_s, y_t):
  return _dist_inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


def _dist_reference(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0):
  y_s = (z_s / tau).softmax(dim=1)
  y_t = (z_t / tau).softmax(dim=1)
  inter_loss = tau**2 * _dist_inter_class_relation(y_s, y_t)
  intra_loss = tau**2 * _dist_intra_class_relation(y_s, y_t)
  return beta * inter_loss + gamma * intra_loss


@pytest.mark.parametrize("beta, gamma, tau", [(1.0, 1.0, 1.0), (1.0, 1.0, 4.0), (2.0, 0.5, 2.0)])
def test_dist_matches_reference(beta, gamma, tau):
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  _assert_matches(
    lambda s_, t_: logit.dist(s_, t_, beta=beta, gamma=gamma, temperature=tau),
    lambda a, b: _dist_reference(a, b, beta, gamma, tau),
    s,
    t,
  )


# teddykoker/torchsort torchsort/isotonic_cpu.cpp isotonic_l2_kernel (pool-adjacent-violators,
# from fast-soft-sort / scikit-learn): argmin_{v_1 >= ... >= v_n} 0.5 ||v - y||^2, in float64.
def _torchsort_isotonic_l2(y):
  n = y.shape[0]
  sol, sums = y.astype(np.float64), y.astype(np.float64)
  c, target = np.ones(n), np.arange(n)
  i = 0
  while i < n:
    k = target[i] + 1
    if k == n:
      break
    if sol[i] > sol[k]:
      i = k
      continue
    sum_y, sum_c = sums[i], c[i]
    while True:
      prev_y = sol[k]
      sum_y += sums[k]
      sum_c += c[k]
      k = target[k] + 1
      if k == n or prev_y > sol[k]:
        sol[i], sums[i], c[i] = sum_y / sum_c, sum_y, sum_c
        target[i], target[k - 1] = k - 1, i
        if i > 0:
          i = target[i - 1]
        break
  i = 0
  while i < n:
    k = target[i] + 1
    sol[i + 1 : k] = sol[i]
    i = k
  return sol


# torchsort torchsort/ops.py SoftRank (regularization='l2') forward and backward for one row:
# Projection of x / strength onto the permutahedron of w = (n, ..., 1); the vjp averages the
# cotangent over each block of the isotonic solution (_partition: gaps > 1e-9).
def _torchsort_soft_rank(x, strength):
  theta = np.asarray(x, np.float64) / strength
  permutation = np.argsort(theta)[::-1]
  s = theta[permutation]
  dual = _torchsort_isotonic_l2(s - (np.arange(len(s))[::-1] + 1.0))
  ranks = np.empty_like(s)
  ranks[permutation] = s - dual
  starts = np.concatenate([[0], np.flatnonzero(np.abs(np.diff(dual)) > 1e-9) + 1, [len(s)]])

  def vjp(cotangent):
    sorted_cotangent = np.asarray(cotangent, np.float64)[permutation]
    block_means = np.concatenate(
      [
        np.full(end - start, sorted_cotangent[start:end].mean())
        for start, end in zip(starts[:-1], starts[1:])
      ]
    )
    result = np.asarray(cotangent, np.float64).copy()
    result[permutation] -= block_means
    return result / strength

  return ranks, vjp


def _torchsort_soft_rank_torch(values, strength):
  """torchsort.soft_rank(values, 'l2', strength) on a [B, n] torch tensor, via the numpy rows."""
  torch = _torch()

  class SoftRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
      rows = [_torchsort_soft_rank(row, strength) for row in tensor.detach().numpy()]
      ctx.vjps = [vjp for _, vjp in rows]
      return torch.tensor(np.stack([ranks for ranks, _ in rows]), dtype=tensor.dtype)

    @staticmethod
    def backward(ctx, grad_output):
      return torch.tensor(
        np.stack([vjp(g) for vjp, g in zip(ctx.vjps, grad_output.numpy())]), dtype=grad_output.dtype
      )

  return SoftRank.apply(values)


@pytest.mark.parametrize("strength", [0.1, 1.0, 10.0])
def test_soft_rank_matches_torchsort(strength):
  x = _normal(0, (B, C))
  x[:, 3] = x[:, 5]  # ties
  x[0] = np.round(x[0])
  cotangent = _normal(1, (B, C))
  ranks, vjp = jax.vjp(lambda v: logit.soft_rank(v, regularization_strength=strength), x)
  rows = [_torchsort_soft_rank(row, strength) for row in x]
  np.testing.assert_allclose(ranks, np.stack([r for r, _ in rows]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    vjp(cotangent)[0], np.stack([f(g) for (_, f), g in zip(rows, cotangent)]), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    jax.jit(functools.partial(logit.soft_rank, axis=0))(x.T, regularization_strength=strength),
    ranks.T,
    rtol=1e-6,
    atol=1e-6,
  )


def _assert_solves_decreasing_isotonic_l2(y, v, atol):
  """KKT conditions of argmin_{v_1 >= ... >= v_n} 0.5 ||v - y||^2 (a convex problem): v is
  decreasing, each level set holds the mean of its y, and every prefix of a level set has mean
  <= the level (the multipliers sum_{i <= j} (v_i - y_i) of the active constraints are >= 0)."""
  assert np.all(np.diff(v) <= 0)
  for level in np.unique(v):
    block = y[v == level]
    np.testing.assert_allclose(block.mean(), level, atol=atol)
    assert np.all(np.cumsum(block) / np.arange(1, block.size + 1) <= level + atol)


def test_isotonic_regression_solves_its_definition():
  y = np.stack(
    [
      _normal(2, (C,)),
      np.arange(C, dtype=np.float32),
      -np.arange(C, dtype=np.float32),
      np.round(_normal(3, (C,))),
    ]
  )
  for row in y:
    _assert_solves_decreasing_isotonic_l2(
      row.astype(np.float64), _torchsort_isotonic_l2(row), atol=1e-12
    )
  ours = np.asarray(logit._isotonic_decreasing(y), np.float64)
  np.testing.assert_allclose(ours, [_torchsort_isotonic_l2(row) for row in y], rtol=1e-6, atol=1e-6)
  for row, solution in zip(y, ours):
    _assert_solves_decreasing_isotonic_l2(row.astype(np.float64), solution, atol=1e-5)


# CMKD (arXiv:2410.06561): neither reference code nor the method section was available, so this
# transcription is of the formula documented in logit.correlation_kd (DIST's pearson on
# probabilities plus pearson of torchsort soft ranks of the tempered log-probabilities): it
# checks the implementation, not the paper's conventions.
def _correlation_kd_formula(z_s, z_t, w_p, w_s, tau, strength):
  y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
  r_s = _torchsort_soft_rank_torch((z_s / tau).log_softmax(dim=1), strength)
  r_t = _torchsort_soft_rank_torch((z_t / tau).log_softmax(dim=1), strength)
  per_example = w_p * (1 - _dist_pearson_correlation(y_s, y_t)) + w_s * (
    1 - _dist_pearson_correlation(r_s, r_t)
  )
  return (tau**2 * per_example).mean()


@pytest.mark.parametrize("tau, strength", [(1.0, 1.0), (4.0, 0.1)])
def test_correlation_kd_matches_formula(tau, strength):
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  w_s = np.random.default_rng(5).random(B).astype(np.float32)
  _assert_matches(
    lambda s_, t_: logit.correlation_kd(
      s_,
      t_,
      pearson_weight=1 - w_s,
      spearman_weight=w_s,
      temperature=tau,
      regularization_strength=strength,
    ),
    lambda a, b: _correlation_kd_formula(
      a, b, 1 - torch_tensor(w_s), torch_tensor(w_s), tau, strength
    ),
    s,
    t,
  )


def torch_tensor(x):
  return _torch().tensor(x)


def test_correlation_kd_spearman_term_is_spearman_for_sharp_ranks():
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  rank = lambda x: np.argsort(np.argsort(x, -1), -1).astype(np.float64)
  rs, rt = rank(s), rank(t)
  rs -= rs.mean(-1, keepdims=True)
  rt -= rt.mean(-1, keepdims=True)
  spearman = (rs * rt).sum(-1) / np.sqrt((rs**2).sum(-1) * (rt**2).sum(-1))
  sharp = 0.5 * min(np.diff(np.sort(s, -1)).min(), np.diff(np.sort(t, -1)).min())
  ours = logit.correlation_kd(
    s, t, pearson_weight=0.0, temperature=1.0, regularization_strength=sharp, reduction="none"
  )
  np.testing.assert_allclose(ours, 1 - spearman, atol=1e-5)


# jhoon-oh/kd_data code/image_classfication/tools/losses.py mse_logit
def _mse_logit(output, teacher_output):
  return _torch().nn.MSELoss()(output, teacher_output)


def test_mse_logits_matches_kd_data():
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  _assert_matches(logit.mse_logits, _mse_logit, s, t)


def test_dkd_with_standardization_matches_logit_standardization():
  """logit-standardization-KD mdistiller/distillers/DKD.py: normalize, then dkd_loss."""
  s, t = _normal(0, (B, C)), _normal(1, (B, C))
  labels = _labels(4, (B,))
  _assert_matches(
    lambda s_, t_: logit.dkd(
      logit.standardize(s_), logit.standardize(t_), labels, beta=8.0, temperature=2.0
    ),
    lambda a, b: _mdistiller_dkd_loss(
      _ls_normalize(a), _ls_normalize(b), torch_labels(labels).long(), 1.0, 8.0, 2.0
    ),
    s,
    t,
  )


# ----------------------------------------------------------------------------------------------
# Fuzzing: finite values and gradients for extreme magnitudes, temperatures, masks and bf16.
# ----------------------------------------------------------------------------------------------
@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(
  seed=st.integers(0, 2**16),
  log10_scale=st.floats(-3.0, 4.0),
  temperature=st.sampled_from([0.25, 1.0, 2.0, 4.0, 8.0]),
  num_padded=st.integers(0, C - 1),
  bf16=st.booleans(),
)
def test_fuzz_finite_values_and_gradients(seed, log10_scale, temperature, num_padded, bf16):
  s, t = _normal(seed, (B, C), 10.0**log10_scale), _normal(seed + 1, (B, C), 10.0**log10_scale)
  if num_padded:
    s[:, -num_padded:] = -np.inf
    t[:, -num_padded:] = -np.inf
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  values_and_grads = _all_values_and_grads(
    jnp.asarray(s, dtype), jnp.asarray(t, dtype), jnp.float32(temperature)
  )
  for name, (value, (grad_s, grad_t)) in values_and_grads.items():
    assert value.dtype == jnp.float32 and np.isfinite(value), name
    assert np.all(np.isfinite(grad_s)) and np.all(np.isfinite(grad_t)), name
