"""Distillation methods: a config of named losses → one loss function and its trainable extras.

A method is data plus a function. The config names the losses and their weights, and gives each
loss its own settings in a sub-dict named like the loss::

    config.distill = ConfigDict(dict(
        losses={'ce': 0.1, 'kd': 0.9},           # name → weight; the loss is Σ weight · term
        kd={'temperature': 4.0},                  # settings of the 'kd' term
    ))

`build` turns that into a `Method`: the terms, their hyper-parameters, the feature names each side
must return, the adapter modules the method trains (FitNet regressors, CRD embeddings, ...) and the
initial method state (CRD memory banks). `Method.loss` is called inside the jitted train step.

Hyper-parameters come in two kinds, declared by each loss:

* ``hparams``: floats (temperatures, loss weights, margins). They travel in ``TrainState.hparams``
  as float32 arrays, so they are *traced*: a population vmaps over different values in one
  compiled step, and changing one needs no recompilation.
* ``options``: anything that changes the program (booleans, integer sizes, feature names). They are
  Python values fixed at build time.

Every term also accepts ``warmup_epochs`` (an option): its weight ramps up as
``min(epoch / warmup_epochs, 1)`` with the 1-based epoch of the step, mdistiller's DKD warm-up
(``min(kwargs["epoch"] / self.warmup, 1.0)``). It needs ``steps_per_epoch`` in `build`.

Adding a method = one module that calls `register` with a `LossDef` + its tests; the module is
imported at the bottom of this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.losses.sequence import SparseTeacher

Features = Mapping[str, jax.Array]
FeatureShapes = Mapping[str, jax.ShapeDtypeStruct]


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """Everything a term may read, assembled inside the step (trace-time container, not a pytree).

  Token-level models (language models) have one more axis: logits ``[B, S, V]``, labels and
  mask ``[B, S]``; per-example terms then average over the real tokens (`masked_mean`), which
  is `jaxkd.losses.sequence`'s ``token_mean`` reduction.

  Attributes:
    student_logits: ``[B, C]`` (or ``[B, S, V]``) float32.
    student_features: the features the term asked for, by name.
    teacher_logits: ``[B, C]`` (or ``[B, S, V]``) float32 (``None`` without teacher). Already
      under stop_gradient. From a top-k cache: log-probabilities at the k ids, ``-inf`` elsewhere.
    teacher_topk: the cached top-k teacher itself (``SparseTeacher`` of ``[..., k]`` ids and
      full-vocabulary log-probabilities) when the batch carries one, else ``None``.
    teacher_features: teacher features by name (``{}`` without teacher).
    labels: ``[B]`` (or ``[B, S]``) int32.
    mask: ``[B]`` (or ``[B, S]``) float32, 1 for real examples (tokens), 0 for padding.
    index: ``[B]`` int32 dataset indices (CRD memory banks), or ``None`` if the batch has none.
    train_labels: ``[N]`` int32, the label of every training example by dataset index, for
      terms that declare `LossDef.needs_train_labels` (``None`` otherwise).
    step: scalar int32, the optimiser step.
    rng: a PRNG key private to this term and step.
    hparams: this term's traced hyper-parameters (float32 scalars), by name.
    options: this term's static options, by name.
    adapter: this term's trainable adapter module (``None`` if it has none).
    state: this term's method state (``None`` if it has none).
    train: whether this is a training step (adapters with BatchNorm use it).
  """

  student_logits: jax.Array
  student_features: Features
  teacher_logits: jax.Array | None
  teacher_topk: SparseTeacher | None
  teacher_features: Features
  labels: jax.Array
  mask: jax.Array
  index: jax.Array | None
  train_labels: jax.Array | None
  step: jax.Array
  rng: jax.Array
  hparams: Mapping[str, jax.Array]
  options: Mapping[str, Any]
  adapter: nnx.Module | None
  state: Any
  train: bool = True


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """Shapes of the features both models return (for a batch of `input_shape`), given to a
  `LossDef`'s feature selectors and adapter factory at build time. Empty (and `num_classes`
  None) for methods whose terms read no features."""

  student: FeatureShapes
  teacher: FeatureShapes
  num_classes: int | None


@dataclasses.dataclass(frozen=True)
class LossDef:
  """One registered loss term.

  Attributes:
    name: the config key.
    compute: ``compute(inputs: LossInputs) -> value`` (a float32 scalar, already reduced over
      the batch), or ``-> (value, new_state)`` when `init_state` is given.
    hparams: traced float hyper-parameters and their defaults.
    options: static options and their defaults.
    needs_teacher: whether the term reads the teacher.
    student_features: ``fn(options, info) -> names`` of student features the term reads.
    teacher_features: same for the teacher.
    adapter: ``fn(options, info, rngs) -> nnx.Module``, the trainable extra module, or ``None``.
    init_state: ``fn(options, info, num_train_examples, rng) -> pytree``, the non-trainable
      method state (CRD memory banks), or ``None``.
    needs_train_labels: ``fn(options) -> bool``, whether the term reads every training label
      (`LossInputs.train_labels`; CRD's other-class negatives), or ``None`` (never).
  """

  name: str
  compute: Callable[[LossInputs], Any]
  hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  needs_teacher: bool = True
  student_features: Callable[[Mapping[str, Any], FeatureInfo], Sequence[str]] | None = None
  teacher_features: Callable[[Mapping[str, Any], FeatureInfo], Sequence[str]] | None = None
  adapter: Callable[[Mapping[str, Any], FeatureInfo, nnx.Rngs], nnx.Module] | None = None
  init_state: Callable[[Mapping[str, Any], FeatureInfo, int, jax.Array], Any] | None = None
  needs_train_labels: Callable[[Mapping[str, Any]], bool] | None = None


_REGISTRY: dict[str, LossDef] = {}
# Options every term accepts, handled here rather than by the term.
_COMMON_OPTIONS = {"warmup_epochs": 0}


def register(loss_def: LossDef) -> LossDef:
  """Adds a loss term to the registry (one call per method module)."""
  if loss_def.name in _REGISTRY:
    raise ValueError(f"loss {loss_def.name!r} is registered twice")
  _REGISTRY[loss_def.name] = loss_def
  return loss_def


def names() -> list[str]:
  """Sorted names of every registered loss."""
  return sorted(_REGISTRY)


def get(name: str) -> LossDef:
  if name not in _REGISTRY:
    raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(names())}")
  return _REGISTRY[name]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of per-example `values` over real examples: Σ mᵢ vᵢ / max(Σ mᵢ, 1)."""
  values = values.astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, values, 0.0) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@dataclasses.dataclass(frozen=True)
class Term:
  """A `LossDef` with the settings of one config."""

  loss: LossDef
  options: Mapping[str, Any]

  @property
  def name(self) -> str:
    return self.loss.name


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
  """A built distillation method (static; lives in the step's closure).

  Attributes:
    terms: the loss terms, in config order.
    hparams: initial traced hyper-parameters, ``{'losses': {name: weight}, name: {hp: value}}``.
      `jaxkd.step.init_state` copies them into ``TrainState.hparams`` as float32 arrays.
    adapters: an `nnx.Dict` of the trainable adapter modules, keyed by loss name.
    student_features / teacher_features: feature names the step must request.
    needs_teacher: whether any term reads the teacher.
    info: feature shapes the method was built for.
    num_train_examples: dataset size (memory banks).
    train_labels: ``[num_train_examples]`` labels by dataset index, when a term reads them.
    steps_per_epoch: for epoch-based schedules (``None`` if no term has one).
  """

  terms: tuple[Term, ...]
  hparams: Mapping[str, Any]
  adapters: nnx.Dict
  student_features: tuple[str, ...]
  teacher_features: tuple[str, ...]
  needs_teacher: bool
  info: FeatureInfo
  num_train_examples: int | None
  train_labels: np.ndarray | None
  steps_per_epoch: int | None
  init_rng: jax.Array

  @property
  def stateful(self) -> bool:
    return any(term.loss.init_state is not None for term in self.terms)

  def init_state(self) -> dict[str, Any]:
    """The initial method state: ``{loss name: state}`` for stateful terms."""
    rngs = jax.random.split(self.init_rng, len(self.terms))
    return {
      term.name: term.loss.init_state(term.options, self.info, self.num_train_examples, rng)
      for term, rng in zip(self.terms, rngs)
      if term.loss.init_state is not None
    }

  def schedule(self, term: Term, step: jax.Array) -> jax.Array:
    """Weight multiplier of `term` at `step`: the linear warm-up over epochs, 1 without."""
    warmup_epochs = term.options["warmup_epochs"]
    if not warmup_epochs:
      return jnp.float32(1.0)
    epoch = step // self.steps_per_epoch + 1  # 1-based, as mdistiller's kwargs["epoch"]
    return jnp.minimum(epoch.astype(jnp.float32) / warmup_epochs, 1.0)

  def loss(
    self,
    *,
    hparams,
    adapters: nnx.Dict | None,
    method_state,
    student_logits,
    student_features,
    teacher_logits,
    teacher_features,
    batch,
    step,
    rng,
    teacher_axis: bool = False,
    train: bool = True,
  ):
    """Σ weightᵢ · scheduleᵢ(step) · termᵢ.

    Args:
      hparams: ``TrainState.hparams`` (traced).
      adapters: the merged adapter modules.
      method_state: ``TrainState.method_state``.
      teacher_logits / teacher_features: with ``teacher_axis=True`` they carry a leading teacher
        axis (an ensemble with one loss per teacher): teacher terms are vmapped over it and
        averaged.
      batch: the global batch ('label', optional 'mask' and 'index').
      step, rng: the optimiser step and a key for this step.

    Returns:
      ``(loss, metrics, new_method_state)``; metrics hold each term's unweighted value.
    """
    labels = batch["label"]
    mask = (
      batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(labels.shape, jnp.float32)
    )
    train_labels = (
      None if self.train_labels is None else jnp.asarray(self.train_labels, jnp.int32)
    )  # a constant of the step
    teacher_topk = (
      SparseTeacher(ids=batch["teacher_topk_ids"], logprobs=batch["teacher_topk_logprobs"])
      if "teacher_topk_ids" in batch
      else None
    )
    total = jnp.float32(0.0)
    metrics = {}
    new_state = dict(method_state)
    for term, term_rng in zip(self.terms, jax.random.split(rng, len(self.terms))):
      adapter = adapters[term.name] if adapters is not None and term.name in adapters else None

      def evaluate(
        term_teacher_logits, term_teacher_features, term=term, adapter=adapter, term_rng=term_rng
      ):
        inputs = LossInputs(
          student_logits=student_logits.astype(jnp.float32),
          student_features=student_features,
          teacher_logits=(
            None if term_teacher_logits is None else term_teacher_logits.astype(jnp.float32)
          ),
          teacher_topk=teacher_topk,
          teacher_features=term_teacher_features,
          labels=labels,
          mask=mask,
          index=batch.get("index"),
          train_labels=train_labels,
          step=step,
          rng=term_rng,
          hparams=hparams.get(term.name, {}),
          options=term.options,
          adapter=adapter,
          state=method_state.get(term.name),
          train=train,
        )
        result = term.loss.compute(inputs)
        return result if term.loss.init_state is not None else (result, None)

      if teacher_axis and term.loss.needs_teacher:
        values, _ = jax.vmap(evaluate)(teacher_logits, teacher_features)
        value = jnp.mean(values)
      else:
        value, term_state = evaluate(teacher_logits, teacher_features)
        if term.loss.init_state is not None:
          new_state[term.name] = term_state
      weight = hparams["losses"][term.name] * self.schedule(term, step)
      total = total + weight * value
      metrics[term.name] = value
    metrics["loss"] = total
    return total, metrics, new_state


def _split_settings(loss_def: LossDef, settings: Mapping[str, Any]):
  options = {**_COMMON_OPTIONS, **loss_def.options}
  hparams = dict(loss_def.hparams)
  for key, value in settings.items():
    if key in hparams:
      hparams[key] = float(value)
    elif key in options:
      options[key] = value
    else:
      raise ValueError(
        f"unknown setting {loss_def.name}.{key}; {loss_def.name} takes "
        f"{', '.join(sorted([*hparams, *options]))}"
      )
  return hparams, options


def feature_shapes(model: nnx.Module, input_shape: Sequence[int]) -> tuple[FeatureShapes, int]:
  """Feature shapes and number of classes of `model`, by abstract evaluation (no FLOPs)."""
  graphdef, state = nnx.split(model)

  def forward(state, images):
    return nnx.merge(graphdef, state)(images, train=False, return_features=True)

  logits, features = jax.eval_shape(
    forward, state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  )
  return dict(features), logits.shape[-1]


def build(
  config: Mapping[str, Any],
  *,
  student: nnx.Module,
  teacher: nnx.Module | None = None,
  num_train_examples: int | None = None,
  train_labels: Callable[[], np.ndarray] | np.ndarray | None = None,
  rngs: nnx.Rngs | None = None,
  steps_per_epoch: int | None = None,
  input_shape: Sequence[int] = (2, 32, 32, 3),
) -> Method:
  """Builds the method a `config.distill` describes.

  Args:
    config: ``losses`` (name → weight) and one optional sub-dict of settings per loss.
    student: the student model (feature shapes are probed from it).
    teacher: the teacher model, or ``None`` for plain supervised training (then every term must
      be teacher-free, e.g. ``{'ce': 1.0}``). For an ensemble pass one of its members.
    num_train_examples: dataset size, needed by memory-bank methods (CRD).
    train_labels: every training label by dataset index (``[num_train_examples]`` ints), or a
      function returning them, called only if a term needs them (reading a dataset's labels
      can take a pass over it); needed by CRD with ``negatives='other_class'``.
    rngs: initialises adapters and method state.
    steps_per_epoch: needed by epoch-based schedules (``warmup_epochs``).
    input_shape: the shape of an input batch (NHWC), for probing feature shapes; only used
      by terms that read features (default: CIFAR, 32×32×3).
  """
  config = dict(config)
  weights = dict(config.pop("losses", None) or {})
  if not weights:
    raise ValueError(f"config.distill.losses is empty; name at least one of: {', '.join(names())}")
  loss_defs = [get(name) for name in weights]
  stray = set(config) - set(weights)
  if stray:
    raise ValueError(
      f"config.distill has settings for {sorted(stray)} which are not in losses {sorted(weights)}"
    )
  rngs = rngs if rngs is not None else nnx.Rngs(0)

  # Feature shapes are probed (abstractly) only for terms that read features or build
  # adapters, so logit-only methods need no input shape.
  if any(d.student_features or d.teacher_features or d.adapter for d in loss_defs):
    try:
      student_shapes, num_classes = feature_shapes(student, input_shape)
      teacher_shapes = feature_shapes(teacher, input_shape)[0] if teacher is not None else {}
    except Exception as error:
      raise ValueError(
        f"probing the models' features with input_shape={tuple(input_shape)} "
        "failed; pass distill.build(..., input_shape=) matching the data "
        f"(NHWC): {error}"
      ) from error
    info = FeatureInfo(student=student_shapes, teacher=teacher_shapes, num_classes=num_classes)
  else:
    info = FeatureInfo(student={}, teacher={}, num_classes=None)

  terms, hparams, adapters = [], {"losses": {}}, {}
  student_features, teacher_features = [], []
  for loss_def in loss_defs:
    term_hparams, options = _split_settings(loss_def, dict(config.get(loss_def.name) or {}))
    if loss_def.needs_teacher and teacher is None:
      raise ValueError(f"loss {loss_def.name!r} needs a teacher, and none is given")
    if options["warmup_epochs"] and not steps_per_epoch:
      raise ValueError(f"{loss_def.name}.warmup_epochs needs steps_per_epoch in distill.build")
    terms.append(Term(loss_def, options))
    hparams["losses"][loss_def.name] = float(weights[loss_def.name])
    if term_hparams:
      hparams[loss_def.name] = term_hparams
    sides = (
      (loss_def.student_features, student_features, info.student),
      (loss_def.teacher_features, teacher_features, info.teacher),
    )
    for selector, chosen, available in sides:
      for name in selector(options, info) if selector else ():
        if name not in available:
          raise ValueError(
            f"{loss_def.name} needs feature {name!r}; the model returns {sorted(available)}"
          )
        if name not in chosen:
          chosen.append(name)
    if loss_def.adapter is not None:
      adapters[loss_def.name] = loss_def.adapter(options, info, rngs)
  readers = [
    term.name
    for term in terms
    if term.loss.needs_train_labels and term.loss.needs_train_labels(term.options)
  ]
  labels = None
  if readers:
    if train_labels is None:
      raise ValueError(
        f"{readers[0]} reads every training label: pass train_labels to distill.build"
      )
    labels = np.asarray(train_labels() if callable(train_labels) else train_labels)
    if labels.shape != (num_train_examples,):
      raise ValueError(
        f"{readers[0]}: train_labels has shape {labels.shape}, expected "
        f"({num_train_examples},), one label per training example"
      )
  return Method(
    terms=tuple(terms),
    hparams=hparams,
    adapters=nnx.Dict(adapters),
    student_features=tuple(student_features),
    teacher_features=tuple(teacher_features),
    needs_teacher=any(term.loss.needs_teacher for term in terms),
    info=info,
    num_train_examples=num_train_examples,
    train_labels=labels,
    steps_per_epoch=steps_per_epoch,
    init_rng=rngs.params(),
  )


# One import per method module: importing registers its losses.
from jaxkd.distill import logit  # noqa: E402,F401
from jaxkd.distill import feature  # noqa: E402,F401
from jaxkd.distill import crd  # noqa: E402,F401
from jaxkd.distill import sequence  # noqa: E402,F401
