"""Offline language-model distillation on the Python standard library's own source files.

    python -m jaxkd.main --config=configs/lm_kd.py --workdir=/tmp/jaxkd_lm_kd
    python -m jaxkd.main --config=configs/lm_kd.py:method=gkd --workdir=/tmp/jaxkd_lm_gkd

Byte-level (256 byte ids + BOS, EOS, PAD) language models on the `*.py` files of the running
interpreter's standard library (`jaxkd.data.text`, split by file into train / validation /
test). The comparison experiment (`jaxkd.experiments.compare`) trains a decoder teacher on the
training split, then the same small student from scratch and with KD, over 3 seeds, and reports
bits per byte on the test split (with next-byte agreement and KL against the teacher). The
student is data-limited, as in the image quickstart: it sees the first `student_examples`
packed windows of the training split, the teacher many more.

Config argument `method=M` (default 'kd'):
  * 'kd': (1 − α)·CE + α·KL(teacher ‖ student), α 0.5, T 1, from the teacher's next-byte
    distributions stored once (`teacher.cache`), truncated as in pre-training distillation:
    top-p 0.95 then top-50, float16 (Peng et al. 2024).
  * 'pretrain': pre-training distillation's best recipe: the stored top-p-k teacher, KD as
    KL, α warmup-stable-decay to 0.9 with a WSD learning rate (Peng et al. 2024).
  * 'gkd': on-policy GKD (Agarwal et al. 2024; TRL's GKDTrainer defaults): with probability
    λ = 0.5 the continuation after the first half of a window is the student's own sample
    (T 0.9), scored by the teacher; generalised JSD β 0.5.
  * 'seq_kd': sequence-level KD (Kim & Rush 2016): continuations are the teacher's samples.
  * 'skd': speculative KD (Xu et al. 2024, the authors' defaults): student proposals (T 0.5,
    top-p 0.5) outside the teacher's top-25 replaced by teacher samples (T 0.2, top-p 0.5),
    drafts of 5 tokens; KL(teacher ‖ student).
  * 'chunked': 'kd' with a live teacher through `chunked_lm`: CE and KD from hidden states,
    chunk by chunk, never building [batch, sequence, vocabulary] logits.
`smoke` is a few steps on tiny models (tests); `seeds=5` more student seeds; `size=base`
larger models and budgets (a GPU or TPU).
"""

import copy

from jaxkd import configlib

# Per `size`: (teacher kwargs, student kwargs, teacher epochs, teacher examples (0 = all),
# student epochs, student examples).
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
# Language-model conventions: T = 1, no T² factor, per-token means (jaxkd.distill).
_KL = {"temperature": 1.0, "scale_by_temperature_squared": False}
_METHODS = {
  "kd": {"losses": {"ce": 0.5, "kd": 0.5}, "kd": _KL},
  "pretrain": {
    "losses": {"ce": 1.0, "kd": 1.0},
    "kd": _KL,
    "alpha": {"schedule": "wsd", "peak": 0.9, "warmup_fraction": 0.1, "decay_fraction": 0.1},
  },
  # TRL GKDConfig: beta 0.5, temperature 1, lmbda 0.5; the loss is the JSD alone.
  "gkd": {"losses": {"jsd": 1.0}, "jsd": {"beta": 0.5, "temperature": 1.0}},
  "seq_kd": {"losses": {"kd": 1.0}, "kd": _KL},
  "skd": {"losses": {"kd": 1.0}, "kd": _KL},
  "chunked": {"losses": {"chunked_lm": 1.0}, "chunked_lm": {"alpha": 0.5, "chunk_size": 256}},
}
_SAMPLING = {"gkd": "on_policy", "seq_kd": "seq_kd", "skd": "speculative"}


def get_config(arg=None):
  arg = configlib.parse_arg(arg, smoke=False, seeds=3, size="small", method="kd")
  if arg.method not in _METHODS:
    raise configlib.ConfigError(
      f"config argument method={arg.method!r}: must be one of {', '.join(_METHODS)}"
    )
  teacher_kwargs, student_kwargs, teacher_epochs, teacher_examples, epochs, examples = _SIZES[
    arg.size
  ]
  config = configlib.base_config()
  config.experiment = "compare"
  config.method = arg.method

  config.data.name = "stdlib"
  config.data.source = "text"
  config.data.dir = ""  # '' = this interpreter's standard library.
  config.data.tokenizer = "bytes"
  config.data.seq_len = 256
  config.data.train_examples = examples  # The student's data: the first windows of train.
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.eval_examples = 256  # Bits per byte over the first 256 test windows (65k bytes).

  config.teacher.model = "transformer_lm"
  config.teacher.kwargs = teacher_kwargs
  config.student.model = "transformer_lm"
  config.student.kwargs = student_kwargs
  config.distill = copy.deepcopy(_METHODS[arg.method])
  stored_teacher = arg.method in ("kd", "pretrain")
  if stored_teacher:
    # Peng et al. 2024's storage: top-p 0.95, then top-50 (their best k), float16.
    config.teacher.cache.topk = 50
    config.teacher.cache.top_p = 0.95
    config.teacher.cache.dtype = "float16"
  if arg.method in _SAMPLING:
    config.sampling.kind = _SAMPLING[arg.method]
    config.sampling.prompt_len = config.data.seq_len // 2

  config.optimizer.name = "adamw"
  config.optimizer.lr = 3e-3
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = "wsd" if arg.method == "pretrain" else "cosine"
  config.optimizer.warmup_epochs = 0.5
  config.num_epochs = epochs

  config.compare = {
    "seeds": arg.seeds,
    "teacher_epochs": teacher_epochs,
    "teacher_train_examples": teacher_examples,
    # The KD students read <workdir>/teacher/cache: written once, by the first of them.
    "cache_teacher": stored_teacher,
  }
  config.log_every_steps = 20
  config.eval_every_epochs = 4  # each evaluation runs the teacher too (agreement, KL)
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
    if arg.method in _SAMPLING:
      config.sampling.prompt_len = 16
    if arg.method == "chunked":
      config.distill.chunked_lm.chunk_size = 8
  return config
