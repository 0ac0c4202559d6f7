"""ImageNet (ILSVRC-2012) distillation with the recipes of the KD benchmark, and function matching.

    python -m jaxkd.main --config=configs/imagenet_kd.py:pair=r34_r18,method=dkd \
        --workdir=/runs/in_dkd_r34_r18 --config.teacher.checkpoint=/teachers/resnet34 \
        --config.data.dir=DATA_DIR

Config argument `pair=P,method=M` (defaults r34_r18, kd). Pairs (`PAIRS`): r34_r18 (torchvision
ResNet-34 → ResNet-18) and r50_mv1 (torchvision ResNet-50 → mdistiller's MobileNetV1). The
teachers are torchvision's pretrained weights (73.31 / 76.13 top-1), converted once with
`python -m jaxkd.tools.import_torch --model resnet34 --checkpoint resnet34.pth --out DIR`.

| `method=` | loss | source |
|---|---|---|
| `ce` | CE (the student from scratch) | mdistiller's baseline: the same recipe |
| `kd` | 0.5·CE + 0.5·KD, T = 1 | mdistiller `configs/imagenet/<pair>/kd.yaml` |
| `dkd` | CE + DKD (α 1, β 0.5 (r34_r18) / 2 (r50_mv1), T 1, warm-up 1 epoch) | mdistiller `dkd.yaml` |
| `dist` | CE + 2·DIST (τ 1, β = γ = 1) | DIST_KD README, ImageNet |
| `fm` | KL(teacher ‖ student) at T = 1, no labels, one mixup view for both | big_vision |

Shared recipe (mdistiller `configs/imagenet/*`): 100 epochs, batch 512, SGD momentum 0.9, lr 0.2,
×0.1 at epochs 30, 60, 90, weight decay 1e-4; RandomResizedCrop(224) + horizontal flip to train,
Resize(256) + CenterCrop(224) to evaluate, cut on the host (`jaxkd.data.imagenet`).

`fm`, function matching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient
and consistent"; big_vision `configs/proj/distill/bit_i1k.py`): teacher and student see the same
aggressively augmented view, the inception crop + flip then mixup (`utils.mixup(p=1, n=2)`, here
`data.augment='mixup'` inside the step), and the student matches the teacher's distribution on
it, KL at T = 1 alone, no labels; patience: batch 4096, 1200 epochs, Adam (β 0.9, 0.999), lr 0.03
cosine after 5,000 warm-up steps. big_vision's weight decay 3e-4 is decoupled and scaled by the
schedule but not by the lr; optax's adamw scales it by the lr, hence 3e-4 / 0.03 = 0.01 here.
Not reproduced: big_vision decays kernels only (here every parameter), clips the gradient's
global norm at 1 (jaxkd's optimiser has no clipping field), keeps Adam's first moment in
bfloat16, and trains on train[:98%]; its teacher is BiT-R152x2, here the pair's teacher.

Data: TFDS 'imagenet2012' prepared as array_record (a manual download; the error message without
it says how), read without TensorFlow. JPEG decoding is the host's work per example: the
batches are computed in `data.num_workers` worker processes (grain, shared memory: in a
container, give /dev/shm a few GB, e.g. `docker run --shm-size=16g`).
"""

import copy

from jaxkd import configlib

# pair → (teacher, student), names of jaxkd.models.
PAIRS = {"r34_r18": ("resnet34", "resnet18"), "r50_mv1": ("resnet50", "mobilenet_v1")}

# ILSVRC-2012 'train': the steps of an epoch follow from it.
TRAIN_EXAMPLES = 1_281_167

# method → config.distill.
METHODS = {
  "ce": {"losses": {"ce": 1.0}},
  # mdistiller configs/imagenet/<pair>/kd.yaml: KD.TEMPERATURE 1, CE_WEIGHT 0.5, KD_WEIGHT 0.5.
  "kd": {"losses": {"ce": 0.5, "kd": 0.5}, "kd": {"temperature": 1.0}},
  # mdistiller configs/imagenet/<pair>/dkd.yaml: CE_WEIGHT 1, BETA (per pair), T 1, WARMUP 1;
  # ALPHA keeps CFG.DKD.ALPHA 1.
  "dkd": {
    "losses": {"ce": 1.0, "dkd": 1.0},
    "dkd": {"alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup_epochs": 1},
  },
  # DIST_KD README, ImageNet: τ 1, β = γ = 1, loss weights CE 1, DIST 2.
  "dist": {
    "losses": {"ce": 1.0, "dist": 2.0},
    "dist": {"beta": 1.0, "gamma": 1.0, "temperature": 1.0},
  },
  # big_vision bit_i1k.py: config.distance = 'kl', distance_kw = dict(t=1.0); no label term.
  "fm": {"losses": {"kd": 1.0}, "kd": {"temperature": 1.0}},
}
# mdistiller configs/imagenet/r50_mv1/dkd.yaml DKD.BETA.
_DKD_BETA = {"r50_mv1": 2.0}


def recipe(method: str, pair: str) -> dict:
  """`config.distill` of `method` for `pair`."""
  if method not in METHODS:
    raise configlib.ConfigError(
      f"config argument method={method!r}: must be one of {', '.join(METHODS)}"
    )
  distill = copy.deepcopy(METHODS[method])
  if method == "dkd" and pair in _DKD_BETA:
    distill["dkd"]["beta"] = _DKD_BETA[pair]
  return distill


def get_config(arg=None):
  arg = configlib.parse_arg(arg, pair="r34_r18", method="kd")
  if arg.pair not in PAIRS:
    raise configlib.ConfigError(
      f"config argument pair={arg.pair!r}: must be one of {', '.join(PAIRS)}"
    )
  teacher, student = PAIRS[arg.pair]
  config = configlib.base_config()
  config.method = arg.method
  config.distill = recipe(arg.method, arg.pair)

  config.data.name = "imagenet2012"
  config.data.source = "tfds"
  config.data.dir = ""  # '' = TFDS's default data dir (~/tensorflow_datasets or $TFDS_DATA_DIR).
  config.data.batch_size = 512
  config.data.eval_batch_size = 512  # 50,000 validation images: 98 batches, the last padded.
  # The views are cut on the host: 'none' in the step, but for function matching's mixup.
  config.data.augment = "mixup" if arg.method == "fm" else "none"
  config.data.num_threads = 1  # Per worker: the workers are the parallelism.
  config.data.num_workers = 16  # Worker processes decoding JPEGs (mdistiller's loaders: 32).

  config.student.model = student
  if arg.method != "ce":
    config.teacher.model = teacher  # Checked against the checkpoint's model.json.
    config.teacher.checkpoint = ""  # Required: a jaxkd.models.io directory of the teacher.

  config.optimizer.name = "sgd"
  config.optimizer.lr = 0.2
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "step"
  config.optimizer.decay_epochs = (30, 60, 90)
  config.optimizer.decay_factor = 0.1
  config.num_epochs = 100
  config.eval_every_epochs = 1

  if arg.method == "fm":
    config.data.batch_size = 4096
    config.num_epochs = 1200
    config.optimizer.name = "adamw"
    config.optimizer.lr = 0.03
    config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
    config.optimizer.weight_decay = 3e-4 / 0.03  # big_vision's wd, in optax's convention
    config.optimizer.schedule = "cosine"
    config.optimizer.decay_epochs = ()
    config.optimizer.warmup_epochs = 5000 / (TRAIN_EXAMPLES // config.data.batch_size)
    config.eval_every_epochs = 10

  config.log_every_steps = 100
  config.checkpoint_every_steps = TRAIN_EXAMPLES // config.data.batch_size  # every epoch
  return config
