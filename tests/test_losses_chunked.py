"""Tests of jaxkd.losses.chunked: chunked KD from hidden states equals the dense loss."""

import functools

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses.chunked import chunked_kd
from jaxkd.losses.chunked import chunked_per_token_divergence
from jaxkd.losses.logit import jsd
from jaxkd.losses.logit import kd
from jaxkd.losses.logit import skew_reverse_kl
from jaxkd.losses.logit import tvd
from jaxkd.losses.sequence import per_token_divergence
from jaxkd.losses.sequence import sequence_loss

B, S, DS, DT, V = 2, 11, 8, 12, 37  # S = 11 is not a multiple of the chunk sizes below.


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = jnp.asarray(rng.random((B, S)) < 0.7).at[1].set(False).at[1, 3].set(True)
  return normal(B, S, DS), normal(DS, V), normal(B, S, DT), normal(DT, V), mask


def _dense(
  divergence, student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask, **kwargs
):
  return sequence_loss(
    divergence, student_hidden @ student_unembed, teacher_hidden @ teacher_unembed, mask, **kwargs
  )


@functools.cache
def _value_and_grads(loss_fn, divergence, chunk_size, kwargs):
  """jit(value_and_grad) w.r.t. student hidden and unembedding, cached per configuration."""
  kwargs = dict(kwargs)
  if chunk_size is not None:
    kwargs["chunk_size"] = chunk_size
  fn = lambda hs, ws, ht, wt, m: loss_fn(hs, ws, ht, wt, m, divergence=divergence, **kwargs)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def _dense_fn(hs, ws, ht, wt, m, divergence, **kwargs):
  return _dense(divergence, hs, ws, ht, wt, m, **kwargs)


class ChunkedKDTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("kd_T2", kd, 4, (("temperature", 2.0),)),
    ("jsd", jsd, 4, (("beta", 0.5),)),
    ("skew_reverse_kl", skew_reverse_kl, 3, (("alpha", 0.1),)),
    ("tvd_one_chunk", tvd, 64, ()),
    ("kd_chunk_1", kd, 1, (("temperature", 1.0),)),
  )
  def test_value_and_grads_equal_dense(self, divergence, chunk_size, kwargs):
    inputs = _inputs()
    value, (grad_hidden, grad_unembed) = _value_and_grads(
      chunked_kd, divergence, chunk_size, kwargs
    )(*inputs)
    expected, (expected_hidden, expected_unembed) = _value_and_grads(
      _dense_fn, divergence, None, kwargs
    )(*inputs)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_hidden, expected_hidden, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_unembed, expected_unembed, rtol=1e-5, atol=1e-6)
    # Masked positions get exactly zero gradient.
    np.testing.assert_array_equal(np.asarray(grad_hidden)[~np.asarray(inputs[-1])], 0.0)

  def test_per_token_values(self):
    inputs = _inputs(1)
    per_token = chunked_per_token_divergence(*inputs, divergence=jsd, chunk_size=4)
    student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask = inputs
    expected = per_token_divergence(
      jsd, student_hidden @ student_unembed, teacher_hidden @ teacher_unembed, mask
    )
    self.assertEqual(per_token.shape, (B, S))
    np.testing.assert_allclose(per_token, expected, rtol=1e-5, atol=1e-6)

  def test_jit_equals_eager_and_num_tokens(self):
    inputs = _inputs(2)
    eager = chunked_kd(*inputs, chunk_size=4, temperature=1.0, num_tokens=20)
    jitted = jax.jit(functools.partial(chunked_kd, chunk_size=4, temperature=1.0))(
      *inputs, num_tokens=20
    )
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    dense = _dense(kd, *inputs, temperature=1.0)
    np.testing.assert_allclose(eager, dense * int(inputs[-1].sum()) / 20, rtol=1e-5)

  def test_vocab_mismatch_names_both_sizes(self):
    student_hidden, student_unembed, teacher_hidden, _, mask = _inputs()
    with self.assertRaisesRegex(
      ValueError, f"student vocabulary size {V} != teacher vocabulary size 40"
    ):
      chunked_kd(student_hidden, student_unembed, teacher_hidden, jnp.zeros((DT, 40)), mask)

  def test_width_mismatch(self):
    student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask = _inputs()
    with self.assertRaisesRegex(ValueError, "hidden widths"):
      chunked_kd(student_hidden, teacher_unembed, teacher_hidden, teacher_unembed, mask)

  def test_bfloat16_finite_and_close(self):
    inputs = _inputs(3)
    low = [x.astype(jnp.bfloat16) for x in inputs[:4]] + [inputs[4]]
    value, grads = jax.value_and_grad(
      lambda hs, ws: chunked_kd(hs, ws, *low[2:], chunk_size=4, temperature=1.0), argnums=(0, 1)
    )(*low[:2])
    self.assertEqual(value.dtype, jnp.float32)
    self.assertTrue(all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads))
    np.testing.assert_allclose(value, _dense(kd, *inputs, temperature=1.0), rtol=5e-2)

  def test_never_builds_full_logits(self):
    # Compiled (not run) value+grad at a shape where logits dominate: the chunked scratch memory (a few
    # [B, chunk, V] buffers) stays below one [B, S, V] float32 buffer, the dense one holds several.
    batch, seq_len, vocab = 2, 256, 2000
    shapes = [(batch, seq_len, DS), (DS, vocab), (batch, seq_len, DT), (DT, vocab)]
    inputs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    inputs.append(jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_))
    temp_bytes = {}
    for name, fn in (
      ("chunked", _value_and_grads(chunked_kd, kd, 8, (("temperature", 1.0),))),
      ("dense", _value_and_grads(_dense_fn, kd, None, (("temperature", 1.0),))),
    ):
      temp_bytes[name] = fn.lower(*inputs).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = batch * seq_len * vocab * 4
    self.assertLess(temp_bytes["chunked"], logits_bytes / 2)
    self.assertGreater(temp_bytes["dense"], 2 * logits_bytes)
