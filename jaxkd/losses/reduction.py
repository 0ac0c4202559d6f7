"""The reduction shared by every logit loss, and the hyperparameter checks shared by every loss.

Reference implementations disagree on how a per-class divergence becomes a scalar, and the
choice changes the loss scale by a factor of the number of classes. The four reductions:

* ``'batchmean'``: sum over the class axis, mean over every other position. torch
  ``kl_div(reduction='batchmean')``, RepDistiller ``size_average=False`` then ``/ B``,
  mdistiller ``.sum(1).mean()``, TRL ``jsd.sum() / mask.sum()`` and DistiLLM's per-token mean.
* ``'mean'``: mean over every element, class axis included: torch ``reduction='mean'``,
  TRL ``reduction='mean'``, torch ``F.mse_loss``.
* ``'sum'``: sum over everything.
* ``'none'``: the per-example values (class axis summed), leading dimensions kept.

:func:`check_arguments` refuses a concrete hyperparameter outside its domain (a temperature of 0, a
negative weight, a mixture coefficient outside [0, 1]) with a ValueError naming it. Traced values
(under ``jax.jit``, ``vmap`` or ``grad``) cannot be inspected and pass unchecked.
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Reduction = Literal["batchmean", "mean", "sum", "none"]
REDUCTIONS = ("batchmean", "mean", "sum", "none")


def position_mask_and_class_counts(
  where: jax.typing.ArrayLike | None,
  shape: tuple[int, ...],
  axis: int = -1,
) -> tuple[jax.Array | None, jax.Array | int]:
  """Splits an element mask into the positions that count and their class counts.

  Args:
    where: boolean mask broadcastable to ``shape`` (an optax-style ``where``; a mask
      without the class axis is expanded along ``axis``), or None for all elements.
    shape: shape of the logits, class axis included.
    axis: the class axis.

  Returns:
    ``(positions, class_counts)``: ``positions`` is a boolean array of ``shape`` without
    ``axis`` (True where at least one class is included) or None; ``class_counts`` is the
    number of included classes per position (an int when ``where`` is None).
  """
  num_classes = shape[axis]
  if where is None:
    return None, num_classes
  where = expand_class_mask(where, len(shape), axis)
  where = jnp.broadcast_to(where, shape)
  return jnp.any(where, axis=axis), jnp.sum(where, axis=axis)


def expand_class_mask(where: jax.typing.ArrayLike, ndim: int, axis: int) -> jax.Array:
  """Adds the class axis to a per-position mask, as optax's losses do."""
  where = jnp.asarray(where, dtype=bool)
  if where.ndim == ndim - 1:
    where = jnp.expand_dims(where, axis)
  return where


def reduce_loss(
  per_example: jax.Array,
  reduction: Reduction,
  *,
  positions: jax.Array | None = None,
  class_counts: jax.Array | int | None = None,
) -> jax.Array:
  """Reduces per-example loss values (class axis already summed) to the requested form.

  Args:
    per_example: float array ``[...]``, one value per position.
    reduction: one of ``'batchmean'``, ``'mean'``, ``'sum'``, ``'none'`` (module docstring).
    positions: optional boolean ``[...]``; positions that are False contribute zero and are
      left out of the ``'batchmean'`` and ``'mean'`` denominators.
    class_counts: number of classes behind each value, ``'mean'``'s extra denominator.
      None for losses that are not a sum of per-class terms, which then reject ``'mean'``.

  Returns:
    A float32 scalar, or ``per_example`` (zeroed where ``positions`` is False) for 'none'.
    With no counted position, 'batchmean' and 'mean' return 0 rather than 0/0.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  per_example = jnp.asarray(per_example, jnp.float32)
  if positions is not None:
    per_example = jnp.where(positions, per_example, 0.0)
  if reduction == "none":
    return per_example
  total = jnp.sum(per_example)
  if reduction == "sum":
    return total
  if reduction == "mean":
    if class_counts is None:
      raise ValueError(
        "reduction='mean' averages over the class axis, which this loss does not "
        "have as a sum of per-class terms; use 'batchmean', 'sum' or 'none'."
      )
    counts = jnp.broadcast_to(jnp.asarray(class_counts, jnp.float32), per_example.shape)
  else:
    counts = jnp.ones(per_example.shape, jnp.float32)
  if positions is not None:
    counts = jnp.where(positions, counts, 0.0)
  count = jnp.sum(counts)
  return total / jnp.maximum(count, 1.0)


class Domain(NamedTuple):
  """The values a hyperparameter may take: a description for the error and an elementwise test."""

  description: str
  contains: Callable[[np.ndarray], np.ndarray]


def _is_integer(values: np.ndarray) -> np.ndarray:
  return np.isfinite(values) & (values == np.floor(values))


POSITIVE = Domain("a finite number > 0", lambda v: np.isfinite(v) & (v > 0))
NON_NEGATIVE = Domain("a finite number >= 0", lambda v: np.isfinite(v) & (v >= 0))
# +inf is a meaningful offset (dkd's exact removal of the ground-truth class).
NON_NEGATIVE_OR_INF = Domain("a number >= 0 (inf allowed)", lambda v: v >= 0)
FINITE = Domain("a finite number", np.isfinite)
UNIT_INTERVAL = Domain("a number in [0, 1]", lambda v: (v >= 0) & (v <= 1))
POSITIVE_INTEGER = Domain("an integer >= 1", lambda v: _is_integer(v) & (v >= 1))
NON_NEGATIVE_INTEGER = Domain("an integer >= 0", lambda v: _is_integer(v) & (v >= 0))


def check_arguments(function: str, **arguments: tuple[Any, Domain]) -> None:
  """Raises a ValueError naming the first concrete argument outside its domain.

  NaN is outside every domain. An array argument (per-example weights) must lie in the domain
  everywhere. Traced values cannot be inspected here and pass; the caller refuses bad config values
  before compiling.

  Args:
    function: the loss's name, for the message.
    **arguments: ``name=(value, domain)`` for each hyperparameter to check.

  Raises:
    ValueError: ``"<function>: <name> must be <domain>, got <value>"``.
  """
  for name, (value, domain) in arguments.items():
    if isinstance(value, jax.core.Tracer):
      continue
    if not np.all(domain.contains(np.asarray(value, np.float64))):
      raise ValueError(f"{function}: {name} must be {domain.description}, got {value!r}")
