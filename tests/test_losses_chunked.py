"""Tests of jaxkd.losses.chunked: the chunked LM loss equals the dense computation, value and gradient."""

import functools

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses.chunked import LMHead
from jaxkd.losses.chunked import chunked_kd
from jaxkd.losses.chunked import chunked_lm_loss
from jaxkd.losses.chunked import soft_cap
from jaxkd.losses.logit import jsd
from jaxkd.losses.logit import kd
from jaxkd.losses.sequence import SparseTeacher
from jaxkd.losses.sequence import sequence_cross_entropy
from jaxkd.losses.sequence import sequence_loss
from jaxkd.losses.sequence import sparse_topk_kd
from jaxkd.losses.sequence import truncate_teacher

B, S, DS, DT, V = 2, 11, 8, 12, 37  # B·S = 22 tokens: not a multiple of the chunk sizes below.


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = jnp.asarray(rng.random((B, S)) < 0.7).at[1].set(False).at[1, 3].set(True)
  targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
  return dict(
    student_hidden=normal(B, S, DS),
    student_unembed=normal(DS, V),
    teacher_hidden=normal(B, S, DT),
    teacher_unembed=normal(DT, V),
    targets=targets,
    mask=mask,
  )


def _teacher(inputs, config):
  """The teacher of a configuration: an LMHead, its top-p-k truncation, or None."""
  kind = config.get("teacher", "head")
  head = LMHead(inputs["teacher_hidden"], inputs["teacher_unembed"], config.get("teacher_softcap"))
  if kind == "head":
    return head
  if kind == "sparse":
    logits = soft_cap(head.hidden @ head.unembed, head.softcap)
    return truncate_teacher(logits, top_p=0.9, top_k=6)
  return None


def _dense_loss(student_hidden, student_unembed, inputs, config):
  """The dense reference: [B, S, V] logits, then sequence_cross_entropy and sequence_loss."""
  logits = soft_cap(student_hidden @ student_unembed, config.get("student_softcap"))
  teacher = _teacher(inputs, config)
  total = 0.0
  if config.get("ce_weight", 1.0):
    ce = sequence_cross_entropy(logits, inputs["targets"], inputs["mask"])
    total += config.get("ce_weight", 1.0) * ce
  if teacher is not None:
    if isinstance(teacher, LMHead):
      teacher = soft_cap(teacher.hidden @ teacher.unembed, teacher.softcap)
    divergence = config.get("divergence") or (
      sparse_topk_kd if isinstance(teacher, SparseTeacher) else kd
    )
    kd_value = sequence_loss(divergence, logits, teacher, inputs["mask"], **config["kwargs"])
    total += config.get("kd_weight", 1.0) * kd_value
  return total


def _chunked_loss(student_hidden, student_unembed, inputs, config):
  total, _ = chunked_lm_loss(
    LMHead(student_hidden, student_unembed, config.get("student_softcap")),
    inputs["mask"],
    targets=inputs["targets"] if config.get("ce_weight", 1.0) else None,
    teacher=_teacher(inputs, config),
    ce_weight=config.get("ce_weight", 1.0),
    kd_weight=config.get("kd_weight", 1.0),
    divergence=config.get("divergence"),
    chunk_size=config["chunk_size"],
    **config["kwargs"],
  )
  return total


@functools.cache
def _value_and_grads(loss_fn, config_items):
  """jit(value_and_grad) w.r.t. the student hidden states and unembedding, cached per config."""
  config = dict(config_items)
  config["kwargs"] = dict(config.get("kwargs", ()))
  fn = lambda hs, ws, inputs: loss_fn(hs, ws, inputs, config)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def _compare(config_items, seed=0, rtol=1e-5):
  inputs = _inputs(seed)
  args = (inputs["student_hidden"], inputs["student_unembed"], inputs)
  value, (grad_hidden, grad_unembed) = _value_and_grads(_chunked_loss, config_items)(*args)
  expected, (expected_hidden, expected_unembed) = _value_and_grads(_dense_loss, config_items)(*args)
  np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(grad_hidden, expected_hidden, rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(grad_unembed, expected_unembed, rtol=rtol, atol=1e-6)
  # Masked positions get exactly zero gradient.
  np.testing.assert_array_equal(np.asarray(grad_hidden)[~np.asarray(inputs["mask"])], 0.0)


class ChunkedLMLossTest(parameterized.TestCase):
  @parameterized.named_parameters(
    (
      "ce_and_kd_T2",
      (("chunk_size", 4), ("ce_weight", 0.3), ("kd_weight", 0.7))
      + (("kwargs", (("temperature", 2.0),)),),
    ),
    (
      "kd_only_chunk_1",
      (("chunk_size", 1), ("ce_weight", 0.0), ("kwargs", (("temperature", 1.0),))),
    ),
    ("ce_only_one_chunk", (("chunk_size", 64), ("teacher", None))),
    ("jsd", (("chunk_size", 5), ("divergence", jsd), ("kwargs", (("beta", 0.5),)))),
    (
      "softcap_both",
      (("chunk_size", 4), ("student_softcap", 2.0), ("teacher_softcap", 3.0))
      + (("kwargs", (("temperature", 1.0),)),),
    ),
    (
      "sparse_renormalize",
      (("chunk_size", 4), ("teacher", "sparse"), ("kwargs", (("missing", "renormalize"),))),
    ),
    (
      "sparse_residual_cross_entropy_softcap",
      (("chunk_size", 7), ("teacher", "sparse"), ("student_softcap", 2.0))
      + (("kwargs", (("missing", "residual"), ("form", "cross_entropy"), ("temperature", 2.0))),),
    ),
  )
  def test_value_and_grads_equal_dense(self, config_items):
    _compare(config_items)

  def test_eval_path_and_terms(self):
    # Without differentiation only the forward scan runs; the per-term values are the dense ones.
    inputs = _inputs(1)
    teacher = LMHead(inputs["teacher_hidden"], inputs["teacher_unembed"])
    total, terms = jax.jit(
      lambda i: chunked_lm_loss(
        LMHead(i["student_hidden"], i["student_unembed"]),
        i["mask"],
        targets=i["targets"],
        teacher=LMHead(i["teacher_hidden"], i["teacher_unembed"]),
        ce_weight=0.25,
        kd_weight=0.75,
        chunk_size=4,
        temperature=1.0,
      )
    )(inputs)
    logits = inputs["student_hidden"] @ inputs["student_unembed"]
    ce = sequence_cross_entropy(logits, inputs["targets"], inputs["mask"])
    kd_value = sequence_loss(
      kd, logits, teacher.hidden @ teacher.unembed, inputs["mask"], temperature=1.0
    )
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(terms["kd"], kd_value, rtol=1e-5)
    np.testing.assert_allclose(total, 0.25 * ce + 0.75 * kd_value, rtol=1e-5)

  def test_gradients_of_weights_num_tokens_and_teacher(self):
    # Traced weights, num_tokens and temperature (a population's hparams) enter as arguments: their
    # gradients are exact; the teacher is a constant (zero gradient).
    inputs = _inputs(2)

    def loss(weights, num_tokens, temperature, teacher_hidden):
      total, _ = chunked_lm_loss(
        LMHead(inputs["student_hidden"], inputs["student_unembed"]),
        inputs["mask"],
        targets=inputs["targets"],
        teacher=LMHead(teacher_hidden, inputs["teacher_unembed"]),
        ce_weight=weights[0],
        kd_weight=weights[1],
        chunk_size=4,
        num_tokens=num_tokens,
        temperature=temperature,
      )
      return total

    args = (jnp.array([0.4, 0.6]), jnp.float32(20.0), jnp.float32(2.0), inputs["teacher_hidden"])
    total, (grad_weights, grad_num_tokens, _, grad_teacher) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    )(*args)
    logits = inputs["student_hidden"] @ inputs["student_unembed"]
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_unembed"]
    ce = sequence_cross_entropy(logits, inputs["targets"], inputs["mask"], num_tokens=20.0)
    kd_value = sequence_loss(
      kd, logits, teacher_logits, inputs["mask"], num_tokens=20.0, temperature=2.0
    )
    np.testing.assert_allclose(total, 0.4 * ce + 0.6 * kd_value, rtol=1e-5)
    np.testing.assert_allclose(grad_weights, [ce, kd_value], rtol=1e-5)
    np.testing.assert_allclose(grad_num_tokens, -total / 20.0, rtol=1e-5)
    np.testing.assert_array_equal(grad_teacher, 0.0)

  def test_vmap_over_weights(self):
    # A population vmaps the step over its members' hyper-parameters.
    inputs = _inputs(3)

    def grads(kd_weight):
      return jax.grad(
        lambda ws: chunked_lm_loss(
          LMHead(inputs["student_hidden"], ws),
          inputs["mask"],
          targets=inputs["targets"],
          teacher=LMHead(inputs["teacher_hidden"], inputs["teacher_unembed"]),
          ce_weight=1 - kd_weight,
          kd_weight=kd_weight,
          chunk_size=8,
          temperature=1.0,
        )[0]
      )(inputs["student_unembed"])

    weights = jnp.array([0.0, 1.0])
    batched = jax.jit(jax.vmap(grads))(weights)
    single = jax.jit(grads)
    for index, kd_weight in enumerate(weights):
      np.testing.assert_allclose(batched[index], single(kd_weight), rtol=1e-5, atol=1e-7)

  def test_tied_embedding(self):
    # Tied input/output embedding: the unembedding is embedding.T and the gradient reaches the
    # embedding through both uses, as in the dense model.
    inputs = _inputs(6)
    embedding = inputs["student_unembed"].T  # [V, D]
    tokens = inputs["targets"]

    def dense(embedding):
      logits = jnp.tanh(embedding[tokens]) @ embedding.T
      return sequence_cross_entropy(logits, inputs["targets"], inputs["mask"])

    def chunked(embedding):
      head = LMHead(jnp.tanh(embedding[tokens]), embedding.T)
      return chunked_lm_loss(head, inputs["mask"], targets=inputs["targets"], chunk_size=5)[0]

    value, grad = jax.jit(jax.value_and_grad(chunked))(embedding)
    expected, expected_grad = jax.jit(jax.value_and_grad(dense))(embedding)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)

  def test_chunked_kd_wrapper(self):
    inputs = _inputs(4)
    hs, ws, ht, wt, mask = (
      inputs[k]
      for k in ("student_hidden", "student_unembed", "teacher_hidden", "teacher_unembed", "mask")
    )
    np.testing.assert_allclose(
      chunked_kd(hs, ws, ht, wt, mask, chunk_size=4, temperature=1.0, num_tokens=20),
      sequence_loss(kd, hs @ ws, ht @ wt, mask, temperature=1.0, num_tokens=20),
      rtol=1e-5,
    )

  def test_bfloat16_finite_and_close(self):
    inputs = _inputs(5)
    low = {k: v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v for k, v in inputs.items()}

    def loss(hs, ws):
      return chunked_lm_loss(
        LMHead(hs, ws),
        low["mask"],
        targets=low["targets"],
        teacher=LMHead(low["teacher_hidden"], low["teacher_unembed"]),
        chunk_size=4,
        temperature=1.0,
      )[0]

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
      low["student_hidden"], low["student_unembed"]
    )
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(grads[0].dtype, jnp.bfloat16)
    self.assertTrue(all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads))
    expected, _ = _value_and_grads(_dense_loss, (("kwargs", (("temperature", 1.0),)),))(
      inputs["student_hidden"], inputs["student_unembed"], inputs
    )
    np.testing.assert_allclose(value, expected, rtol=5e-2)

  def test_errors(self):
    inputs = _inputs()
    student = LMHead(inputs["student_hidden"], inputs["student_unembed"])
    teacher = LMHead(inputs["teacher_hidden"], inputs["teacher_unembed"])
    with self.assertRaisesRegex(TypeError, r"integer dtype int32.*labels != -100"):
      chunked_lm_loss(student, inputs["targets"], teacher=teacher)
    with self.assertRaisesRegex(
      ValueError, f"student vocabulary size {V} != teacher vocabulary size 40"
    ):
      chunked_lm_loss(
        student, inputs["mask"], teacher=teacher._replace(unembed=jnp.zeros((DT, 40)))
      )
    with self.assertRaisesRegex(ValueError, "student hidden width"):
      chunked_lm_loss(student._replace(unembed=inputs["teacher_unembed"]), inputs["mask"])
    with self.assertRaisesRegex(TypeError, "targets must be integer"):
      chunked_lm_loss(student, inputs["mask"], targets=inputs["mask"].astype(jnp.float32))
    with self.assertRaisesRegex(TypeError, "teacher must be"):
      chunked_lm_loss(student, inputs["mask"], teacher=inputs["teacher_hidden"])

  def test_never_builds_full_logits(self):
    # Compiled (not run) value+grad at a shape where logits dominate: the chunked scratch memory (a few
    # [chunk, V] buffers) stays below one [B, S, V] float32 buffer, the dense one holds several.
    batch, seq_len, vocab = 2, 256, 2000
    shapes = dict(
      student_hidden=(batch, seq_len, DS),
      student_unembed=(DS, vocab),
      teacher_hidden=(batch, seq_len, DT),
      teacher_unembed=(DT, vocab),
    )
    inputs = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in shapes.items()}
    inputs["targets"] = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    inputs["mask"] = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)
    config = (("chunk_size", 16), ("kwargs", (("temperature", 1.0),)))
    temp_bytes = {
      name: fn.lower(inputs["student_hidden"], inputs["student_unembed"], inputs)
      .compile()
      .memory_analysis()
      .temp_size_in_bytes
      for name, fn in (
        ("chunked", _value_and_grads(_chunked_loss, config)),
        ("dense", _value_and_grads(_dense_loss, config)),
      )
    }
    logits_bytes = batch * seq_len * vocab * 4
    self.assertLess(temp_bytes["chunked"], logits_bytes / 2)
    self.assertGreater(temp_bytes["dense"], 2 * logits_bytes)
