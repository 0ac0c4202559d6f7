"""The distillation step: teacher forward, student forward, loss, update — one `jax.jit`.

Per step, inside one compiled function (big_vision's distillation trainer)::

    images  = augment(rng, batch['image'])                 # once: teacher and student see one view
    teacher = stop_gradient(teacher(images, train=False))  # eval mode: BN running statistics
    grads   = ∇ method.loss(student(images, train=True), teacher, adapters(...))
    state   = optimizer update of (student params, adapter params); new BN statistics

Models cross the `jax.jit` boundary as state pytrees: `nnx.split` once outside, `nnx.merge` of the
static graph definition with traced state inside, and the updated state (parameters, batch
statistics, RNG counters) split out again. The step is a pure function of
``(state, teacher_state, batch)``; the state is donated.

Sharding (see `jaxkd.parallel`): the batch is split over every device, the state follows the FSDP
rule, metrics are replicated; all pinned with explicit `NamedSharding`s on the jit boundary.
BatchNorm statistics are means over the *global* batch: under `jax.jit` a sharded array is one
logical array, and the partitioner turns the batch-axis mean into a cross-device all-reduce. So a
step on 8 devices computes exactly what the 1-device step computes (tests/test_step.py checks it
to 1e-5), unlike `pmap`-style per-device BatchNorm.

Ensembles (a list of teachers of one architecture) stack the teachers' states on a leading axis
and `jax.vmap` the teacher forward over it. Populations (`jaxkd.population`) stack whole
TrainStates and `jax.vmap` the student update over them, sharing the teacher forward and the view.
Cached teachers (`jaxkd.teacher_cache`) put the teacher's logits in the batch; the step then runs
no teacher at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd import distill, parallel
from jaxkd.losses import logit

Augment = Callable[[jax.Array, jax.Array], jax.Array]
EnsembleRule = Literal["mean_logits", "mean_probs", "per_teacher"]
ENSEMBLE_RULES = ("mean_logits", "mean_probs", "per_teacher")
# Batch keys through which a cached teacher arrives (written by jaxkd.teacher_cache).
CACHED_DENSE = "teacher_logits"
CACHED_SPARSE = ("teacher_topk_ids", "teacher_topk_logprobs")


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and checkpoints).

  Attributes:
    step: int32 scalar, the number of updates applied.
    student: the student's full `nnx.State` (parameters, batch statistics, RNG counters).
    adapters: the `nnx.State` of the method's adapter modules (empty for logit-only methods).
    opt_state: optax state over ``{'student': params, 'adapters': params}``.
    method_state: non-trainable method state by loss name (CRD memory banks).
    hparams: traced hyper-parameters, ``{'losses': {name: weight}, name: {hp: value}}``, float32.
    rng: uint32[2] key data; the step's randomness is ``fold_in(rng, step)``, so a resumed run
      reproduces the uninterrupted one.
  """

  step: jax.Array
  student: nnx.State
  adapters: nnx.State
  opt_state: optax.OptState
  method_state: Any
  hparams: Any
  rng: jax.Array


def split_params(state: nnx.State) -> tuple[nnx.State, nnx.State]:
  """``(parameters, everything else)`` of a module state."""
  return nnx.split_state(state, nnx.Param, ...)


def trainable_params(state: TrainState) -> dict[str, nnx.State]:
  """The tree the optimiser sees: ``{'student': params, 'adapters': params}``."""
  return {"student": split_params(state.student)[0], "adapters": split_params(state.adapters)[0]}


def create_state(
  student: nnx.Module,
  method: distill.Method,
  optimizer: optax.GradientTransformation,
  seed: int = 0,
) -> TrainState:
  """The initial `TrainState`, unplaced (see `init_state`)."""
  student_state = nnx.state(student)
  adapter_state = nnx.state(method.adapters)
  trainable = {
    "student": split_params(student_state)[0],
    "adapters": split_params(adapter_state)[0],
  }
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    student=student_state,
    adapters=adapter_state,
    opt_state=optimizer.init(trainable),
    method_state=method.init_state(),
    hparams=jax.tree.map(jnp.float32, method.hparams),
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def init_state(
  student: nnx.Module,
  method: distill.Method,
  optimizer: optax.GradientTransformation,
  seed: int = 0,
  mesh: jax.sharding.Mesh | None = None,
) -> TrainState:
  """The initial `TrainState`, placed on `mesh` by the FSDP rule (`jaxkd.parallel`)."""
  state = create_state(student, method, optimizer, seed)
  return parallel.shard_state(mesh, state) if mesh is not None else state


def _is_ensemble(teacher) -> bool:
  return isinstance(teacher, (list, tuple))


def stack_trees(trees: Sequence[Any]) -> Any:
  """Stacks pytrees of one structure along a new leading axis, on the host.

  For building ensemble and population states from process-local arrays (numpy stacking needs
  no compilation per leaf shape); `jaxkd.parallel.shard_state` then places the result.
  """
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *trees)


def teacher_state(
  teacher: nnx.Module | Sequence[nnx.Module] | None, mesh: jax.sharding.Mesh | None = None
):
  """The teacher's `nnx.State`, an argument of the step (never donated, never updated).

  A list of teachers (an ensemble of one architecture) gives their states stacked on a leading
  axis. ``None`` gives ``None``.
  """
  if teacher is None:
    return None
  if _is_ensemble(teacher):
    state, leading_axes = stack_trees([nnx.state(member) for member in teacher]), 1
  else:
    state, leading_axes = nnx.state(teacher), 0
  return parallel.shard_state(mesh, state, leading_axes) if mesh is not None else state


def combine_teachers(logits: jax.Array, features: dict[str, jax.Array], rule: EnsembleRule):
  """Combines stacked teacher outputs ``[N, B, ...]``.

  * ``'mean_logits'``: ``z = mean_i z_i``.
  * ``'mean_probs'``: ``z = log mean_i softmax(z_i)``, the log of the averaged distribution (a
    valid logit vector; a loss with temperature T then tempers this averaged T=1 distribution).
  * ``'per_teacher'``: outputs stay stacked; teacher terms are evaluated per teacher and averaged.

  Features are averaged for both mean rules.
  """
  if rule == "per_teacher":
    return logits, features
  mean_features = {name: jnp.mean(value, axis=0) for name, value in features.items()}
  if rule == "mean_logits":
    return jnp.mean(logits, axis=0), mean_features
  if rule == "mean_probs":
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(logits.shape[0]), mean_features
  raise ValueError(f"unknown ensemble rule {rule!r}; known rules: {', '.join(ENSEMBLE_RULES)}")


def _teacher_forward(graphdef, state, images, feature_names, ensemble: EnsembleRule | None):
  """Teacher logits (float32) and the requested features, in eval mode, without gradient."""

  def forward(member_state):
    model = nnx.merge(graphdef, member_state)
    logits, features = model(images, train=False, return_features=bool(feature_names))
    return logits.astype(jnp.float32), {name: features[name] for name in feature_names}

  if ensemble is None:
    outputs = forward(state)
  else:
    outputs = combine_teachers(*jax.vmap(forward)(state), ensemble)
  return jax.lax.stop_gradient(outputs)


def _cached_teacher_logits(batch, num_classes: Callable[[], int]) -> jax.Array | None:
  """Teacher logits from a cached-teacher batch, or None if the batch carries none."""
  if CACHED_DENSE in batch:
    return batch[CACHED_DENSE].astype(jnp.float32)
  if all(key in batch for key in CACHED_SPARSE):
    from jaxkd import teacher_cache  # the cache module pulls in numpy I/O only when used

    return teacher_cache.dense_logits(
      batch[CACHED_SPARSE[0]], batch[CACHED_SPARSE[1]], num_classes()
    )
  return None


def _step_key(rng_data: jax.Array, step: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)


def _masked_sum(values, mask):
  return jnp.sum(jnp.where(mask, values, 0).astype(jnp.float32))


def _batch_mask(batch) -> jax.Array:
  if "mask" in batch:
    return batch["mask"].astype(bool)
  return jnp.ones(batch["label"].shape, bool)


def _check_teacher(teacher, ensemble):
  if _is_ensemble(teacher) and ensemble not in ENSEMBLE_RULES:
    raise ValueError(
      f"unknown ensemble rule {ensemble!r}; known rules: {', '.join(ENSEMBLE_RULES)}"
    )


def _shardings(mesh, student, method, optimizer, teacher, population_size):
  """Explicit shardings of (state, teacher_state, batch) and of the metrics."""
  abstract_state = jax.eval_shape(lambda: create_state(student, method, optimizer))
  leading_axes = 0
  if population_size:
    abstract_state = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct((population_size, *leaf.shape), leaf.dtype), abstract_state
    )
    leading_axes = 1
  state_sharding = parallel.state_shardings(mesh, abstract_state, leading_axes)
  if teacher is None:
    # The step ignores this argument (a trainer may still pass the teacher it evaluates with):
    # accept whatever sharding it has.
    teacher_sharding = None
  else:
    teacher_sharding = parallel.state_shardings(
      mesh, jax.eval_shape(lambda: teacher_state(teacher)), int(_is_ensemble(teacher))
    )
  return state_sharding, teacher_sharding, parallel.batch_sharding(mesh), parallel.replicated(mesh)


def make_train_step(
  *,
  student: nnx.Module,
  teacher: nnx.Module | Sequence[nnx.Module] | None,
  method: distill.Method,
  optimizer: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  augment: Augment | None = None,
  ensemble: EnsembleRule = "mean_logits",
  population_size: int | None = None,
  population_chunk: int | None = None,
  donate: bool = True,
):
  """Compiles ``train_step(state, teacher_state, batch) -> (state, metrics)``.

  Args:
    student: the student model (its graph definition is taken; weights come from the state).
    teacher: the teacher model, a list of teachers of one architecture (an ensemble), or
      ``None``: plain supervised training, or a cached teacher whose outputs the batch carries
      (``'teacher_logits'`` or ``'teacher_topk_ids'``/``'teacher_topk_logprobs'``).
    method: from `jaxkd.distill.build`.
    optimizer: an optax transformation over ``{'student': params, 'adapters': params}``.
    mesh: from `jaxkd.parallel.make_mesh`.
    augment: ``augment(rng, images) -> images``, applied once inside the step; teacher and
      student see the same view.
    ensemble: how an ensemble's outputs combine (`combine_teachers`).
    population_size: if set, the state is a stacked population (`jaxkd.population`): the student
      update is vmapped over its leading axis; the teacher forward and the view are shared.
    population_chunk: members updated together: ``None`` vmaps all of them at once; ``k``
      splits the population into groups of ``k`` vmapped members, the groups unrolled one after
      the other in the one compiled step. Vmapping a convolution over stacked kernels makes it a
      grouped convolution, which XLA's CPU backend runs slower than the separate convolutions
      (and a `lax.map` loop slower still: loop bodies lose its multi-threaded kernels); ``k=1``
      keeps every student convolution as it is and still shares the teacher forward and the
      view (see BENCHMARKS.md). Compile time grows with the number of groups. Same results
      either way.
    donate: donate the state buffers (off only for tests that reuse an input state).

  Returns:
    The jitted step. ``metrics`` holds ``'loss'``, each term's unweighted value by loss name,
    and ``'accuracy'`` (train batch, before the update); each ``[P]`` for a population.
  """
  _check_teacher(teacher, ensemble)
  student_graphdef = nnx.graphdef(student)
  adapter_graphdef = nnx.graphdef(method.adapters)
  teacher_graphdef = None
  if teacher is not None:
    teacher_graphdef = nnx.graphdef(teacher[0] if _is_ensemble(teacher) else teacher)
  ensemble_rule = ensemble if _is_ensemble(teacher) else None
  per_teacher = ensemble_rule == "per_teacher"
  if per_teacher and (method.stateful or len(method.adapters)):
    raise ValueError(
      "ensemble='per_teacher' evaluates teacher terms once per teacher, which "
      "suits terms without adapters or memory banks; combine the teachers with "
      "'mean_logits' or 'mean_probs' for this method"
    )
  if augment is not None and teacher is None and method.needs_teacher:
    raise ValueError(
      "a cached teacher holds the outputs of fixed views: it cannot be combined "
      "with a random augmentation inside the step"
    )

  def student_update(state: TrainState, images, batch, teacher_logits, teacher_features):
    student_rng = jax.random.fold_in(_step_key(state.rng, state.step), 1)
    params, rest = split_params(state.student)
    adapter_params, adapter_rest = split_params(state.adapters)

    def loss_fn(trainable):
      model = nnx.merge(student_graphdef, trainable["student"], rest, copy=True)
      logits, features = model(images, train=True, return_features=bool(method.student_features))
      adapters = nnx.merge(adapter_graphdef, trainable["adapters"], adapter_rest, copy=True)
      loss, metrics, method_state = method.loss(
        hparams=state.hparams,
        adapters=adapters,
        method_state=state.method_state,
        student_logits=logits,
        student_features={k: features[k] for k in method.student_features},
        teacher_logits=teacher_logits,
        teacher_features=teacher_features,
        batch=batch,
        step=state.step,
        rng=student_rng,
        teacher_axis=per_teacher,
      )
      mask = _batch_mask(batch)
      metrics["accuracy"] = _masked_sum(
        jnp.argmax(logits, -1) == batch["label"], mask
      ) / jnp.maximum(jnp.sum(mask), 1)
      new_rest = split_params(nnx.state(model))[1]
      new_adapter_rest = split_params(nnx.state(adapters))[1]
      return loss, (metrics, new_rest, new_adapter_rest, method_state)

    trainable = {"student": params, "adapters": adapter_params}
    grads, (metrics, rest, adapter_rest, method_state) = jax.grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(
      step=state.step + 1,
      student=nnx.merge_state(trainable["student"], rest),
      adapters=nnx.merge_state(trainable["adapters"], adapter_rest),
      opt_state=opt_state,
      method_state=method_state,
    )
    return new_state, metrics

  def train_step(state: TrainState, teacher_state, batch):
    # Population members share the view: the key of member 0 drives the augmentation.
    shared_rng, shared_step = (
      (state.rng[0], state.step[0]) if population_size else (state.rng, state.step)
    )
    images = batch["image"]
    if augment is not None:
      images = augment(jax.random.fold_in(_step_key(shared_rng, shared_step), 0), images)
    teacher_logits, teacher_features = None, {}
    if teacher is not None:
      teacher_logits, teacher_features = _teacher_forward(
        teacher_graphdef, teacher_state, images, method.teacher_features, ensemble_rule
      )
    elif method.needs_teacher:

      def num_classes():  # the student's head size, by abstract evaluation (no FLOPs)
        member_state = (
          jax.tree.map(lambda x: x[0], state.student) if population_size else state.student
        )
        return jax.eval_shape(
          lambda s: nnx.merge(student_graphdef, s, copy=True)(images, train=False)[0], member_state
        ).shape[-1]

      teacher_logits = _cached_teacher_logits(batch, num_classes)
      if teacher_logits is None or method.teacher_features:
        raise ValueError(
          "the method needs a teacher: pass teacher= or a batch with cached teacher "
          "logits (jaxkd.teacher_cache); a cache holds no features"
        )
    update = lambda s: student_update(s, images, batch, teacher_logits, teacher_features)
    if not population_size:
      return update(state)
    if population_chunk is None:
      return jax.vmap(update)(state)
    groups = [
      jax.vmap(update)(
        jax.tree.map(lambda leaf, start=start: leaf[start : start + population_chunk], state)
      )
      for start in range(0, population_size, population_chunk)
    ]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *groups)

  state_sharding, teacher_sharding, batch_sharding, metrics_sharding = _shardings(
    mesh, student, method, optimizer, teacher, population_size
  )
  return jax.jit(
    train_step,
    in_shardings=(state_sharding, teacher_sharding, batch_sharding),
    out_shardings=(state_sharding, metrics_sharding),
    donate_argnums=(0,) if donate else (),
  )


def make_eval_step(
  *,
  student: nnx.Module,
  teacher: nnx.Module | Sequence[nnx.Module] | None = None,
  mesh: jax.sharding.Mesh,
  ensemble: EnsembleRule = "mean_logits",
  population_size: int | None = None,
):
  """Compiles ``eval_step(state, teacher_state, batch) -> sums``.

  Sums over real examples (``batch['mask']``, if present): ``'correct'`` (top-1) and ``'count'``;
  with a teacher also ``'agree'`` (student and teacher argmax agree) and ``'kl'``
  (``KL(p_t ‖ q_s)`` at T = 1, summed over examples). Both models in eval mode. For a population
  every sum has a leading ``[P]`` axis.
  """
  _check_teacher(teacher, ensemble)
  student_graphdef = nnx.graphdef(student)
  teacher_graphdef = None
  if teacher is not None:
    teacher_graphdef = nnx.graphdef(teacher[0] if _is_ensemble(teacher) else teacher)
  # 'per_teacher' has no single teacher distribution to compare with: evaluate the mean.
  ensemble_rule = None
  if _is_ensemble(teacher):
    ensemble_rule = "mean_logits" if ensemble == "per_teacher" else ensemble

  def eval_step(state: TrainState, teacher_state, batch):
    mask = _batch_mask(batch)
    teacher_logits = None
    if teacher is not None:
      teacher_logits, _ = _teacher_forward(
        teacher_graphdef, teacher_state, batch["image"], (), ensemble_rule
      )

    def member_sums(member_state):
      model = nnx.merge(student_graphdef, member_state.student)
      logits, _ = model(batch["image"], train=False)
      predictions = jnp.argmax(logits, -1)
      sums = {
        "correct": _masked_sum(predictions == batch["label"], mask),
        "count": _masked_sum(jnp.ones_like(mask), mask),
      }
      if teacher_logits is not None:
        sums["agree"] = _masked_sum(predictions == jnp.argmax(teacher_logits, -1), mask)
        kl = logit.kd(
          logits,
          teacher_logits,
          temperature=1.0,
          scale_by_temperature_squared=False,
          reduction="none",
        )
        sums["kl"] = _masked_sum(kl, mask)
      return sums

    return jax.vmap(member_sums)(state) if population_size else member_sums(state)

  # The eval step takes any TrainState layout; only its outputs' sharding is pinned.
  return jax.jit(eval_step, out_shardings=parallel.replicated(mesh))


def student_model(student: nnx.Module, state: TrainState) -> nnx.Module:
  """A student module carrying the trained weights and statistics of `state` (for export)."""
  return nnx.merge(nnx.graphdef(student), state.student)
