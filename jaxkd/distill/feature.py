"""Feature and relation terms, with the feature choices and adapters of the references.

Feature names are the model zoo's (`jaxkd.models`): ``stem``, ``stage1..N`` (after the ReLU),
``preact_stage1..N``, ``pooled``; ViTs return ``block1..N`` and ``pooled``. RepDistiller's
``feat`` list is ``[stem, stage1, ..., stageN, pooled]``; its ``train_student.py`` picks:

=====================  ====================================  ==================================
term                   features (RepDistiller index)         adapter
=====================  ====================================  ==================================
fitnet                 ``stage2`` (``hint_layer = 2``)       `ConvReg` student → teacher shape
attention_transfer     ``stage1..N`` (``feat[1:-1]``)        —
nst                    ``stage1..N`` (``feat[1:-1]``)        —
similarity_preserving  ``stageN`` (``feat[-2]``)             —
rkd, pkt               ``pooled`` (``feat[-1]``)             —
correlation_congruence ``pooled`` (``feat[-1]``)             `Embed` (linear, unnormalised) ×2
vid                    ``stage1..N`` (``feat[1:-1]``)        one `VIDRegressor` per stage
review_kd              student ``stage1..N`` + ``pooled``;   `ReviewKDFusion` (mdistiller)
                       teacher ``preact_stage1..N`` + ``pooled``
hidden_mse/_cosine     ``layers`` option (ViT ``blockK``)    `LinearProjection` if widths differ
=====================  ====================================  ==================================

Stage lists are per model: ``stage1..N`` is every stage the model returns (3 for CIFAR
ResNets, 4 for WRN/VGG/ResNet50), so the pairs of the zoo line up stage by stage. The feature
selections are options (``features=...``) for other pairings.
"""

import math
import re
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from jaxkd.distill import FeatureInfo, LossDef, LossInputs, register
from jaxkd.distill import adapters
from jaxkd.losses import feature, relation


def stage_names(shapes: Mapping[str, object], prefix: str = "stage") -> list[str]:
  """``prefix1..prefixN`` present in a model's features, in stage order."""
  pattern = re.compile(rf"{prefix}(\d+)$")
  stages = sorted((int(m.group(1)), name) for name in shapes if (m := pattern.match(name)))
  return [name for _, name in stages]


def _chosen(options, info: FeatureInfo, default) -> tuple[list[str], list[str]]:
  """(student names, teacher names): the ``features`` option, else ``default(info)``."""
  if options["features"] is not None:
    names = options["features"]
    student, teacher = (names, names) if isinstance(names[0], str) else names
    return list(student), list(teacher)
  return default(info)


def selectors(default):
  return (
    lambda options, info: _chosen(options, info, default)[0],
    lambda options, info: _chosen(options, info, default)[1],
  )


def _all_stages(info):
  student, teacher = stage_names(info.student), stage_names(info.teacher)
  if len(student) != len(teacher):
    raise ValueError(
      f"student stages {student} and teacher stages {teacher} do not pair up; "
      "set the features option"
    )
  return student, teacher


def _last_stage(info):
  return [stage_names(info.student)[-1]], [stage_names(info.teacher)[-1]]


def pooled_feature(info):
  del info
  return ["pooled"], ["pooled"]


def _hint(info):
  del info
  return ["stage2"], ["stage2"]


def feature_pairs(inputs: LossInputs, default) -> tuple[list, list]:
  """The student and teacher feature arrays a term reads, in pairing order."""
  student_names, teacher_names = _chosen(inputs.options, _info_of(inputs), default)
  return (
    [inputs.student_features[name] for name in student_names],
    [inputs.teacher_features[name] for name in teacher_names],
  )


def _info_of(inputs: LossInputs) -> FeatureInfo:
  # At trace time the requested arrays stand in for the build-time shapes: the default
  # selectors pick the same names from them.
  return FeatureInfo(
    student=inputs.student_features,
    teacher=inputs.teacher_features,
    num_classes=inputs.student_logits.shape[-1],
  )


def _register_feature_term(
  name,
  compute,
  default,
  *,
  hparams=None,
  ranges=None,
  options=None,
  adapter=None,
  term_options=None,
):
  student_selector, teacher_selector = selectors(default)
  return register(
    LossDef(
      name=name,
      compute=compute,
      hparams=hparams or {},
      ranges=ranges or {},
      options={"features": None, **(options or {}), **(term_options or {})},
      student_features=student_selector,
      teacher_features=teacher_selector,
      adapter=adapter,
    )
  )


def _shapes(info: FeatureInfo, options, default):
  student_names, teacher_names = _chosen(options, info, default)
  return (
    [info.student[name].shape for name in student_names],
    [info.teacher[name].shape for name in teacher_names],
  )


# --- FitNet: MSE between the regressed student hint and the teacher hint. ---


def _fitnet(inputs: LossInputs):
  (student_hint,), (teacher_hint,) = feature_pairs(inputs, _hint)
  return feature.fitnet(inputs.adapter(student_hint, inputs.train), teacher_hint)


def _fitnet_adapter(options, info, rngs):
  (student_shape,), (teacher_shape,) = _shapes(info, options, _hint)
  return adapters.ConvReg(student_shape, teacher_shape, rngs=rngs)


_register_feature_term("fitnet", _fitnet, _hint, adapter=_fitnet_adapter)


# --- Attention transfer and NST over every stage. ---


def _attention_transfer(inputs: LossInputs):
  return feature.attention_transfer(*feature_pairs(inputs, _all_stages), p=inputs.options["p"])


_register_feature_term("attention_transfer", _attention_transfer, _all_stages, options={"p": 2})


def _nst(inputs: LossInputs):
  return feature.nst(
    *feature_pairs(inputs, _all_stages),
    degree=inputs.options["degree"],
    offset=inputs.hparams["offset"],
  )


_register_feature_term("nst", _nst, _all_stages, hparams={"offset": 0.0}, options={"degree": 2})


# --- Relations between the examples of the batch (batch-level scalars). ---


def _similarity_preserving(inputs: LossInputs):
  return relation.similarity_preserving(*feature_pairs(inputs, _last_stage))


_register_feature_term("similarity_preserving", _similarity_preserving, _last_stage)


def _rkd(inputs: LossInputs):
  (student,), (teacher,) = feature_pairs(inputs, pooled_feature)
  return relation.rkd(student, teacher, **inputs.hparams)


_register_feature_term(
  "rkd",
  _rkd,
  pooled_feature,
  hparams={"distance_weight": 25.0, "angle_weight": 50.0},
  ranges={"distance_weight": "non_negative", "angle_weight": "non_negative"},
)


def _pkt(inputs: LossInputs):
  (student,), (teacher,) = feature_pairs(inputs, pooled_feature)
  return relation.pkt(student, teacher)


_register_feature_term("pkt", _pkt, pooled_feature)


def embed_heads(options, info, rngs, default, normalize):
  """Trainable embedding heads for both sides (RepDistiller trains ``embed_s`` and ``embed_t``)."""
  (student_shape,), (teacher_shape,) = _shapes(info, options, default)
  dim = options["feat_dim"]
  return nnx.Dict(
    student=adapters.Embed(math.prod(student_shape[1:]), dim, normalize=normalize, rngs=rngs),
    teacher=adapters.Embed(math.prod(teacher_shape[1:]), dim, normalize=normalize, rngs=rngs),
  )


def _correlation_congruence(inputs: LossInputs):
  (student,), (teacher,) = feature_pairs(inputs, pooled_feature)
  return relation.correlation_congruence(
    inputs.adapter["student"](student), inputs.adapter["teacher"](teacher)
  )


_register_feature_term(
  "correlation_congruence",
  _correlation_congruence,
  pooled_feature,
  options={"feat_dim": 128},
  adapter=lambda options, info, rngs: embed_heads(options, info, rngs, pooled_feature, False),
)


# --- VID: Gaussian likelihood of each teacher stage under a regressor of the student's. ---


def _vid(inputs: LossInputs):
  total = jnp.float32(0.0)
  for regressor, student, teacher in zip(inputs.adapter, *feature_pairs(inputs, _all_stages)):
    mean = regressor(student, output_size=teacher.shape[1:3])
    total += feature.vid(mean, teacher, regressor.log_scale[...], eps=inputs.options["eps"])
  return total


def _vid_adapter(options, info, rngs):
  student_shapes, teacher_shapes = _shapes(info, options, _all_stages)
  # RepDistiller: VIDLoss(s_channels, t_channels, t_channels) per stage.
  return nnx.List(
    [
      adapters.VIDRegressor(
        s[-1], t[-1], t[-1], init_pred_var=options["init_pred_var"], eps=options["eps"], rngs=rngs
      )
      for s, t in zip(student_shapes, teacher_shapes)
    ]
  )


_register_feature_term(
  "vid", _vid, _all_stages, options={"init_pred_var": 5.0, "eps": 1e-5}, adapter=_vid_adapter
)


# --- ReviewKD (mdistiller): ABF fusion of student levels, hierarchical context loss. ---


def _review_levels(info):
  """Student ``stage1..N, pooled``; teacher ``preact_stage1..N, pooled`` (mdistiller)."""
  return (
    stage_names(info.student) + ["pooled"],
    stage_names(info.teacher, "preact_stage") + ["pooled"],
  )


def _as_map(x):
  """A pooled ``[B, C]`` feature as the ``[B, 1, 1, C]`` map mdistiller unsqueezes it to."""
  return x.reshape(x.shape[0], 1, 1, x.shape[-1]) if x.ndim == 2 else x


def _review_kd(inputs: LossInputs):
  student_levels, teacher_levels = feature_pairs(inputs, _review_levels)
  fused = inputs.adapter([_as_map(x) for x in student_levels], train=inputs.train)
  return feature.review_hcl(fused, [_as_map(x) for x in teacher_levels])


def _review_kd_adapter(options, info, rngs):
  student_shapes, teacher_shapes = _shapes(info, options, _review_levels)
  return adapters.ReviewKDFusion(
    [s[-1] for s in student_shapes],
    [t[-1] for t in teacher_shapes],
    [tuple(t[1:3]) if len(t) == 4 else (1, 1) for t in teacher_shapes],
    max_mid_channels=options["max_mid_channels"],
    rngs=rngs,
  )


# mdistiller CFG.REVIEWKD: CE 1, REVIEWKD_WEIGHT 1, WARMUP_EPOCHS 20, MAX_MID_CHANNEL 512.
_register_feature_term(
  "review_kd",
  _review_kd,
  _review_levels,
  options={"max_mid_channels": 512},
  adapter=_review_kd_adapter,
  term_options={"warmup_epochs": 20},
)


# --- Hidden states (transformers): MSE / cosine per paired layer, projected if widths differ. ---


def _layers(info):
  student, teacher = stage_names(info.student, "block"), stage_names(info.teacher, "block")
  return student[-1:], teacher[-1:]


def _hidden(loss_fn):
  def compute(inputs: LossInputs):
    students, teachers = feature_pairs(inputs, _layers)
    projected = [
      projection(student) if projection is not None else student
      for projection, student in zip(inputs.adapter, students)
    ]
    return loss_fn(projected, teachers)

  return compute


def _projections(options, info, rngs):
  student_shapes, teacher_shapes = _shapes(info, options, _layers)
  return nnx.List(
    [
      adapters.LinearProjection(s[-1], t[-1], rngs=rngs) if s[-1] != t[-1] else None
      for s, t in zip(student_shapes, teacher_shapes)
    ]
  )


_register_feature_term("hidden_mse", _hidden(feature.hidden_mse), _layers, adapter=_projections)
_register_feature_term(
  "hidden_cosine", _hidden(feature.hidden_cosine), _layers, adapter=_projections
)
