"""Tests of jaxkd.losses.sequence: masked per-token losses, token_mean, the sparse top-k teacher."""

import functools

from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.losses.logit import akl
from jaxkd.losses.logit import jsd
from jaxkd.losses.logit import kd
from jaxkd.losses.logit import reverse_kl
from jaxkd.losses.logit import skew_kl
from jaxkd.losses.logit import skew_reverse_kl
from jaxkd.losses.logit import soft_cross_entropy
from jaxkd.losses.logit import tvd
from jaxkd.losses.sequence import SparseTeacher
from jaxkd.losses.sequence import decode_sparse_teacher
from jaxkd.losses.sequence import encode_sparse_teacher
from jaxkd.losses.sequence import per_token_divergence
from jaxkd.losses.sequence import sequence_cross_entropy
from jaxkd.losses.sequence import sequence_loss
from jaxkd.losses.sequence import slice_vocab
from jaxkd.losses.sequence import sparse_bytes_per_token
from jaxkd.losses.sequence import sparse_id_dtype
from jaxkd.losses.sequence import sparse_teacher_from_logits
from jaxkd.losses.sequence import sparse_topk_kd
from jaxkd.losses.sequence import token_mean
from jaxkd.losses.sequence import truncate_teacher

B, S, V = 2, 5, 11


def _logits(seed, shape=(B, S, V), scale=3.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _mask():
  # Row 0 partly masked (a prompt then padding), row 1 fully masked.
  return jnp.array([[False, True, True, True, False], [False] * S])


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# token_mean
# ---------------------------------------------------------------------------------------------


class TokenMeanTest(parameterized.TestCase):
  def test_mean_over_valid_positions(self):
    per_token = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[True, False, True], [False, False, True]])
    np.testing.assert_allclose(token_mean(per_token, mask), (1 + 3 + 6) / 3, rtol=1e-6)

  def test_global_token_count(self):
    # Two micro-batches with 3 and 1 valid tokens: summing their token_means over the global count (4)
    # gives the mean of the whole batch, not the mean of the two means.
    first, first_mask = jnp.array([1.0, 2.0, 3.0]), jnp.array([True, True, True])
    second, second_mask = jnp.array([10.0, 99.0, 99.0]), jnp.array([True, False, False])
    accumulated = token_mean(first, first_mask, num_tokens=4) + token_mean(
      second, second_mask, num_tokens=4
    )
    np.testing.assert_allclose(accumulated, (1 + 2 + 3 + 10) / 4, rtol=1e-6)
    whole = token_mean(jnp.concatenate([first, second]), jnp.concatenate([first_mask, second_mask]))
    np.testing.assert_allclose(accumulated, whole, rtol=1e-6)

  def test_fully_masked_is_zero_with_zero_grad(self):
    per_token = jnp.array([jnp.nan, jnp.inf, 1.0])
    mask = jnp.zeros(3, bool)
    value, grad = jax.value_and_grad(lambda x: token_mean(x, mask))(per_token)
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(grad, np.zeros(3))

  def test_garbage_at_masked_positions(self):
    per_token = jnp.array([2.0, jnp.nan, -jnp.inf, 4.0])
    mask = jnp.array([True, False, False, True])
    value, grad = jax.value_and_grad(lambda x: token_mean(x, mask))(per_token)
    np.testing.assert_allclose(value, 3.0)
    np.testing.assert_array_equal(grad, [0.5, 0.0, 0.0, 0.5])

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, "mask shape"):
      token_mean(jnp.ones((2, 3)), jnp.ones((2, 4), bool))


# ---------------------------------------------------------------------------------------------
# per-token wrappers: masks, garbage, errors
# ---------------------------------------------------------------------------------------------


DIVERGENCES = (
  ("kd", kd, dict(temperature=2.0)),
  ("reverse_kl", reverse_kl, {}),
  ("jsd", jsd, dict(beta=0.5)),
  ("skew_kl", skew_kl, dict(alpha=0.1)),
  ("skew_reverse_kl", skew_reverse_kl, dict(alpha=0.1)),
  ("tvd", tvd, {}),
  ("akl", akl, {}),
)


class SequenceLossTest(parameterized.TestCase):
  @parameterized.named_parameters(*DIVERGENCES)
  def test_equals_mean_over_valid_positions(self, divergence, kwargs):
    student, teacher, mask = _logits(0), _logits(1), _mask()
    per_position = divergence(student, teacher, reduction="none", **kwargs)
    expected = np.sum(np.where(mask, per_position, 0.0)) / np.sum(mask)
    np.testing.assert_allclose(
      sequence_loss(divergence, student, teacher, mask, **kwargs), expected, rtol=1e-5
    )

  @parameterized.named_parameters(*DIVERGENCES)
  def test_garbage_at_masked_positions(self, divergence, kwargs):
    student, teacher, mask = _logits(0), _logits(1), _mask()
    garbage = jnp.where(
      jnp.arange(V) % 3 == 0, jnp.nan, jnp.where(jnp.arange(V) % 3 == 1, jnp.inf, -1e30)
    )
    dirty_student = jnp.where(mask[..., None], student, garbage)
    dirty_teacher = jnp.where(mask[..., None], teacher, -garbage)

    def loss(s, t):
      return sequence_loss(divergence, s, t, mask, **kwargs)

    clean_value, clean_grad = jax.value_and_grad(loss)(student, teacher)
    dirty_value, dirty_grad = jax.value_and_grad(loss)(dirty_student, dirty_teacher)
    np.testing.assert_allclose(dirty_value, clean_value, rtol=1e-6)
    self.assertTrue(np.all(np.isfinite(dirty_grad)))
    np.testing.assert_array_equal(np.asarray(dirty_grad)[~np.asarray(mask)], 0.0)
    np.testing.assert_allclose(dirty_grad, clean_grad, rtol=1e-5, atol=1e-7)

  def test_per_token_zero_at_masked_positions(self):
    per_token = per_token_divergence(kd, _logits(0), _logits(1), _mask(), temperature=1.0)
    self.assertEqual(per_token.shape, (B, S))
    np.testing.assert_array_equal(np.asarray(per_token)[~np.asarray(_mask())], 0.0)
    self.assertTrue(np.all(np.asarray(per_token)[np.asarray(_mask())] > 0))

  def test_fully_masked_batch_is_zero(self):
    mask = jnp.zeros((B, S), bool)
    value, grad = jax.value_and_grad(lambda s: sequence_loss(jsd, s, _logits(1), mask))(_logits(0))
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(grad, 0.0)

  def test_num_tokens(self):
    student, teacher, mask = _logits(0), _logits(1), _mask()
    np.testing.assert_allclose(
      sequence_loss(kd, student, teacher, mask, num_tokens=12, temperature=1.0),
      sequence_loss(kd, student, teacher, mask, temperature=1.0) * 3 / 12,
      rtol=1e-6,
    )

  def test_vocab_mismatch_names_both_sizes(self):
    with self.assertRaisesRegex(
      ValueError, r"student vocabulary size 11 != teacher vocabulary size 13"
    ):
      sequence_loss(kd, _logits(0), _logits(1, (B, S, 13)), _mask())

  def test_mask_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, "mask shape"):
      sequence_loss(kd, _logits(0), _logits(1), jnp.ones((B, S + 1), bool))

  @parameterized.named_parameters(("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
  def test_jit_equals_eager(self, dtype):
    student, teacher, mask = _logits(0).astype(dtype), _logits(1).astype(dtype), _mask()
    eager = sequence_loss(jsd, student, teacher, mask, beta=0.3)
    jitted = jax.jit(lambda s, t, m: sequence_loss(jsd, s, t, m, beta=0.3))(student, teacher, mask)
    self.assertEqual(jitted.dtype, jnp.float32)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)

  @parameterized.named_parameters(*DIVERGENCES[:3])
  def test_finite_with_vocab_padding_and_extreme_logits(self, divergence, kwargs):
    # Padded vocabulary entries are -inf in both models; the real entries span +-1e4.
    padded = jnp.arange(V) >= V - 3
    student = jnp.where(padded, -jnp.inf, _logits(0, scale=1e4))
    teacher = jnp.where(padded, -jnp.inf, _logits(1, scale=1e4))
    value, grad = jax.value_and_grad(
      lambda s: sequence_loss(divergence, s, teacher, _mask(), **kwargs)
    )(student)
    self.assertTrue(np.isfinite(value))
    self.assertTrue(np.all(np.isfinite(grad)))
    reference = sequence_loss(
      divergence, student[..., : V - 3], teacher[..., : V - 3], _mask(), **kwargs
    )
    np.testing.assert_allclose(value, reference, rtol=1e-5)

  @hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
  @hypothesis.given(
    seq_len=st.sampled_from([1, 4]),
    vocab=st.sampled_from([2, 7]),
    scale=st.sampled_from([0.1, 3.0, 100.0]),
    divergence=st.sampled_from([kd, jsd, reverse_kl]),
    seed=st.integers(0, 2**16),
  )
  def test_fuzz_finite_nonnegative_masked_mean(self, seq_len, vocab, scale, divergence, seed):
    rng = np.random.default_rng(seed)
    student = _logits(seed, (2, seq_len, vocab), scale)
    teacher = _logits(seed + 1, (2, seq_len, vocab), scale)
    mask = jnp.asarray(rng.random((2, seq_len)) < 0.6)
    value, grad = _jit_value_and_grad(divergence)(student, teacher, mask)
    per_position = np.asarray(divergence(student, teacher, reduction="none"))
    expected = np.where(mask, per_position, 0.0).sum() / max(int(mask.sum()), 1)
    self.assertTrue(np.isfinite(value) and value >= -1e-6)
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


@functools.cache
def _jit_value_and_grad(divergence):
  return jax.jit(jax.value_and_grad(lambda s, t, m: sequence_loss(divergence, s, t, m)))


# ---------------------------------------------------------------------------------------------
# Parity with the reference implementations (torch transcriptions)
# ---------------------------------------------------------------------------------------------


def _trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
  """Transcribed from huggingface/trl trl/trainer/gkd_trainer.py, GKDTrainer.generalized_jsd_loss
  (the version with `labels`, reduction='batchmean')."""
  import torch
  import torch.nn.functional as F

  student_logits = student_logits / temperature
  teacher_logits = teacher_logits / temperature
  student_log_probs = F.log_softmax(student_logits, dim=-1)
  teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
  if beta == 0:
    jsd_ = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
  elif beta == 1:
    jsd_ = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
  else:
    beta = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
      torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
      dim=0,
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd_ = beta * kl_teacher + (1 - beta) * kl_student
  mask = labels != -100
  jsd_ = jsd_[mask]
  return jsd_.sum() / mask.sum()


def _distillm_skewed_forward_kl(logits, teacher_logits, label, lam=0.1):
  """Transcribed from jongwooko/distillm distillm/losses.py, skewed_forward_kl."""
  import torch
  import torch.nn.functional as F

  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
  mixed_probs = lam * teacher_probs + (1 - lam) * student_probs
  mixed_logprobs = torch.log(mixed_probs)
  mask = (label != -100).int()
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  prod_probs = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def _distillm_skewed_reverse_kl(logits, teacher_logits, label, lam=0.1):
  """Transcribed from jongwooko/distillm distillm/losses.py, skewed_reverse_kl."""
  import torch
  import torch.nn.functional as F

  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
  mixed_probs = (1 - lam) * teacher_probs + lam * student_probs
  student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
  mixed_logprobs = torch.log(mixed_probs)
  mask = (label != -100).int()
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
  prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def _labels():
  labels = np.array([[-100, 3, 7, 1, -100], [-100, -100, 2, 9, 4]])
  return labels, jnp.asarray(labels != -100)


def _torch_value_and_grad(fn, student, teacher, *args):
  import torch

  student_t = torch.tensor(np.asarray(student), dtype=torch.float64, requires_grad=True)
  value = fn(student_t, torch.tensor(np.asarray(teacher), dtype=torch.float64), *args)
  value.backward()
  return value.item(), student_t.grad.numpy()


class ReferenceParityTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    pytest.importorskip("torch")

  @parameterized.product(beta=[0.0, 0.1, 0.5, 1.0], temperature=[1.0, 2.0])
  def test_trl_generalized_jsd(self, beta, temperature):
    import torch

    student, teacher = _logits(0), _logits(1)
    labels, mask = _labels()
    expected, expected_grad = _torch_value_and_grad(
      _trl_generalized_jsd_loss, student, teacher, torch.tensor(labels), beta, temperature
    )
    value, grad = jax.value_and_grad(
      lambda s: sequence_loss(jsd, s, teacher, mask, beta=beta, temperature=temperature)
    )(student)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)

  @parameterized.parameters(0.1, 0.5)
  def test_distillm_skewed_forward_kl(self, alpha):
    import torch

    student, teacher = _logits(0), _logits(1)
    labels, mask = _labels()
    expected, expected_grad = _torch_value_and_grad(
      _distillm_skewed_forward_kl, student, teacher, torch.tensor(labels), alpha
    )
    # skew_kl's default form is DistiLLM's value (a cross-entropy); form='kl' differs by the
    # per-token mean teacher entropy and has the same gradient.
    value, grad = jax.value_and_grad(
      lambda s: sequence_loss(skew_kl, s, teacher, mask, alpha=alpha)
    )(student)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
    log_p = _np_log_softmax(teacher)
    teacher_entropy = -(np.exp(log_p) * log_p).sum(-1)
    kl_value, kl_grad = jax.value_and_grad(
      lambda s: sequence_loss(skew_kl, s, teacher, mask, alpha=alpha, form="kl")
    )(student)
    np.testing.assert_allclose(
      kl_value + teacher_entropy[np.asarray(mask)].mean(), expected, rtol=1e-5
    )
    np.testing.assert_allclose(kl_grad, expected_grad, rtol=1e-4, atol=1e-7)

  @parameterized.parameters(0.1, 0.5)
  def test_distillm_skewed_reverse_kl(self, alpha):
    import torch

    student, teacher = _logits(0), _logits(1)
    labels, mask = _labels()
    expected, expected_grad = _torch_value_and_grad(
      _distillm_skewed_reverse_kl, student, teacher, torch.tensor(labels), alpha
    )
    value, grad = jax.value_and_grad(
      lambda s: sequence_loss(skew_reverse_kl, s, teacher, mask, alpha=alpha)
    )(student)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Sparse top-k teacher
# ---------------------------------------------------------------------------------------------


def _distillkit_sparse_kl(logits, target_ids, target_values, missing, temperature, eps=1e-6):
  """Transcribed from arcee-ai/DistillKit distillkit/lossfuncs/common.py (get_logprobs,
  get_target_logprobs with log_target=True, target_generation_temperature=1) and
  distillkit/lossfuncs/kl.py (sparse_kl_div_inner, log_missing_prob, log1mexp); per-token, times T²."""
  import torch

  def log1mexp(x):
    return torch.where(x > -1, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

  def log_missing_prob(sparse_logprobs):
    return log1mexp(torch.logsumexp(sparse_logprobs, dim=-1).clamp(max=-eps))

  alpha = 1.0 / temperature
  lse_in = torch.logsumexp(target_values, dim=-1, keepdim=True)
  leftover = (1.0 - lse_in.exp()).clamp(0, 1)
  alpha_values_in = alpha * target_values
  alpha_lse = torch.logsumexp(alpha_values_in, dim=-1, keepdim=True)
  if missing == "residual":  # MissingProbabilityHandling.SYMMETRIC_UNIFORM
    if temperature == 1.0:
      target_logprobs = target_values
    else:
      target_logprobs = alpha_values_in - (alpha_lse.exp() + leftover.pow(alpha)).log()
  else:  # MissingProbabilityHandling.ZERO
    target_logprobs = alpha_values_in - alpha_lse
  logits = logits / temperature
  student_logprobs = logits.gather(-1, target_ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
  teacher_probs = target_logprobs.exp()
  inner = torch.sum(teacher_probs * (target_logprobs - student_logprobs), dim=-1)
  if missing == "residual":
    log_teacher_missing = log_missing_prob(target_logprobs)
    log_student_missing = log_missing_prob(student_logprobs)
    teacher_missing = log_teacher_missing.exp()
    inner = inner + torch.where(
      teacher_missing > eps,
      teacher_missing * (log_teacher_missing - log_student_missing),
      torch.zeros_like(teacher_missing),
    )
  return inner * temperature**2


# Jitted once per mode: eager dispatch of the many small ops is slow on a busy 2-core machine.
_sparse_per_token = jax.jit(
  functools.partial(sparse_topk_kd, reduction="none"), static_argnames="missing"
)


class SparseTopKTest(parameterized.TestCase):
  @parameterized.parameters(
    ("renormalize", "kl", 1.0),
    ("residual", "kl", 2.0),
    ("renormalize", "cross_entropy", 2.0),
    ("residual", "cross_entropy", 1.0),
  )
  def test_full_support_equals_dense_kd(self, missing, form, temperature):
    # k = V and p = 1 keep the whole distribution: value and gradient of the dense loss (KL: `kd`;
    # cross-entropy: `soft_cross_entropy`, both x T^2).
    student, teacher = _logits(0), _logits(1)
    sparse = truncate_teacher(teacher, top_p=1.0, top_k=V)
    self.assertTrue(np.all(np.asarray(sparse.ids) >= 0))
    dense_fn = (
      kd
      if form == "kl"
      else functools.partial(soft_cross_entropy, scale_by_temperature_squared=True)
    )
    sparse_value, sparse_grad = jax.jit(
      jax.value_and_grad(
        lambda s: sparse_topk_kd(s, sparse, form=form, missing=missing, temperature=temperature)
      )
    )(student)
    dense_value, dense_grad = jax.jit(
      jax.value_and_grad(lambda s: dense_fn(s, teacher, temperature=temperature))
    )(student)
    np.testing.assert_allclose(sparse_value, dense_value, rtol=1e-6)
    np.testing.assert_allclose(sparse_grad, dense_grad, rtol=1e-5, atol=1e-7)

  def test_residual_bucket_by_hand(self):
    student, teacher = _logits(0), _logits(1)
    sparse = sparse_teacher_from_logits(teacher, 4)
    log_q = _np_log_softmax(student)
    p = np.exp(np.asarray(sparse.logprobs, np.float64))
    q = np.exp(np.take_along_axis(log_q, np.asarray(sparse.ids), -1))
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    expected = (p * np.log(p / q)).sum(-1) + p_rest * np.log(p_rest / q_rest)
    np.testing.assert_allclose(
      _sparse_per_token(student, sparse, missing="residual"), expected, rtol=1e-5
    )

  def test_renormalize_by_hand(self):
    # DistillKit's ZERO handling: the teacher renormalised over its ids, the student not.
    student, teacher = _logits(0), _logits(1)
    sparse = sparse_teacher_from_logits(teacher, 4)
    log_q = np.take_along_axis(_np_log_softmax(student), np.asarray(sparse.ids), -1)
    p = np.exp(np.asarray(sparse.logprobs, np.float64))
    p = p / p.sum(-1, keepdims=True)
    expected = (p * (np.log(p) - log_q)).sum(-1)
    np.testing.assert_allclose(_sparse_per_token(student, sparse), expected, rtol=1e-5)
    self.assertTrue(np.all(expected > 0))

  def test_temperature_rescale_exact_on_kept_support(self):
    # Stored at T=1, distilled at T=3: the teacher part equals softmax(z_t / 3) truncated to the kept ids
    # and renormalised (the log-partition cancels within the support).
    student, teacher, temperature = _logits(0), _logits(1), 3.0
    sparse = sparse_teacher_from_logits(teacher, 4)
    kept_logits = np.take_along_axis(np.asarray(teacher, np.float64), np.asarray(sparse.ids), -1)
    p = np.exp(_np_log_softmax(kept_logits / temperature))
    log_q = np.take_along_axis(
      _np_log_softmax(np.asarray(student) / temperature), np.asarray(sparse.ids), -1
    )
    expected = temperature**2 * (p * (np.log(p) - log_q)).sum(-1)
    np.testing.assert_allclose(
      _sparse_per_token(student, sparse, temperature=temperature), expected, rtol=1e-5
    )

  @parameterized.product(missing=["renormalize", "residual"], temperature=[1.0, 2.0])
  def test_distillkit_parity(self, missing, temperature):
    torch = pytest.importorskip("torch")
    student, teacher = _logits(0), _logits(1)
    sparse = sparse_teacher_from_logits(teacher, 4)
    expected = _distillkit_sparse_kl(
      torch.tensor(np.asarray(student), dtype=torch.float64),
      torch.tensor(np.asarray(sparse.ids)),
      torch.tensor(np.asarray(sparse.logprobs), dtype=torch.float64),
      missing,
      temperature,
    ).numpy()
    np.testing.assert_allclose(
      _sparse_per_token(student, sparse, missing=missing, temperature=temperature),
      expected,
      rtol=1e-5,
      atol=1e-6,
    )

  @parameterized.parameters("renormalize", "residual")
  def test_padding_and_duplicate_ids(self, missing):
    student, teacher = _logits(0), _logits(1)
    sparse = sparse_teacher_from_logits(teacher, 4)
    # The first id's mass split over two copies, then two padded slots (-1 and a -inf log-prob).
    ids = jnp.concatenate(
      [sparse.ids, sparse.ids[..., :1], -jnp.ones_like(sparse.ids[..., :1]), sparse.ids[..., 1:2]],
      -1,
    )
    logprobs = jnp.concatenate(
      [
        sparse.logprobs.at[..., 0].add(-jnp.log(2.0)),
        sparse.logprobs[..., :1] - jnp.log(2.0),
        jnp.zeros_like(sparse.logprobs[..., :1]),
        jnp.full_like(sparse.logprobs[..., :1], -jnp.inf),
      ],
      -1,
    )
    messy = SparseTeacher(ids=ids, logprobs=logprobs)

    loss = jax.jit(
      jax.value_and_grad(
        lambda s, t: jnp.sum(sparse_topk_kd(s, t, missing=missing, reduction="none"))
      )
    )
    messy_value, messy_grad = loss(student, messy)
    clean_value, clean_grad = loss(student, sparse)
    np.testing.assert_allclose(messy_value, clean_value, rtol=1e-5)
    np.testing.assert_allclose(messy_grad, clean_grad, rtol=1e-5, atol=1e-7)

  @parameterized.parameters("renormalize", "residual")
  def test_all_padding_is_zero(self, missing):
    empty = SparseTeacher(
      ids=-jnp.ones((B, S, 3), jnp.int32), logprobs=jnp.full((B, S, 3), -jnp.inf)
    )
    value, grad = jax.jit(jax.value_and_grad(lambda s: sparse_topk_kd(s, empty, missing=missing)))(
      _logits(0)
    )
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(grad, 0.0)

  @parameterized.parameters("renormalize", "residual")
  def test_masked_sequence_with_vocab_padding(self, missing):
    # Student vocabulary padded with -inf, logits up to 1e4, garbage at masked positions.
    padded = jnp.arange(V) >= V - 2
    student = jnp.where(padded, -jnp.inf, _logits(0, scale=1e4))
    sparse = sparse_teacher_from_logits(jnp.where(padded, -jnp.inf, _logits(1)), 4)
    mask = _mask()
    dirty_student = jnp.where(mask[..., None], student, jnp.nan)
    dirty = SparseTeacher(
      ids=jnp.where(mask[..., None], sparse.ids, 12345),
      logprobs=jnp.where(mask[..., None], sparse.logprobs, jnp.nan),
    )

    loss = jax.jit(
      jax.value_and_grad(lambda s, t: sequence_loss(sparse_topk_kd, s, t, mask, missing=missing))
    )
    value, grad = loss(dirty_student, dirty)
    self.assertTrue(np.isfinite(value) and value > 0)
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)
    clean_value, clean_grad = loss(student, sparse)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-6)

  def test_rejects_unknown_mode(self):
    with self.assertRaisesRegex(ValueError, "missing"):
      sparse_topk_kd(_logits(0), sparse_teacher_from_logits(_logits(1), 3), missing="uniform")


class SparseTopKFormTest(parameterized.TestCase):
  @parameterized.parameters("renormalize", "residual")
  def test_cross_entropy_form_by_hand(self, missing):
    # The pre-training-distillation NLL: -sum over the buckets of p~ log q (residual: one more bucket).
    student, teacher = _logits(0), _logits(1)
    sparse = sparse_teacher_from_logits(teacher, 4)
    log_q = np.take_along_axis(_np_log_softmax(student), np.asarray(sparse.ids), -1)
    p = np.exp(np.asarray(sparse.logprobs, np.float64))
    if missing == "renormalize":
      expected = -(p / p.sum(-1, keepdims=True) * log_q).sum(-1)
    else:
      q_rest = 1 - np.exp(log_q).sum(-1)
      expected = -(p * log_q).sum(-1) - (1 - p.sum(-1)) * np.log(q_rest)
    np.testing.assert_allclose(
      sparse_topk_kd(student, sparse, form="cross_entropy", missing=missing, reduction="none"),
      expected,
      rtol=1e-5,
    )

  def test_rejects_unknown_form(self):
    with self.assertRaisesRegex(ValueError, "form"):
      sparse_topk_kd(_logits(0), sparse_teacher_from_logits(_logits(1), 3), form="nll")


def _np_truncate(logits, top_p, top_k):
  """numpy reference of top-p (Holtzman et al.: the smallest most-probable set of mass >= p) then
  top-k, returning the kept boolean [..., V] mask."""
  probs = np.exp(_np_log_softmax(logits))
  order = np.argsort(-probs, axis=-1, kind="stable")
  sorted_probs = np.take_along_axis(probs, order, -1)
  cumulative = np.cumsum(sorted_probs, -1)
  nucleus_size = (cumulative < top_p).sum(-1, keepdims=True) + 1  # first index reaching top_p
  rank = np.arange(logits.shape[-1])
  kept_sorted = (rank < nucleus_size) & (rank < top_k)
  kept = np.zeros_like(kept_sorted)
  np.put_along_axis(kept, order, kept_sorted, -1)
  return kept


class TruncateTeacherTest(parameterized.TestCase):
  @parameterized.parameters((0.95, 100), (0.5, 3), (0.9, 5), (0.99, 2))
  def test_kept_set_matches_reference(self, top_p, top_k):
    teacher = _logits(1, (4, 6, 40))
    sparse = truncate_teacher(teacher, top_p=top_p, top_k=min(top_k, 40))
    kept = _np_truncate(np.asarray(teacher), top_p, top_k)
    ids, logprobs = np.asarray(sparse.ids), np.asarray(sparse.logprobs)
    used = ids >= 0
    np.testing.assert_array_equal(used.sum(-1), kept.sum(-1))
    for index in np.ndindex(ids.shape[:-1]):
      self.assertEqual(set(ids[index][used[index]]), set(np.flatnonzero(kept[index])))
    # Full-vocabulary log-probs at the kept ids; unused slots are (-1, -inf).
    full = _np_log_softmax(teacher)
    np.testing.assert_allclose(
      logprobs[used],
      np.take_along_axis(full, np.where(used, ids, 0), -1)[used],
      rtol=1e-5,
      atol=1e-6,
    )
    self.assertTrue(np.all(np.isneginf(logprobs[~used])))

  def test_nucleus_smaller_than_k_pads(self):
    # Probabilities 0.6, 0.3, 0.06, 0.04: the 0.8 nucleus is two tokens, k = 3 leaves one slot unused.
    teacher = jnp.log(jnp.array([0.06, 0.6, 0.04, 0.3]))
    sparse = truncate_teacher(teacher, top_p=0.8, top_k=3)
    np.testing.assert_array_equal(sparse.ids, [1, 3, -1])
    np.testing.assert_allclose(sparse.logprobs, [np.log(0.6), np.log(0.3), -np.inf], rtol=1e-6)

  @parameterized.product(temperature=[0.5, 2.0], missing=["renormalize", "residual"])
  def test_target_is_softmax_of_truncated_logits(self, temperature, missing):
    # 'renormalize' trains on softmax(Truncate(z) / tau) exactly (Peng et al. 2024); the teacher alone
    # is tempered (student_temperature=1), no tau^2. 'residual' adds the truncated mass as one bucket.
    student, teacher = _logits(0), _logits(1)
    sparse = truncate_teacher(teacher, top_p=0.9, top_k=6)
    kept = _np_truncate(np.asarray(teacher), 0.9, 6)
    truncated = np.where(kept, np.asarray(teacher, np.float64), -np.inf)
    log_q = _np_log_softmax(student)
    if missing == "renormalize":
      log_p = _np_log_softmax(truncated / temperature)
      expected = (np.exp(log_p) * np.where(kept, log_p - log_q, 0.0)).sum(-1)
    else:
      # Stored p = softmax(z) on K; buckets p_K and r = 1 - sum p_K, re-tempered together.
      log_p_kept = np.where(kept, _np_log_softmax(teacher), -np.inf)
      log_r = np.log1p(-np.exp(log_p_kept).sum(-1))
      buckets = np.concatenate([log_p_kept, log_r[..., None]], -1) / temperature
      buckets = buckets - np.log(np.exp(buckets).sum(-1, keepdims=True))
      log_q_rest = np.log1p(-np.where(kept, np.exp(log_q), 0.0).sum(-1))
      log_q_buckets = np.concatenate([log_q, log_q_rest[..., None]], -1)
      finite = np.isfinite(buckets)
      expected = (np.exp(buckets) * np.where(finite, buckets - log_q_buckets, 0.0)).sum(-1)
    value = sparse_topk_kd(
      student,
      sparse,
      missing=missing,
      temperature=temperature,
      student_temperature=1.0,
      scale_by_temperature_squared=False,
      reduction="none",
    )
    np.testing.assert_allclose(value, expected, rtol=1e-5)

  def test_k_above_vocab_is_one_clear_line(self):
    with self.assertRaisesRegex(
      ValueError, r"^top-k of k=12 entries needs 1 <= k <= the vocabulary size 11$"
    ):
      truncate_teacher(_logits(1), top_k=12)
    with self.assertRaisesRegex(ValueError, "k=12"):
      sparse_teacher_from_logits(_logits(1), 12)
    too_many = SparseTeacher(ids=jnp.zeros((B, S, 12), jnp.int32), logprobs=jnp.zeros((B, S, 12)))
    with self.assertRaisesRegex(
      ValueError, "k=12 entries per position, more than the student vocabulary size 11"
    ):
      sparse_topk_kd(_logits(0), too_many)

  def test_rejects_bad_top_p(self):
    with self.assertRaisesRegex(ValueError, "top_p"):
      truncate_teacher(_logits(1), top_p=0.0, top_k=3)


class CompactStorageTest(parameterized.TestCase):
  @parameterized.parameters(
    (1000, np.uint16), (65535, np.uint16), (65536, np.int32), (151936, np.int32)
  )
  def test_id_dtype_by_vocab_size(self, vocab_size, dtype):
    self.assertEqual(sparse_id_dtype(vocab_size), np.dtype(dtype))

  def test_bytes_per_token(self):
    # Peng et al.'s k = 100 at V = 32000 (uint16 ids, float16 log-probs) vs 128000 bytes of fp32 logits.
    self.assertEqual(sparse_bytes_per_token(32000, 100), 400)
    self.assertEqual(sparse_bytes_per_token(151936, 100, "bfloat16"), 600)
    self.assertEqual(sparse_bytes_per_token(151936, 100, "float32"), 800)

  @parameterized.parameters(
    (300, "float16", "renormalize"),
    (300, "bfloat16", "residual"),
    (70000, "float16", "residual"),
    (70000, "bfloat16", "renormalize"),
  )
  def test_round_trip(self, vocab_size, logprob_dtype, missing):
    rng = np.random.default_rng(0)
    # 60 likely tokens: the 0.9 nucleus is smaller than k = 100 and leaves unused slots.
    teacher = rng.normal(size=(2, 3, vocab_size)) * 2
    teacher[..., :60] += 12
    teacher = jnp.asarray(teacher, jnp.float32)
    student = jnp.asarray(rng.normal(size=(2, 3, vocab_size)) * 4, jnp.float32)
    sparse = truncate_teacher(teacher, top_p=0.9, top_k=100)
    ids, logprobs = encode_sparse_teacher(sparse, vocab_size, logprob_dtype)
    self.assertEqual(ids.dtype, sparse_id_dtype(vocab_size))
    self.assertEqual(logprobs.dtype, jnp.dtype(logprob_dtype))
    decoded = decode_sparse_teacher(ids, logprobs, vocab_size)
    self.assertEqual(decoded.ids.dtype, np.int32)
    self.assertEqual(decoded.logprobs.dtype, np.float32)
    # Ids and unused slots survive exactly; log-probs within half a unit in the last place.
    np.testing.assert_array_equal(decoded.ids, sparse.ids)
    used = np.asarray(sparse.ids) >= 0
    self.assertFalse(used.all())
    self.assertTrue(np.all(np.isneginf(decoded.logprobs[~used])))
    exact = np.asarray(sparse.logprobs)[used]
    ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) - (10 if logprob_dtype == "float16" else 7))
    self.assertTrue(np.all(np.abs(decoded.logprobs[used] - exact) <= ulp / 2))
    # The KD loss of the decoded teacher is within the rounding of the exact one.
    loss = jax.jit(lambda t: sparse_topk_kd(student, t, missing=missing))
    np.testing.assert_allclose(
      loss(decoded), loss(sparse), rtol=2e-3 if logprob_dtype == "float16" else 2e-2
    )


# ---------------------------------------------------------------------------------------------
# Cross-entropy with the targets, LM guards
# ---------------------------------------------------------------------------------------------


def _hf_causal_lm_loss(logits, labels):
  """Transcribed from transformers' ForCausalLMLoss (loss/loss_utils.py): shift, then
  cross_entropy(ignore_index=-100, reduction='mean')."""
  import torch.nn.functional as F

  logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
  labels = labels[:, 1:].reshape(-1)
  return F.cross_entropy(logits, labels, ignore_index=-100, reduction="mean")


class CrossEntropyTest(parameterized.TestCase):
  def test_hugging_face_causal_lm_loss(self):
    torch = pytest.importorskip("torch")
    logits = _logits(0)
    labels = np.array([[-100, -100, 3, 7, 1], [-100, 2, 9, 4, -100]])
    expected, expected_grad = _torch_value_and_grad(
      lambda s, _, labels: _hf_causal_lm_loss(s, labels), logits, logits, torch.tensor(labels)
    )
    shifted = jnp.asarray(labels[:, 1:])
    value, grad = jax.value_and_grad(
      lambda s: sequence_cross_entropy(s[:, :-1], shifted, shifted != -100)
    )(logits)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-8)

  def test_garbage_and_ignored_labels_at_masked_positions(self):
    logits, mask = _logits(0), _mask()
    targets = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, S)), jnp.int32)
    dirty_logits = jnp.where(mask[..., None], logits, jnp.nan)
    dirty_targets = jnp.where(mask, targets, -100)
    loss = lambda z, t: sequence_cross_entropy(z, t, mask)
    value, grad = jax.value_and_grad(loss)(dirty_logits, dirty_targets)
    clean_value, clean_grad = jax.value_and_grad(loss)(logits, targets)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-6)
    per_position = _np_log_softmax(logits)
    expected = -np.take_along_axis(per_position, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(value, expected[np.asarray(mask)].mean(), rtol=1e-5)

  def test_float_targets_rejected(self):
    with self.assertRaisesRegex(TypeError, "targets must be integer"):
      sequence_cross_entropy(_logits(0), jnp.zeros((B, S)), _mask())


class IntegerMaskTest(parameterized.TestCase):
  """Labels passed as a mask (TRL's -100 convention) are refused with the fix in the message."""

  MESSAGE = r"mask has integer dtype int32; .* pass `labels != -100`"

  def test_token_mean(self):
    with self.assertRaisesRegex(TypeError, self.MESSAGE):
      token_mean(jnp.ones((B, S)), jnp.full((B, S), -100, jnp.int32))

  @parameterized.named_parameters(
    ("sequence_loss", lambda m: sequence_loss(kd, _logits(0), _logits(1), m)),
    ("per_token_divergence", lambda m: per_token_divergence(jsd, _logits(0), _logits(1), m)),
    (
      "sequence_cross_entropy",
      lambda m: sequence_cross_entropy(_logits(0), jnp.zeros((B, S), jnp.int32), m),
    ),
    (
      "sparse",
      lambda m: sequence_loss(
        sparse_topk_kd, _logits(0), sparse_teacher_from_logits(_logits(1), 3), m
      ),
    ),
  )
  def test_sequence_losses(self, loss_fn):
    labels = jnp.asarray(_labels()[0], jnp.int32)
    with self.assertRaisesRegex(TypeError, self.MESSAGE):
      loss_fn(labels)
    # The fix the message names works.
    self.assertTrue(np.all(np.isfinite(loss_fn(labels != -100))))

  def test_float_mask_accepted(self):
    np.testing.assert_allclose(token_mean(jnp.array([1.0, 3.0]), jnp.array([1.0, 0.0])), 1.0)


class SliceVocabTest(parameterized.TestCase):
  def test_padded_teacher_sliced_to_student(self):
    # 3 padding rows whose logits sit 30 below the real ones: they carry ~1e-13 of the mass.
    student, teacher = _logits(0), _logits(1)
    padded = jnp.concatenate([teacher, jnp.full((B, S, 3), -30.0)], -1)
    with self.assertRaisesRegex(ValueError, "slice_vocab"):
      sequence_loss(kd, student, padded, _mask())
    sliced = slice_vocab(padded, V)
    np.testing.assert_array_equal(sliced, teacher)
    np.testing.assert_allclose(
      sequence_loss(kd, student, sliced, _mask(), temperature=1.0),
      sequence_loss(kd, student, teacher, _mask(), temperature=1.0),
      rtol=1e-6,
    )

  def test_real_tokens_past_the_student_vocab_raise(self):
    teacher = _logits(1, (B, S, V + 4))
    with self.assertRaisesRegex(
      ValueError, r"the 4 teacher entries past 11 carry up to .* real tokens"
    ):
      slice_vocab(teacher, V)
    # Under a trace the check cannot run: the slice alone.
    self.assertEqual(jax.jit(lambda t: slice_vocab(t, V))(teacher).shape, (B, S, V))

  def test_student_larger_than_teacher(self):
    with self.assertRaisesRegex(ValueError, "the student's is larger"):
      slice_vocab(_logits(1), V + 1)


if __name__ == "__main__":
  pytest.main([__file__])
