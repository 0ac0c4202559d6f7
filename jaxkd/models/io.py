"""Saving and loading a whole model (architecture name + weights) as an orbax checkpoint.

This is the format a config names as a teacher (`config.teacher.checkpoint = DIR`), and the one
`python -m jaxkd.tools.import_torch` writes. DIR holds `model.json` (the `create` arguments) and
`state/` (the model's `nnx.State`, params and BatchNorm statistics, as a pure dict).
"""

import json
import os

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxkd.models.registry import create

_METADATA = "model.json"
_STATE = "state"


def save(directory: str, model: nnx.Module, name: str, **create_kwargs) -> None:
  """Writes `model` under `directory`.

  `create(name, **create_kwargs)` must rebuild the model's structure.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _METADATA), "w") as f:
    json.dump({"name": name, "create_kwargs": create_kwargs}, f, indent=2)
  state = nnx.to_pure_dict(nnx.state(model))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, _STATE), state, force=True)


def read_metadata(directory: str) -> dict:
  """The `{'name': ..., 'create_kwargs': {...}}` record of a saved model; clear error if absent."""
  path = os.path.join(os.path.abspath(directory), _METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{directory} is not a jaxkd model checkpoint (no {_METADATA}); write one with "
      "jaxkd.models.io.save or `python -m jaxkd.tools.import_torch`"
    )
  with open(path) as f:
    return json.load(f)


def load(directory: str, *, dtype=jnp.float32) -> nnx.Module:
  """Rebuilds the saved model with compute `dtype` and restores its weights."""
  metadata = read_metadata(directory)
  # Abstract construction: random initialisation would compile one kernel per parameter shape
  # (tens of seconds for a CIFAR ResNet on CPU) only for the weights to be overwritten.
  model = nnx.eval_shape(lambda: create(metadata["name"], dtype=dtype, **metadata["create_kwargs"]))
  abstract_state = nnx.to_pure_dict(nnx.state(model))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      os.path.join(os.path.abspath(directory), _STATE), abstract_state
    )
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model
