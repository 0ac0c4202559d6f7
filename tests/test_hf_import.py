"""Hugging Face import/export against transformers itself, offline.

Per family a tiny random model is built with transformers (`XConfig(...)` → `XForCausalLM` →
`save_pretrained`), its weights randomised (biases and norm scales included, so that every
tensor's mapping matters), imported with `jaxkd.models.hf.load_pretrained` in float32, and
compared with transformers' PyTorch forward on a left-padded batch (logits, 1e-4) and with
`model.generate(do_sample=False)` (greedy tokens, KV cache). The imported model is then exported
with `save_pretrained` and reloaded by transformers, which must give the same logits.
"""

import json
import re

import numpy as np
import pytest
from etils import epath

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxkd import models, parallel  # noqa: E402
from jaxkd.models import hf  # noqa: E402
from jaxkd.models.generate import generate  # noqa: E402
from jaxkd.models.transformer import keep_layers  # noqa: E402

import fake_gcs  # noqa: E402

VOCAB = 97
BATCH, LENGTH, PROMPT, NEW = 3, 12, 8, 5
# Left padding of each row of the test batch: 0, 4 and 1 tokens.
PADDING = (0, 4, 1)

_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4)
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
# family: (transformers config class, its arguments)
FAMILIES = {
  # GQA 4:2, llama3 RoPE scaling, biases on attention and MLP, untied.
  "llama": (
    transformers.LlamaConfig,
    dict(
      **_SMALL,
      **_TOKENS,
      num_hidden_layers=2,
      num_key_value_heads=2,
      attention_bias=True,
      mlp_bias=True,
      max_position_embeddings=64,
      rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8,
      ),
    ),
  ),
  # q/k/v biases, YaRN, tied, a sliding window (4) on the second layer.
  "qwen2": (
    transformers.Qwen2Config,
    dict(
      **_SMALL,
      **_TOKENS,
      num_hidden_layers=2,
      num_key_value_heads=2,
      tie_word_embeddings=True,
      use_sliding_window=True,
      sliding_window=4,
      max_window_layers=1,
      max_position_embeddings=64,
      rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    ),
  ),
  # q/k RMSNorm, head_dim 16 != 32 / 4, untied, theta 1e6.
  "qwen3": (
    transformers.Qwen3Config,
    dict(
      **_SMALL,
      **_TOKENS,
      num_hidden_layers=2,
      num_key_value_heads=2,
      head_dim=16,
      rope_theta=1e6,
    ),
  ),
  # (1 + w) RMSNorm, embedding × sqrt(32), legacy hidden_act 'gelu' (= tanh GELU), MQA, head_dim 16.
  "gemma": (
    transformers.GemmaConfig,
    dict(
      **_SMALL,
      **_TOKENS,
      num_hidden_layers=2,
      num_key_value_heads=1,
      head_dim=16,
      hidden_act="gelu",
    ),
  ),
  # Sandwich norms, soft-capping in its non-linear range, query_pre_attn_scalar 10, a sliding
  # window (4) shorter than the sequence on the even layers.
  "gemma2": (
    transformers.Gemma2Config,
    dict(
      **_SMALL,
      **_TOKENS,
      num_hidden_layers=2,
      num_key_value_heads=2,
      head_dim=16,
      query_pre_attn_scalar=10,
      sliding_window=4,
      attn_logit_softcapping=2.0,
      final_logit_softcapping=3.0,
    ),
  ),
  # q/k norm, local (1e4) and global (1e6, linear scaling 4) RoPE, window 4, final soft-capping.
  "gemma3_text": (
    transformers.Gemma3TextConfig,
    dict(
      **_SMALL,
      **_TOKENS,
      num_hidden_layers=2,
      num_key_value_heads=2,
      head_dim=16,
      query_pre_attn_scalar=16,
      sliding_window=4,
      layer_types=["sliding_attention", "full_attention"],
      rope_scaling=dict(rope_type="linear", factor=4.0),
      final_logit_softcapping=5.0,
    ),
  ),
  # Learned positions, LayerNorm with bias, gelu_new MLP of width 40, fused c_attn, tied.
  "gpt2": (
    transformers.GPT2Config,
    dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=40, n_positions=32, **_TOKENS),
  ),
}


def _randomise(model: "torch.nn.Module", seed: int = 0) -> None:
  """Weights ~ N(0, 0.15²), norm scales around their identity value, biases ~ N(0, 0.15²)."""
  generator = torch.Generator().manual_seed(seed)
  gemma_norm = isinstance(
    model,
    (
      transformers.GemmaPreTrainedModel,
      transformers.Gemma2PreTrainedModel,
      transformers.Gemma3PreTrainedModel,
    ),
  )
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      noise = torch.randn(parameter.shape, generator=generator)
      if "norm" in name or ".ln_" in name:
        centre = 0.0 if gemma_norm else 1.0
        parameter.copy_(centre + 0.3 * noise.clamp(-1.5, 1.5))
      else:
        parameter.copy_(0.15 * noise)


def _hf_model(family: str, directory, config_kwargs=None, **save_kwargs):
  config_class, kwargs = FAMILIES[family]
  config = config_class(**{**kwargs, **(config_kwargs or {})})
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  _randomise(model)
  model.save_pretrained(directory, **save_kwargs)
  return model


def _batch(seed: int = 0):
  tokens = np.random.default_rng(seed).integers(3, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  mask = np.arange(LENGTH)[None] >= np.asarray(PADDING)[:, None]
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions):
  with torch.no_grad():
    return model(
      input_ids=torch.from_numpy(tokens).long(),
      attention_mask=torch.from_numpy(mask).long(),
      position_ids=torch.from_numpy(positions).long(),
    ).logits.numpy()


@nnx.jit
def _forward(model, tokens, mask, positions):
  return model(tokens, positions=positions, token_mask=mask)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_generation_and_export_match_transformers(family, tmp_path):
  reference = _hf_model(family, tmp_path / "hf")
  model = hf.load_pretrained(tmp_path / "hf", dtype=jnp.float32)
  tokens, mask, positions = _batch()

  expected = _hf_logits(reference, tokens, mask, positions)
  logits = np.asarray(_forward(model, tokens, mask, positions))
  error = np.abs(logits - expected)[mask].max()
  print(f"{family}: max |Δlogits| {error:.1e} (logit scale {np.abs(expected).max():.2f})")
  np.testing.assert_allclose(logits[mask], expected[mask], atol=1e-4)

  prompt, prompt_mask = tokens[:, :PROMPT], mask[:, :PROMPT]
  result = generate(model, prompt, NEW, rng=jax.random.key(0), greedy=True, prompt_mask=prompt_mask)
  with torch.no_grad():
    hf_tokens = reference.generate(
      torch.from_numpy(prompt).long(),
      attention_mask=torch.from_numpy(prompt_mask).long(),
      max_new_tokens=NEW,
      min_new_tokens=NEW,
      do_sample=False,
    )[:, PROMPT:]
  np.testing.assert_array_equal(result.tokens, hf_tokens.numpy())

  hf.save_pretrained(model, tmp_path / "exported")
  exported = json.loads((tmp_path / "exported" / "config.json").read_text())
  assert exported["model_type"] == family
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / "exported", attn_implementation="eager"
  ).eval()
  np.testing.assert_allclose(
    _hf_logits(reloaded, tokens, mask, positions)[mask], expected[mask], atol=1e-5
  )


def test_sharded_checkpoint_loads_into_the_fsdp_layout(tmp_path):
  _hf_model("llama", tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  sharded = hf.load_pretrained(tmp_path, dtype=jnp.float32, mesh=mesh)
  single = hf.load_pretrained(tmp_path, dtype=jnp.float32)
  state = nnx.state(sharded, nnx.Param)
  expected_shardings = parallel.state_shardings(mesh, state)
  single_params = dict(nnx.to_flat_state(nnx.state(single)))
  split = 0
  for (path, variable), sharding in zip(
    nnx.to_flat_state(state), jax.tree.leaves(expected_shardings)
  ):
    array = variable[...]
    assert array.sharding.is_equivalent_to(sharding, array.ndim), path
    split += "fsdp" in sharding.spec
    np.testing.assert_array_equal(array, single_params[path][...])
  assert split >= 5  # embeddings, MLP and attention kernels are split over 'fsdp'


def test_bucket_checkpoint_is_copied_once_to_the_local_cache(tmp_path, monkeypatch):
  """A gs:// teacher: its shards are copied to $JAXKD_CACHE_DIR (safetensors memory-maps
  local files) once, and the model equals the local directory's."""
  local = tmp_path / "local"
  _hf_model("llama", local, max_shard_size="20KB")
  remote = epath.Path(fake_gcs.bucket()) / "llama"
  for file in local.iterdir():
    (remote / file.name).write_bytes(file.read_bytes())
  monkeypatch.setenv("JAXKD_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)

  loaded = hf.load_pretrained(remote, dtype=jnp.float32)
  copies = sorted((tmp_path / "cache" / "hf").glob("*/*"))
  assert len(copies) == len(list(local.glob("*.safetensors"))) > 1
  modified = [copy.stat().st_mtime_ns for copy in copies]
  again = hf.load_pretrained(str(remote), dtype=jnp.float32)
  assert [copy.stat().st_mtime_ns for copy in copies] == modified  # reused, not copied again
  expected = dict(nnx.to_flat_state(nnx.state(hf.load_pretrained(local, dtype=jnp.float32))))
  for model in (loaded, again):
    for path, variable in nnx.to_flat_state(nnx.state(model)):
      np.testing.assert_array_equal(variable[...], expected[path][...])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "local"]  # nothing under ./gs:


def test_bfloat16_by_default(tmp_path):
  _hf_model("qwen3", tmp_path)
  model = hf.load_pretrained(tmp_path)
  assert model.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}


def _rewrite_config(directory, **changes):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      config.pop(key, None)
    else:
      config[key] = value
  path.write_text(json.dumps(config))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_transformers_4_spelling_of_rope_fields(family, tmp_path):
  """Published checkpoints write rope_theta / rope_scaling / rope_local_base_freq."""
  _hf_model(family, tmp_path)
  expected = hf.read_config(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  if family == "llama":
    rope = dict(config["rope_parameters"])
    changes = dict(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
  else:
    full, sliding = (config["rope_parameters"][k] for k in ("full_attention", "sliding_attention"))
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    changes = dict(
      rope_theta=full["rope_theta"],
      rope_local_base_freq=sliding["rope_theta"],
      rope_scaling=scaling,
      layer_types=None,
      sliding_window_pattern=2,  # derives the same layer_types: sliding, full
    )
  _rewrite_config(tmp_path, rope_parameters=None, **changes)
  assert hf.read_config(tmp_path) == expected


@pytest.mark.parametrize(
  "changes,message",
  [
    (dict(model_type="mistral"), "model_type='mistral'"),
    (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0)), "rope_type='dynamic'"),
    (dict(rope_parameters=dict(rope_type="linear")), "'linear' RoPE needs it"),
    (dict(quantization_config={"bits": 4}), "quantization_config={'bits': 4}"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
  ],
)
def test_unsupported_config_is_one_line_error(changes, message, tmp_path):
  _hf_model("qwen3", tmp_path)
  _rewrite_config(tmp_path, **changes)
  with pytest.raises(ValueError, match=re.escape(message)) as error:
    hf.read_config(tmp_path)
  assert "\n" not in str(error.value)


def test_gemma3_attention_softcap_is_refused():
  """transformers' Gemma 3 accepts attn_logit_softcapping but never applies it."""
  config_class, kwargs = FAMILIES["gemma3_text"]
  config = config_class(**kwargs).to_dict()
  config["attn_logit_softcapping"] = 50.0
  with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
    hf.decoder_config(config)


def test_missing_tensor_is_reported(tmp_path):
  from safetensors.numpy import load_file, save_file

  _hf_model("llama", tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
    hf.load_pretrained(tmp_path, dtype=jnp.float32)


def test_create_kwargs_rebuild_the_imported_architecture(tmp_path):
  _hf_model("gemma3_text", tmp_path)
  model = hf.load_pretrained(tmp_path, dtype=jnp.float32)
  kwargs = json.loads(json.dumps(model.config.create_kwargs()))
  rebuilt = nnx.eval_shape(lambda: models.create("transformer_lm", **kwargs))
  assert rebuilt.config == model.config
  assert jax.tree.map(np.shape, nnx.state(rebuilt)) == jax.tree.map(np.shape, nnx.state(model))


def _randomised_student(**kwargs):
  student = nnx.eval_shape(lambda: models.create("lm_tiny", num_classes=VOCAB, **kwargs))
  rng = np.random.default_rng(1)
  flat = []
  for path, variable in nnx.to_flat_state(nnx.state(student)):
    centre = 1.0 if path[-1] == "scale" else 0.0
    value = centre + 0.15 * rng.normal(size=variable.shape)
    flat.append((path, variable.replace(jax.device_put(value.astype(np.float32)))))
  nnx.update(student, nnx.from_flat_state(flat))
  return student


def test_lm_tiny_student_exports_as_llama(tmp_path):
  student = _randomised_student(num_kv_heads=2)
  hf.save_pretrained(student, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tokens, mask, positions = _batch(1)
  expected = np.asarray(_forward(student, tokens, mask, positions))
  np.testing.assert_allclose(
    _hf_logits(reloaded, tokens, mask, positions)[mask], expected[mask], atol=1e-4
  )


def test_inexpressible_decoder_is_refused(tmp_path):
  student = nnx.eval_shape(
    lambda: models.create("lm_tiny", num_classes=VOCAB, qkv_bias=True, mlp_bias=True)
  )
  with pytest.raises(ValueError, match="no Hugging Face family") as error:
    hf.save_pretrained(student, tmp_path)
  assert "\n" not in str(error.value)


def test_layer_dropped_student_keeps_the_teacher_layers(tmp_path):
  teacher_hf = _hf_model("gemma2", tmp_path / "teacher", dict(num_hidden_layers=3))
  teacher = hf.load_pretrained(tmp_path / "teacher", dtype=jnp.float32)
  student = keep_layers(teacher, [0, 2])
  assert student.config.num_layers == 2
  assert student.config.layer_types == ("sliding_attention", "sliding_attention")
  teacher_params = dict(nnx.to_flat_state(nnx.state(teacher)))
  for path, variable in nnx.to_flat_state(nnx.state(student)):
    source = ("layers", [0, 2][path[1]], *path[2:]) if path[0] == "layers" else path
    np.testing.assert_array_equal(variable[...], teacher_params[source][...])
  # Exported, transformers sees the teacher's tensors of layers 0 and 2.
  hf.save_pretrained(student, tmp_path / "student")
  student_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
  teacher_tensors = teacher_hf.state_dict()
  for name, tensor in student_hf.state_dict().items():
    source = name.replace("layers.1.", "layers.2.")
    np.testing.assert_array_equal(tensor.numpy(), teacher_tensors[source].numpy(), err_msg=name)
  with pytest.raises(ValueError, match="increasing"):
    keep_layers(teacher, [2, 0])
