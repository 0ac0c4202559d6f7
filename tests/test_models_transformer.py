"""Decoder-only LM and KV-cache generation: shapes, features, config, cache == full forward,
left padding, packed documents, hidden states and soft-capping, sampling filters, jit, bf16, and
parity with a PyTorch transcription of Hugging Face's LlamaForCausalLM after
`load_torch_state_dict`. The Hugging Face families are checked against transformers in
test_hf_import.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import models
from jaxkd.models import generate as generation
from jaxkd.models import torch_import
from jaxkd.models.transformer import default_mlp_dim

VOCAB = 61


# Every test generates NEW tokens after a [2, PROMPT] prompt and returns the logits: one
# compilation of `generate` per sampling mode, one of the forward pass at [2, PROMPT + NEW].
PROMPT, NEW = 5, 4
# Sampling tests draw from a nucleus, as on-policy distillation does; all share one compilation.
TOP_P = 0.9


def _random_model(**kwargs):
  """lm_tiny with its initial distribution, N(0, 0.02) weights and unit RMSNorm scales, drawn in
  numpy into an abstract build: eager initialisation compiles every initialiser separately."""
  model = nnx.eval_shape(lambda: models.create("lm_tiny", num_classes=VOCAB, **kwargs))
  rng = np.random.default_rng(3)

  def value(path, variable):
    if path[-1] == "scale":
      return np.ones(variable.shape, variable.dtype)
    return (0.02 * rng.normal(size=variable.shape)).astype(variable.dtype)

  # device_put, not jnp.asarray: the latter compiles a staging op per shape for numpy input.
  nnx.update(
    model,
    nnx.from_flat_state(
      [
        (path, variable.replace(jax.device_put(value(path, variable))))
        for path, variable in nnx.to_flat_state(nnx.state(model))
      ]
    ),
  )
  return model


@pytest.fixture(scope="module")
def model():
  return _random_model()


def _prompt(batch=2, length=PROMPT, seed=0):
  # numpy glue throughout: an eager jnp op compiles once per shape.
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int32)


@nnx.jit
def _forward(model, tokens):
  return model(tokens, return_features=True)


def _generate(model, prompt, seed=0, **kwargs):
  """Greedy with `greedy=True`; otherwise sampled with `top_p=TOP_P` unless given."""
  if not kwargs.get("greedy"):
    kwargs.setdefault("top_p", TOP_P)
  return generation.generate(
    model, prompt, NEW, rng=jax.random.key(seed), return_logits=True, **kwargs
  )


def test_shapes_and_feature_names(model):
  tokens = _prompt(length=PROMPT + NEW)
  logits, features = _forward(model, tokens)
  assert logits.shape == (2, PROMPT + NEW, VOCAB) and logits.dtype == jnp.float32
  assert set(features) == {"embed", "layer1", "layer2", "final"}
  assert all(value.shape == (2, PROMPT + NEW, 64) for value in features.values())
  assert jax.eval_shape(lambda tokens: model(tokens), tokens)[1] == {}


def test_jit_matches_eager(model):
  tokens = _prompt(length=PROMPT + NEW)
  np.testing.assert_allclose(_forward(model, tokens)[0], model(tokens)[0], atol=1e-5)


def test_vocab_size_and_num_classes_are_the_same_knob():
  def shapes(**kwargs):
    return nnx.eval_shape(lambda: models.create("lm_tiny", **kwargs)).embed_tokens.embedding.shape

  assert shapes() == (256, 64)  # presets default to a byte vocabulary
  assert shapes(num_classes=VOCAB) == shapes(vocab_size=VOCAB) == (VOCAB, 64)
  with pytest.raises(ValueError, match="disagree"):
    shapes(num_classes=VOCAB, vocab_size=VOCAB + 1)
  with pytest.raises(ValueError, match="needs vocab_size"):
    models.create("transformer_lm", num_layers=1, width=32, num_heads=2)


@pytest.mark.parametrize("tie_embeddings,num_kv_heads", [(False, None), (True, 2)])
def test_param_count(tie_embeddings, num_kv_heads):
  width, layers, heads, vocab = 64, 2, 4, VOCAB
  kv_width = width * (num_kv_heads or heads) // heads
  mlp = default_mlp_dim(width)
  expected = (
    vocab * width * (1 if tie_embeddings else 2)
    + width
    + layers * (2 * width * width + 2 * width * kv_width + 3 * width * mlp + 2 * width)
  )
  abstract = nnx.eval_shape(
    lambda: models.create(
      "lm_tiny", num_classes=vocab, tie_embeddings=tie_embeddings, num_kv_heads=num_kv_heads
    )
  )
  assert sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == expected
  assert mlp == 192  # LLaMA's 8/3 · 64 = 170.7, rounded up to a multiple of 64


@pytest.mark.parametrize(
  "name,expected", [("lm_tiny", 139_584), ("lm_small", 3_344_640), ("lm_base", 25_960_960)]
)
def test_preset_param_counts(name, expected):
  """The presets' sizes in docs/models.md (256-token vocabulary, untied)."""
  abstract = nnx.eval_shape(lambda: models.create(name))
  assert sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == expected


def test_cached_generation_logits_equal_full_forward(model):
  prompt = _prompt()
  result = _generate(model, prompt)
  assert result.tokens.shape == (2, NEW) and result.logits.shape == (2, NEW, VOCAB)
  full_logits, _ = _forward(model, np.concatenate([prompt, result.tokens], axis=1))
  # Token i is sampled from the logits at position PROMPT-1+i of prompt + generated tokens.
  expected = np.asarray(full_logits)[:, PROMPT - 1 : -1]
  print(
    f"cached vs full forward: max |Δlogits| "
    f"{np.abs(np.asarray(result.logits) - expected).max():.1e} "
    f"(logit scale {np.abs(expected).max():.2f})"
  )
  np.testing.assert_allclose(result.logits, expected, atol=1e-5)


def test_left_padded_prompt_generates_as_if_alone(model):
  short, long = _prompt(1, 3, seed=4), _prompt(1, PROMPT, seed=5)
  padding = np.zeros((1, PROMPT - 3), short.dtype)
  mask = np.arange(PROMPT) >= np.array([[PROMPT - 3], [0]])
  result = _generate(
    model,
    np.concatenate([np.concatenate([padding, short], 1), long]),
    greedy=True,
    prompt_mask=mask,
  )
  tokens, logits = np.asarray(result.tokens), np.asarray(result.logits)
  # Each sequence alone, unpadded; the short one right-padded, which a causal model ignores.
  alone = np.concatenate(
    [np.concatenate([short, tokens[:1], padding], 1), np.concatenate([long, tokens[1:]], 1)]
  )
  alone_logits = np.asarray(_forward(model, alone)[0])
  np.testing.assert_allclose(logits[0], alone_logits[0, 2 : 2 + NEW], atol=1e-5)
  np.testing.assert_allclose(logits[1], alone_logits[1, PROMPT - 1 : -1], atol=1e-5)
  np.testing.assert_array_equal(tokens, np.argmax(logits, -1))


@nnx.jit
def _packed_forward(model, tokens, positions, segment_ids, token_mask):
  """The packed batch in one call, and again through the cache in two chunks (6 + 3 tokens)."""
  rows = dict(positions=positions, segment_ids=segment_ids, token_mask=token_mask)
  full, _ = model(tokens, **rows)
  cache = model.init_cache(tokens.shape[0], tokens.shape[1])
  chunks = []
  for columns in (slice(0, 6), slice(6, None)):
    logits, _, cache = model(
      tokens[:, columns], cache=cache, **{key: value[:, columns] for key, value in rows.items()}
    )
    chunks.append(logits)
  return full, jnp.concatenate(chunks, axis=1)


# Besides lm_tiny: a sliding window (3) shorter than the documents, learned positions, LayerNorm,
# sandwich norms and attention soft-capping, which all interact with packing.
_PACKED_VARIANT = dict(
  layer_types=("sliding_attention", "full_attention"),
  sliding_window=3,
  positions="learned",
  max_positions=16,
  norm_type="layer",
  sandwich_norm=True,
  attn_logit_softcap=1.0,
)


@pytest.mark.parametrize("kwargs", [{}, _PACKED_VARIANT], ids=["lm_tiny", "window_learned"])
def test_packed_documents_give_the_logits_of_each_document_alone(kwargs):
  model = _random_model(**kwargs)
  length = PROMPT + NEW
  a, b = _prompt(1, 5, seed=6)[0], _prompt(1, 4, seed=7)[0]
  # Row 0: a | b. Row 1: two padding tokens | b | a[:3]. Segments 1-based, 0 on padding.
  tokens = np.stack([np.concatenate([a, b]), np.concatenate([[0, 0], b, a[:3]])])
  segment_ids = np.array([[1] * 5 + [2] * 4, [0, 0] + [1] * 4 + [2] * 3])
  positions = np.array([[*range(5), *range(4)], [0, 0, *range(4), *range(3)]])
  token_mask = segment_ids > 0
  packed, cached = map(
    np.asarray, _packed_forward(model, tokens, positions, segment_ids, token_mask)
  )
  # Each document alone, first in its row, right-filled (a causal model ignores what follows).
  alone = np.stack([np.concatenate([a, b]), np.concatenate([b, a])])
  alone_logits = np.asarray(_forward(model, alone)[0])
  assert packed.shape == (2, length, VOCAB)
  for row, columns, alone_row, alone_columns in [
    (0, slice(0, 5), 0, slice(0, 5)),
    (0, slice(5, 9), 1, slice(0, 4)),
    (1, slice(2, 6), 1, slice(0, 4)),
    (1, slice(6, 9), 0, slice(0, 3)),
  ]:
    np.testing.assert_allclose(
      packed[row, columns], alone_logits[alone_row, alone_columns], atol=1e-5
    )
  np.testing.assert_allclose(cached[token_mask], packed[token_mask], atol=1e-5)


@nnx.jit
def _hidden_and_logits(model, tokens):
  hidden, features = model(tokens, return_hidden=True, return_features=True)
  return hidden, features["final"], model.unembedding(), model(tokens)[0]


@pytest.mark.parametrize("kwargs", [{}, dict(tie_embeddings=True, final_logit_softcap=0.5)])
def test_logits_are_the_soft_capped_hidden_states_times_the_unembedding(kwargs):
  model = _random_model(**kwargs)
  hidden, final, unembedding, logits = map(
    np.asarray, _hidden_and_logits(model, _prompt(length=PROMPT + NEW))
  )
  assert hidden.shape == (2, PROMPT + NEW, 64) and unembedding.shape == (64, VOCAB)
  np.testing.assert_array_equal(hidden, final)
  if model.lm_head is None:
    np.testing.assert_array_equal(unembedding, np.asarray(model.embed_tokens.embedding[...]).T)
  raw = hidden.astype(np.float64) @ unembedding.astype(np.float64)
  cap = model.final_logit_softcap
  assert cap == kwargs.get("final_logit_softcap")
  expected = raw if cap is None else cap * np.tanh(raw / cap)
  if cap is not None:
    assert np.abs(raw).max() > 2 * cap  # the cap bends the largest logits
  np.testing.assert_allclose(logits, expected, atol=1e-6, rtol=1e-5)


def test_greedy_is_deterministic(model):
  greedy = [_generate(model, _prompt(), seed, greedy=True).tokens for seed in (0, 1)]
  np.testing.assert_array_equal(greedy[0], greedy[1])


def test_sampling_with_temperature_varies_with_rng(model):
  samples = [_generate(model, _prompt(), seed, temperature=5.0).tokens for seed in (0, 1)]
  assert not np.array_equal(samples[0], samples[1])


_sample = jax.jit(generation.sample_logits, static_argnames=("top_k", "greedy"))


def test_top_k_one_is_greedy():
  # greedy=True is jnp.argmax, which the greedy generation tests run.
  logits = 3.0 * np.random.default_rng(0).normal(size=(256, VOCAB)).astype(np.float32)
  np.testing.assert_array_equal(_sample(logits, jax.random.key(1), top_k=1), np.argmax(logits, -1))


def test_top_p_never_samples_outside_the_nucleus():
  # probabilities 0.5, 0.3, 0.1, 0.05, 0.05 (shuffled): the 0.75-nucleus is {0.5, 0.3}.
  probs = np.array([0.05, 0.3, 0.05, 0.5, 0.1], np.float32)
  logits = np.log(probs)[None].repeat(4000, axis=0)
  tokens = np.asarray(_sample(logits, jax.random.key(0), top_p=0.75))
  assert set(np.unique(tokens)) == {1, 3}
  # The kept tokens keep their relative odds: P(3) = 0.5 / 0.8.
  assert abs(np.mean(tokens == 3) - 0.625) < 0.03
  # The most likely token is always kept, even for a tiny top_p.
  np.testing.assert_array_equal(_sample(logits, jax.random.key(1), top_p=1e-3), 3)


def test_top_k_and_extreme_logits():
  logits = np.array([[1e4, -1e4, 9_999.0, -np.inf, 0.0]], np.float32)
  filtered = jax.jit(generation.filter_logits, static_argnames="top_k")(logits, top_k=2)
  np.testing.assert_array_equal(np.isfinite(filtered[0]), [True, False, True, False, False])
  tokens = _sample(logits.repeat(500, 0), jax.random.key(0), top_k=2, top_p=0.9)
  assert set(np.unique(tokens)) <= {0, 2}


def test_generate_inside_jit_and_traced_temperature_reuses_the_compilation(model):
  prompt = _prompt()
  outer_jit = nnx.jit(
    lambda model, prompt, rng: (
      generation.generate(model, prompt, NEW, rng=rng, top_p=TOP_P, return_logits=True).tokens
    )
  )
  np.testing.assert_array_equal(
    outer_jit(model, prompt, jax.random.key(3)), _generate(model, prompt, 3).tokens
  )
  compiled_before = generation._generate._cache_size()
  _generate(model, prompt, temperature=2.0, top_p=0.5)
  assert generation._generate._cache_size() == compiled_before


def test_bf16_compute_with_f32_params(model):
  bf16_model = nnx.eval_shape(
    lambda: models.create("lm_tiny", num_classes=VOCAB, dtype=jnp.bfloat16)
  )
  nnx.update(bf16_model, nnx.state(model))
  assert all(
    leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(bf16_model, nnx.Param))
  )
  logits, features = nnx.eval_shape(
    lambda m, tokens: m(tokens, return_features=True), bf16_model, _prompt(length=PROMPT + NEW)
  )
  assert logits.dtype == jnp.float32
  assert {value.dtype for value in features.values()} == {np.dtype(jnp.bfloat16)}
  assert bf16_model.init_cache(2, 8).keys.dtype == jnp.bfloat16
  prompt = _prompt()
  result = _generate(bf16_model, prompt, top_p=None)  # generation without a nucleus, in passing
  assert np.all(np.isfinite(result.logits))
  # The first token's logits depend on the prompt only: compare with the float32 model there.
  f32_logits = np.asarray(_forward(model, np.concatenate([prompt, result.tokens], axis=1))[0])
  scale = np.abs(f32_logits[:, PROMPT - 1]).max()
  np.testing.assert_allclose(
    np.asarray(result.logits)[:, 0], f32_logits[:, PROMPT - 1], atol=0.05 * scale
  )


def test_torch_parity_with_hugging_face_llama_layout():
  torch = pytest.importorskip("torch")
  nn = torch.nn
  width, num_heads, num_kv_heads, mlp_dim, theta = 64, 4, 2, default_mlp_dim(64), 10_000.0
  head_dim = width // num_heads

  class RMSNorm(nn.Module):
    def __init__(self):
      super().__init__()
      self.weight = nn.Parameter(torch.empty(width).uniform_(0.5, 1.5))

    def forward(self, x):
      return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

  def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.q_proj = nn.Linear(width, num_heads * head_dim, bias=False)
      self.k_proj = nn.Linear(width, num_kv_heads * head_dim, bias=False)
      self.v_proj = nn.Linear(width, num_kv_heads * head_dim, bias=False)
      self.o_proj = nn.Linear(num_heads * head_dim, width, bias=False)

    def forward(self, x, cos, sin):
      batch, length, _ = x.shape
      query = self.q_proj(x).view(batch, length, num_heads, head_dim).transpose(1, 2)
      key = self.k_proj(x).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
      value = self.v_proj(x).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
      query, key = query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin
      repeats = num_heads // num_kv_heads  # HF repeat_kv: head h reads kv head h // repeats
      key, value = key.repeat_interleave(repeats, 1), value.repeat_interleave(repeats, 1)
      scores = query @ key.transpose(2, 3) / head_dim**0.5
      causal = torch.ones(length, length, dtype=torch.bool).tril()
      weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
      return self.o_proj((weights @ value).transpose(1, 2).reshape(batch, length, -1))

  class Mlp(nn.Module):
    def __init__(self):
      super().__init__()
      self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
      self.up_proj = nn.Linear(width, mlp_dim, bias=False)
      self.down_proj = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x):
      return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

  class DecoderLayer(nn.Module):
    def __init__(self):
      super().__init__()
      self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()
      self.self_attn, self.mlp = Attention(), Mlp()

    def forward(self, x, cos, sin):
      x = x + self.self_attn(self.input_layernorm(x), cos, sin)
      return x + self.mlp(self.post_attention_layernorm(x))

  class LlamaModel(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed_tokens = nn.Embedding(VOCAB, width)
      self.layers = nn.ModuleList([DecoderLayer() for _ in range(2)])
      self.norm = RMSNorm()

    def forward(self, tokens):
      inverse_frequencies = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
      angles = torch.arange(tokens.shape[1]).float()[:, None] * inverse_frequencies
      angles = torch.cat([angles, angles], dim=-1)
      hidden = self.embed_tokens(tokens)
      for layer in self.layers:
        hidden = layer(hidden, angles.cos(), angles.sin())
      return self.norm(hidden)

  class LlamaForCausalLM(nn.Module):
    def __init__(self):
      super().__init__()
      self.model = LlamaModel()
      self.lm_head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens):
      return self.lm_head(self.model(tokens))

  torch.manual_seed(0)
  reference = LlamaForCausalLM()
  tokens = _prompt(length=PROMPT + NEW)
  with torch.no_grad():
    expected = reference(torch.from_numpy(tokens)).numpy()
  model = torch_import.load_torch_model(
    "lm_tiny", reference.state_dict(), num_kv_heads=num_kv_heads
  )  # num_classes read: VOCAB
  logits = np.asarray(_forward(model, tokens)[0])
  scale = np.abs(expected).max()
  print(
    f"LLaMA parity: max |Δlogits| {np.abs(logits - expected).max():.1e} (logit scale {scale:.2f})"
  )
  np.testing.assert_allclose(logits, expected, atol=1e-5 * scale)
