"""Name → constructor registry behind `jaxkd.models.create`."""

from typing import Callable

import jax.numpy as jnp
from flax import nnx

_CONSTRUCTORS: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str):
  """Decorator: registers `fn(*, num_classes, dtype, param_dtype, rngs, **kwargs) -> nnx.Module`."""

  def wrap(fn):
    if name in _CONSTRUCTORS:
      raise ValueError(f"model {name!r} is registered twice")
    _CONSTRUCTORS[name] = fn
    return fn

  return wrap


def names() -> list[str]:
  """Sorted names of every registered model."""
  return sorted(_CONSTRUCTORS)


def check_name(name: str) -> None:
  """Raises a ValueError listing the known models (and a near miss) if `name` is not one."""
  if name not in _CONSTRUCTORS:
    # Reference names differ only in case across families: CIFAR `ResNet18` (mdistiller) vs
    # ImageNet `resnet18` (torchvision).
    same_but_case = [known for known in names() if known.lower() == name.lower()]
    hint = f" (did you mean {' or '.join(map(repr, same_but_case))}?)" if same_but_case else ""
    raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(names())}")


def create(
  name: str,
  *,
  num_classes: int | None = None,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  seed: int = 0,
  rngs: nnx.Rngs | None = None,
  **kwargs,
) -> nnx.Module:
  """Builds model `name`; `dtype` is the compute dtype, `param_dtype` the storage dtype.

  `num_classes=None` keeps the architecture's default head size (vocab size for LMs).
  """
  check_name(name)
  if rngs is None:
    rngs = nnx.Rngs(seed)
  if num_classes is not None:
    kwargs["num_classes"] = num_classes
  return _CONSTRUCTORS[name](dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)
