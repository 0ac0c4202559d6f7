"""Sampling as a batch source (jaxkd.sampling) and speculative KD decoding
(jaxkd.models.generate.speculative_generate): the batch layout against hand-built golden rows,
the λ coin, on-policy / sequence-level samples against `generate`, speculative KD against a
token-by-token transcription of the SKD algorithm with full forwards (greedy) and against its
exact two-model distribution (sampled), and the teacher's logits on a sampled batch against a
fresh forward of prompt + continuation."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from jaxkd import models, parallel, sampling, tasks, teachers
from jaxkd.models import generate as generation

VOCAB, EOS, PAD = 13, 12, 11
SEQ_LEN, PROMPT = 10, 4
NEW = SEQ_LEN + 1 - PROMPT
BATCH = 8  # every compiled program sees batches of 8 rows
TOKEN_BYTES = np.where(np.arange(VOCAB) < PAD, 1, 0)


def _model(seed, **kwargs):
  """A tiny decoder with N(0, 0.5) weights, drawn in numpy into an abstract build: peaked and
  distinct next-token distributions, so that top-k tests are not decided by ties."""
  model = nnx.eval_shape(
    lambda: models.create("transformer_lm", vocab_size=VOCAB, width=16, num_heads=2, **kwargs)
  )
  rng = np.random.default_rng(seed)
  flat = [
    (
      path,
      variable.replace(
        jax.device_put(
          np.ones(variable.shape, np.float32)
          if path[-1] == "scale"
          else (0.5 * rng.normal(size=variable.shape)).astype(np.float32)
        )
      ),
    )
    for path, variable in nnx.to_flat_state(nnx.state(model))
  ]
  nnx.update(model, nnx.from_flat_state(flat))
  return model


@pytest.fixture(scope="module")
def student():
  return _model(1, num_layers=1)


@pytest.fixture(scope="module")
def teacher():
  return _model(2, num_layers=2)


def _data_batch(batch_size=BATCH, seed=0):
  """A data batch of the text path's layout: windows of SEQ_LEN + 1 tokens, all scored."""
  window = np.random.default_rng(seed).integers(0, PAD, (batch_size, SEQ_LEN + 1)).astype(np.int32)
  return {
    "inputs": window[:, :-1],
    "targets": window[:, 1:],
    "loss_mask": np.ones((batch_size, SEQ_LEN), bool),
    "positions": np.tile(np.arange(SEQ_LEN, dtype=np.int32), (batch_size, 1)),
    "segment_ids": np.ones((batch_size, SEQ_LEN), np.int32),
    "target_bytes": TOKEN_BYTES[window[:, 1:]].astype(np.int32),
    "index": np.arange(batch_size, dtype=np.int32),
  }


def _sampler(kind, **kwargs):
  kwargs = {"eos_id": EOS, "pad_id": PAD, "prompt_len": PROMPT, **kwargs}
  return sampling.Sampler(kind=kind, token_bytes=TOKEN_BYTES, **kwargs)


# Module-level samplers: `Sampler` hashes by identity, so each compiles once (`_compiled`).
ON_POLICY_GREEDY = _sampler("on_policy", fraction=1.0, temperature=0.0, eos_id=None)
SEQ_KD_GREEDY = _sampler("seq_kd", temperature=0.0, eos_id=None)
ON_POLICY_HALF = _sampler("on_policy", temperature=2.0)
DATA_ONLY = _sampler("on_policy", fraction=0.0)
SKD_GREEDY = _sampler(
  "speculative", speculative_k=3, temperature=0.0, teacher_temperature=0.0, eos_id=None
)


@functools.lru_cache(maxsize=None)
def _compiled(sampler, student_graphdef, teacher_graphdef, mesh=None):
  return sampling.jit_sample(sampler, student_graphdef, teacher_graphdef, mesh)


def _sample(sampler, student, teacher, batch, seed=0, mesh=None):
  student_graphdef, student_state = nnx.split(student)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  if mesh is not None:
    batch = parallel.host_to_global(mesh, batch)
  new_batch, metrics = _compiled(sampler, student_graphdef, teacher_graphdef, mesh)(
    student_state, teacher_state, batch, jax.random.key(seed)
  )
  return jax.tree.map(np.asarray, new_batch), jax.tree.map(float, metrics)


def _coin(seed, fraction):
  """The λ coin of `sample` with rng key(seed), transcribed."""
  return bool(jax.random.uniform(jax.random.split(jax.random.key(seed))[0]) < fraction)


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def _greedy(model, prompt):
  return np.asarray(generation.generate(model, prompt, NEW, rng=jax.random.key(0), greedy=True)[0])


def test_sampled_batch_layout_against_golden_rows():
  sampler = _sampler("on_policy")
  batch = _data_batch(batch_size=4)
  prompt = batch["inputs"][:, :PROMPT]
  continuation = np.array(
    [
      [5, 6, EOS, 7, 8, 9, 1],  # EOS inside: scored through it, PAD after
      [EOS, 3, 3, 3, 3, 3, 3],  # EOS first: only it is scored
      [1, 2, 3, 4, 5, 6, 7],  # no EOS: every generated token scored
      [1, 2, 3, 4, 5, 6, EOS],  # EOS last
    ],
    np.int32,
  )
  new_batch, metrics = sampling._sampled_batch(sampler, batch, prompt, continuation, None)
  new_batch = jax.tree.map(np.asarray, new_batch)

  ends = [3, 1, 7, 7]  # scored generated tokens per row
  sequence = np.full((4, SEQ_LEN + 1), PAD, np.int32)
  sequence[:, :PROMPT] = prompt
  for row, end in enumerate(ends):
    sequence[row, PROMPT : PROMPT + end] = continuation[row, :end]
  loss_mask = np.zeros((4, SEQ_LEN), bool)
  real_inputs = np.zeros((4, SEQ_LEN), bool)
  for row, end in enumerate(ends):
    loss_mask[row, PROMPT - 1 : PROMPT - 1 + end] = True
    real_inputs[row, : PROMPT + end] = True
  expected = {
    "inputs": sequence[:, :-1],
    "targets": sequence[:, 1:],
    "loss_mask": loss_mask,
    "positions": np.where(real_inputs, np.arange(SEQ_LEN), 0),
    "segment_ids": real_inputs.astype(np.int32),
    "target_bytes": np.where(loss_mask, TOKEN_BYTES[sequence[:, 1:]], 0),
    "index": batch["index"],
  }
  assert set(new_batch) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(new_batch[key], value, err_msg=key)
    assert new_batch[key].dtype == batch[key].dtype, key
  # Row 0: targets 5, 6, EOS scored at t = 3, 4, 5; the EOS carries no bytes.
  np.testing.assert_array_equal(new_batch["target_bytes"][0, 3:6], [1, 1, 0])
  assert float(metrics["generated_tokens"]) == np.mean(ends)
  assert float(metrics["eos_rate"]) == 0.75


def test_fraction_zero_returns_the_prompt_masked_data_batch(student, teacher):
  batch = _data_batch()
  new_batch, metrics = _sample(DATA_ONLY, student, teacher, batch)
  expected = dict(batch, loss_mask=batch["loss_mask"].copy())
  expected["loss_mask"][:, : PROMPT - 1] = False
  for key, value in expected.items():
    np.testing.assert_array_equal(new_batch[key], value, err_msg=key)
    assert new_batch[key].dtype == value.dtype, key
  assert metrics == {"sampled": 0.0, "generated_tokens": 0.0, "eos_rate": 0.0}


def test_the_coin_is_drawn_from_the_rng_and_sampling_is_deterministic(student, teacher):
  batch = _data_batch()
  results = {seed: _sample(ON_POLICY_HALF, student, teacher, batch, seed) for seed in range(12)}
  coins = {seed: _coin(seed, 0.5) for seed in results}
  assert {seed: result[1]["sampled"] == 1.0 for seed, result in results.items()} == coins
  assert 0 < sum(coins.values()) < len(coins)
  sampled_seeds = [seed for seed, coin in coins.items() if coin]
  again = _sample(ON_POLICY_HALF, student, teacher, batch, sampled_seeds[0])[0]
  for key, value in results[sampled_seeds[0]][0].items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)
  assert not np.array_equal(again["inputs"], results[sampled_seeds[1]][0]["inputs"])


def test_on_policy_and_seq_kd_greedy_are_the_models_greedy_generations(student, teacher):
  batch = _data_batch()
  prompt = batch["inputs"][:, :PROMPT]
  for sampler, model in ((ON_POLICY_GREEDY, student), (SEQ_KD_GREEDY, teacher)):
    for seed in range(2):  # λ = 1: every rng samples
      new_batch, metrics = _sample(sampler, student, teacher, batch, seed)
      np.testing.assert_array_equal(new_batch["inputs"][:, :PROMPT], prompt)
      np.testing.assert_array_equal(new_batch["targets"][:, PROMPT - 1 :], _greedy(model, prompt))
      assert metrics == {"sampled": 1.0, "generated_tokens": NEW, "eos_rate": 0.0}
  # The two models disagree, so the check above tells them apart.
  assert not np.array_equal(_greedy(student, prompt), _greedy(teacher, prompt))


def test_teacher_scores_the_sampled_batch_as_a_fresh_forward_of_prompt_and_continuation(
  student, teacher
):
  batch = _data_batch(seed=3)
  seed = next(seed for seed in range(12) if _coin(seed, 0.5))
  new_batch, metrics = _sample(ON_POLICY_HALF, student, teacher, batch, seed)
  assert metrics["sampled"] == 1.0 and 0 < metrics["eos_rate"] < 1  # rows with and without EOS
  task = tasks.CausalLM(seq_len=SEQ_LEN)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  live = teachers.Teacher(source="live", task=task, graphdef=teacher_graphdef)
  step_logits = jax.jit(lambda state, b: live.outputs(state, task.view(b, None), b).logits)(
    teacher_state, new_batch
  )
  # Prompt + continuation up to the EOS, then arbitrary tokens: causal logits do not see them.
  fresh_rows = np.array(new_batch["inputs"])
  for row in range(BATCH):
    scored = np.flatnonzero(new_batch["loss_mask"][row])
    assert scored[0] == PROMPT - 1
    fresh_rows[row, scored] = new_batch["inputs"][row, scored]
    fresh_rows[row, scored[-1] + 1 :] = np.arange(SEQ_LEN - scored[-1] - 1) % PAD
  fresh = np.asarray(_logits(teacher, fresh_rows))
  mask = new_batch["loss_mask"]
  np.testing.assert_allclose(step_logits[mask], fresh[mask], atol=1e-5, rtol=1e-5)


def _skd_reference(student, teacher, prompt, top_k):
  """Token-by-token greedy SKD with full forwards (Xu et al. 2024, Algorithm 1): the student's
  argmax, unless it is outside the teacher's top-k, then the teacher's argmax. The forwards run
  over the whole zero-padded row (one shape): causal logits do not see the padding."""
  sequence = np.concatenate([prompt, np.zeros((len(prompt), NEW), np.int32)], axis=1)
  for position in range(PROMPT - 1, PROMPT - 1 + NEW):
    proposal = np.argmax(np.asarray(_logits(student, sequence))[:, position], axis=-1)
    teacher_logits = np.asarray(_logits(teacher, sequence))[:, position]
    top = np.argsort(-teacher_logits, axis=-1)[:, :top_k]
    inside = np.any(top == proposal[:, None], axis=-1)
    sequence[:, position + 1] = np.where(inside, proposal, np.argmax(teacher_logits, axis=-1))
  return sequence[:, PROMPT:]


def _greedy_speculative(student, teacher, prompt, accept_top_k, draft_tokens=5):
  result = generation.speculative_generate(
    student,
    teacher,
    prompt,
    NEW,
    rng=jax.random.key(0),
    accept_top_k=accept_top_k,
    draft_tokens=draft_tokens,
    greedy=True,
    teacher_greedy=True,
  )
  return jax.tree.map(np.asarray, result)


def test_speculative_with_k_zero_is_the_teacher_and_with_k_vocab_the_student(student, teacher):
  prompt = _data_batch()["inputs"][:, :PROMPT]
  teacher_only = _greedy_speculative(student, teacher, prompt, accept_top_k=0)
  np.testing.assert_array_equal(teacher_only.tokens, _greedy(teacher, prompt))
  assert teacher_only.replaced.all() and teacher_only.accepted.sum() == 0
  student_only = _greedy_speculative(student, teacher, prompt, accept_top_k=VOCAB)
  np.testing.assert_array_equal(student_only.tokens, _greedy(student, prompt))
  assert not student_only.replaced.any()
  np.testing.assert_array_equal(student_only.accepted, student_only.judged)


def test_greedy_speculative_is_token_by_token_skd_for_any_draft_length(student, teacher):
  batch = _data_batch(seed=5)
  prompt = batch["inputs"][:, :PROMPT]
  reference = _skd_reference(student, teacher, prompt, top_k=3)
  for draft_tokens in (1, 5):
    result = _greedy_speculative(student, teacher, prompt, 3, draft_tokens)
    np.testing.assert_array_equal(result.tokens, reference, err_msg=f"{draft_tokens=}")
    assert 0 < result.replaced.mean() < 1  # both outcomes occur
  # The sampler's batch and metrics (no EOS: every generated token is scored).
  new_batch, metrics = _sample(SKD_GREEDY, student, teacher, batch)
  np.testing.assert_array_equal(new_batch["targets"][:, PROMPT - 1 :], reference)
  assert metrics["replace_rate"] == pytest.approx(result.replaced.mean())
  assert metrics["accept_rate"] == pytest.approx(result.accepted.sum() / result.judged.sum())
  assert 0 < metrics["accept_rate"] < 1


def test_sharded_speculative_batch_equals_the_single_device_one(student, teacher):
  batch = _data_batch(seed=5)
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1})
  single, single_metrics = _sample(SKD_GREEDY, student, teacher, batch)
  sharded, sharded_metrics = _sample(SKD_GREEDY, student, teacher, batch, mesh=mesh)
  for key in single:
    np.testing.assert_array_equal(sharded[key], single[key], err_msg=key)
  assert sharded_metrics == pytest.approx(single_metrics)


def _nucleus(probs, top_p):
  """Holtzman et al. 2020: the tokens whose more likely tokens hold < top_p of the mass."""
  order = np.argsort(-probs, axis=-1)
  sorted_probs = np.take_along_axis(probs, order, -1)
  keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
  keep = np.zeros(probs.shape, bool)
  np.put_along_axis(keep, order, keep_sorted, axis=-1)
  return keep


def _softmax(logits):
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def test_sampled_speculative_tokens_and_distribution_against_the_skd_chain(student, teacher):
  """Student samples (T = 1), teacher resamples (T = 0.7, top-p 0.6), k = 4, in lock-step blocks
  of 5 proposals. Checked against one full forward per model over prompt + every (y1, y2): the
  kept proposals are in the teacher's top-k at their prefix, the replacements in its nucleus,
  and the marginals of y1, y2, y3 are those of token-by-token SKD:
  q(y)·[y in top-k(p)] + q(outside top-k)·p_T(y)."""
  top_k, teacher_temperature, teacher_top_p = 4, 0.7, 0.6
  prompt = _data_batch(batch_size=1, seed=7)["inputs"][:, :PROMPT]
  pairs = np.stack(np.meshgrid(np.arange(VOCAB), np.arange(VOCAB), indexing="ij"), -1)
  rows = np.concatenate([np.repeat(prompt, VOCAB**2, 0), pairs.reshape(-1, 2)], 1)
  # Logits at P - 1, P, P + 1 of row (y1, y2): the prefixes (), (y1,), (y1, y2).
  shape = (VOCAB, VOCAB, 3, VOCAB)
  student_logits = np.asarray(_logits(student, rows))[:, PROMPT - 1 :].reshape(shape)
  teacher_logits = np.asarray(_logits(teacher, rows))[:, PROMPT - 1 :].reshape(shape)
  in_top_k = np.zeros(shape, bool)
  np.put_along_axis(in_top_k, np.argsort(-teacher_logits, -1)[..., :top_k], True, axis=-1)
  student_probs = _softmax(student_logits)
  teacher_probs = _softmax(teacher_logits / teacher_temperature)
  in_nucleus = _nucleus(teacher_probs, teacher_top_p)
  teacher_probs = np.where(in_nucleus, teacher_probs, 0)
  teacher_probs /= teacher_probs.sum(-1, keepdims=True)
  outside = np.sum(np.where(in_top_k, 0, student_probs), -1, keepdims=True)
  kernel = np.where(in_top_k, student_probs, 0) + outside * teacher_probs
  first = kernel[0, 0, 0]  # [y1]
  second = first[:, None] * kernel[:, 0, 1]  # [y1, y2]
  marginals = [first, second.sum(0), (second[..., None] * kernel[:, :, 2]).sum((0, 1))]

  batch_rows, repeats = 4, 1024  # 1024 independent lock-step batches of 4 rows
  sample = jax.jit(
    jax.vmap(
      lambda key: generation.speculative_generate(
        student,
        teacher,
        np.repeat(prompt, batch_rows, 0),
        3,
        rng=key,
        accept_top_k=top_k,
        draft_tokens=5,
        temperature=1.0,
        top_p=None,
        teacher_temperature=teacher_temperature,
        teacher_top_p=teacher_top_p,
      )
    )
  )
  result = jax.tree.map(
    lambda x: np.asarray(x).reshape(-1, 3), sample(jax.random.split(jax.random.key(0), repeats))
  )
  y1, y2, y3 = result.tokens.T
  prefix = [(y1 * 0, y1 * 0), (y1, y1 * 0), (y1, y2)]  # indices of each position's prefix row
  for position, ((a, b), token) in enumerate(zip(prefix, (y1, y2, y3))):
    kept = ~result.replaced[:, position]
    assert np.all(in_top_k[a, b, position, token][kept])
    assert np.all(in_nucleus[a, b, position, token][~kept])
    empirical = np.bincount(token, minlength=VOCAB) / len(token)
    distance = 0.5 * np.abs(empirical - marginals[position]).sum()
    assert distance < 0.04, (position, distance)
  assert 0.1 < result.replaced.mean() < 0.9
  # Every kept position was judged; a kept proposal's judgement was an acceptance.
  assert np.all(result.judged >= 1) and np.all(result.accepted <= result.judged)
  assert np.all(result.accepted[~result.replaced] >= 1)


def test_sampler_defaults_and_validation():
  skd = _sampler("speculative")
  assert (skd.fraction, skd.temperature, skd.top_p, skd.speculative_k, skd.draft_tokens) == (
    1.0,
    0.5,
    0.5,
    25,
    5,
  )
  on_policy = _sampler("on_policy", top_k=0)
  assert (on_policy.fraction, on_policy.temperature, on_policy.top_p, on_policy.top_k) == (
    0.5,
    0.9,
    1.0,
    None,
  )
  with pytest.raises(ValueError, match="kind"):
    _sampler("beam")
  with pytest.raises(ValueError, match="fraction"):
    _sampler("seq_kd", fraction=1.5)
  with pytest.raises(ValueError, match="teacher"):
    sampling.sample(_sampler("seq_kd"), None, None, None, None, _data_batch(), jax.random.key(0))
