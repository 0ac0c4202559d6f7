"""Offline quickstart: the whole KD story on Fashion-MNIST in minutes on a laptop CPU.

    python -m jaxkd.main --config=configs/quickstart.py --workdir=/tmp/jaxkd_quickstart

Trains a CNN teacher on the 60,000 training images, then the same small student twice per
seed, from scratch and with Hinton KD from that teacher, and prints (and writes to
<workdir>/results.md and results.json) top-1, agreement with the teacher and
KL(teacher ‖ student) on the 10,000 test images, as mean ± std over seeds (jaxkd.experiments.compare).

The data are the IDX files of Debian's `dataset-fashion-mnist` (/usr/share/datasets/
fashion-mnist/); `--config.data.dir=DIR` reads them from any directory, and
`--config.data.source=tfds` from a prepared TFDS 'fashion_mnist'.

Config argument: `configs/quickstart.py:smoke` is a few steps on a tiny slice (tests);
`:seeds=5` runs more student seeds.
"""

from jaxkd import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, smoke=False, seeds=3)
  config = configlib.base_config()

  config.data.name = "fashion_mnist"
  config.data.source = "idx"
  config.data.dir = ""  # '' = /usr/share/datasets/fashion-mnist (Debian's package).
  # The students learn from the first 5,000 training images only: KD's soft targets carry what
  # the teacher learnt from all 60,000 (Hinton et al. 2015, §3 "soft targets as regularizers").
  config.data.train_examples = 5000
  config.data.batch_size = 128
  config.data.eval_batch_size = 1000
  config.data.augment = "none"  # Without augmentation, so the teacher sees the student's view.

  # Teacher: 3 conv layers, 32-64-128 channels; trained first by jaxkd.compare.
  config.teacher.model = "small_cnn"
  config.teacher.kwargs = {"widths": (32, 64, 128), "depth": 1, "flatten": True}
  # Student: 8-16-32 channels.
  config.student.model = "small_cnn"
  config.student.kwargs = {"widths": (8, 16, 32), "depth": 1, "flatten": True}

  # Hinton KD with the CIFAR reference weights: 0.1·CE + 0.9·T²·KL(p_T ‖ q_T), T = 4.
  config.distill.losses = {"ce": 0.1, "kd": 0.9}
  config.distill.kd = {"temperature": 4.0}

  config.optimizer.name = "sgd"
  config.optimizer.lr = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "cosine"
  config.num_epochs = 10  # Student epochs (over data.train_examples).

  config.experiment = "compare"  # jaxkd.experiments.compare: teacher, then students.
  config.compare = {
    "seeds": arg.seeds,  # Student seeds: config.seed, config.seed + 1, ...
    "teacher_epochs": 2,  # Over teacher_train_examples.
    "teacher_train_examples": 0,  # 0 = all 60,000 training images.
  }
  config.log_every_steps = 50
  config.eval_every_epochs = 1  # Curves with a point per epoch (jaxkd.report plots them).
  config.checkpoint_every_steps = 500

  if arg.smoke:  # Seconds, not minutes: exercises every stage, learns little.
    config.data.train_examples = 256
    config.data.batch_size = 32
    config.data.eval_batch_size = 2000
    config.num_epochs = 1
    config.compare.teacher_epochs = 1
    config.compare.teacher_train_examples = 256
    config.log_every_steps = 4
  return config
