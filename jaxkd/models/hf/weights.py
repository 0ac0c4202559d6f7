"""Hugging Face safetensors ↔ `TransformerLM` weights, loaded straight into their sharding.

Names: a decoder variable's path gives its Hugging Face tensor mechanically
(`torch_import.torch_key` plus the `model.` prefix; `lm_head.weight` at the top level), and
Linear kernels are the transposed torch weights. GPT-2 (`transformer.` prefix) renames modules
(`wte`, `wpe`, `h`, `ln_1`, `ln_2`, `ln_f`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`), stores
Conv1D weights as [in, out] (jaxkd's kernel layout) and fuses q, k, v into the columns of
`attn.c_attn`.

Loading reads each tensor memory-mapped (`safetensors.safe_open`); with a mesh every device's
shard is read and converted on its own (`jax.make_array_from_callback`), so no host ever holds a
whole tensor per device, or the whole model. A `gs://` directory's shards are copied once to a
local cache (`local_cache_dir()`), since memory-mapping needs a local file.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from jaxkd import parallel
from jaxkd.models import torch_import
from jaxkd.models.hf import config as hf_config_lib
from jaxkd.models.transformer import DecoderConfig, TransformerLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Files describing the tokenizer and generation defaults, copied along with a student.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
)
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Checkpoint tensors that are not parameters: GPT-2's causal-mask buffers and the RoPE tables of
# old LLaMA exports.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_GPT2_MODULES = {
  "embed_tokens": "wte",
  "embed_positions": "wpe",
  "layers": "h",
  "input_layernorm": "ln_1",
  "post_attention_layernorm": "ln_2",
  "norm": "ln_f",
  "self_attn": "attn",
  "o_proj": "c_proj",
  "up_proj": "c_fc",
  "down_proj": "c_proj",
}
_GPT2_FUSED = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """Where a decoder variable lives in the checkpoint.

  layout 'same': the tensor as is; 'transposed': torch Linear [out, in] of a kernel [in, out];
  'columns': columns block * width .. (block + 1) * width of a fused tensor (GPT-2's c_attn).
  """

  name: str
  layout: str = "same"
  block: int = 0


def _tensor(path: tuple, gpt2: bool, prefix: str) -> _Tensor:
  leaf = path[-1]
  if not gpt2:
    name = torch_import.torch_key(path)
    name = name if path[0] == "lm_head" else prefix + name
    return _Tensor(name, "transposed" if leaf == "kernel" else "same")
  if path[0] == "lm_head":
    return _Tensor("lm_head.weight", "transposed")
  modules = [str(_GPT2_MODULES.get(part, part)) for part in path[:-1]]
  name = prefix + ".".join(modules + [torch_import.torch_key((leaf,))])
  if len(path) > 3 and path[3] in _GPT2_FUSED:
    fused = prefix + ".".join(modules[:3] + ["c_attn", torch_import.torch_key((leaf,))])
    return _Tensor(fused, "columns", _GPT2_FUSED[path[3]])
  return _Tensor(name)


def _tensors(model: TransformerLM, names: set[str] | None = None) -> dict[tuple, _Tensor]:
  """{variable path: `_Tensor`} for every parameter of `model`.

  `names`: the checkpoint's tensor names, to detect GPT-2 files saved without the
  `transformer.` prefix (those of the original OpenAI conversion).
  """
  gpt2 = model.config.positions == "learned"
  prefix = "transformer." if gpt2 else "model."
  if gpt2 and names is not None and "transformer.wte.weight" not in names:
    prefix = ""
  return {
    path: _tensor(path, gpt2, prefix) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def _normalise(index: tuple, shape: tuple) -> tuple[slice, ...]:
  return tuple(slice(*part.indices(size)) for part, size in zip(index, shape))


def _read(source, tensor: _Tensor, index: tuple[slice, ...], width: int) -> np.ndarray:
  """The block `index` of the variable stored as `tensor` in the safetensors slice `source`."""
  if tensor.layout == "transposed":
    return source[index[::-1]].T
  if tensor.layout == "columns":
    *rows, columns = index
    offset = tensor.block * width
    return source[(*rows, slice(columns.start + offset, columns.stop + offset))]
  return source[index]


def _stored_shape(tensor: _Tensor, shape: tuple, width: int) -> tuple:
  if tensor.layout == "transposed":
    return shape[::-1]
  if tensor.layout == "columns":
    return (*shape[:-1], 3 * width)
  return shape


def read_config(directory) -> DecoderConfig:
  """The `DecoderConfig` of the Hugging Face model in `directory` (its config.json).

  Raises:
    ValueError: one line naming the field and value jaxkd does not implement.
  """
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face model directory")
  return hf_config_lib.decoder_config(json.loads(path.read_text()))


def _weight_files(directory: epath.Path) -> list[str]:
  """The local safetensors files of the checkpoint, the index's shards or model.safetensors;
  those of a remote directory are copied to `local_cache_dir()` first (`_local_copy`)."""
  index = directory / WEIGHTS_INDEX_FILE
  if index.exists():
    files = sorted(
      {directory / file for file in json.loads(index.read_text())["weight_map"].values()}
    )
  elif (directory / WEIGHTS_FILE).exists():
    files = [directory / WEIGHTS_FILE]
  else:
    raise FileNotFoundError(
      f"{directory} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} (only safetensors "
      "checkpoints are read)"
    )
  return [_local_copy(file) if "://" in os.fspath(file) else os.fspath(file) for file in files]


def local_cache_dir() -> epath.Path:
  """Where remote safetensors shards are copied: `$JAXKD_CACHE_DIR/hf`, default
  `~/.cache/jaxkd/hf`."""
  root = os.environ.get("JAXKD_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "jaxkd"
  )
  return epath.Path(root) / "hf"


def _local_copy(file: epath.Path) -> str:
  """A local copy of a remote (`gs://`) safetensors shard, made once and reused.

  safetensors memory-maps its files, which needs a local file system. The copy is keyed by the
  remote path and size; it is written to a temporary name and renamed, so that processes of one
  host loading the same teacher at once never read a half-written shard.
  """
  size = file.stat().length
  key = hashlib.sha256(f"{file}\0{size}".encode()).hexdigest()[:16]
  target = local_cache_dir() / key / file.name
  if not (target.exists() and target.stat().length == size):
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{file.name}.{os.getpid()}.partial"
    with file.open("rb") as source, open(partial, "wb") as destination:
      shutil.copyfileobj(source, destination, length=64 << 20)
    os.replace(partial, target)
    logging.info("Copied %s (%.2f GiB) to %s", file, size / 2**30, target)
  return os.fspath(target)


def load_pretrained(
  directory, *, dtype=jnp.bfloat16, param_dtype=None, mesh: Mesh | None = None
) -> TransformerLM:
  """A `TransformerLM` holding the weights of a local Hugging Face causal LM directory.

  `directory` holds config.json and model.safetensors, or model.safetensors.index.json and its
  shards (an `etils.epath` path or a string; nothing is downloaded). The architecture comes from
  config.json (`read_config`); `model.config.create_kwargs()` rebuilds it with
  `create('transformer_lm', ...)`, e.g. for `jaxkd.models.io.save`.

  Args:
    directory: the Hugging Face model directory.
    dtype: compute dtype (bfloat16, or float32 for exact comparisons).
    param_dtype: storage dtype of the weights; default `dtype`. The checkpoint's tensors are cast.
    mesh: place every weight with `jaxkd.parallel.state_shardings(mesh, ...)` (FSDP over
      'fsdp'), reading only each device's shard. Default: the first local device.

  Raises:
    ValueError: an unsupported config.json field or value (one line), or one line listing missing
      tensors, unexpected tensors and shape mismatches.
  """
  from safetensors import safe_open  # the hf extra, imported when used

  directory = epath.Path(directory)
  config = read_config(directory)
  param_dtype = dtype if param_dtype is None else param_dtype
  model = nnx.eval_shape(
    lambda: TransformerLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  )
  with contextlib.ExitStack() as stack:
    handles = {
      name: handle
      for file in _weight_files(directory)
      for handle in [stack.enter_context(safe_open(file, framework="numpy"))]
      for name in handle.keys()
    }
    tensors = _tensors(model, set(handles))
    expected = {tensor.name for tensor in tensors.values()}
    missing = sorted(expected - set(handles))
    unexpected = sorted(
      name
      for name in set(handles) - expected
      if not name.endswith(_BUFFER_SUFFIXES)
      # A tied checkpoint may still store the head; transformers ties it to the embedding.
      and not (config.tie_embeddings and name == "lm_head.weight")
    )
    loaded, mismatched = [], []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      tensor = tensors[path]
      if tensor.name not in handles:
        continue
      source = handles[tensor.name].get_slice(tensor.name)
      stored = tuple(source.get_shape())
      if stored != _stored_shape(tensor, variable.shape, config.width):
        mismatched.append(f"{tensor.name} {stored} for {'.'.join(map(str, path))} {variable.shape}")
        continue
      sharding = (
        SingleDeviceSharding(jax.local_devices()[0])
        if mesh is None
        else NamedSharding(mesh, parallel.fsdp_spec(variable.shape, mesh.shape["fsdp"]))
      )

      def shard(index, source=source, tensor=tensor, shape=variable.shape):
        block = _read(source, tensor, _normalise(index, shape), config.width)
        return np.asarray(block).astype(param_dtype, copy=False)

      array = jax.make_array_from_callback(variable.shape, sharding, shard)
      loaded.append((path, variable.replace(array)))
    problems = [
      f"{what}: {', '.join(names)}"
      for what, names in (
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("shape mismatches", mismatched),
      )
      if names
    ]
    if problems:
      raise ValueError(f"{directory} does not fit its config.json: " + " | ".join(problems))
  nnx.update(model, nnx.from_flat_state(loaded))
  return model


def _token_ids(tokenizer_directory: epath.Path) -> dict:
  """bos/eos/pad token ids of a model directory's config.json, or of its generation_config.json
  where config.json has none."""
  ids = {}
  for file in ("generation_config.json", CONFIG_FILE):
    path = tokenizer_directory / file
    if path.exists():
      values = json.loads(path.read_text())
      ids.update({name: values[name] for name in _TOKEN_ID_FIELDS if name in values})
  return ids


def save_pretrained(model: TransformerLM, directory, *, tokenizer_directory=None) -> None:
  """Writes `model` as a Hugging Face directory: config.json and model.safetensors.

  The family is the first of `jaxkd.models.hf.FAMILIES` that expresses the decoder exactly (an
  `lm_tiny` student is a Llama). `transformers.AutoModelForCausalLM.from_pretrained(directory)`
  then computes the same logits. Weights keep their dtype; the whole model passes through host
  memory once (meant for students; arrays must be addressable by this process).

  Args:
    model: a `TransformerLM`.
    directory: output directory (created), an `etils.epath` path or a string.
    tokenizer_directory: a Hugging Face model directory (the teacher's) whose tokenizer files
      (`TOKENIZER_FILES`) are copied and whose bos/eos/pad token ids are written to config.json.

  Raises:
    ValueError: the decoder matches no supported family (one line, the reason per family).
  """
  from safetensors.numpy import save  # the hf extra, imported when used

  directory = epath.Path(directory)
  fields = hf_config_lib.hf_config(model.config)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  dtype = np.dtype(next(iter(params.values())).dtype)
  fields["dtype"] = dtype.name
  arrays, fused = {}, {}
  for path, tensor in _tensors(model).items():
    value = np.asarray(params[path][...])
    if tensor.layout == "columns":
      fused.setdefault(tensor.name, [None] * 3)[tensor.block] = value
    else:
      arrays[tensor.name] = np.ascontiguousarray(
        value.T if tensor.layout == "transposed" else value
      )
  arrays.update({name: np.concatenate(blocks, axis=-1) for name, blocks in fused.items()})
  directory.mkdir(parents=True, exist_ok=True)
  if tokenizer_directory is not None:
    tokenizer_directory = epath.Path(tokenizer_directory)
    fields.update(_token_ids(tokenizer_directory))
    for file in TOKENIZER_FILES:
      if (tokenizer_directory / file).exists():
        (directory / file).write_bytes((tokenizer_directory / file).read_bytes())
  (directory / CONFIG_FILE).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
  (directory / WEIGHTS_FILE).write_bytes(save(arrays, metadata={"format": "pt"}))
