"""Student populations: P students trained in one compiled step by vmapping the update.

A population stacks P `TrainState`s on a leading axis; `jaxkd.step.make_train_step(...,
population_size=P)` vmaps the student update over it while the teacher forward and the augmented
view are computed once and shared. What varies between members must therefore be *data*, not
program:

* loss weights and loss hyper-parameters live in ``TrainState.hparams`` (traced float32);
* the learning rate lives in the optimiser state, with ``optax.inject_hyperparams``
  (``'learning_rate'``), or as a multiplier of any optimiser's update via
  `with_learning_rate_scale` (``'learning_rate_scale'``; exact for SGD/momentum, Adam, AdamW,
  whose updates are linear in the learning rate, and it keeps the base schedule);
* the seed: member ``i``'s ``TrainState.rng`` (CRD negatives, dropout) and, given
  ``make_student``, its initial weights.

The config expresses the sweep, one list of ``size`` values per key::

    config.population = dict(size=4, sweep={'kd.temperature': [1, 2, 4, 8]})
    config.population = dict(size=3, sweep={'losses': {'kd': [0.5, 0.9, 1.0]}, 'seed': [0, 1, 2]})

(A `ml_collections.ConfigDict` refuses dots in field names: nest the keys there, as in the
second line.)

Keys: ``'<loss>.<hparam>'`` (e.g. ``'kd.temperature'``, ``'dkd.beta'``), ``'losses.<loss>'``
(weights), ``'seed'``, ``'learning_rate'``, ``'learning_rate_scale'``. Members share the data
order and the augmented views (member 0's key draws them), so a sweep compares hyper-parameters
on identical data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd import distill, parallel
from jaxkd.step import TrainState, create_state, stack_trees

SEED_KEY = "seed"
LEARNING_RATE_KEY = "learning_rate"
LEARNING_RATE_SCALE_KEY = "learning_rate_scale"


def with_learning_rate_scale(
  optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """`optimizer` followed by an injected ``step_size`` multiplier (1 by default), sweepable as
  ``'learning_rate_scale'``."""
  return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def _flatten_sweep(sweep: Mapping[str, Any], prefix: str = "") -> dict[str, Sequence[Any]]:
  """Dotted keys from nested mappings.

  ``{'kd': {'temperature': [...]}}`` becomes ``{'kd.temperature': [...]}``.
  """
  flat = {}
  for key, value in sweep.items():
    if hasattr(value, "items"):
      flat.update(_flatten_sweep(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value)
  return flat


def member_overrides(population_config: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One ``{sweep key: value}`` dict per member, from ``{'size': P, 'sweep': {key: [P values]}}``.

  Sweep keys are dotted (``'kd.temperature'``) or nested (``{'kd': {'temperature': [...]}}``,
  the form an `ml_collections.ConfigDict` accepts, since it refuses dots in field names).
  """
  size = int(population_config["size"])
  sweep = _flatten_sweep(population_config.get("sweep") or {})
  for key, values in sweep.items():
    if len(values) != size:
      raise ValueError(f"population sweep {key!r} has {len(values)} values for {size} members")
  return [{key: values[i] for key, values in sweep.items()} for i in range(size)]


def _set_hparam(hparams: dict, key: str, value: float) -> None:
  group, _, name = key.partition(".")
  if group not in hparams or name not in hparams[group]:
    known = sorted(f"{g}.{n}" for g, values in hparams.items() for n in values)
    raise ValueError(
      f"cannot sweep {key!r}; sweepable keys: {', '.join(known)}, {SEED_KEY}, "
      f"{LEARNING_RATE_KEY}, {LEARNING_RATE_SCALE_KEY}"
    )
  hparams[group][name] = jnp.float32(value)


def _is_injected(node) -> bool:
  return isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def _set_injected(opt_state, name: str, value: float, key: str):
  """Sets hyper-parameter `name` of every `optax.inject_hyperparams` state holding it."""
  found = []

  def set_value(node):
    if _is_injected(node) and name in node.hyperparams:
      found.append(node)
      return node._replace(
        hyperparams={**node.hyperparams, name: jnp.asarray(value, node.hyperparams[name].dtype)}
      )
    return node

  opt_state = jax.tree.map(set_value, opt_state, is_leaf=_is_injected)
  if not found:
    hint = (
      "optax.inject_hyperparams(optax.sgd)(learning_rate=...)"
      if key == LEARNING_RATE_KEY
      else "jaxkd.population.with_learning_rate_scale(optimizer)"
    )
    raise ValueError(f"sweeping {key!r} needs an optimizer built with {hint}")
  return opt_state


def init_population(
  student: nnx.Module,
  method: distill.Method,
  optimizer: optax.GradientTransformation,
  population_config: Mapping[str, Any],
  seed: int = 0,
  mesh: jax.sharding.Mesh | None = None,
  make_student: Callable[[int], nnx.Module] | None = None,
) -> TrainState:
  """The stacked `TrainState` of a population (leading axis = member).

  Args:
    student: the student model (all members' initial weights, unless `make_student`).
    method, optimizer: as for `jaxkd.step.init_state` (the optimizer must carry the injected
      hyper-parameters the sweep sets).
    population_config: ``{'size': P, 'sweep': {key: [P values]}}``.
    seed: the base seed; member ``i`` uses ``sweep['seed'][i]`` if swept, else ``seed + i``.
    mesh: place the state on it (member axis replicated, the rest by the FSDP rule).
    make_student: ``seed -> model``; when given, each member starts from its own seed's
      weights (needed for a seed sweep to change initial weights, not only the RNG stream).
  """
  members = []
  for index, overrides in enumerate(member_overrides(population_config)):
    member_seed = int(overrides.get(SEED_KEY, seed + index))
    model = make_student(member_seed) if make_student is not None else student
    state = create_state(model, method, optimizer, seed=member_seed)
    hparams = jax.tree.map(lambda x: x, state.hparams)  # a fresh nested dict to edit
    opt_state = state.opt_state
    for key, value in overrides.items():
      if key == SEED_KEY:
        continue
      if key == LEARNING_RATE_KEY:
        opt_state = _set_injected(opt_state, "learning_rate", value, key)
      elif key == LEARNING_RATE_SCALE_KEY:
        opt_state = _set_injected(opt_state, "step_size", value, key)
      else:
        _set_hparam(hparams, key, value)
    members.append(state.replace(hparams=hparams, opt_state=opt_state))
  stacked = stack_trees(members)
  return parallel.shard_state(mesh, stacked, leading_axes=1) if mesh is not None else stacked


def size(state: TrainState) -> int:
  return int(np.shape(state.step)[0])


def member(tree: Any, index: int) -> Any:
  """Member `index` of a stacked tree (state, metrics, eval sums)."""
  return jax.tree.map(lambda leaf: leaf[index], tree)


def unstack(tree: Any) -> list[Any]:
  """All members of a stacked tree, e.g. to checkpoint each member's `TrainState` on its own."""
  count = int(np.shape(jax.tree.leaves(tree)[0])[0])
  return [member(tree, index) for index in range(count)]


def member_metrics(metrics: Mapping[str, jax.Array]) -> list[dict[str, float]]:
  """Per-member metric dicts of Python floats, for logging each member separately."""
  host = jax.device_get(metrics)
  return [{name: float(value) for name, value in entry.items()} for entry in unstack(host)]


def member_names(population_config: Mapping[str, Any]) -> list[str]:
  """Readable member names from the sweep, e.g. ``'kd.temperature=4'``, for workdirs and logs."""
  return [
    ",".join(f"{key}={value}" for key, value in overrides.items()) or f"member{index}"
    for index, overrides in enumerate(member_overrides(population_config))
  ]


def stack(states: Sequence[TrainState]) -> TrainState:
  """Stacks single `TrainState`s into a population state (e.g. members restored one by one)."""
  return stack_trees(states)
