"""`TrainState`: what one student carries from step to step, and what a checkpoint holds.

Models cross the `jax.jit` boundary as state pytrees: `nnx.split` once outside the step,
`nnx.merge` of the static graph definition with traced state inside it. The loss weights,
temperatures and other traced hyper-parameters are not part of the state: they are an argument
of the step (`jaxkd.distill.Method.hparams`), read from the config on every run, so a resumed
run follows the config it is started with and a population can vary them per member.
"""

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and checkpoints).

  Attributes:
    step: int32 scalar, the number of updates applied.
    student: the student's full `nnx.State` (parameters, batch statistics, RNG counters).
    adapters: the `nnx.State` of the method's adapter modules (empty for logit-only methods).
    opt_state: optax state over ``{'student': params, 'adapters': params}``.
    method_state: non-trainable method state by loss name (CRD memory banks).
    rng: uint32[2] key data; step k's randomness is ``fold_in(rng, k)``, so a resumed run
      reproduces the uninterrupted one.
  """

  step: jax.Array
  student: nnx.State
  adapters: nnx.State
  opt_state: optax.OptState
  method_state: dict
  rng: jax.Array


def split_params(state: nnx.State) -> tuple[nnx.State, nnx.State]:
  """``(parameters, everything else)`` of a module state."""
  return nnx.split_state(state, nnx.Param, ...)


def trainable(student: nnx.State, adapters: nnx.State) -> dict[str, nnx.State]:
  """The tree the optimiser updates: ``{'student': params, 'adapters': params}``."""
  return {"student": split_params(student)[0], "adapters": split_params(adapters)[0]}


def create(
  student: nnx.Module,
  adapters: nnx.Module,
  method_state: dict,
  optimizer: optax.GradientTransformation,
  seed: int,
) -> TrainState:
  """The initial `TrainState` of `student` and the method's `adapters`, on the host."""
  student_state, adapter_state = nnx.state(student), nnx.state(adapters)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    student=student_state,
    adapters=adapter_state,
    opt_state=optimizer.init(trainable(student_state, adapter_state)),
    method_state=method_state,
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def step_key(state: TrainState, stream: int) -> jax.Array:
  """The PRNG key of `stream` at the state's step: ``fold_in(fold_in(key(rng), step), stream)``.

  Stream 0 draws the augmented view, stream 1 the method's randomness (CRD negatives).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  return jax.random.fold_in(key, stream)
