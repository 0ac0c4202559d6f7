"""Hinton KD on CIFAR-100 with the recipe of RepDistiller / mdistiller / DIST.

    python -m jaxkd.main --config=configs/cifar_kd.py --workdir=/tmp/r32x4_r8x4 \
        --config.teacher.checkpoint=DIR --config.data.dir=TFDS_DATA_DIR

Recipe (/work/shared/reference/cifar100_benchmark.md): 240 epochs, SGD momentum 0.9, batch 64,
lr 0.05 (0.01 for MobileNetV2 / ShuffleNet students), ×0.1 at epochs 150, 180, 210, weight decay
5e-4, RandomCrop(32, padding 4) + horizontal flip, loss 0.1·CE + 0.9·T²·KL at T = 4, teacher in
eval mode. Reference top-1 for resnet32x4 → resnet8x4: 72.50 scratch, 73.33 KD (RepDistiller).

The teacher is a jaxkd.models.io directory: a finished jaxkd run's `<workdir>/model`, or a
converted RepDistiller checkpoint (`python -m jaxkd.tools.import_torch`).

The data is TFDS 'cifar100' prepared as array_record, read without TensorFlow; nothing is
downloaded at training time (prepare it once: `tfds build cifar100 --file_format=array_record`).

Config argument: `configs/cifar_kd.py:teacher=wrn_40_2,student=wrn_16_2` picks the pair;
`configs/cifar_kd.py:method=ce,student=resnet32x4` trains `student` with cross-entropy alone
(no teacher): how to train a teacher, whose `<workdir>/model` then serves as
`--config.teacher.checkpoint`.
"""
from jaxkd import configlib

# Students trained with lr 0.01 (RepDistiller train_student.py: `if opt.model_s in
# ['MobileNetV2', 'ShuffleV1', 'ShuffleV2']`; its 'MobileNetV2' is our 'mobile_half').
_LOW_LR_STUDENTS = ("MobileNetV2", "mobile_half", "ShuffleV1", "ShuffleV2")


def get_config(arg=None):
  arg = configlib.parse_arg(arg, teacher="resnet32x4", student="resnet8x4", method="kd")
  if arg.method not in ("kd", "ce"):
    raise configlib.ConfigError(f"config argument method={arg.method!r}: must be 'kd' or 'ce'")
  config = configlib.base_config()

  config.data.name = "cifar100"
  config.data.source = "tfds"  # tfds.data_source('cifar100', data_dir=data.dir), array_record.
  config.data.dir = ""  # '' = TFDS's default data dir (~/tensorflow_datasets or $TFDS_DATA_DIR).
  config.data.batch_size = 64
  config.data.eval_batch_size = 1000
  config.data.augment = "crop_flip"  # RandomCrop(32, padding=4) + RandomHorizontalFlip.
  config.data.num_threads = 8  # Record reads and decoding are the host's work per step.

  config.student.model = arg.student
  if arg.method == "kd":
    config.teacher.model = arg.teacher  # Checked against the checkpoint's model.json.
    config.teacher.checkpoint = ""  # Required: a jaxkd.models.io directory of the teacher.
    config.distill.losses = {"ce": 0.1, "kd": 0.9}
    config.distill.kd = {"temperature": 4.0}  # RepDistiller DistillKL: T² · KL(p_T ‖ q_T).
  else:
    config.distill.losses = {"ce": 1.0}

  config.num_epochs = 240
  config.optimizer.name = "sgd"
  config.optimizer.lr = 0.01 if arg.student in _LOW_LR_STUDENTS else 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "step"
  config.optimizer.decay_epochs = (150, 180, 210)
  config.optimizer.decay_factor = 0.1

  config.log_every_steps = 200
  config.eval_every_epochs = 1  # RepDistiller evaluates every epoch; we log last and best.
  config.checkpoint_every_steps = 781 * 5  # Every 5 epochs (781 steps per epoch at batch 64).
  return config
