"""Tiny NNX models with the zoo's calling convention, for the engine tests.

``logits, features = model(images, train=..., return_features=...)`` with features 'stem',
'stage1', 'stage2', 'preact_stage1', 'preact_stage2' and 'pooled', like `jaxkd.models`. The
convolutions are the zoo's `layers.Conv2d`, so the sharding, population and multi-host tests
run its fusion barrier too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd import distill, parallel, population, step, tasks, teachers
from jaxkd import state as train_state
from jaxkd.models.layers import Conv2d

# The tiny CNN's task: 8×8 RGB images (`batch`).
TASK = tasks.Classification(image_shape=(8, 8, 3))


class TinyCNN(nnx.Module):
  """conv-BN-relu stem, two conv-BN stages (the second strided), mean pool, linear head."""

  def __init__(self, num_classes: int = 10, width: int = 4, *, rngs: nnx.Rngs):
    self.stem = Conv2d(3, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.conv1 = Conv2d(width, width, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.conv2 = Conv2d(width, 2 * width, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(2 * width, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def __call__(self, images, train: bool = False, return_features: bool = False):
    norm = lambda bn, x: bn(x, use_running_average=not train)
    stem = jax.nn.relu(norm(self.stem_bn, self.stem(images)))
    preact1 = norm(self.bn1, self.conv1(stem))
    stage1 = jax.nn.relu(preact1)
    preact2 = norm(self.bn2, self.conv2(stage1))
    stage2 = jax.nn.relu(preact2)
    pooled = jnp.mean(stage2, axis=(1, 2))
    logits = self.head(pooled)
    if not return_features:
      return logits, {}
    return logits, {
      "stem": stem,
      "stage1": stage1,
      "stage2": stage2,
      "preact_stage1": preact1,
      "preact_stage2": preact2,
      "pooled": pooled,
    }


def tiny_cnn(num_classes: int = 10, width: int = 4, seed: int = 0) -> TinyCNN:
  return TinyCNN(num_classes, width, rngs=nnx.Rngs(seed))


def batch(size: int = 16, num_classes: int = 10, image_size: int = 8, seed: int = 0):
  """A random host batch: normalised NHWC images, labels, indices."""
  rng = jax.random.key(seed)
  image_rng, label_rng = jax.random.split(rng)
  return {
    "image": np.asarray(jax.random.normal(image_rng, (size, image_size, image_size, 3))),
    "label": np.asarray(jax.random.randint(label_rng, (size,), 0, num_classes), np.int32),
    "index": np.arange(size, dtype=np.int32),
  }


def forward(model, images, train: bool = False, return_features: bool = False):
  """`model(images, ...)` compiled, leaving `model` untouched (train-mode statistics discarded)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images):
    return nnx.merge(graphdef, state, copy=True)(
      images, train=train, return_features=return_features
    )

  return run(state, jnp.asarray(images))


# --- The engine as jaxkd.train assembles it, for tests that drive steps by hand. ---


def method(
  config, student, teacher=None, *, task=TASK, steps_per_epoch=1, total_steps=1, **build_kwargs
):
  """`config.distill` planned against the models and built (adapters, state)."""
  method_plan = distill.plan(
    config,
    info=distill.feature_info(task, student, teacher),
    has_teacher=teacher is not None,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
  )
  return distill.build(method_plan, **build_kwargs)


def init_state(student, method, optimizer, *, seed=0, mesh=None):
  """A fresh `TrainState` of `student`, placed on `mesh`."""
  state = train_state.create(student, method.adapters, method.initial_state, optimizer, seed)
  return parallel.shard_state(mesh, state) if mesh is not None else state


def teacher_sources(teacher_models, method, mesh, *, task=TASK, rule="mean_logits"):
  """`jaxkd.teachers.Teachers` of live teacher models (none for an empty list)."""
  if not teacher_models:
    none = teachers.Teacher(source="none")
    return teachers.Teachers(train=none, eval=none)
  return teachers.from_models(
    teacher_models,
    task=task,
    mesh=mesh,
    feature_names=method.plan.teacher_features,
    rule=rule,
    in_step=method.plan.needs_teacher,
  )


def train_step(
  student,
  method,
  optimizer,
  mesh,
  teacher,
  state,
  *,
  task=TASK,
  members=False,
  chunk=None,
  donate=True,
):
  """The compiled step of `jaxkd.train`: ``step(state, hparams, teacher_state, batch)``."""
  learner = step.Learner.create(student, method, optimizer, task)
  if members:
    step_fn = functools.partial(population.train_step, learner, chunk=chunk)
  else:
    step_fn = functools.partial(step.train_step, learner)
  return step.jit_train_step(
    step_fn,
    teacher,
    mesh,
    jax.eval_shape(lambda: state),
    leading_axes=int(members),
    donate=donate,
  )


def eval_step(student, method, mesh, teacher, *, task=TASK, members=False):
  """The compiled eval step of `jaxkd.train`: ``eval(state, teacher_state, batch) -> sums``."""
  learner = step.Learner.create(student, method, None, task)
  eval_fn = population.eval_step if members else step.eval_step
  return step.jit_eval_step(functools.partial(eval_fn, learner), teacher, mesh)
