"""Saving and loading a whole model (architecture name + weights) as an orbax checkpoint.

This is the format a config names as a teacher (`config.teacher.checkpoint = DIR`), and the one
`python -m jaxkd.tools.import_torch` writes. DIR (local or ``gs://``) holds `model.json` (the
`create` arguments) and `state/` (the model's `nnx.State`, params and BatchNorm statistics, as a
pure dict).

A saved model is portable: it loads on any device count and mesh, whatever mesh it was saved
from, because `load` names the layout to read into (one device, or the FSDP rule of
`jaxkd.parallel` on a given mesh) instead of the saved one. `model.json` is written last, so a
directory with one is complete; `load` checks it against the weights (architecture, shapes)
before reading them and names the first difference.
"""

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxkd import parallel
from jaxkd.checkpoint import (
  as_path,
  describe_error,
  layout_difference,
  quiet_orbax_errors,
  quietly,
)
from jaxkd.errors import CheckpointError, CheckpointNotFoundError
from jaxkd.models.registry import create

_METADATA = "model.json"
_STATE = "state"


def save(directory: str | os.PathLike, model: nnx.Module, name: str, **create_kwargs) -> None:
  """Writes `model` under `directory`, replacing any model there. Call it on every process.

  `create(name, **create_kwargs)` must rebuild the model's structure.

  Raises:
    CheckpointError: the directory cannot be written (the message names it and the OS error).
  """
  directory = as_path(directory)
  metadata_path = directory / _METADATA
  quiet_orbax_errors()

  def write():
    if jax.process_index() == 0:
      directory.mkdir(parents=True, exist_ok=True)
      # Until the new weights are complete the directory must not claim to hold a model.
      if metadata_path.exists():
        metadata_path.unlink()
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(directory / _STATE, nnx.to_pure_dict(nnx.state(model)), force=True)
    if jax.process_index() == 0:
      metadata_path.write_text(json.dumps({"name": name, "create_kwargs": create_kwargs}, indent=2))

  _, reason = quietly(write, errors=(OSError, ValueError))
  if reason:
    raise CheckpointError(f"cannot write the model to {directory}: {reason}")


def read_metadata(directory: str | os.PathLike) -> dict:
  """The `{'name': ..., 'create_kwargs': {...}}` record of a saved model.

  Raises:
    CheckpointNotFoundError: (also a FileNotFoundError) no `model.json` in `directory`.
    CheckpointError: `model.json` is not such a record.
  """
  path = as_path(directory) / _METADATA
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise CheckpointNotFoundError(
      f"{directory} is not a jaxkd model checkpoint (no {_METADATA}); write one with "
      "jaxkd.models.io.save or `python -m jaxkd.tools.import_torch`"
    ) from None
  except OSError as error:
    raise CheckpointError(f"cannot read {path}: {describe_error(error)}") from error
  try:
    record = json.loads(text)
  except ValueError as error:
    raise CheckpointError(f"{path} is not valid JSON ({error}); re-export the model") from None
  if (
    not isinstance(record, dict)
    or not isinstance(record.get("name"), str)
    or not isinstance(record.get("create_kwargs"), dict)
  ):
    raise CheckpointError(
      f"{path} is not a model record: expected {{'name': str, 'create_kwargs': dict}}, got "
      f"{text[:80]!r}"
    )
  return record


def abstract_model(directory: str | os.PathLike, *, dtype=jnp.float32) -> nnx.Module:
  """The saved model built abstractly (shapes, no weights, no FLOPs), after checking that
  `model.json` describes the saved weights: cheap enough to run before anything is compiled.

  Raises:
    CheckpointNotFoundError: no model there.
    CheckpointError: `model.json` names no buildable model, or one whose arrays differ from the
      saved ones (the message names the path and the first difference), or the weights'
      metadata cannot be read.
  """
  record = read_metadata(directory)
  metadata_path = as_path(directory) / _METADATA
  state_path = as_path(directory) / _STATE
  description = f"{record['name']}({_kwargs_text(record['create_kwargs'])})"
  try:
    # Abstract: random initialisation would compile one kernel per parameter shape (tens of
    # seconds for a CIFAR ResNet on CPU) only for the weights to be overwritten.
    model = nnx.eval_shape(lambda: create(record["name"], dtype=dtype, **record["create_kwargs"]))
  except (TypeError, ValueError) as error:
    raise CheckpointError(
      f"{metadata_path} names a model that cannot be built, {description}: "
      f"{' '.join(str(error).split())}"
    ) from None
  quiet_orbax_errors()
  saved, reason = quietly(lambda: ocp.StandardCheckpointHandler().metadata(state_path))
  if reason:
    raise CheckpointError(f"cannot read the weights in {state_path}: {reason}")
  difference = layout_difference(saved, nnx.to_pure_dict(nnx.state(model)))
  if difference:
    raise CheckpointError(
      f"{metadata_path} describes {description}, but the weights in {state_path} do not match "
      f"it: {difference}"
    )
  return model


def load(directory: str | os.PathLike, *, dtype=jnp.float32, mesh: Mesh | None = None):
  """Rebuilds the saved model with compute `dtype` and restores its weights.

  Args:
    directory: what `save` wrote (local or ``gs://``).
    dtype: the compute dtype of the rebuilt model (weights take its parameter dtype).
    mesh: place the weights on this mesh following `jaxkd.parallel.state_shardings` (FSDP rule;
      replicated when its 'fsdp' axis is 1). None: whole on the first local device.

  Raises:
    CheckpointNotFoundError: no model there.
    CheckpointError: as `abstract_model`, or the weights cannot be read.
  """
  model = abstract_model(directory, dtype=dtype)
  abstract_state = nnx.to_pure_dict(nnx.state(model))
  if mesh is None:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), abstract_state)
  else:
    shardings = parallel.state_shardings(mesh, abstract_state)
  target = jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
    abstract_state,
    shardings,
  )
  state_path = as_path(directory) / _STATE
  restored, reason = quietly(lambda: _restore(state_path, target))
  if reason:
    raise CheckpointError(f"cannot read the weights in {state_path}: {reason}")
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model


def _restore(path, target):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


def _kwargs_text(kwargs: Mapping) -> str:
  return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
