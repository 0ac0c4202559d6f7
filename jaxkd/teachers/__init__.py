"""Teacher sources: the one owner of everything a step knows about its teacher.

A run's teacher is one of four sources, chosen by `config.teacher`:

* ``'none'``: no teacher in the step (plain supervised training, or a method without teacher
  terms; evaluation may still compare with a teacher);
* ``'live'``: one model, run in eval mode inside the step on the step's view;
* ``'ensemble'``: several models of one architecture (``teacher.checkpoint = 'dir1,dir2'``),
  their states stacked and the forward `jax.vmap`ped; combined by `ENSEMBLE_RULES`;
* ``'cached'``: the outputs computed once over the training examples (`jaxkd.teachers.cache`,
  dense logits or top-k log-probabilities), looked up by example index on the host and carried
  in the batch; the step runs no teacher.

Whatever the source, the step receives one function, ``teacher(view, batch) -> TeacherOutputs``
(`Teacher.bind`), under `jax.lax.stop_gradient`. `load` builds the sources of a run from its
`Settings`: the one the training step calls, the one evaluation compares with, and their state.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etils import epath

from jaxkd import errors, models, parallel, tasks
from jaxkd.losses.chunked import LMHead
from jaxkd.losses.sequence import SparseTeacher
from jaxkd.models import hf
from jaxkd.models import io as model_io
from jaxkd.teachers import cache as cache_lib

Source = Literal["none", "live", "ensemble", "cached"]
ENSEMBLE_RULES = ("mean_logits", "mean_probs", "per_teacher")


@flax.struct.dataclass
class TeacherOutputs:
  """What the loss sees of the teacher, under stop_gradient.

  Attributes:
    logits: float32 ``[B, C]`` (``[B, S, V]``), or ``None`` without a teacher; from a top-k
      cache, the log-probabilities at the k ids and ``-inf`` elsewhere; an `LMHead` when the
      task asks for one (`jaxkd.tasks.CausalLM.lm_head`). With `per_teacher`, a leading ``[N]``
      teacher axis.
    features: the requested features by name (same leading axis with `per_teacher`).
    topk: the cached top-k teacher itself (ids and full-vocabulary log-probabilities), for
      terms that read the sparse form (`sparse_topk_kd`); else ``None``.
    per_teacher: an ensemble whose teacher terms are evaluated per teacher and averaged.
  """

  logits: jax.Array | None
  features: dict[str, jax.Array]
  topk: SparseTeacher | None = None
  per_teacher: bool = flax.struct.field(pytree_node=False, default=False)


NO_OUTPUTS = TeacherOutputs(logits=None, features={})


def combine(logits: jax.Array, features: Mapping[str, jax.Array], rule: str) -> TeacherOutputs:
  """Combines stacked ensemble outputs ``[N, B, ...]``.

  * ``'mean_logits'``: ``z = mean_i z_i``.
  * ``'mean_probs'``: ``z = log mean_i softmax(z_i)``, the log of the averaged distribution (a
    valid logit vector; a loss with temperature T then tempers this averaged T=1 distribution).
  * ``'per_teacher'``: outputs stay stacked; teacher terms are evaluated per teacher and averaged.

  Features are averaged for both mean rules.
  """
  if rule == "per_teacher":
    return TeacherOutputs(logits=logits, features=dict(features), per_teacher=True)
  mean_features = {name: jnp.mean(value, axis=0) for name, value in features.items()}
  if rule == "mean_logits":
    return TeacherOutputs(logits=jnp.mean(logits, axis=0), features=mean_features)
  if rule == "mean_probs":
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    mixture = jax.nn.logsumexp(log_probs, axis=0) - jnp.log(logits.shape[0])
    return TeacherOutputs(logits=mixture, features=mean_features)
  raise ValueError(f"unknown ensemble rule {rule!r}; known rules: {', '.join(ENSEMBLE_RULES)}")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """One teacher source (static): how its outputs follow from its state and the batch.

  Attributes:
    source: see the module docstring.
    task: how the model reads the batch (live and ensemble sources).
    graphdef: the model's graph definition (one member's, for an ensemble).
    rule: the ensemble rule.
    feature_names: the features the method reads.
    num_classes: width of the dense logits a top-k cache expands to; for a live teacher whose
      vocabulary is padded past its tokenizer's (Qwen's 152064 embedding rows for 151936
      tokens), the entries kept (`jaxkd.losses.slice_vocab`).
  """

  source: Source
  task: tasks.Task | None = None
  graphdef: Any = None
  rule: str = "mean_logits"
  feature_names: tuple[str, ...] = ()
  num_classes: int | None = None

  def outputs(self, state, view: jax.Array, batch: Mapping[str, jax.Array]) -> TeacherOutputs:
    """The teacher's outputs on `view` (the step's view of `batch`)."""
    if self.source == "none":
      return NO_OUTPUTS
    if self.source == "cached":
      return jax.lax.stop_gradient(self._cached(batch))

    def forward(member_state):
      model = nnx.merge(self.graphdef, member_state)
      logits, features = self.task.apply(
        model, view, batch, train=False, return_features=bool(self.feature_names)
      )
      if isinstance(logits, LMHead):  # an LMHead keeps its dtypes (chunked losses)
        logits = logits._replace(unembed=logits.unembed[:, : self.num_classes])
      else:
        logits = logits[..., : self.num_classes].astype(jnp.float32)
      return logits, {name: features[name] for name in self.feature_names}

    if self.source == "live":
      outputs = TeacherOutputs(*forward(state))
    else:
      outputs = combine(*jax.vmap(forward)(state), self.rule)
    return jax.lax.stop_gradient(outputs)

  def bind(self, state) -> Callable[[jax.Array, Mapping[str, jax.Array]], TeacherOutputs]:
    """The function the step calls: ``teacher(view, batch) -> TeacherOutputs``."""
    return functools.partial(self.outputs, state)

  def _cached(self, batch) -> TeacherOutputs:
    if cache_lib.LOGITS_KEY not in batch and cache_lib.TOPK_IDS_KEY not in batch:
      raise ValueError(
        "a cached teacher reads its outputs from the batch, which has none: add them with "
        "Teachers.add_to_batch (jaxkd.teachers.cache)"
      )
    if cache_lib.LOGITS_KEY in batch:
      return TeacherOutputs(logits=batch[cache_lib.LOGITS_KEY].astype(jnp.float32), features={})
    ids, logprobs = batch[cache_lib.TOPK_IDS_KEY], batch[cache_lib.TOPK_LOGPROBS_KEY]
    return TeacherOutputs(
      logits=cache_lib.dense_logits(ids, logprobs, self.num_classes),
      features={},
      topk=SparseTeacher(ids=ids, logprobs=logprobs.astype(jnp.float32)),
    )


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.teacher`, resolved (`settings`).

  Attributes:
    checkpoints: the teacher model directories; none = no teacher model, several = an ensemble.
    rule: how an ensemble combines (`ENSEMBLE_RULES`).
    cache_dir: where the cached outputs live ('' = run the teacher in the step).
    cache_topk: 0 = dense logits; k = the top-`cache_top_p` nucleus, then at most k classes, of
      the distribution at `cache_temperature` (`jaxkd.teachers.cache`).
    cache_top_p, cache_temperature: see `cache_topk`.
    cache_dtype: storage dtype of the logits / log-probabilities.
    in_step: whether the training step reads the teacher (the method has teacher terms).
    num_classes: the classes the student predicts; a teacher with more output entries (a
      padded vocabulary of the same tokenizer) is sliced to them. None = no slicing.
    dtype: the teacher's compute dtype ('float32' or 'bfloat16').
  """

  checkpoints: tuple[str, ...] = ()
  rule: str = "mean_logits"
  cache_dir: str = ""
  cache_topk: int = 0
  cache_top_p: float = 1.0
  cache_temperature: float = 1.0
  cache_dtype: str = "float32"
  in_step: bool = False
  num_classes: int | None = None
  dtype: str = "float32"

  @property
  def train_source(self) -> Source:
    if not self.in_step:
      return "none"
    if self.cache_dir:
      return "cached"
    return "ensemble" if len(self.checkpoints) > 1 else "live"


def settings(teacher_config: Mapping[str, Any], *, in_step: bool) -> Settings:
  """`config.teacher` as `Settings`; ValueError naming the field for a value that cannot work."""
  checkpoints = tuple(path.strip() for path in teacher_config["checkpoint"].split(",") if path)
  cache = teacher_config["cache"]
  resolved = Settings(
    checkpoints=checkpoints,
    rule=teacher_config["ensemble"],
    cache_dir=cache["dir"],
    cache_topk=int(cache["topk"]),
    cache_top_p=float(cache["top_p"]),
    cache_temperature=float(cache["temperature"]),
    cache_dtype=cache["dtype"],
    in_step=in_step,
    dtype=teacher_config["dtype"],
  )
  if resolved.rule not in ENSEMBLE_RULES:
    raise ValueError(f"teacher.ensemble={resolved.rule!r}: must be one of {ENSEMBLE_RULES}")
  if resolved.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"teacher.dtype={resolved.dtype!r}: must be 'float32' or 'bfloat16'")
  if resolved.cache_topk < 0:
    raise ValueError(f"teacher.cache.topk={resolved.cache_topk}: must be 0 (dense) or positive")
  if not 0 < resolved.cache_top_p <= 1:
    raise ValueError(f"teacher.cache.top_p={resolved.cache_top_p}: must be in (0, 1]")
  if not resolved.cache_temperature > 0:
    raise ValueError(f"teacher.cache.temperature={resolved.cache_temperature}: must be positive")
  if resolved.cache_dtype not in cache_lib.STORAGE_DTYPES:
    raise ValueError(
      f"teacher.cache.dtype={resolved.cache_dtype!r}: must be one of {cache_lib.STORAGE_DTYPES}"
    )
  if resolved.cache_dir and not checkpoints:
    raise ValueError(
      "teacher.cache.dir is set but teacher.checkpoint is empty: the cache is computed from "
      "(and evaluation compares with) the teacher model"
    )
  if resolved.cache_dir and resolved.rule == "per_teacher" and len(checkpoints) > 1:
    raise ValueError(
      "teacher.ensemble='per_teacher' keeps every teacher's outputs; a cache holds one "
      "distribution: use 'mean_logits' or 'mean_probs'"
    )
  return resolved


def is_hugging_face(directory: str) -> bool:
  """Whether `directory` is a Hugging Face model (config.json + safetensors), not a jaxkd one
  (model.json + an orbax state)."""
  path = epath.Path(directory)
  return (path / "config.json").exists() and not (path / "model.json").exists()


def read_record(directory: str) -> dict:
  """The ``{'name', 'create_kwargs'}`` record of a jaxkd model directory or a Hugging Face one
  (a `transformer_lm` of its config.json); ValueError saying why not."""
  try:
    if is_hugging_face(directory):
      return {"name": "transformer_lm", "create_kwargs": hf.read_config(directory).create_kwargs()}
    return model_io.read_metadata(directory)
  except (OSError, errors.CheckpointError) as error:
    raise ValueError(str(error)) from None


def load_model(directory: str, *, dtype: str = "float32", mesh=None) -> nnx.Module:
  """The teacher model in `directory` (jaxkd or Hugging Face), weights placed on `mesh`."""
  if is_hugging_face(directory):
    return hf.load_pretrained(directory, dtype=jnp.dtype(dtype), mesh=mesh)
  return model_io.load(directory, dtype=jnp.dtype(dtype), mesh=mesh)


def read_architecture(checkpoints: Sequence[str]) -> dict:
  """The model record the checkpoints share; ValueError naming a checkpoint that differs."""
  records = [read_record(directory) for directory in checkpoints]
  for directory, record in zip(checkpoints[1:], records[1:]):
    if record != records[0]:
      raise ValueError(
        f"an ensemble needs teachers of one architecture: {checkpoints[0]} holds "
        f"{records[0]}, {directory} holds {record}"
      )
  return records[0]


def abstract_model(directory: str) -> nnx.Module:
  """The teacher model in `directory`, built abstractly (no weights, no FLOPs); a jaxkd
  directory's model.json is checked against its saved weights' shapes. ValueError saying why
  not."""
  try:
    if not is_hugging_face(directory):
      return model_io.abstract_model(directory)
  except errors.CheckpointError as error:
    raise ValueError(str(error)) from None
  record = read_record(directory)
  return nnx.eval_shape(lambda: models.create(record["name"], **record["create_kwargs"]))


@dataclasses.dataclass(frozen=True)
class Teachers:
  """The teacher sources of one run.

  Attributes:
    train: what the training step calls.
    eval: what evaluation compares the student with (``source='none'`` without a model).
    state: the teacher weights (stacked for an ensemble), placed on the mesh; an argument of
      the compiled steps (never donated, never updated). ``None`` without a model.
    cache: the opened cache of a ``'cached'`` training source.
  """

  train: Teacher
  eval: Teacher
  state: Any = None
  cache: cache_lib.TeacherCache | None = None

  def add_to_batch(self, host_batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """A host training batch plus what the training source reads from it (cached outputs)."""
    return host_batch if self.cache is None else self.cache.add_to_batch(host_batch)


def _stacked_state(teacher_models: Sequence[nnx.Module]):
  """One member's state, or every member's stacked on a leading axis (on the host)."""
  if len(teacher_models) == 1:
    return nnx.state(teacher_models[0])
  member_states = [nnx.state(model) for model in teacher_models]
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *member_states)


def from_models(
  teacher_models: Sequence[nnx.Module],
  *,
  task: tasks.Task,
  mesh: jax.sharding.Mesh,
  feature_names: Sequence[str] = (),
  rule: str = "mean_logits",
  in_step: bool = True,
  num_classes: int | None = None,
) -> Teachers:
  """Live (one model) or ensemble (several, one architecture) sources of `teacher_models`.

  Args:
    teacher_models: the teacher modules (weights loaded).
    task: how the models read a batch.
    mesh: where the teacher state goes (FSDP rule of `jaxkd.parallel`; an ensemble's stacking
      axis is never split).
    feature_names: the teacher features the method reads.
    rule: how an ensemble combines (`ENSEMBLE_RULES`).
    in_step: whether the training step reads the teacher (else its source is ``'none'`` and
      the models only serve evaluation).
    num_classes: slice the teacher's outputs to these first entries (a padded vocabulary).
  """
  if rule not in ENSEMBLE_RULES:
    raise ValueError(f"unknown ensemble rule {rule!r}; known rules: {', '.join(ENSEMBLE_RULES)}")
  ensemble = len(teacher_models) > 1
  # Never donated: placed without a host copy (a large teacher loaded sharded stays so).
  state = parallel.place_state(mesh, _stacked_state(teacher_models), leading_axes=int(ensemble))
  live = Teacher(
    source="ensemble" if ensemble else "live",
    task=task,
    graphdef=nnx.graphdef(teacher_models[0]),
    rule=rule,
    feature_names=tuple(feature_names),
    num_classes=num_classes,
  )
  # 'per_teacher' has no single teacher distribution to compare with: evaluate the mean.
  eval_teacher = dataclasses.replace(
    live, feature_names=(), rule="mean_logits" if rule == "per_teacher" else rule
  )
  return Teachers(train=live if in_step else Teacher(source="none"), eval=eval_teacher, state=state)


def load(
  resolved: Settings,
  *,
  task: tasks.Task,
  feature_names: Sequence[str],
  mesh: jax.sharding.Mesh,
  cache_identity: Callable[[], Mapping[str, Any]] | None = None,
  cache_batches: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
) -> Teachers:
  """Loads the teacher models of `resolved` and builds the run's sources.

  Args:
    resolved: from `settings` (checked by `jaxkd.plan`).
    task, feature_names, mesh: see `from_models`.
    cache_identity: for a cached source, ``() -> {dataset, num_examples, data_fingerprint}``
      of the training examples the cache covers (called only then).
    cache_batches: ``() -> host batches`` over those examples in eval form (deterministic
      view, ``'index'``, boolean ``'mask'``), called only when the cache must be written.

  Raises:
    jaxkd.teachers.cache.CacheMismatchError: the cache was computed from another teacher.
  """
  if not resolved.checkpoints:
    none = Teacher(source="none")
    return Teachers(train=none, eval=none)
  ensemble = len(resolved.checkpoints) > 1
  teacher_models = [
    load_model(directory, dtype=resolved.dtype, mesh=None if ensemble else mesh)
    for directory in resolved.checkpoints
  ]
  source = resolved.train_source
  live = from_models(
    teacher_models,
    task=task,
    mesh=mesh,
    feature_names=feature_names,
    rule=resolved.rule,
    in_step=source in ("live", "ensemble"),
    num_classes=resolved.num_classes,
  )
  if source != "cached":
    return live
  return with_cache(
    live,
    resolved.cache_dir,
    storage=dict(
      kind="topk" if resolved.cache_topk else "dense",
      k=resolved.cache_topk or None,
      top_p=resolved.cache_top_p,
      temperature=resolved.cache_temperature,
      dtype=resolved.cache_dtype,
    ),
    teacher_fingerprint=cache_lib.fingerprint(_stacked_state(teacher_models)),
    identity=cache_identity(),
    batches=cache_batches,
  )


def with_cache(
  live: Teachers,
  directory: str,
  *,
  storage: Mapping[str, Any],
  teacher_fingerprint: str,
  identity: Mapping[str, Any],
  batches: Callable[[], Iterable[Mapping[str, Any]]],
) -> Teachers:
  """`live` with a ``'cached'`` training source: the cache at `directory`, written first from
  `live`'s evaluation teacher over `batches()` if the directory holds none.

  Args:
    live: from `from_models`.
    directory: the cache directory.
    storage: how to store the outputs: `cache.write_cache`'s kind, k, top_p, temperature,
      dtype.
    teacher_fingerprint: `cache.fingerprint` of the teacher weights (host arrays).
    identity: ``{dataset, num_examples, data_fingerprint}`` of the covered examples.
    batches: ``() -> host batches`` in eval form, called only when writing.
  """
  identity = dict(identity, teacher_fingerprint=teacher_fingerprint)
  teacher = live.eval
  if not (epath.Path(directory) / cache_lib.MANIFEST).exists():
    outputs = jax.jit(
      lambda state, batch: teacher.outputs(state, teacher.task.view(batch, None), batch)
    )
    cache_lib.write_cache(
      directory,
      teacher_logits=lambda batch: outputs(live.state, batch).logits,
      batches=batches(),
      **storage,
      **identity,
    )
  cache = cache_lib.open_cache(directory, **identity)
  cached = Teacher(source="cached", num_classes=cache.manifest.num_classes)
  return dataclasses.replace(live, train=cached, cache=cache)
