"""Distillation methods: a config of named losses → one loss function and its trainable extras.

A method is data plus a function. The config names the losses and their weights, and gives each
loss its own settings in a sub-dict named like the loss::

    config.distill = ConfigDict(dict(
        losses={'ce': 0.1, 'kd': 0.9},           # name → weight; the loss is Σ weight · term
        kd={'temperature': 4.0},                  # settings of the 'kd' term
    ))

Two steps turn that into what the train step calls:

* `plan` (pure, before anything is built): the terms, their hyper-parameters, the feature names
  each side must return, whether a teacher and the training labels are read. Every mistake in
  `config.distill` (an unknown loss or setting, a value out of range, a feature the model does
  not return) is a ValueError here, which `jaxkd.plan` reports as the one config error line.
* `build`: the `Method`, with the adapter modules the method trains (FitNet regressors, CRD
  embeddings, ...) and its initial state (CRD memory banks). `Method.loss` runs inside the step.

Hyper-parameters come in two kinds, declared by each loss:

* ``hparams``: floats (temperatures, loss weights, margins), passed to the step as float32
  arrays (`Method.hparams`), so they are *traced*: a population vmaps over different values in
  one compiled step, and changing one needs no recompilation. Their defaults are the loss
  function's own (`jaxkd.losses`), read from its signature.
* ``options``: anything that changes the program (booleans, integer sizes, feature names). They
  are Python values fixed when the method is planned.

Every term also accepts ``warmup_epochs`` (an option): its weight ramps up as
``min(epoch / warmup_epochs, 1)`` with the 1-based epoch of the step, mdistiller's DKD warm-up
(`jaxkd.losses.dkd_warmup_factor`).

An optional ``alpha`` section mixes the terms as ``(1 − α)·LM + α·KD`` (pre-training
distillation, Peng et al. 2024): every teacher-free term is multiplied by ``1 − α(step)`` and
every teacher term by ``α(step)``, on top of its weight; ``α`` follows a schedule
(`jaxkd.optim.scalar_schedule`)::

    config.distill.alpha = dict(schedule='constant', peak=0.9)
    config.distill.alpha = dict(schedule='linear', init=1.0, end=0.0)            # decreasing α
    config.distill.alpha = dict(schedule='wsd', peak=0.9, warmup_fraction=0.1, decay_fraction=0.1)

A term that computes both parts itself (``chunked_lm``) receives ``α`` and is not rescaled.

Adding a method = one module that calls `register` with a `LossDef` + its tests; the module is
imported at the bottom of this file. `describe()` lists every term's settings (the table of
docs/engine.md is generated from it).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd import optim, tasks
from jaxkd.losses.logit import dkd_warmup_factor
from jaxkd.losses.sequence import SparseTeacher, token_mean

Features = Mapping[str, jax.Array]
FeatureShapes = Mapping[str, jax.ShapeDtypeStruct]

# Ranges a hyper-parameter can be declared to need (`LossDef.ranges`), and their check.
RANGES = {
  "positive": (lambda value: 0 < value < np.inf, "must be positive and finite"),
  "non_negative": (lambda value: 0 <= value < np.inf, "must be 0 or more, and finite"),
  "unit_interval": (lambda value: 0 <= value <= 1, "must be in [0, 1]"),
  "finite": (lambda value: bool(np.isfinite(value)), "must be a finite number"),
}


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """Everything a term may read, assembled inside the step (trace-time container, not a pytree).

  Token-level models (language models) have one more axis: logits ``[B, S, V]``, labels and
  mask ``[B, S]``; per-example terms then average over the scored tokens
  (`jaxkd.losses.token_mean`), the per-token mean of TRL, DistiLLM and DistillKit.

  Attributes:
    student_logits: ``[B, C]`` (or ``[B, S, V]``) float32.
    student_features: the features the term asked for, by name.
    teacher_logits: ``[B, C]`` (or ``[B, S, V]``) float32 (``None`` without teacher). Already
      under stop_gradient. From a top-k cache: log-probabilities at the k ids, ``-inf`` elsewhere.
    teacher_topk: the cached top-k teacher itself (``SparseTeacher`` of ``[..., k]`` ids and
      full-vocabulary log-probabilities) when the batch carries one, else ``None``.
    teacher_features: teacher features by name (``{}`` without teacher).
    labels: ``[B]`` (or ``[B, S]``) int32.
    mask: ``[B]`` (or ``[B, S]``) bool, True for the scored examples (tokens).
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
    alpha: ``α(step)`` of the method's alpha schedule, or None without one.
    log: extra scalars the term reports, by name (logged as ``<term>/<name>``).
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
  alpha: jax.Array | None = None
  log: dict = dataclasses.field(default_factory=dict)

  def mean(self, values: jax.Array) -> jax.Array:
    """Mean of per-example (per-token) `values` over the scored ones."""
    return token_mean(values, self.mask)


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """Shapes of the features both models return (for a probe batch), given to a `LossDef`'s
  feature selectors and adapter factory. `num_classes` is the student's head size."""

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
    ranges: hyper-parameter name → a key of `RANGES` its values must satisfy.
    choices: option name → the values it may take.
    needs_teacher: whether the term reads the teacher.
    student_features: ``fn(options, info) -> names`` of student features the term reads.
    teacher_features: same for the teacher.
    adapter: ``fn(options, info, rngs) -> nnx.Module``, the trainable extra module, or ``None``.
    init_state: ``fn(options, info, num_train_examples, rng) -> pytree``, the non-trainable
      method state (CRD memory banks), or ``None``.
    needs_train_labels: ``fn(options) -> bool``, whether the term reads every training label
      (`LossInputs.train_labels`; CRD's other-class negatives), or ``None`` (never).
    lm_head: the term reads the models' `jaxkd.losses.LMHead` (hidden states, unembedding) in
      place of logits and mixes the label and teacher parts itself (``chunked_lm``).
    reads_labels: the term reads the labels (a mixed view has none: mixup, cutmix).
  """

  name: str
  compute: Callable[[LossInputs], Any]
  hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  ranges: Mapping[str, str] = dataclasses.field(default_factory=dict)
  choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
  needs_teacher: bool = True
  student_features: Callable[[Mapping[str, Any], FeatureInfo], Sequence[str]] | None = None
  teacher_features: Callable[[Mapping[str, Any], FeatureInfo], Sequence[str]] | None = None
  adapter: Callable[[Mapping[str, Any], FeatureInfo, nnx.Rngs], nnx.Module] | None = None
  init_state: Callable[[Mapping[str, Any], FeatureInfo, int, jax.Array], Any] | None = None
  needs_train_labels: Callable[[Mapping[str, Any]], bool] | None = None
  lm_head: bool = False
  reads_labels: bool = False


_REGISTRY: dict[str, LossDef] = {}
# Options every term accepts, handled here rather than by the term.
_COMMON_OPTIONS = {"warmup_epochs": 0}


def register(loss_def: LossDef) -> LossDef:
  """Adds a loss term to the registry (one call per method module)."""
  if loss_def.name in _REGISTRY:
    raise ValueError(f"loss {loss_def.name!r} is registered twice")
  _REGISTRY[loss_def.name] = loss_def
  return loss_def


def defaults_of(loss_fn: Callable, names: Sequence[str]) -> dict[str, Any]:
  """The default values of `loss_fn`'s keyword arguments `names`: each default is written once,
  in the loss function (its reference implementation's value)."""
  parameters = inspect.signature(loss_fn).parameters
  return {name: parameters[name].default for name in names}


def names() -> list[str]:
  """Sorted names of every registered loss."""
  return sorted(_REGISTRY)


def get(name: str) -> LossDef:
  if name not in _REGISTRY:
    raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(names())}")
  return _REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class Term:
  """A `LossDef` with the settings of one config."""

  loss: LossDef
  options: Mapping[str, Any]

  @property
  def name(self) -> str:
    return self.loss.name


@dataclasses.dataclass(frozen=True)
class Alpha:
  """``α(step)`` of ``(1 − α)·LM + α·KD``: `jaxkd.optim.scalar_schedule` over the run."""

  schedule: str = "constant"
  peak: float = 1.0
  init: float = 0.0
  end: float = 0.0
  warmup_fraction: float = 0.0
  decay_fraction: float = 0.0
  decay_shape: str = "linear"
  total_steps: int = 1

  def __call__(self, step: jax.Array) -> jax.Array:
    return self.function()(step)

  def function(self):
    return optim.scalar_schedule(
      self.schedule,
      total_steps=self.total_steps,
      peak_value=self.peak,
      init_value=self.init,
      end_value=self.end,
      warmup_steps=round(self.warmup_fraction * self.total_steps),
      decay_steps=round(self.decay_fraction * self.total_steps),
      decay_shape=self.decay_shape,
    )


def _alpha(settings: Mapping[str, Any], total_steps: int) -> Alpha:
  """The ``alpha`` section checked: ValueError naming ``alpha.<field>``."""
  fields = {field.name for field in dataclasses.fields(Alpha)} - {"total_steps"}
  unknown = set(settings) - fields
  if unknown:
    raise ValueError(f"unknown setting alpha.{sorted(unknown)[0]}; alpha takes {sorted(fields)}")
  alpha = Alpha(**settings, total_steps=max(total_steps, 1))
  if alpha.schedule not in optim.SCALAR_SCHEDULES:
    raise ValueError(f"alpha.schedule={alpha.schedule!r}: must be one of {optim.SCALAR_SCHEDULES}")
  for name in ("peak", "init", "end"):
    _check_range(f"alpha.{name}", getattr(alpha, name), "unit_interval")
  for name in ("warmup_fraction", "decay_fraction"):
    _check_range(f"alpha.{name}", getattr(alpha, name), "unit_interval")
  alpha.function()  # the schedule's own checks (warm-up and decay within the run, the shape)
  return alpha


@dataclasses.dataclass(frozen=True)
class MethodPlan:
  """A checked `config.distill` (static): what `build` builds and the step needs to know.

  Attributes:
    terms: the loss terms, in config order.
    hparams: the traced hyper-parameters, ``{'losses': {name: weight}, name: {hp: value}}``.
    student_features / teacher_features: feature names the models must return.
    needs_teacher: whether any term reads the teacher.
    label_terms: the terms that read the labels.
    needs_train_labels: the first term that reads every training label, or ''.
    info: the feature shapes the method was planned for.
    steps_per_epoch: for epoch-based schedules.
    alpha: the `Alpha` schedule mixing label and teacher terms, or None.
    lm_head: the terms read `LMHead`s, not logits (`LossDef.lm_head`).
  """

  terms: tuple[Term, ...]
  hparams: Mapping[str, Any]
  student_features: tuple[str, ...]
  teacher_features: tuple[str, ...]
  needs_teacher: bool
  label_terms: tuple[str, ...]
  needs_train_labels: str
  info: FeatureInfo
  steps_per_epoch: int
  alpha: Alpha | None = None
  lm_head: bool = False


def feature_info(task: tasks.Task, student: nnx.Module, teacher: nnx.Module | None = None):
  """The `FeatureInfo` of a student (and teacher) reading batches of `task` (no FLOPs run)."""
  student_logits, student_features = tasks.probe(task, student)
  teacher_features = tasks.probe(task, teacher)[1] if teacher is not None else {}
  return FeatureInfo(
    student=student_features,
    teacher=teacher_features,
    num_classes=tasks.num_classes(student_logits),
  )


def _check_range(field: str, value: float, range_name: str) -> None:
  accepts, why = RANGES[range_name]
  if not accepts(value):
    raise ValueError(f"{field}={value!r} {why}")


def check_hparam(term: str, name: str, value: float) -> None:
  """ValueError naming ``<term>.<name>`` (or ``losses.<term>``) when `value` is out of range."""
  if term == "losses":
    _check_range(f"losses.{name}", value, "non_negative")
  else:
    _check_range(f"{term}.{name}", value, get(term).ranges.get(name, "finite"))


def _settings(loss_def: LossDef, settings: Mapping[str, Any]):
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
  for key, value in hparams.items():
    check_hparam(loss_def.name, key, value)
  for key, allowed in loss_def.choices.items():
    if options[key] not in allowed:
      raise ValueError(f"{loss_def.name}.{key}={options[key]!r}: must be one of {allowed}")
  if options["warmup_epochs"] < 0:
    raise ValueError(f"{loss_def.name}.warmup_epochs={options['warmup_epochs']!r} must be >= 0")
  return hparams, options


def plan(
  config: Mapping[str, Any],
  *,
  info: FeatureInfo,
  has_teacher: bool,
  steps_per_epoch: int = 1,
  total_steps: int = 1,
) -> MethodPlan:
  """Checks `config.distill` against the models' features; ValueError on the first problem.

  Args:
    config: ``losses`` (name → weight), one optional sub-dict of settings per loss, and an
      optional ``alpha`` section (module docstring).
    info: the feature shapes the models return (`jaxkd.tasks.probe`).
    has_teacher: whether the run has a teacher (teacher terms need one).
    steps_per_epoch: for ``warmup_epochs``.
    total_steps: the run's length, for the alpha schedule.
  """
  config = dict(config)
  weights = dict(config.pop("losses", None) or {})
  alpha = config.pop("alpha", None)
  alpha = _alpha(dict(alpha), total_steps) if alpha else None
  if not weights:
    raise ValueError(f"distill.losses is empty; name at least one of: {', '.join(names())}")
  loss_defs = [get(name) for name in weights]
  stray = set(config) - set(weights)
  if stray:
    raise ValueError(
      f"distill has settings for {sorted(stray)} which are not in losses {sorted(weights)}"
    )
  terms, hparams = [], {"losses": {}}
  student_features, teacher_features = [], []
  for loss_def in loss_defs:
    term_hparams, options = _settings(loss_def, dict(config.get(loss_def.name) or {}))
    if loss_def.needs_teacher and not has_teacher:
      raise ValueError(
        f"loss {loss_def.name!r} needs a teacher: set teacher.checkpoint (a jaxkd model "
        "directory, e.g. a finished run's <workdir>/model)"
      )
    weight = float(weights[loss_def.name])
    check_hparam("losses", loss_def.name, weight)
    terms.append(Term(loss_def, options))
    hparams["losses"][loss_def.name] = weight
    if term_hparams:
      hparams[loss_def.name] = term_hparams
    sides = (
      (loss_def.student_features, student_features, info.student, "student"),
      (loss_def.teacher_features, teacher_features, info.teacher, "teacher"),
    )
    for selector, chosen, available, side in sides:
      for name in selector(options, info) if selector else ():
        if name not in available:
          raise ValueError(
            f"{loss_def.name} needs the {side} feature {name!r}; the model returns "
            f"{sorted(available)}"
          )
        if name not in chosen:
          chosen.append(name)
  readers = [
    term.name
    for term in terms
    if term.loss.needs_train_labels and term.loss.needs_train_labels(term.options)
  ]
  lm_head = [term.name for term in terms if term.loss.lm_head]
  dense = [term.name for term in terms if not term.loss.lm_head and not term.loss.student_features]
  if lm_head and dense:
    raise ValueError(
      f"{lm_head[0]} reads hidden states and never builds the logits, which {dense[0]} needs: "
      f"use {lm_head[0]} alone (it computes the cross-entropy and the KD term)"
    )
  return MethodPlan(
    terms=tuple(terms),
    hparams=hparams,
    student_features=tuple(student_features),
    teacher_features=tuple(teacher_features),
    needs_teacher=any(term.loss.needs_teacher for term in terms),
    label_terms=tuple(term.name for term in terms if term.loss.reads_labels),
    needs_train_labels=readers[0] if readers else "",
    info=info,
    steps_per_epoch=steps_per_epoch,
    alpha=alpha,
    lm_head=bool(lm_head),
  )


def check_per_teacher(method_plan: MethodPlan) -> None:
  """An ensemble with ``'per_teacher'`` evaluates each teacher term once per teacher: that suits
  terms without adapters or memory banks only (ValueError otherwise)."""
  for term in method_plan.terms:
    if term.loss.needs_teacher and (term.loss.adapter or term.loss.init_state):
      raise ValueError(
        f"teacher.ensemble='per_teacher' evaluates {term.name} once per teacher, which suits "
        "terms without adapters or memory banks; combine the teachers with 'mean_logits' or "
        "'mean_probs' for this method"
      )


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
  """A built distillation method (static; the step's `jaxkd.step.Learner` holds it).

  Attributes:
    plan: what was planned (terms, hparams, features).
    adapters: an `nnx.Dict` of the trainable adapter modules, keyed by loss name.
    initial_state: the method state before the first step (``{loss name: state}``).
    train_labels: ``[num_train_examples]`` labels by dataset index, when a term reads them.
  """

  plan: MethodPlan
  adapters: nnx.Dict
  initial_state: dict[str, Any]
  train_labels: np.ndarray | None

  @property
  def hparams(self) -> dict[str, Any]:
    """The traced hyper-parameters as float32 arrays: an argument of the step."""
    return jax.tree.map(jnp.float32, self.plan.hparams)

  @property
  def stateful(self) -> bool:
    return bool(self.initial_state)

  def schedule(self, term: Term, step: jax.Array) -> jax.Array:
    """Weight multiplier of `term` at `step`: its warm-up over epochs, times α(step) (teacher
    terms) or 1 − α(step) (label terms) with an alpha schedule."""
    factor = jnp.float32(1.0)
    warmup_epochs = term.options["warmup_epochs"]
    if warmup_epochs:
      epoch = step // self.plan.steps_per_epoch + 1  # 1-based, as mdistiller's kwargs["epoch"]
      factor = dkd_warmup_factor(epoch, warmup_epochs)
    if self.plan.alpha is not None and not term.loss.lm_head:
      alpha = self.plan.alpha(step)
      factor = factor * (alpha if term.loss.needs_teacher else 1.0 - alpha)
    return factor

  def loss(
    self,
    hparams,
    *,
    student_logits,
    student_features,
    teacher,
    labels,
    mask,
    index,
    adapters: nnx.Dict | None,
    method_state,
    step,
    rng,
    train: bool = True,
  ):
    """Σ weightᵢ · scheduleᵢ(step) · termᵢ.

    Args:
      hparams: `Method.hparams` (traced; a member's values in a population).
      student_logits, student_features: the student's outputs (features the plan asked for).
      teacher: `jaxkd.teachers.TeacherOutputs`; with ``per_teacher`` its logits and features
        carry a leading teacher axis, and teacher terms are vmapped over it and averaged.
      labels, mask: from the task (`jaxkd.tasks`): int32 labels, boolean mask.
      index: ``[B]`` dataset indices, or None.
      adapters: the merged adapter modules.
      method_state: the method state (``TrainState.method_state``).
      step, rng: the optimiser step and a key for this step.

    Returns:
      ``(loss, metrics, new_method_state)``; metrics hold each term's unweighted value.
    """
    if teacher.per_teacher:
      check_per_teacher(self.plan)
    train_labels = None if self.train_labels is None else jnp.asarray(self.train_labels)
    alpha = None if self.plan.alpha is None else self.plan.alpha(step)
    total = jnp.float32(0.0)
    metrics = {}
    new_state = dict(method_state)
    for term, term_rng in zip(self.plan.terms, jax.random.split(rng, len(self.plan.terms))):
      adapter = adapters[term.name] if adapters is not None and term.name in adapters else None
      logged = {}

      def evaluate(
        teacher_logits, teacher_features, term=term, adapter=adapter, rng=term_rng, log=logged
      ):
        inputs = LossInputs(
          student_logits=student_logits
          if term.loss.lm_head
          else student_logits.astype(jnp.float32),
          student_features=student_features,
          teacher_logits=teacher_logits,
          teacher_topk=teacher.topk,
          teacher_features=teacher_features,
          labels=labels,
          mask=mask,
          index=index,
          train_labels=train_labels,
          step=step,
          rng=rng,
          hparams=hparams.get(term.name, {}),
          options=term.options,
          adapter=adapter,
          state=method_state.get(term.name),
          train=train,
          alpha=alpha,
          log=log,
        )
        result = term.loss.compute(inputs)
        return result if term.loss.init_state is not None else (result, None)

      if teacher.per_teacher and term.loss.needs_teacher:
        values, _ = jax.vmap(evaluate)(teacher.logits, teacher.features)
        value = jnp.mean(values)
      else:
        value, term_state = evaluate(teacher.logits, teacher.features)
        if term.loss.init_state is not None:
          new_state[term.name] = term_state
      weight = hparams["losses"][term.name] * self.schedule(term, step)
      total = total + weight * value
      metrics[term.name] = value
      metrics.update({f"{term.name}/{name}": scalar for name, scalar in logged.items()})
    if alpha is not None:
      metrics["alpha"] = alpha
    metrics["loss"] = total
    return total, metrics, new_state


def build(
  method_plan: MethodPlan,
  *,
  rngs: nnx.Rngs | None = None,
  num_train_examples: int | None = None,
  train_labels: Callable[[], np.ndarray] | np.ndarray | None = None,
) -> Method:
  """The `Method` of `method_plan`: its adapters (initialised from `rngs`) and initial state.

  Args:
    method_plan: from `plan`.
    rngs: initialises adapters and method state (default ``nnx.Rngs(0)``).
    num_train_examples: dataset size, needed by memory-bank methods (CRD).
    train_labels: every training label by dataset index (``[num_train_examples]`` ints), or a
      function returning them, called only if a term needs them (reading a dataset's labels
      can take a pass over it); needed by CRD with ``negatives='other_class'``.
  """
  info = method_plan.info
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  adapters = {
    term.name: term.loss.adapter(term.options, info, rngs)
    for term in method_plan.terms
    if term.loss.adapter is not None
  }
  term_rngs = jax.random.split(rngs.params(), len(method_plan.terms))
  initial_state = {
    term.name: term.loss.init_state(term.options, info, num_train_examples, rng)
    for term, rng in zip(method_plan.terms, term_rngs)
    if term.loss.init_state is not None
  }
  labels = None
  if method_plan.needs_train_labels:
    if train_labels is None:
      raise ValueError(
        f"{method_plan.needs_train_labels} reads every training label: pass train_labels"
      )
    labels = np.asarray(train_labels() if callable(train_labels) else train_labels, np.int32)
    if labels.shape != (num_train_examples,):
      raise ValueError(
        f"{method_plan.needs_train_labels}: train_labels has shape {labels.shape}, expected "
        f"({num_train_examples},), one label per training example"
      )
  return Method(
    plan=method_plan, adapters=nnx.Dict(adapters), initial_state=initial_state, train_labels=labels
  )


def describe() -> list[dict[str, Any]]:
  """Every registered term's settings, for docs and tools: name, hparams and options with their
  defaults, and whether it reads the teacher, trains an adapter, keeps method state."""
  return [
    {
      "name": loss_def.name,
      "teacher": loss_def.needs_teacher,
      "adapter": loss_def.adapter is not None,
      "state": loss_def.init_state is not None,
      "hparams": dict(loss_def.hparams),
      "options": {**_COMMON_OPTIONS, **loss_def.options},
    }
    for loss_def in map(get, names())
  ]


# One import per method module: importing registers its losses.
from jaxkd.distill import logit  # noqa: E402,F401
from jaxkd.distill import feature  # noqa: E402,F401
from jaxkd.distill import crd  # noqa: E402,F401
from jaxkd.distill import sequence  # noqa: E402,F401
