"""Offline language-model distillation on the Python standard library's own source files.

    python -m jaxkd.main --config=configs/lm_kd.py --workdir=/tmp/jaxkd_lm_kd

Byte-level (256 byte ids + BOS, EOS, PAD) language models on the `*.py` files of the running
interpreter's standard library (`jaxkd.data.text`, split by file into train / validation /
test). The comparison experiment (`jaxkd.experiments.compare`) trains a decoder teacher on the
training split, stores its top-k next-byte distributions once (`teacher.cache`), then the same
small student from scratch and with KD from the stored distributions, over 3 seeds, and reports
bits per byte on the test split (with agreement and KL against the teacher).

The student is data-limited, as in the image quickstart: it sees the first `student_examples`
packed windows of the training split, the teacher all of them.

Config argument: `configs/lm_kd.py:smoke` is a few steps on tiny models (tests);
`:seeds=5` more student seeds; `:size=base` larger models and budgets (a GPU or TPU).
"""

from jaxkd import configlib

# Model sizes and budgets per `size`: (teacher kwargs, student kwargs, teacher epochs,
# teacher examples (0 = all), student epochs, student examples).
_SIZES = {
  "small": (
    {"num_layers": 4, "width": 128, "num_heads": 4},
    {"num_layers": 2, "width": 64, "num_heads": 4},
    1,
    4096,
    12,
    256,
  ),
  "base": (
    {"num_layers": 8, "width": 512, "num_heads": 8},
    {"num_layers": 4, "width": 256, "num_heads": 4},
    4,
    0,
    20,
    4096,
  ),
}


def get_config(arg=None):
  arg = configlib.parse_arg(arg, smoke=False, seeds=3, size="small")
  teacher_kwargs, student_kwargs, teacher_epochs, teacher_examples, epochs, examples = _SIZES[
    arg.size
  ]
  config = configlib.base_config()
  config.experiment = "compare"
  config.method = "kd"

  config.data.name = "stdlib"
  config.data.source = "text"
  config.data.dir = ""  # '' = this interpreter's standard library.
  config.data.tokenizer = "bytes"
  config.data.seq_len = 256
  config.data.train_examples = examples  # The student's data: the first windows of train.
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.eval_examples = 512  # Bits per byte over the first 512 test windows (131k bytes).

  config.teacher.model = "transformer_lm"
  config.teacher.kwargs = teacher_kwargs
  config.student.model = "transformer_lm"
  config.student.kwargs = student_kwargs

  # Language-model conventions: T = 1, no T² factor, per-token means (jaxkd.distill).
  config.distill.losses = {"ce": 0.5, "kd": 0.5}
  config.distill.kd = {"temperature": 1.0, "scale_by_temperature_squared": False}

  config.optimizer.name = "adamw"
  config.optimizer.lr = 3e-3
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_epochs = 0.5
  config.num_epochs = epochs

  config.compare = {
    "seeds": arg.seeds,
    "teacher_epochs": teacher_epochs,
    "teacher_train_examples": teacher_examples,
  }
  config.log_every_steps = 20
  config.eval_every_epochs = 2
  config.checkpoint_every_steps = 1000

  if arg.smoke:  # Seconds: tiny models, a few steps.
    config.teacher.kwargs = {"num_layers": 1, "width": 32, "num_heads": 2}
    config.student.kwargs = {"num_layers": 1, "width": 16, "num_heads": 2}
    config.data.seq_len = 32
    config.data.train_examples = 64
    config.data.batch_size = 16
    config.data.eval_batch_size = 32
    config.data.eval_examples = 64
    config.num_epochs = 1
    config.optimizer.warmup_epochs = 0.0
    config.compare.teacher_epochs = 1
    config.compare.teacher_train_examples = 128
    config.log_every_steps = 2
    config.eval_every_epochs = 1
  return config
