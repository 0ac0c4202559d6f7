"""The distillation step of one student: view → teacher outputs → student loss and grads → update.

    view    = task.view(batch, rng)                        # once: teacher and student see one view
    teacher = teacher(view, batch)                         # eval mode, under stop_gradient
    grads   = ∇ method.loss(student(view, train=True), teacher, adapters(...))
    state   = optimizer update of (student params, adapter params); new BN statistics

`train_step` and `eval_step` are plain functions of arrays and of a static `Learner`; the
trainer jits them (`jit_train_step`) with explicit shardings (`jaxkd.parallel`): the batch split
over every device, the state by the FSDP rule, metrics replicated, the state donated. They know
nothing of where the teacher's outputs come from (`jaxkd.teachers`: a live model, an ensemble, a
cache) nor of populations (`jaxkd.population` maps `update` over stacked members), and they read
images and tokens alike (`jaxkd.tasks`).

BatchNorm statistics are means over the *global* batch: under `jax.jit` a sharded array is one
logical array, and the partitioner turns the batch-axis mean into a cross-device all-reduce. So a
step on 8 devices computes what the 1-device step computes (tests/test_step.py), unlike
`pmap`-style per-device BatchNorm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.losses
from flax import nnx

from jaxkd import distill, parallel, tasks
from jaxkd.losses import logit
from jaxkd.losses.chunked import LMHead
from jaxkd.state import TrainState, split_params, step_key
from jaxkd.teachers import TeacherOutputs

Batch = Mapping[str, jax.Array]
TeacherFn = Callable[[jax.Array, Batch], TeacherOutputs]

# Streams of the step's randomness (`jaxkd.state.step_key`); the sampler's (jaxkd.sampling)
# draws the batch before the step.
VIEW_STREAM, METHOD_STREAM, SAMPLE_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)
class Learner:
  """The static half of the step: graph definitions, the method, the optimiser, the task."""

  student: Any  # nnx.GraphDef of the student
  adapters: Any  # nnx.GraphDef of the method's adapter modules
  method: distill.Method
  optimizer: optax.GradientTransformation
  task: tasks.Task

  @classmethod
  def create(cls, student: nnx.Module, method: distill.Method, optimizer, task: tasks.Task):
    return cls(nnx.graphdef(student), nnx.graphdef(method.adapters), method, optimizer, task)


def train_step(learner: Learner, state: TrainState, hparams, batch: Batch, teacher: TeacherFn):
  """One update of one student on `batch`; returns ``(new_state, metrics)``."""
  view = learner.task.view(batch, step_key(state, VIEW_STREAM))
  teacher_outputs = teacher(view, batch)
  return update(learner, state, hparams, view, batch, teacher_outputs)


def update(learner: Learner, state: TrainState, hparams, view, batch, teacher: TeacherOutputs):
  """The student half of `train_step`: loss and gradients on `view`, then the optimiser update.

  Metrics: ``'loss'``, each term's unweighted value by loss name, ``'accuracy'`` (top-1 of
  the scored examples or tokens, before the update), ``'nonfinite'`` (1 when the loss or a
  gradient was not finite and the update was skipped) and ``'first_nonfinite_grad'`` (the
  index in `gradient_paths` of the first non-finite gradient, -1 if none).
  """
  labels, mask = learner.task.targets(batch)
  student_params, student_rest = split_params(state.student)
  adapter_params, adapter_rest = split_params(state.adapters)
  method = learner.method

  def loss_fn(params):
    student = nnx.merge(learner.student, params["student"], student_rest, copy=True)
    adapters = nnx.merge(learner.adapters, params["adapters"], adapter_rest, copy=True)
    logits, features = learner.task.apply(
      student, view, batch, train=True, return_features=bool(method.plan.student_features)
    )
    loss, metrics, method_state = method.loss(
      hparams,
      student_logits=logits,
      student_features={name: features[name] for name in method.plan.student_features},
      teacher=teacher,
      labels=labels,
      mask=mask,
      index=batch.get("index"),
      adapters=adapters,
      method_state=state.method_state,
      step=state.step,
      rng=step_key(state, METHOD_STREAM),
    )
    if not isinstance(logits, LMHead):  # chunked losses never build the logits
      metrics["accuracy"] = _mean(jnp.argmax(logits, -1) == labels, mask)
    new_rest = (split_params(nnx.state(student))[1], split_params(nnx.state(adapters))[1])
    return loss, (metrics, new_rest, method_state)

  params = {"student": student_params, "adapters": adapter_params}
  (loss, (metrics, (student_rest, adapter_rest), method_state)), grads = jax.value_and_grad(
    loss_fn, has_aux=True
  )(params)
  updates, opt_state = learner.optimizer.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  new_state = state.replace(
    step=state.step + 1,
    student=nnx.merge_state(params["student"], student_rest),
    adapters=nnx.merge_state(params["adapters"], adapter_rest),
    opt_state=opt_state,
    method_state=method_state,
  )
  # A non-finite loss or gradient leaves the state as it was (only the step count moves on),
  # so no NaN ever reaches the weights, a checkpoint or an export; the trainer decides what
  # to do (jaxkd.train: stop, or skip up to a limit).
  finite, first_nonfinite = _finite(loss, grads)
  metrics["nonfinite"] = (~finite).astype(jnp.float32)
  metrics["first_nonfinite_grad"] = first_nonfinite
  held = state.replace(step=state.step + 1)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, held)
  return new_state, metrics


def eval_step(learner: Learner, state: TrainState, batch: Batch, teacher: TeacherFn):
  """Sums over the scored examples (tokens) of `batch`, both models in eval mode (`evaluate`)."""
  view = learner.task.view(batch, None)
  teacher_logits = teacher(view, batch).logits
  teacher_logits = None if teacher_logits is None else tasks.dense_logits(teacher_logits)
  return evaluate(learner, state, view, batch, teacher_logits)


def evaluate(learner: Learner, state: TrainState, view, batch, teacher_logits):
  """The student half of `eval_step`.

  Sums: ``'count'`` (scored units), ``'correct'`` (top-1), ``'correct_top5'`` (when there are more
  than 5 classes), ``'nll'`` (cross-entropy, nats), ``'bytes'`` (language models: the UTF-8 bytes
  of the scored targets, for bits per byte); with a teacher also ``'agree'`` (same argmax) and
  ``'kl'`` (KL(teacher ‖ student) at T = 1, nats).
  """
  labels, mask = learner.task.targets(batch)
  student = nnx.merge(learner.student, state.student)
  logits, _ = learner.task.apply(student, view, batch, train=False, return_features=False)
  logits = tasks.dense_logits(logits).astype(jnp.float32)
  predictions = jnp.argmax(logits, -1)
  nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
  sums = {
    "count": _sum(jnp.ones(mask.shape), mask),
    "correct": _sum(predictions == labels, mask),
    "nll": _sum(nll, mask),
  }
  if logits.shape[-1] > 5:
    top5 = jax.lax.top_k(logits, 5)[1]
    sums["correct_top5"] = _sum(jnp.any(top5 == labels[..., None], axis=-1), mask)
  if "target_bytes" in batch:
    sums["bytes"] = _sum(batch["target_bytes"], mask)
  if teacher_logits is not None:
    sums["agree"] = _sum(predictions == jnp.argmax(teacher_logits, -1), mask)
    kl = logit.kd(
      logits,
      teacher_logits,
      temperature=1.0,
      scale_by_temperature_squared=False,
      reduction="none",
    )
    sums["kl"] = _sum(kl, mask)
  return sums


def _finite(loss, grads) -> tuple[jax.Array, jax.Array]:
  """``(loss and every gradient finite, index of the first non-finite gradient leaf or -1)``."""
  leaf_finite = jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(grads)])
  first = jnp.where(jnp.all(leaf_finite), -1, jnp.argmin(leaf_finite))
  return jnp.isfinite(loss) & jnp.all(leaf_finite), first.astype(jnp.int32)


def gradient_paths(state: TrainState) -> list[str]:
  """The path of each gradient leaf, in the order of ``metrics['first_nonfinite_grad']``."""
  params = {"student": split_params(state.student)[0], "adapters": split_params(state.adapters)[0]}
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _sum(values, mask):
  return jnp.sum(jnp.where(mask, values, 0).astype(jnp.float32))


def _mean(values, mask):
  return _sum(values, mask) / jnp.maximum(jnp.sum(mask), 1)


def jit_train_step(step_fn, teacher, mesh, abstract_state, *, leading_axes: int = 0, donate=True):
  """``jax.jit`` of ``step_fn(state, hparams, batch, teacher_fn)`` as
  ``compiled(state, hparams, teacher_state, batch) -> (state, metrics)``.

  Args:
    step_fn: `train_step` with its learner bound, or a population's (`jaxkd.population`).
    teacher: the `jaxkd.teachers.Teacher` the step calls, bound to `teacher_state` inside.
    mesh: the device mesh.
    abstract_state: the state's structure (shapes and dtypes), for its shardings.
    leading_axes: stacking axes of the state that are never split (1 for a population).
    donate: donate the state's buffers (off for tests that reuse an input state).
  """
  state_sharding = parallel.state_shardings(mesh, abstract_state, leading_axes)
  replicated = parallel.replicated(mesh)

  def compiled(state, hparams, teacher_state, batch):
    return step_fn(state, hparams, batch, teacher.bind(teacher_state))

  return jax.jit(
    compiled,
    in_shardings=(state_sharding, replicated, None, parallel.batch_sharding(mesh)),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,) if donate else (),
  )


def jit_eval_step(eval_fn, teacher, mesh):
  """``jax.jit`` of ``eval_fn(state, batch, teacher_fn)`` as ``compiled(state, teacher_state,
  batch) -> sums``; any state layout, sums replicated."""

  def compiled(state, teacher_state, batch):
    return eval_fn(state, batch, teacher.bind(teacher_state))

  return jax.jit(compiled, out_shardings=parallel.replicated(mesh))


def student_model(graphdef, state: TrainState) -> nnx.Module:
  """The student module with the trained weights and statistics of `state` (for export)."""
  return nnx.merge(graphdef, state.student)
