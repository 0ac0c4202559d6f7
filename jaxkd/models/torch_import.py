"""PyTorch state dict → `nnx.State` of a jaxkd model, by the mechanical name mapping.

jaxkd models name their submodules like the reference PyTorch modules (see `jaxkd.models.layers`),
so each variable's nnx path is its torch key up to the leaf name and the layout:

  nnx path                               torch key                        layout
  ('layer1', 0, 'conv1', 'kernel')  4-D  'layer1.0.conv1.weight'          OIHW → HWIO
  ('fc', 'kernel')                  2-D  'fc.weight'                      (out, in) → (in, out)
  (…, 'bias')                            '….bias'                         as is
  (…, 'bn1', 'scale') / 'bias'           '….bn1.weight' / '….bn1.bias'    as is
  (…, 'bn1', 'mean') / 'var'             '….running_mean' / 'running_var' as is
  (…, 'embedding')                       '….weight'                       as is
  (…, 'cls_token'), any other leaf       '….cls_token'                    as is

A variable that sits directly on a module rather than in a layer (timm ViT's `nn.Parameter`s
`cls_token` and `pos_embed`) keeps its own name and layout. torch's `num_batches_tracked` counters
have no counterpart and are dropped. A model whose checkpoints do not follow its own module names
(fused projections, renamed heads) defines a static method
`adapt_torch_state_dict(state_dict) -> state_dict` on its class: it receives the checkpoint as
{key: numpy array} and returns it in the mechanical convention above.

torch itself is not imported here: tensors are converted with `.numpy()` (or `np.asarray`).
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxkd.models.registry import create

# Leaf variable name of a flax layer → leaf name in the torch state dict; other leaf names (bare
# parameters such as a ViT's `cls_token`) are the same on both sides.
_TORCH_LEAF_NAMES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
  "embedding": "weight",
}
# Top-level keys under which training scripts nest the weights: RepDistiller / mdistiller save
# {'model': state_dict, 'epoch': …, 'optimizer': …}; others use 'state_dict'.
_WRAPPER_KEYS = ("model", "state_dict")
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_PROBE_CLASSES = 1001  # A head size no model uses by default, to tell head parameters apart.


def torch_key(path: tuple[Any, ...]) -> str:
  """The torch state-dict key of an nnx variable path: ('layer1', 0, 'bn1', 'mean') →
  'layer1.0.bn1.running_mean'; ('pos_embed',) → 'pos_embed'."""
  *modules, leaf = path
  return ".".join([str(part) for part in modules] + [_TORCH_LEAF_NAMES.get(leaf, leaf)])


def _to_jax_layout(path: tuple[Any, ...], array: np.ndarray) -> np.ndarray:
  """torch (out, in, *spatial) kernels → (*spatial, in, out); everything else unchanged."""
  if path[-1] != "kernel" or array.ndim < 2:
    return array
  return np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))


def _to_torch_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Inverse of `_to_jax_layout` on shapes, for error messages in torch's terms."""
  if path[-1] != "kernel" or len(shape) < 2:
    return tuple(shape)
  return (shape[-1], shape[-2]) + tuple(shape[:-2])


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The flat {key: array} state dict inside a checkpoint.

  Accepts a bare state dict or one nested under 'model' / 'state_dict' (RepDistiller and mdistiller
  save {'model': state_dict, …}), and strips the 'module.' prefix `nn.DataParallel` adds.
  """
  for wrapper in _WRAPPER_KEYS:
    if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
      checkpoint = checkpoint[wrapper]
      break
  state_dict = {
    key: _as_numpy(value)
    for key, value in checkpoint.items()
    if not key.endswith(_IGNORED_SUFFIXES)
  }
  if state_dict and all(key.startswith("module.") for key in state_dict):
    state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
  return state_dict


def _flat_variables(model: nnx.Module) -> dict[tuple[Any, ...], nnx.Variable]:
  return dict(nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))))


def _adapt(model: nnx.Module, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Applies the model class's `adapt_torch_state_dict` hook, if it defines one."""
  hook = getattr(type(model), "adapt_torch_state_dict", None)
  return arrays if hook is None else hook(arrays)


def infer_num_classes(name: str, state_dict: Mapping[str, Any], **create_kwargs) -> int:
  """The head size of model `name` that the checkpoint holds.

  The variables whose shape changes with `num_classes` are the head (found by building the model
  abstractly twice); the checkpoint's size along the axis that changes is the answer.
  """
  return _infer_num_classes(name, unwrap_state_dict(state_dict), create_kwargs)[0]


def _infer_num_classes(
  name: str, arrays: dict[str, np.ndarray], create_kwargs: dict[str, Any]
) -> tuple[int, nnx.Module | None]:
  """(`infer_num_classes`, the abstract default model when its head has that size, else None)."""
  create_kwargs = {key: value for key, value in create_kwargs.items() if key != "num_classes"}
  default_model = nnx.eval_shape(lambda: create(name, **create_kwargs))
  probe_model = nnx.eval_shape(lambda: create(name, num_classes=_PROBE_CLASSES, **create_kwargs))
  arrays = _adapt(default_model, arrays)
  probe = _flat_variables(probe_model)
  for path, variable in _flat_variables(default_model).items():
    if probe[path].shape == variable.shape or torch_key(path) not in arrays:
      continue
    axis = next(
      axis
      for axis, (size, probe_size) in enumerate(zip(variable.shape, probe[path].shape))
      if size != probe_size
    )
    num_classes = int(_to_jax_layout(path, arrays[torch_key(path)]).shape[axis])
    return num_classes, (default_model if variable.shape[axis] == num_classes else None)
  raise ValueError(
    f"cannot infer num_classes of {name!r} from the checkpoint: no classifier "
    "weight found; pass num_classes"
  )


def convert_state_dict(
  model: nnx.Module, state_dict: Mapping[str, Any], *, model_description: str | None = None
) -> nnx.State:
  """Converts a PyTorch state dict into the params and BatchNorm statistics of `model`.

  `model` only provides the structure (`nnx.eval_shape` output is enough); it is not modified.
  Every `nnx.Param` / `nnx.BatchStat` must have its torch key with a matching shape, and every
  checkpoint key must be used.

  Returns:
    The `nnx.State` of those variables, in the model's dtypes; apply it with
    `nnx.update(model, state)`.

  Raises:
    ValueError: listing every missing key, unexpected key and shape mismatch at once.
  """
  arrays = _adapt(model, unwrap_state_dict(state_dict))
  variables = _flat_variables(model)
  expected_keys = {torch_key(path): path for path in variables}
  missing = sorted(set(expected_keys) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected_keys))
  mismatched = []
  converted = []
  for key, path in sorted(expected_keys.items()):
    if key not in arrays:
      continue
    variable = variables[path]
    value = _to_jax_layout(path, arrays[key])
    if value.shape != variable.shape:
      mismatched.append(
        f"{key}: checkpoint {tuple(arrays[key].shape)}, model expects "
        f"{_to_torch_shape(path, variable.shape)}"
      )
      continue
    # Cast in numpy (ml_dtypes has bfloat16) and device_put: an on-device cast, or jnp.asarray
    # of a numpy array, compiles a small program per shape.
    converted.append((path, variable.replace(jax.device_put(value.astype(variable.dtype)))))
  if missing or unexpected or mismatched:
    problems = []
    if missing:
      problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
      problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
      problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    description = model_description or type(model).__name__
    raise ValueError(f"checkpoint does not fit {description}: " + " | ".join(problems))
  return nnx.from_flat_state(converted)


def load_torch_model(name: str, state_dict: Mapping[str, Any], **create_kwargs) -> nnx.Module:
  """`create(name, **create_kwargs)` holding the weights of a PyTorch state dict.

  The model is built abstractly (`nnx.eval_shape`), so no random initialisation is computed only
  to be overwritten; every `nnx.Param` and `nnx.BatchStat` then comes from the checkpoint.

  Args:
    name: a registered model name (`jaxkd.models.names()`).
    state_dict: {key: torch.Tensor | np.ndarray}, or a checkpoint holding one under 'model' /
      'state_dict' (see `unwrap_state_dict`).
    **create_kwargs: passed to `create`; `num_classes` is read off the classifier weight when
      absent.

  Raises:
    ValueError: unknown model, or one error listing every missing key, unexpected key and shape
      mismatch.
  """
  arrays = unwrap_state_dict(state_dict)
  model = None
  if create_kwargs.get("num_classes") is None:
    # A checkpoint with the default head (CIFAR-100, ImageNet-1k) reuses the default build.
    num_classes, model = _infer_num_classes(name, arrays, create_kwargs)
    create_kwargs = dict(create_kwargs, num_classes=num_classes)
  if model is None:
    model = nnx.eval_shape(lambda: create(name, **create_kwargs))
  nnx.update(
    model,
    convert_state_dict(
      model,
      arrays,
      model_description=f"model {name!r} (num_classes={create_kwargs['num_classes']})",
    ),
  )
  return model


def load_torch_state_dict(name: str, state_dict: Mapping[str, Any], **create_kwargs) -> nnx.State:
  """The params and BatchNorm statistics of `load_torch_model(name, state_dict, **create_kwargs)`.

  Returns:
    The `nnx.State` of the model's `nnx.Param` and `nnx.BatchStat` variables, in the model's
    param dtype (BatchNorm statistics in float32), for `nnx.update` of a model of the same
    structure.
  """
  model = load_torch_model(name, state_dict, **create_kwargs)
  return nnx.state(model, (nnx.Param, nnx.BatchStat))
