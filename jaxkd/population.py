"""Student populations: P students trained in one compiled step, sharing the view and the teacher.

The one owner of populations: the sweep is parsed here (`parse`), members are named and
initialised here (`init`), and the one-student step of `jaxkd.step` becomes a population step
here (`train_step`, `eval_step`): the view and the teacher's outputs are computed once, then the
student half of the step (`jaxkd.step.update`) runs for every member, `jax.vmap`ped over the
stacked states, or in unrolled groups on XLA:CPU (see `train_step`). No other module needs the
population's size.

What varies between members is *data*, not program:

* loss weights and loss hyper-parameters: the step's ``hparams`` argument, stacked ``[P]``;
* the learning rate: a multiplier of the optimiser's update (`with_learning_rate_scale`,
  ``'learning_rate_scale'``; exact for SGD/momentum, Adam, AdamW, whose updates are linear in the
  learning rate, and it keeps the base schedule);
* the seed: member ``i``'s ``TrainState.rng`` (CRD negatives, dropout) and its initial weights.

The config expresses the sweep, one list of ``size`` values per key; a `ml_collections.ConfigDict`
refuses dots in field names, so keys nest::

    config.population = dict(size=4, sweep={'kd': {'temperature': [1., 2., 4., 8.]}})
    config.population = dict(size=3, sweep={'losses': {'kd': [0.5, 0.9, 1.0]}, 'seed': [0, 1, 2]})

Keys: ``'<loss>.<hparam>'``, ``'losses.<loss>'`` (weights), ``'seed'``, ``'learning_rate_scale'``.
Members share the data order and the augmented views (member 0's key draws them), so a sweep
compares hyper-parameters on identical data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd import distill, step, tasks
from jaxkd.state import TrainState, step_key

SEED_KEY = "seed"
LEARNING_RATE_SCALE_KEY = "learning_rate_scale"


@dataclasses.dataclass(frozen=True)
class Members:
  """A parsed population: one ``{sweep key: value}`` dict per member, and the members' names."""

  overrides: tuple[Mapping[str, Any], ...]
  names: tuple[str, ...]

  @property
  def size(self) -> int:
    return len(self.overrides)

  @property
  def swept_keys(self) -> tuple[str, ...]:
    return tuple(self.overrides[0])


def _flatten(sweep: Mapping[str, Any], prefix: str = "") -> dict[str, list]:
  """Dotted keys from nested mappings: ``{'kd': {'temperature': [...]}}`` → ``'kd.temperature'``."""
  flat = {}
  for key, value in sweep.items():
    if hasattr(value, "items"):
      flat.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(value, (list, tuple)):
      flat[f"{prefix}{key}"] = list(value)
    else:
      raise ValueError(
        f"population.sweep {prefix}{key}={value!r}: must be a list of one value per member"
      )
  return flat


def parse(population_config: Mapping[str, Any]) -> Members | None:
  """`config.population` → `Members`, or None for a single student (``size == 1``, no sweep).

  Raises ValueError naming the problem (a size below 1, a sweep list of the wrong length).
  """
  size = int(population_config["size"])
  sweep = _flatten(population_config.get("sweep") or {})
  if size < 1:
    raise ValueError(f"population.size={size}: must be 1 (one student) or more")
  for key, values in sweep.items():
    if len(values) != size:
      raise ValueError(f"population.sweep {key!r} has {len(values)} values for {size} members")
  if size == 1 and not sweep:
    return None
  if not sweep:
    raise ValueError(
      f"population.size={size}: without population.sweep the members are identical; sweep a "
      f"key with {size} values (e.g. seed)"
    )
  overrides = tuple({key: values[i] for key, values in sweep.items()} for i in range(size))
  names = tuple(
    ",".join(f"{key}={value}" for key, value in member.items()) or f"member{index}"
    for index, member in enumerate(overrides)
  )
  return Members(overrides=overrides, names=names)


def check(members: Members, hparams: Mapping[str, Any]) -> None:
  """ValueError for a sweep key the method or the optimiser cannot vary, or a bad value."""
  sweepable = sorted(f"{group}.{name}" for group, values in hparams.items() for name in values)
  for key in members.swept_keys:
    if key in (SEED_KEY, LEARNING_RATE_SCALE_KEY):
      continue
    group, _, name = key.partition(".")
    if group not in hparams or name not in hparams[group]:
      raise ValueError(
        f"population.sweep cannot sweep {key!r}; sweepable keys: {', '.join(sweepable)}, "
        f"{SEED_KEY}, {LEARNING_RATE_SCALE_KEY}"
      )
    for value in (member[key] for member in members.overrides):
      distill.check_hparam(group, name, float(value))
  for member in members.overrides:
    scale = member.get(LEARNING_RATE_SCALE_KEY, 1.0)
    if not scale > 0:
      raise ValueError(f"population.sweep {LEARNING_RATE_SCALE_KEY}={scale!r}: must be positive")


def with_learning_rate_scale(
  optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """`optimizer` followed by an injected ``step_size`` multiplier (1 by default), sweepable as
  ``'learning_rate_scale'``."""
  return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def optimizer(members: Members | None, base: optax.GradientTransformation):
  """The optimiser the members need: `base`, with the learning-rate multiplier if swept."""
  if members is not None and LEARNING_RATE_SCALE_KEY in members.swept_keys:
    return with_learning_rate_scale(base)
  return base


def _is_injected(node) -> bool:
  return isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def _set_step_size(opt_state, value: float):
  """Sets the injected ``step_size`` of `with_learning_rate_scale`'s state."""

  def set_value(node):
    if _is_injected(node) and "step_size" in node.hyperparams:
      size = jnp.asarray(value, node.hyperparams["step_size"].dtype)
      return node._replace(hyperparams={**node.hyperparams, "step_size": size})
    return node

  return jax.tree.map(set_value, opt_state, is_leaf=_is_injected)


def _member_hparams(hparams: Mapping[str, Any], overrides: Mapping[str, Any]):
  member = {group: dict(values) for group, values in hparams.items()}
  for key, value in overrides.items():
    if key not in (SEED_KEY, LEARNING_RATE_SCALE_KEY):
      group, _, name = key.partition(".")
      member[group][name] = float(value)
  return jax.tree.map(jnp.float32, member)


def member_seeds(members: Members, seed: int) -> list[int]:
  """Member ``i``'s seed: ``sweep['seed'][i]`` if swept, else ``seed + i``."""
  return [int(member.get(SEED_KEY, seed + i)) for i, member in enumerate(members.overrides)]


def stack(trees: Sequence[Any]) -> Any:
  """Stacks pytrees of one structure on a new leading axis, on the host (numpy)."""
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *trees)


def init(
  members: Members,
  make_state: Callable[[int, bool], TrainState],
  hparams: Mapping[str, Any],
  *,
  seed: int,
) -> tuple[TrainState, Any]:
  """The stacked initial states and hyper-parameters of the members (leading axis = member).

  Args:
    members: from `parse`.
    make_state: ``(seed, new_weights) -> TrainState`` of one student whose RNG stream is drawn
      from `seed`; its initial weights too when `new_weights` (a swept seed), else every
      member starts from the same weights.
    hparams: the method's hyper-parameters (`jaxkd.distill.Method.hparams`), before the sweep.
    seed: the base seed (see `member_seeds`).
  """
  states, member_hparams = [], []
  for member_seed, overrides in zip(member_seeds(members, seed), members.overrides):
    state = make_state(member_seed, SEED_KEY in overrides)
    if LEARNING_RATE_SCALE_KEY in overrides:
      state = state.replace(
        opt_state=_set_step_size(state.opt_state, overrides[LEARNING_RATE_SCALE_KEY])
      )
    states.append(state)
    member_hparams.append(_member_hparams(hparams, overrides))
  return stack(states), stack(member_hparams)


def train_step(
  learner: step.Learner, states: TrainState, hparams, batch, teacher, *, chunk: int | None
):
  """`jaxkd.step.train_step` for stacked members: one view and one teacher forward, shared.

  `chunk`: members updated together. ``None`` vmaps all of them at once; ``k`` splits them into
  groups of ``k`` vmapped members, unrolled one after the other in the one compiled step.
  Vmapping a convolution over stacked kernels makes it a grouped convolution, which XLA's CPU
  backend runs slower than the separate convolutions, so ``k = 1`` is the fast setting there
  (BENCHMARKS.md); accelerators prefer one vmap. Same results either way.
  """
  first = jax.tree.map(lambda leaf: leaf[0], states)  # member 0's key draws the shared view
  view = learner.task.view(batch, step_key(first, step.VIEW_STREAM))
  teacher_outputs = teacher(view, batch)

  def update(member_states, member_hparams):
    return jax.vmap(
      lambda state, hp: step.update(learner, state, hp, view, batch, teacher_outputs)
    )(member_states, member_hparams)

  size = jax.tree.leaves(states)[0].shape[0]
  if chunk is None or chunk >= size:
    return update(states, hparams)
  groups = [
    update(*jax.tree.map(lambda leaf, start=start: leaf[start : start + chunk], (states, hparams)))
    for start in range(0, size, chunk)
  ]
  return jax.tree.map(lambda *parts: jnp.concatenate(parts), *groups)


def eval_step(learner: step.Learner, states: TrainState, batch, teacher):
  """`jaxkd.step.eval_step` for stacked members: the teacher runs once; sums are ``[P]``."""
  view = learner.task.view(batch, None)
  teacher_logits = teacher(view, batch).logits
  teacher_logits = None if teacher_logits is None else tasks.dense_logits(teacher_logits)
  return jax.vmap(lambda state: step.evaluate(learner, state, view, batch, teacher_logits))(states)


def unstack(tree: Any) -> list[Any]:
  """Every member of a stacked tree (state, metrics, evaluation sums)."""
  size = int(np.shape(jax.tree.leaves(tree)[0])[0])
  return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(size)]
