"""Hugging Face `config.json` ↔ `DecoderConfig`, for the families jaxkd implements exactly.

The semantics are those of transformers 5.x (`models/<family>/configuration_*.py` and
`modeling_*.py`), which also reads the older 4.x spelling (`rope_theta` + `rope_scaling`) that most
published checkpoints use. A missing field takes that class's default.

Every field of a config.json is accounted for: read (it changes the architecture), known to be
harmless for a frozen teacher's or a student's forward pass (`HARMLESS_FIELDS`, per family
`_FAMILY_HARMLESS`), or allowed only at a value that changes nothing (`REQUIRED_VALUES`).
Anything else is a one-line ValueError naming the field and its value: jaxkd never runs an
approximation of the checkpoint's model.
"""

from collections.abc import Mapping
from typing import Any

from jaxkd.models.transformer import FULL_ATTENTION, SLIDING_ATTENTION, DecoderConfig

FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")
ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "gemma": "GemmaForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "gemma3_text": "Gemma3ForCausalLM",
  "gpt2": "GPT2LMHeadModel",
}

# Architecture traits that a family fixes (the importer sets them, whatever the config says).
FAMILY_TRAITS = {
  "llama": {},
  "qwen2": dict(qkv_bias=True),
  "qwen3": dict(qk_norm=True),
  "gemma": dict(norm_scale_offset=1.0, embed_scale=True),
  "gemma2": dict(norm_scale_offset=1.0, embed_scale=True, sandwich_norm=True),
  "gemma3_text": dict(norm_scale_offset=1.0, embed_scale=True, sandwich_norm=True, qk_norm=True),
  "gpt2": dict(
    norm_type="layer",
    gated_mlp=False,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    positions="learned",
  ),
}

# The defaults of each transformers config class, for the fields the importer reads.
_ROPE_DEFAULTS = dict(rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
_GEMMA_DEFAULTS = dict(
  _ROPE_DEFAULTS,
  vocab_size=256_000,
  head_dim=256,
  hidden_activation="gelu_pytorch_tanh",
  max_position_embeddings=8192,
  tie_word_embeddings=True,
  attention_bias=False,
)
_DEFAULTS = {
  "llama": dict(
    _ROPE_DEFAULTS,
    vocab_size=32_000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    hidden_act="silu",
    max_position_embeddings=2048,
    attention_bias=False,
    mlp_bias=False,
  ),
  "qwen2": dict(
    _ROPE_DEFAULTS,
    vocab_size=151_936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    max_position_embeddings=32768,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
  ),
  "gemma": dict(
    _GEMMA_DEFAULTS,
    hidden_size=3072,
    intermediate_size=24576,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    hidden_act="gelu_pytorch_tanh",
  ),
  "gemma2": dict(
    _GEMMA_DEFAULTS,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
  ),
  "gpt2": dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    scale_attn_weights=True,
    tie_word_embeddings=True,
  ),
}
_DEFAULTS["qwen3"] = dict(_DEFAULTS["qwen2"], head_dim=128, attention_bias=False)
_DEFAULTS["gemma3_text"] = dict(
  _DEFAULTS["gemma2"],
  vocab_size=262_208,
  max_position_embeddings=131_072,
  final_logit_softcapping=None,
  attn_logit_softcapping=None,
  rope_theta=1_000_000.0,
  rope_local_base_freq=10_000.0,
  sliding_window_pattern=6,
)

# Fields of any config.json that do not change the forward pass: bookkeeping, token ids (the
# tokenizer's business), training-only settings (initialisation, dropout: jaxkd has none) and
# generation defaults.
HARMLESS_FIELDS = frozenset(
  """architectures transformers_version dtype torch_dtype _name_or_path use_cache
  initializer_range attention_dropout bos_token_id eos_token_id pad_token_id sep_token_id
  decoder_start_token_id cache_implementation output_attentions output_hidden_states return_dict
  id2label label2id num_labels tokenizer_class problem_type finetuning_task prefix
  task_specific_params is_decoder torchscript use_bfloat16 tf_legacy_loss tie_encoder_decoder
  chunk_size_feed_forward _attn_implementation_autoset max_length min_length do_sample
  early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p
  repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
  bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
  forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
  begin_suppress_tokens""".split()
)
_FAMILY_HARMLESS = {
  # Tensor-parallel slicing of the pre-training run; transformers 5 ignores it.
  "llama": {"pretraining_tp"},
  # Read by transformers 4.40-4.x only, never by 5.x (which uses hidden_act, see _activation).
  "gemma": {"hidden_activation"},
  # Qwen2 hard-codes its q/k/v biases and ignores attention_bias.
  "qwen2": {"attention_bias"},
  # Unused by the Gemma 2/3 modules (they read hidden_activation).
  "gemma2": {"hidden_act"},
  # _sliding_window_pattern: transformers 5 writes the pattern it derived, and never reads it.
  "gemma3_text": {"hidden_act", "_sliding_window_pattern"},
  # Dropout (none in jaxkd), the double-heads model's summary head, an old alias of
  # n_positions, and float32 attention logits (jaxkd's are float32 anyway).
  "gpt2": {
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "n_ctx",
    "reorder_and_upcast_attn",
  },
}
# Fields allowed only at values that leave a causal decoder-only LM as it is.
REQUIRED_VALUES = {
  "is_encoder_decoder": (False,),
  "add_cross_attention": (False,),
  "cross_attention_hidden_size": (None,),
  "pruned_heads": ({},),
  "use_bidirectional_attention": (None, False),
  "use_mrope": (False,),
  "scale_attn_by_inverse_layer_idx": (False,),
}
_HF_ACTIVATIONS = {
  "silu": "silu",
  "swish": "silu",
  "gelu": "gelu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
}
# RoPE dictionary keys understood per rope_type (besides rope_type / type / rope_theta).
_ROPE_KEYS = {
  "default": set(),
  "linear": {"factor"},
  "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
  "yarn": {
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
  },
}


def _unsupported(field: str, value: Any, family: str, why: str) -> ValueError:
  return ValueError(f"config.json {field}={value!r} (model_type {family!r}): {why}")


class _Fields:
  """The config.json values, recording which fields the importer has accounted for."""

  def __init__(self, config: Mapping[str, Any], family: str):
    self.config, self.family = dict(config), family
    self.defaults = _DEFAULTS[family]
    self.accounted = {"model_type"} | HARMLESS_FIELDS | _FAMILY_HARMLESS.get(family, set())

  def get(self, name: str, default: Any = None) -> Any:
    self.accounted.add(name)
    return self.config.get(name, self.defaults.get(name, default))

  def error(self, name: str, why: str) -> ValueError:
    return _unsupported(name, self.config.get(name), self.family, why)

  def check_rest(self) -> None:
    for name, allowed in REQUIRED_VALUES.items():
      if name in self.config and self.config[name] not in allowed:
        raise self.error(name, f"jaxkd implements only {' or '.join(map(repr, allowed))}")
    unknown = sorted(set(self.config) - self.accounted - set(REQUIRED_VALUES))
    if unknown:
      fields = ", ".join(f"{name}={self.config[name]!r}" for name in unknown)
      raise ValueError(
        f"config.json (model_type {self.family!r}) has fields jaxkd does not implement: "
        f"{fields}; see docs/huggingface.md"
      )


def _activation(fields: _Fields) -> str:
  name = "hidden_activation" if fields.family in ("gemma2", "gemma3_text") else "hidden_act"
  if fields.family == "gpt2":
    name = "activation_function"
  value = fields.get(name)
  if fields.family == "gemma" and value == "gelu":
    # GemmaConfig rewrites the legacy 'gelu' of the released checkpoints to the tanh GELU.
    return "gelu_tanh"
  if value not in _HF_ACTIVATIONS:
    raise fields.error(name, f"supported activations: {', '.join(_HF_ACTIVATIONS)}")
  return _HF_ACTIVATIONS[value]


def _rope_scaling(fields: _Fields, rope: Mapping[str, Any] | None, where: str):
  """(theta or None, `RopeScaling` kwargs or None) of one RoPE dictionary."""
  if not rope:
    return None, None
  rope = dict(rope)
  legacy_type = rope.pop("type", "default")  # transformers < 4.45
  rope_type = rope.pop("rope_type", legacy_type)
  theta = rope.pop("rope_theta", None)
  if rope.get("partial_rotary_factor", 1.0) == 1.0:
    rope.pop("partial_rotary_factor", None)
  if rope_type not in _ROPE_KEYS:
    supported = ", ".join(_ROPE_KEYS)
    raise _unsupported(f"{where}.rope_type", rope_type, fields.family, f"supported: {supported}")
  unknown = sorted(set(rope) - _ROPE_KEYS[rope_type])
  if unknown:
    raise _unsupported(
      f"{where}.{unknown[0]}", rope[unknown[0]], fields.family, f"not part of {rope_type!r} RoPE"
    )
  if rope_type == "default":
    return theta, None
  if rope_type in ("llama3", "yarn"):
    # Hugging Face's standardize_rope_params: a top-level original_max_position_embeddings
    # wins, else the dictionary's, else max_position_embeddings.
    top_level = fields.get("original_max_position_embeddings")
    if top_level is not None or rope.get("original_max_position_embeddings") is None:
      rope["original_max_position_embeddings"] = top_level or fields.get("max_position_embeddings")
  if rope_type == "yarn":
    if rope.get("factor") is None:
      rope["factor"] = (
        fields.get("max_position_embeddings") / rope["original_max_position_embeddings"]
      )
  if rope.get("factor") is None:
    raise _unsupported(f"{where}.factor", None, fields.family, f"{rope_type!r} RoPE needs it")
  return theta, dict(rope, rope_type=rope_type)


def _rope(fields: _Fields) -> dict[str, Any]:
  """rope_theta, rope_scaling and local_rope_theta from either spelling of the RoPE fields."""
  parameters = fields.get("rope_parameters")
  theta = fields.get("rope_theta")
  if fields.family == "gemma3_text":
    local_theta = fields.get("rope_local_base_freq")
    if parameters and FULL_ATTENTION in parameters:
      global_theta, scaling = _rope_scaling(
        fields, parameters[FULL_ATTENTION], f"rope_parameters.{FULL_ATTENTION}"
      )
      local_rope = parameters.get(SLIDING_ATTENTION)
      local_value, local_scaling = _rope_scaling(
        fields, local_rope, f"rope_parameters.{SLIDING_ATTENTION}"
      )
      if local_scaling is not None:
        raise _unsupported(
          f"rope_parameters.{SLIDING_ATTENTION}.rope_type",
          local_scaling["rope_type"],
          fields.family,
          "jaxkd scales the RoPE of global layers only",
        )
      theta, local_theta = global_theta or theta, local_value or local_theta
    else:
      rope_theta, scaling = _rope_scaling(
        fields, parameters or fields.get("rope_scaling"), "rope_scaling"
      )
      theta = rope_theta or theta
    return dict(rope_theta=float(theta), rope_scaling=scaling, local_rope_theta=float(local_theta))
  if parameters and any(key in parameters for key in (FULL_ATTENTION, SLIDING_ATTENTION)):
    raise _unsupported("rope_parameters", parameters, fields.family, "per-layer RoPE")
  rope_theta, scaling = _rope_scaling(
    fields, parameters or fields.get("rope_scaling"), "rope_scaling"
  )
  return dict(rope_theta=float(rope_theta or theta), rope_scaling=scaling)


def _layer_types(fields: _Fields, num_layers: int) -> dict[str, Any]:
  """sliding_window and layer_types, as each family's config class derives them."""
  family = fields.family
  window = fields.get("sliding_window")
  if family in ("qwen2", "qwen3") and not fields.get("use_sliding_window"):
    window = None
  layer_types = fields.get("layer_types")
  if layer_types is None:
    if family in ("qwen2", "qwen3"):
      first_sliding = fields.get("max_window_layers")
      sliding = [window is not None and i >= first_sliding for i in range(num_layers)]
    elif family == "gemma2":
      sliding = [(i + 1) % 2 == 1 for i in range(num_layers)]
    else:
      pattern = fields.get("sliding_window_pattern")
      sliding = [(i + 1) % pattern != 0 for i in range(num_layers)]
    layer_types = [SLIDING_ATTENTION if s else FULL_ATTENTION for s in sliding]
  # Derivation inputs, accounted for even when layer_types is explicit.
  fields.get("max_window_layers" if family in ("qwen2", "qwen3") else "sliding_window_pattern")
  if len(layer_types) != num_layers or set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}:
    raise fields.error(
      "layer_types", f"need {num_layers} of {FULL_ATTENTION!r}/{SLIDING_ATTENTION!r}"
    )
  if window is None or SLIDING_ATTENTION not in layer_types:
    # No layer slides: a plain causal decoder (the window is unused).
    return dict(sliding_window=None, layer_types=None)
  return dict(sliding_window=int(window), layer_types=tuple(layer_types))


def _gpt2(fields: _Fields) -> dict[str, Any]:
  width = fields.get("n_embd")
  scale_attn_weights = fields.get("scale_attn_weights")
  return dict(
    vocab_size=fields.get("vocab_size"),
    num_layers=fields.get("n_layer"),
    width=width,
    num_heads=fields.get("n_head"),
    mlp_dim=fields.get("n_inner") or 4 * width,
    mlp_activation=_activation(fields),
    norm_eps=fields.get("layer_norm_epsilon"),
    max_positions=fields.get("n_positions"),
    # scale_attn_weights=False: logits q·k without the 1/sqrt(head_dim).
    query_pre_attn_scalar=None if scale_attn_weights else 1.0,
    tie_embeddings=fields.get("tie_word_embeddings"),
  )


def _rope_family(fields: _Fields) -> dict[str, Any]:
  family = fields.family
  width, num_heads = fields.get("hidden_size"), fields.get("num_attention_heads")
  num_layers = fields.get("num_hidden_layers")
  head_dim = fields.get("head_dim") or width // num_heads
  kwargs = dict(
    vocab_size=fields.get("vocab_size"),
    num_layers=num_layers,
    width=width,
    num_heads=num_heads,
    num_kv_heads=fields.get("num_key_value_heads") or num_heads,
    head_dim=head_dim,
    mlp_dim=fields.get("intermediate_size"),
    mlp_activation=_activation(fields),
    norm_eps=fields.get("rms_norm_eps"),
    tie_embeddings=fields.get("tie_word_embeddings"),
    # The trained context length: informational, as jaxkd does not bound RoPE positions.
    max_positions=fields.get("max_position_embeddings"),
    **_rope(fields),
  )
  if family != "qwen2":  # Qwen2 hard-codes q/k/v biases and no o_proj bias.
    bias = bool(fields.get("attention_bias"))
    kwargs.update(qkv_bias=bias, out_bias=bias)
  if family == "llama":
    kwargs["mlp_bias"] = bool(fields.get("mlp_bias"))
  if family in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
    kwargs.update(_layer_types(fields, num_layers))
  if family in ("gemma2", "gemma3_text"):
    scalar = fields.get("query_pre_attn_scalar")
    kwargs["query_pre_attn_scalar"] = None if scalar == head_dim else float(scalar)
    kwargs["final_logit_softcap"] = fields.get("final_logit_softcapping")
    attn_softcap = fields.get("attn_logit_softcapping")
    if family == "gemma3_text" and attn_softcap is not None:
      raise fields.error("attn_logit_softcapping", "transformers' Gemma 3 ignores it")
    kwargs["attn_logit_softcap"] = attn_softcap
  if kwargs.get("local_rope_theta") == kwargs["rope_theta"] and kwargs["rope_scaling"] is None:
    kwargs["local_rope_theta"] = None  # the same RoPE on every layer
  if kwargs.get("sliding_window") is None:
    kwargs["local_rope_theta"] = None  # no local layer to apply it to
  return kwargs


def decoder_config(config: Mapping[str, Any]) -> DecoderConfig:
  """The `DecoderConfig` of a Hugging Face config.json (a dict).

  Raises:
    ValueError: one line naming the field and value, for a model_type outside `FAMILIES` or a
      field or value jaxkd does not implement.
  """
  family = config.get("model_type")
  if family not in FAMILIES:
    raise ValueError(
      f"config.json model_type={family!r}: jaxkd imports {', '.join(FAMILIES)} (text-only "
      "causal LMs; for a multimodal Gemma 3 export its language model as gemma3_text)"
    )
  fields = _Fields(config, family)
  kwargs = _gpt2(fields) if family == "gpt2" else _rope_family(fields)
  fields.check_rest()
  return DecoderConfig(**kwargs, **FAMILY_TRAITS[family])


def _rope_fields(config: DecoderConfig) -> dict[str, Any]:
  rope_scaling = None
  if config.rope_scaling is not None:
    rope_scaling = {
      key: value
      for key, value in config.create_kwargs()["rope_scaling"].items()
      if value is not None
    }
  return dict(rope_theta=config.rope_theta, rope_scaling=rope_scaling)


def _to_hf_fields(config: DecoderConfig, family: str) -> dict[str, Any]:
  """config.json fields of `config` written as a `family` model (checked by the caller)."""
  activation = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
  if family == "gpt2":
    activation["gelu_tanh"] = "gelu_new"
    return dict(
      vocab_size=config.vocab_size,
      n_layer=config.num_layers,
      n_embd=config.width,
      n_head=config.num_heads,
      n_inner=config.mlp_dim,
      n_positions=config.max_positions,
      activation_function=activation[config.mlp_activation],
      layer_norm_epsilon=config.norm_eps,
      scale_attn_weights=config.query_pre_attn_scalar is None,
      tie_word_embeddings=config.tie_embeddings,
    )
  fields = dict(
    vocab_size=config.vocab_size,
    num_hidden_layers=config.num_layers,
    hidden_size=config.width,
    num_attention_heads=config.num_heads,
    num_key_value_heads=config.num_kv_heads,
    head_dim=config.head_dim,
    intermediate_size=config.mlp_dim,
    rms_norm_eps=config.norm_eps,
    tie_word_embeddings=config.tie_embeddings,
    **_rope_fields(config),
  )
  if config.max_positions is not None:
    fields["max_position_embeddings"] = config.max_positions
  activation_field = "hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"
  fields[activation_field] = activation[config.mlp_activation]
  if family != "qwen2":
    fields["attention_bias"] = config.qkv_bias
  if family == "llama":
    fields["mlp_bias"] = config.mlp_bias
  layer_types = list(config.layer_types or [FULL_ATTENTION] * config.num_layers)
  if family in ("qwen2", "qwen3"):
    fields.update(
      use_sliding_window=config.sliding_window is not None,
      sliding_window=config.sliding_window,
      max_window_layers=config.num_layers,
      layer_types=layer_types,
    )
  if family in ("gemma2", "gemma3_text"):
    fields.update(
      # Gemma's attention mask code needs a window even when no layer slides.
      sliding_window=config.sliding_window or 4096,
      layer_types=layer_types,
      # An int in transformers' (strictly typed) Gemma configs.
      query_pre_attn_scalar=_integral(config.query_pre_attn_scalar or config.head_dim),
      final_logit_softcapping=config.final_logit_softcap,
      attn_logit_softcapping=config.attn_logit_softcap,
    )
  if family == "gemma3_text":
    fields["rope_local_base_freq"] = config.local_rope_theta or config.rope_theta
  return fields


def _integral(value: float) -> int | float:
  return int(value) if float(value).is_integer() else value


def hf_config(config: DecoderConfig) -> dict[str, Any]:
  """config.json of `config`: the first family (in `FAMILIES` order) that expresses it exactly.

  Exactly means that reading the result back with `decoder_config` gives `config` again.

  Raises:
    ValueError: one line saying, per family, the first field it cannot express.
  """
  problems = []
  for family in FAMILIES:
    fields = dict(_to_hf_fields(config, family), model_type=family)
    try:
      round_trip = decoder_config(fields)
    except ValueError as error:
      problems.append(f"{family}: {error}")
      continue
    # max_positions of a RoPE model is the informational max_position_embeddings.
    informational = {"max_positions"} if config.positions == "rope" else set()
    different = [
      name
      for name in config.__dataclass_fields__
      if name not in informational and getattr(round_trip, name) != getattr(config, name)
    ]
    if not different:
      return dict(fields, architectures=[ARCHITECTURES[family]])
    name = different[0]
    problems.append(
      f"{family}: {name}={getattr(config, name)!r} (has {getattr(round_trip, name)!r})"
    )
  raise ValueError("no Hugging Face family expresses this decoder: " + "; ".join(problems))
