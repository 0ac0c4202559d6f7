"""CIFAR-100 distillation with the recipes of the KD benchmark, one `method=` per published method.

    python -m jaxkd.main \
        --config=configs/cifar_kd.py:method=dkd,teacher=resnet32x4,student=resnet8x4 \
        --workdir=/tmp/dkd_r32x4_r8x4 --config.teacher.checkpoint=DIR --config.data.dir=DATA_DIR

Config argument `method=M,teacher=T,student=S` (defaults kd, resnet32x4, resnet8x4). `M` is a key
of `METHODS`: kd, fitnet, at, sp, cc, vid, rkd, pkt, nst, crd (RepDistiller), dkd, reviewkd
(mdistiller), dist (DIST_KD), kd_ls, dkd_ls (logit standardisation), and ce: `student` trained
with cross-entropy alone and no teacher, which is how the teachers are trained; its
`<workdir>/model` then serves as `--config.teacher.checkpoint`.

Shared recipe (RepDistiller train_student.py, mdistiller configs/cifar100/*.yaml): 240 epochs,
SGD momentum 0.9, batch 64, lr 0.05 (0.01 for MobileNetV2 / ShuffleNet students), ×0.1 at epochs
150, 180, 210, weight decay 5e-4, RandomCrop(32, padding 4) + horizontal flip, teacher in eval mode.
What differs between methods (loss weights and settings) is one entry of `METHODS`; what differs
between teacher/student pairs (DKD β, ReviewKD weight, KD+LS temperature) is looked up in
`PAIR_VALUES`.

The teacher is a jaxkd.models.io directory: a finished jaxkd run's `<workdir>/model`, or a converted
RepDistiller / mdistiller checkpoint (`python -m jaxkd.tools.import_torch`). The data is TFDS
'cifar100' prepared as array_record, read without TensorFlow; nothing is downloaded at training time
(prepare it once: `tfds build cifar100 --file_format=array_record`).
"""

import copy

from jaxkd import configlib


def _repdistiller(loss: str, weight: float, **settings) -> dict:
  """RepDistiller's `γ·CE + α·KD + β·loss` with its scripts' `-r 1 -a 0 -b weight`.

  helper/loops.py train_distill computes `opt.gamma * loss_cls + opt.alpha * loss_div +
  opt.beta * loss_kd`, loss_div being KD at --kd_T 4. The KD term stays in at weight 0, as there:
  `--config.distill.losses.kd=1` is the paper's "+KD" variant (e.g. CRD+KD, `-a 1 -b 0.8`).
  """
  return {
    "losses": {"ce": 1.0, "kd": 0.0, loss: weight},
    "kd": {"temperature": 4.0},
    **({loss: settings} if settings else {}),
  }


# method → config.distill: loss name → weight, and one settings dict per loss (jaxkd.distill).
METHODS = {
  # RepDistiller train_teacher.py / mdistiller configs/cifar100/vanilla.yaml: cross-entropy only.
  "ce": {"losses": {"ce": 1.0}},
  # RepDistiller scripts/run_cifar_distill.sh `--distill kd -r 0.1 -a 0.9 -b 0`, --kd_T 4;
  # mdistiller CFG.KD: CE_WEIGHT 0.1, KD_WEIGHT 0.9, TEMPERATURE 4.
  "kd": {"losses": {"ce": 0.1, "kd": 0.9}, "kd": {"temperature": 4.0}},
  # run_cifar_distill.sh `--distill hint -a 0 -b 100`: hint_layer 2 (stage2), ConvReg regressor.
  "fitnet": _repdistiller("fitnet", 100.0),
  # `--distill attention -a 0 -b 1000`: Attention(p=2) summed over feat[1:-1] (every stage).
  "at": _repdistiller("attention_transfer", 1000.0, p=2),
  # `--distill similarity -a 0 -b 3000`: feat[-2] (last stage).
  "sp": _repdistiller("similarity_preserving", 3000.0),
  # `--distill correlation -a 0 -b 0.02`: LinearEmbed to --feat_dim 128 on feat[-1].
  "cc": _repdistiller("correlation_congruence", 0.02, feat_dim=128),
  # `--distill vid -a 0 -b 1`: VIDLoss(s, t, t) per stage, init_pred_var 5, eps 1e-5.
  "vid": _repdistiller("vid", 1.0, init_pred_var=5.0, eps=1e-5),
  # `--distill rkd -a 0 -b 1`: RKDLoss(w_d=25, w_a=50) on feat[-1].
  "rkd": _repdistiller("rkd", 1.0, distance_weight=25.0, angle_weight=50.0),
  # `--distill pkt -a 0 -b 30000` on feat[-1].
  "pkt": _repdistiller("pkt", 30000.0),
  # `--distill nst -a 0 -b 50`: NSTLoss (polynomial kernel, degree 2) over feat[1:-1].
  "nst": _repdistiller("nst", 50.0, degree=2),
  # `--distill crd -a 0 -b 0.8`: --feat_dim 128, --nce_k 16384, --nce_t 0.07, --nce_m 0.5;
  # negatives among other classes (CIFAR100InstanceSample, --mode exact).
  "crd": _repdistiller(
    "crd",
    0.8,
    feat_dim=128,
    num_negatives=16384,
    temperature=0.07,
    momentum=0.5,
    negatives="other_class",
  ),
  # mdistiller CFG.DKD: CE_WEIGHT 1, ALPHA 1, BETA 8 (per pair: PAIR_VALUES), T 4, WARMUP 20
  # (loss × min(epoch / 20, 1), 1-based epoch).
  "dkd": {
    "losses": {"ce": 1.0, "dkd": 1.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20},
  },
  # mdistiller CFG.REVIEWKD: CE_WEIGHT 1, WARMUP_EPOCHS 20, MAX_MID_CHANNEL 512;
  # configs/cifar100/reviewkd.yaml REVIEWKD_WEIGHT 5 (per pair: PAIR_VALUES).
  "reviewkd": {
    "losses": {"ce": 1.0, "review_kd": 5.0},
    "review_kd": {"warmup_epochs": 20, "max_mid_channels": 512},
  },
  # DIST_KD README, CIFAR-100 (configs/strategies/distill/dist_cifar.yaml): CE 1, DIST 2, τ 4,
  # β = γ = 1 (the DIST_KD README's CIFAR-100 settings).
  "dist": {
    "losses": {"ce": 1.0, "dist": 2.0},
    "dist": {"beta": 1.0, "gamma": 1.0, "temperature": 4.0},
  },
  # logit-standardization-KD README `--logit-stand --base-temp 2 --kd-weight 9`: tools/train.py
  # sets KD.TEMPERATURE 2 and KD_WEIGHT 9, CE_WEIGHT stays mdistiller's 0.1; z-score with
  # torch's unbiased std, ε = 1e-7 (jaxkd.losses.logit.standardize). Per pair: PAIR_VALUES.
  "kd_ls": {"losses": {"ce": 0.1, "kd": 9.0}, "kd": {"temperature": 2.0, "standardize": True}},
  # Same flags on DKD: tools/train.py multiplies DKD.ALPHA and DKD.BETA by 9 and sets DKD.T 2;
  # 9 · (α·TCKD + β·NCKD) is the DKD term at weight 9. β per pair as DKD's.
  "dkd_ls": {
    "losses": {"ce": 1.0, "dkd": 9.0},
    "dkd": {
      "alpha": 1.0,
      "beta": 8.0,
      "temperature": 2.0,
      "standardize": True,
      "warmup_epochs": 20,
    },
  },
}

# mdistiller configs/cifar100/dkd/<pair>.yaml DKD.BETA (the other pairs keep CFG.DKD.BETA 8).
_DKD_BETA = {
  ("resnet56", "resnet20"): 2.0,
  ("resnet110", "resnet32"): 2.0,
  ("vgg13", "vgg8"): 6.0,
  ("vgg13", "MobileNetV2"): 6.0,
  ("wrn_40_2", "wrn_16_2"): 6.0,
  ("wrn_40_2", "wrn_40_1"): 6.0,
}
# method → (section, key) → {(teacher, student): value}; other pairs keep METHODS' value.
PAIR_VALUES = {
  "dkd": {("dkd", "beta"): _DKD_BETA},
  "dkd_ls": {("dkd", "beta"): _DKD_BETA},
  # dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh --kd-loss-weight (the others 5).
  "reviewkd": {
    ("losses", "review_kd"): {
      ("resnet32x4", "ShuffleV2"): 8.0,
      ("resnet56", "resnet20"): 0.6,
      ("resnet110", "resnet32"): 1.0,
    }
  },
  # The LS README's result table links each number to logs/KD/kd,<T>,<S>,<base temp>,<kd weight>
  # .txt: base temperature 3 for these pairs (2 for the others), KD weight 1 for ResNet50 → MV2.
  "kd_ls": {
    ("kd", "temperature"): {
      ("vgg13", "vgg8"): 3.0,
      ("vgg13", "MobileNetV2"): 3.0,
      ("wrn_40_2", "MobileNetV2"): 3.0,
      ("resnet32x4", "wrn_16_2"): 3.0,
      ("resnet32x4", "wrn_40_2"): 3.0,
      ("ResNet50", "MobileNetV2"): 3.0,
    },
    ("losses", "kd"): {("ResNet50", "MobileNetV2"): 1.0},
  },
}

# Reference names of one zoo model: RepDistiller's model_dict calls MobileNetV2 `mobile_half`.
_CANONICAL_NAMES = {"mobile_half": "MobileNetV2"}

# Trained at lr 0.01, every method and the teachers alike: RepDistiller train_student.py and
# train_teacher.py (`if opt.model_s in ['MobileNetV2', 'ShuffleV1', 'ShuffleV2']`), mdistiller's
# yamls for these students (SOLVER.LR 0.01), DIST_KD README ("lr ... should be 0.01").
_MODEL_LR = {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}
_DEFAULT_LR = 0.05


def canonical(model: str) -> str:
  """The name the pair tables use for `model` (the zoo registers some models twice)."""
  return _CANONICAL_NAMES.get(model, model)


def learning_rate(student: str) -> float:
  """Peak lr of the model being trained (the student, or the teacher under method=ce)."""
  return _MODEL_LR.get(canonical(student), _DEFAULT_LR)


def recipe(method: str, teacher: str, student: str) -> dict:
  """The `config.distill` of `method` for the pair: METHODS' entry with the pair's PAIR_VALUES."""
  if method not in METHODS:
    raise configlib.ConfigError(
      f"config argument method={method!r}: must be one of {', '.join(sorted(METHODS))}"
    )
  distill = copy.deepcopy(METHODS[method])
  pair = (canonical(teacher), canonical(student))
  for (section, key), by_pair in PAIR_VALUES.get(method, {}).items():
    if pair in by_pair:
      distill[section][key] = by_pair[pair]
  return distill


def get_config(arg=None):
  arg = configlib.parse_arg(arg, teacher="resnet32x4", student="resnet8x4", method="kd")
  config = configlib.base_config()
  config.distill = recipe(arg.method, arg.teacher, arg.student)
  config.method = arg.method

  config.data.name = "cifar100"
  config.data.source = "tfds"  # tfds.data_source('cifar100', data_dir=data.dir), array_record.
  config.data.dir = ""  # '' = TFDS's default data dir (~/tensorflow_datasets or $TFDS_DATA_DIR).
  config.data.batch_size = 64
  config.data.eval_batch_size = 1000
  config.data.augment = "crop_flip"  # RandomCrop(32, padding=4) + RandomHorizontalFlip.
  config.data.num_threads = 8  # Record reads and decoding are the host's work per step.

  config.student.model = arg.student
  if arg.method != "ce":  # Every other method distils from `teacher`.
    config.teacher.model = arg.teacher  # Checked against the checkpoint's model.json.
    config.teacher.checkpoint = ""  # Required: a jaxkd.models.io directory of the teacher.

  config.num_epochs = 240
  config.optimizer.name = "sgd"
  config.optimizer.lr = learning_rate(arg.student)
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "step"
  config.optimizer.decay_epochs = (150, 180, 210)
  config.optimizer.decay_factor = 0.1

  config.log_every_steps = 200
  config.eval_every_epochs = 1  # RepDistiller evaluates every epoch; we log last and best.
  config.checkpoint_every_steps = 781 * 5  # Every 5 epochs (781 steps per epoch at batch 64).
  return config
