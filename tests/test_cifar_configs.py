"""configs/cifar_kd.py: every `method=` variant loads, validates and builds with jaxkd.distill, with
the benchmark's published weights, its per-pair values and its learning-rate rule.

Models are built abstractly (`nnx.eval_shape`): `distill.plan` only probes their feature shapes,
so nothing is trained and no model parameter is materialised (adapters are, they are small).
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import distill, errors, models, plan, tasks

import testing_utils

CONFIG = "cifar_kd"
CIFAR = tasks.Classification(image_shape=(32, 32, 3))
METHODS = (
  "ce",
  "kd",
  "fitnet",
  "at",
  "sp",
  "cc",
  "vid",
  "rkd",
  "pkt",
  "nst",
  "crd",
  "dkd",
  "reviewkd",
  "dist",
  "kd_ls",
  "dkd_ls",
)

# The published loss weights (RepDistiller scripts/run_cifar_distill.sh `-r γ -a α -b β`;
# mdistiller CFG; DIST_KD; LS README), written out independently of the config's table.
EXPECTED_WEIGHTS = {
  "ce": {"ce": 1.0},
  "kd": {"ce": 0.1, "kd": 0.9},
  "fitnet": {"ce": 1.0, "kd": 0.0, "fitnet": 100.0},
  "at": {"ce": 1.0, "kd": 0.0, "attention_transfer": 1000.0},
  "sp": {"ce": 1.0, "kd": 0.0, "similarity_preserving": 3000.0},
  "cc": {"ce": 1.0, "kd": 0.0, "correlation_congruence": 0.02},
  "vid": {"ce": 1.0, "kd": 0.0, "vid": 1.0},
  "rkd": {"ce": 1.0, "kd": 0.0, "rkd": 1.0},
  "pkt": {"ce": 1.0, "kd": 0.0, "pkt": 30000.0},
  "nst": {"ce": 1.0, "kd": 0.0, "nst": 50.0},
  "crd": {"ce": 1.0, "kd": 0.0, "crd": 0.8},
  "dkd": {"ce": 1.0, "dkd": 1.0},
  "reviewkd": {"ce": 1.0, "review_kd": 5.0},
  "dist": {"ce": 1.0, "dist": 2.0},
  "kd_ls": {"ce": 0.1, "kd": 9.0},
  "dkd_ls": {"ce": 1.0, "dkd": 9.0},
}


def _config(method, teacher="resnet8", student="resnet8"):
  return testing_utils.load_config(CONFIG, f"method={method},teacher={teacher},student={student}")


@functools.cache
def _abstract_model(name):
  return nnx.eval_shape(lambda: models.create(name, num_classes=100))


@functools.cache
def _built(method, teacher="resnet8", student="resnet8"):
  """`distill.build` of a variant, as jaxkd.train calls it (cached: ReviewKD's adapters take
  seconds to initialise)."""
  config = _config(method, teacher, student)
  teacher_model = _abstract_model(config.teacher.model) if config.teacher.model else None
  method_plan = distill.plan(
    config.distill,
    info=distill.feature_info(CIFAR, _abstract_model(config.student.model), teacher_model),
    has_teacher=teacher_model is not None,
    steps_per_epoch=781,
  )
  return distill.build(
    method_plan,
    num_train_examples=50_000,
    train_labels=lambda: np.arange(50_000) % 100,
    rngs=nnx.Rngs(0),
  )


def _term(built, name):
  return next(term for term in built.plan.terms if term.name == name)


@pytest.mark.parametrize("method", METHODS)
def test_method_validates_and_builds(method):
  config = _config(method)
  plan.check(config)
  assert dict(config.distill.losses) == EXPECTED_WEIGHTS[method]
  built = _built(method)
  assert built.plan.hparams["losses"] == EXPECTED_WEIGHTS[method]
  assert built.plan.needs_teacher == (method != "ce")
  assert bool(config.teacher.model) == built.plan.needs_teacher
  assert config.method == method


# Features and adapters on a cross-architecture pair of the benchmark: other widths, and ShuffleV2's
# stages at half resolution (FitNet's ConvReg upsamples). Logit-only methods read no features.
@pytest.mark.parametrize(
  "method", ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "nst", "crd", "reviewkd"]
)
def test_feature_method_builds_on_a_cross_architecture_pair(method):
  config = _config(method, "resnet32x4", "ShuffleV2")
  plan.check(config)
  built = _built(method, "resnet32x4", "ShuffleV2")
  assert built.plan.student_features and built.plan.teacher_features


def test_settings_reach_the_built_terms():
  crd = _built("crd")
  assert crd.plan.hparams["crd"] == {"temperature": 0.07, "momentum": 0.5}
  assert {k: _term(crd, "crd").options[k] for k in ("feat_dim", "num_negatives", "negatives")} == {
    "feat_dim": 128,
    "num_negatives": 16384,
    "negatives": "other_class",
  }
  np.testing.assert_array_equal(crd.train_labels[:3], [0, 1, 2])  # RepDistiller's 'exact' mode
  assert crd.plan.hparams["kd"] == {"temperature": 4.0}
  rkd = _built("rkd")
  assert rkd.plan.hparams["rkd"] == {"distance_weight": 25.0, "angle_weight": 50.0}
  dist = _built("dist")
  assert dist.plan.hparams["dist"] == {"beta": 1.0, "gamma": 1.0, "temperature": 4.0}
  kd_ls = _built("kd_ls")
  assert kd_ls.plan.hparams["kd"] == {"temperature": 2.0}
  assert _term(kd_ls, "kd").options["standardize"]
  dkd_ls = _built("dkd_ls", "resnet32x4", "resnet8x4")
  assert dkd_ls.plan.hparams["dkd"] == {"alpha": 1.0, "beta": 8.0, "temperature": 2.0}
  assert _term(dkd_ls, "dkd").options["standardize"]


@pytest.mark.parametrize("method", ["dkd", "dkd_ls", "reviewkd"])
def test_warm_up_is_20_epochs(method):
  built = _built(method)
  term = _term(built, "review_kd" if method == "reviewkd" else "dkd")
  assert term.options["warmup_epochs"] == 20
  # mdistiller: loss × min(epoch / 20, 1) with the 1-based epoch; 781 steps per epoch.
  assert float(built.schedule(term, jnp.int32(0))) == pytest.approx(1 / 20)
  assert float(built.schedule(term, jnp.int32(781 * 19))) == 1.0


@pytest.mark.parametrize(
  "teacher,student,beta",
  [
    ("resnet56", "resnet20", 2.0),
    ("resnet110", "resnet32", 2.0),
    ("vgg13", "vgg8", 6.0),
    ("vgg13", "MobileNetV2", 6.0),
    ("vgg13", "mobile_half", 6.0),
    ("wrn_40_2", "wrn_16_2", 6.0),
    ("wrn_40_2", "wrn_40_1", 6.0),
    ("resnet32x4", "resnet8x4", 8.0),
    ("resnet32x4", "ShuffleV2", 8.0),
    ("wrn_40_2", "ShuffleV1", 8.0),
    ("ResNet50", "MobileNetV2", 8.0),
  ],
)
def test_dkd_beta_is_looked_up_by_pair(teacher, student, beta):
  for method in ("dkd", "dkd_ls"):
    assert _config(method, teacher, student).distill.dkd.beta == beta


def test_dkd_beta_reaches_the_traced_hparams():
  built = _built("dkd", "resnet56", "resnet20")
  assert built.plan.hparams["dkd"] == {"alpha": 1.0, "beta": 2.0, "temperature": 4.0}


@pytest.mark.parametrize(
  "teacher,student,weight",
  [
    ("resnet32x4", "resnet8x4", 5.0),
    ("resnet32x4", "ShuffleV2", 8.0),
    ("resnet56", "resnet20", 0.6),
    ("resnet110", "resnet32", 1.0),
    ("wrn_40_2", "wrn_16_2", 5.0),
  ],
)
def test_reviewkd_weight_is_looked_up_by_pair(teacher, student, weight):
  assert _config("reviewkd", teacher, student).distill.losses.review_kd == weight


@pytest.mark.parametrize(
  "teacher,student,temperature,weight",
  [
    ("resnet32x4", "resnet8x4", 2.0, 9.0),
    ("vgg13", "vgg8", 3.0, 9.0),
    ("ResNet50", "MobileNetV2", 3.0, 1.0),
    ("wrn_40_2", "wrn_40_1", 2.0, 9.0),
  ],
)
def test_kd_ls_values_are_looked_up_by_pair(teacher, student, temperature, weight):
  config = _config("kd_ls", teacher, student)
  assert (config.distill.kd.temperature, config.distill.losses.kd) == (temperature, weight)
  assert _config("kd", teacher, student).distill.kd.temperature == 4.0  # KD itself: always 4.


@pytest.mark.parametrize("method", ["ce", "kd", "crd", "dkd", "dist", "kd_ls"])
@pytest.mark.parametrize(
  "student,lr",
  [
    ("MobileNetV2", 0.01),
    ("mobile_half", 0.01),
    ("ShuffleV1", 0.01),
    ("ShuffleV2", 0.01),
    ("resnet8x4", 0.05),
    ("wrn_16_2", 0.05),
    ("vgg8", 0.05),
    ("resnet32x4", 0.05),
  ],
)
def test_learning_rate_depends_on_the_student_only(method, student, lr):
  config = testing_utils.load_config(CONFIG, f"method={method},student={student}")
  assert config.optimizer.lr == lr


def test_shared_recipe():
  for method in METHODS:
    config = _config(method)
    assert (config.num_epochs, config.data.batch_size) == (240, 64)
    assert config.data.augment == "crop_flip"
    assert tuple(config.optimizer.decay_epochs) == (150, 180, 210)
    assert (config.optimizer.momentum, config.optimizer.weight_decay) == (0.9, 5e-4)


def test_teacher_training_needs_no_teacher_and_distillation_does():
  def plan_without_teacher(method):
    config = _config(method)
    info = distill.feature_info(CIFAR, _abstract_model(config.student.model))
    return distill.plan(config.distill, info=info, has_teacher=False)

  plan_without_teacher("ce")
  with pytest.raises(ValueError, match="needs a teacher"):
    plan_without_teacher("dkd")


def test_unknown_method_is_one_line_listing_the_known_ones():
  with pytest.raises(errors.ConfigError) as error:
    _config("dkdd")
  message = str(error.value)
  assert "\n" not in message and "method='dkdd'" in message
  known = message.split("must be one of ")[1].split(", ")
  assert sorted(known) == sorted(METHODS)  # Every variant of the config is tested here.
