"""Distil a Hugging Face causal LM you have on disk into a smaller student of its family.

    python -m jaxkd.main --config=configs/hf_kd.py \
        --config.teacher.checkpoint=/path/to/Qwen2.5-0.5B --workdir=/tmp/hf_kd

The teacher is a local Hugging Face directory (config.json, *.safetensors, tokenizer.json; a
Llama, Qwen2/3, Gemma 1/2/3 or GPT-2 model: docs/huggingface.md), loaded by
`jaxkd.models.hf` — nothing is downloaded. The data is the Python standard library's sources
(`configs/lm_kd.py`'s corpus) tokenized with the teacher's own tokenizer; any directory of text
files works with `--config.data.name=text_files --config.data.dir=DIR`.

Config argument:
  * default: the student is a fresh `transformer_lm` of `width` and `depth` with the teacher's
    vocabulary, trained from scratch with KD.
  * `layers=0-2-4`: the student is the teacher keeping these layers, its weights copied
    (`config.student.teacher_layers`; MiniLM / Gemma-style initialisation).
  * `stored`: the KD student reads the teacher's top-p-k distributions stored once
    (`teacher.cache`, pre-training distillation's storage) instead of running it every step.
The trained student is also written as a Hugging Face directory, `<workdir>/hf`.
"""

from jaxkd import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, layers="", width=256, depth=4, stored=False)
  config = configlib.base_config()
  config.method = "kd"
  config.data.name = "stdlib"
  config.data.source = "text"
  config.data.tokenizer = "teacher"  # the teacher directory's tokenizer.json
  config.data.seq_len = 512
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.eval_examples = 256

  config.teacher.model = "transformer_lm"
  config.teacher.checkpoint = ""  # Required: the Hugging Face directory.
  config.teacher.dtype = "bfloat16"

  config.student.model = "transformer_lm"
  if arg.layers:
    config.student.teacher_layers = tuple(int(layer) for layer in arg.layers.split("-"))
  else:
    config.student.kwargs = {"num_layers": arg.depth, "width": arg.width, "num_heads": 4}
  config.student.export_hugging_face = True

  # Language-model conventions: T = 1, no T² factor, per-token means.
  config.distill.losses = {"ce": 0.5, "kd": 0.5}
  config.distill.kd = {"temperature": 1.0, "scale_by_temperature_squared": False}
  if arg.stored:
    config.teacher.cache.dir = ""  # set it: --config.teacher.cache.dir=DIR
    config.teacher.cache.topk = 50
    config.teacher.cache.top_p = 0.95
    config.teacher.cache.dtype = "bfloat16"

  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-4
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_epochs = 0.1
  config.num_epochs = 1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  return config
