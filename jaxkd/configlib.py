"""The training config: every field with its default and meaning, in one place.

Config files (configs/*.py) start from `base_config()` and override what their experiment
changes; `python -m jaxkd.main` locks the result, so `--config.x=y` can change a field but a
misspelt one is an error. `jaxkd.plan` checks the values (and what only the run knows: devices,
data, models, teacher) before anything is built or compiled.
"""

import ml_collections

from jaxkd.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment: a supervised run of a small CNN on Fashion-MNIST."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds the student's init, the data order and the augmentation.
  # '' = one training run (jaxkd.train); a name in jaxkd.experiments.EXPERIMENTS runs that
  # experiment, which composes training runs (e.g. 'compare': teacher, then students).
  config.experiment = ""
  # A name for the method in reports ('kd', 'dkd', ...); '' = derived from distill.losses.
  config.method = ""

  config.data = ml_collections.ConfigDict()
  # Images: a key of jaxkd.data.DATASETS ('fashion_mnist', 'cifar100'). Text: a corpus of
  # jaxkd.data.LOCAL_CORPORA ('stdlib': this Python's standard library sources; 'text_files':
  # the files under data.dir) or, with source 'tfds_text', a TFDS dataset name.
  config.data.name = "fashion_mnist"
  # Images: 'idx' (four IDX files in data.dir) or 'tfds' (prepared array_record). Text: 'text'
  # (a local corpus, split by file) or 'tfds_text' (a TFDS text dataset, its `text_key`).
  config.data.source = "idx"
  config.data.dir = ""  # '' = the default place (Debian's IDX directory / the TFDS data dir).
  config.data.train_examples = 0  # 0 = the whole train split; N = its first N examples.
  config.data.batch_size = 128  # Global batch (split over all devices of all processes).
  config.data.eval_batch_size = 1000  # Global batch of the test-split evaluation.
  config.data.eval_examples = 0  # 0 = the whole test split; N = its first N examples.
  config.data.augment = "none"  # A name in jaxkd.data.AUGMENTATIONS, applied inside the step.
  config.data.num_threads = 2  # grain threads reading and normalising host batches.
  # grain worker processes computing host batches (decoded datasets: ImageNet's JPEGs): 0 =
  # threads only, -1 = one per CPU core; each holds about num_threads + 1 batches in memory.
  config.data.num_workers = 0
  # Text (language models, jaxkd.tasks.CausalLM): packed examples of seq_len tokens.
  config.data.seq_len = 256
  # 'bytes' (256 byte ids + BOS, EOS, PAD), a Hugging Face directory with tokenizer.json, or
  # 'teacher' (the Hugging Face teacher's own, teacher.checkpoint).
  config.data.tokenizer = "bytes"
  config.data.text_key = "text"  # 'tfds_text': the feature holding the text.

  # The model being trained; jaxkd.models.create(model, num_classes=<dataset's>, **kwargs).
  config.student = ml_collections.ConfigDict()
  config.student.model = "small_cnn"  # A name in jaxkd.models.names().
  config.student.kwargs = ml_collections.ConfigDict()  # Extra create() arguments (widths, ...).
  # Language models: () = student.model from scratch; layer indices of a transformer_lm teacher
  # = the student is that teacher with only these layers, its weights copied (MiniLM- and
  # Gemma-style initialisation), e.g. (0, 2, 4) of 6.
  config.student.teacher_layers = ()
  # Also write the trained student as a Hugging Face directory (<workdir>/hf: config.json,
  # model.safetensors, the tokenizer) for serving; transformer_lm students only.
  config.student.export_hugging_face = False

  # The teacher: a jaxkd.models.io directory (what every finished run exports to
  # <workdir>/model, or `python -m jaxkd.tools.import_torch` writes), or a Hugging Face causal
  # LM directory (config.json + safetensors: jaxkd.models.hf). Without one, the run is plain
  # supervised training; with one, evaluation also reports agreement and KL with it.
  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = ""  # Expected architecture name (checked against the directory).
  config.teacher.checkpoint = ""  # '' = no teacher; 'dir1,dir2,...' = an ensemble.
  # How an ensemble's outputs combine: 'mean_logits', 'mean_probs' (log of the mean
  # distribution) or 'per_teacher' (every teacher term per teacher, averaged).
  config.teacher.ensemble = "mean_logits"
  config.teacher.kwargs = ml_collections.ConfigDict()  # create() arguments when a run trains it.
  config.teacher.dtype = "float32"  # Compute dtype: 'float32' or 'bfloat16' (large teachers).
  # Cached teacher (jaxkd.teachers.cache): with a dir, the teacher's outputs on every training
  # example are computed once into it (if absent; reused and verified against the data and the
  # teacher weights otherwise) and training reads them instead of running the teacher. Only for
  # fixed views (data.augment='none'); evaluation still runs the teacher.
  config.teacher.cache = ml_collections.ConfigDict()
  config.teacher.cache.dir = ""  # '' = run the teacher inside every step.
  # 0 = dense logits; k = the top-p nucleus, then at most k classes, of the teacher at τ
  # (pre-training distillation's storage, Peng et al. 2024: p 0.95, k 100 (50 best), τ 1).
  config.teacher.cache.topk = 0
  config.teacher.cache.top_p = 1.0
  config.teacher.cache.temperature = 1.0  # τ of the stored distribution.
  config.teacher.cache.dtype = "float32"  # 'float32', 'float16' or 'bfloat16' (log-)probabilities.

  # The distillation method (jaxkd.distill): loss name → weight, and one settings dict per loss.
  config.distill = ml_collections.ConfigDict()
  config.distill.losses = ml_collections.ConfigDict({"ce": 1.0})

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # 'sgd' (PyTorch SGD: coupled L2 decay) or 'adamw'.
  config.optimizer.lr = 0.05  # Peak learning rate.
  config.optimizer.momentum = 0.9  # SGD momentum (0 = plain SGD).
  config.optimizer.nesterov = False  # SGD with Nesterov momentum.
  config.optimizer.b1 = 0.9  # AdamW β1.
  config.optimizer.b2 = 0.999  # AdamW β2.
  config.optimizer.weight_decay = 5e-4  # SGD: L2 added to the gradient; AdamW: decoupled.
  config.optimizer.schedule = "cosine"  # 'step', 'cosine', 'constant' or 'wsd'.
  config.optimizer.decay_epochs = ()  # 'step': epochs after which lr is multiplied by…
  config.optimizer.decay_factor = 0.1  # … this factor.
  # 'wsd' (warmup-stable-decay, MiniCPM; Peng et al. 2024's best with a WSD α): lr until the
  # last `decay_fraction` of all steps, then `decay_shape` down to lr · end_lr_factor.
  config.optimizer.decay_fraction = 0.1
  config.optimizer.decay_shape = "linear"  # 'linear', 'cosine', '1-sqrt' or 'exponential'.
  config.optimizer.end_lr_factor = 0.0
  config.optimizer.warmup_epochs = 0.0  # Linear warm-up from 0, in (fractional) epochs.

  # Student population (jaxkd.population): `size` students trained in one compiled step, sharing
  # the data order, the views and the teacher forward; member i takes the i-th value of every
  # sweep key. Keys nest (a ConfigDict refuses dots): {'kd': {'temperature': [1., 2., 4., 8.]}},
  # {'losses': {'kd': [...]}}, 'seed' (RNG stream and initial weights), 'learning_rate_scale'.
  # Each member gets <workdir>/members/<name>/ (metrics, TensorBoard, model, results).
  config.population = ml_collections.ConfigDict()
  config.population.size = 1  # 1 = one student, the plain run.
  config.population.sweep = ml_collections.ConfigDict()  # Key → list of `size` values.

  # Language models: sampling as a batch source (jaxkd.sampling). With probability `fraction`
  # a batch's continuation after its first `prompt_len` tokens is generated: 'seq_kd' by the
  # teacher (sequence-level KD), 'on_policy' by the student (GKD), 'speculative' by the
  # student with proposals outside the teacher's top-`speculative_k` replaced by the teacher's
  # samples (speculative KD); otherwise the data's continuation is scored. -1 = the kind's
  # default (fraction 1, 0.5 on_policy; temperature 0.9 (0.5 speculative); top_p 1 (0.5)).
  config.sampling = ml_collections.ConfigDict()
  config.sampling.kind = ""  # '' = train on the data as it is.
  config.sampling.prompt_len = 0  # 0 = half of data.seq_len.
  config.sampling.fraction = -1.0
  config.sampling.temperature = -1.0  # 0 = greedy.
  config.sampling.top_k = 0  # 0 = no top-k.
  config.sampling.top_p = -1.0
  config.sampling.teacher_temperature = 0.2  # speculative: the teacher's replacements.
  config.sampling.teacher_top_p = 0.5
  config.sampling.speculative_k = 25
  config.sampling.draft_tokens = 5  # speculative: student proposals per teacher forward.

  config.num_epochs = 10  # Length of the run; steps = num_epochs · (train examples // batch).
  config.stop_at_step = 0  # 0 = run to the end; N = checkpoint and exit after step N (job limits).
  config.log_every_steps = 100  # Console line + metrics.jsonl/TensorBoard train scalars.
  config.eval_every_epochs = 0  # 0 = evaluate at the end only.
  config.checkpoint_every_steps = 1000  # Also at the end and at stop_at_step.
  config.keep_checkpoints = 2  # Older checkpoints are deleted.
  # A step whose loss or gradient is not finite is never applied. 'stop': end the run with one
  # line naming the step; 'skip': go on, and end once more than max_skipped_steps were skipped.
  config.nonfinite = "stop"
  # A workdir holding checkpoints of another run (model, data, method, optimiser, batch size,
  # schedule): 'refuse' (one line naming what differs), 'fresh' (start over; the earlier run
  # moves to <workdir>/previous-<n>/) or 'continue' (its weights, the new settings).
  config.workdir_mismatch = "refuse"
  config.max_skipped_steps = 10

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # -1: all remaining devices.
  # Multi-process runs: '' = single process, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  # JAX_PROCESS_ID from the environment; 'auto' = let JAX detect the cluster (SLURM, Cloud TPU).
  config.distributed = ""
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style config argument: `configs/x.py:key=value,flag` → typed fields.

  Every key must be one of `defaults`, and its value is converted to the default's type; a
  bare `flag` sets the boolean `flag` to True. `parse_arg('smoke', smoke=False, seeds=3)` gives
  `{'smoke': True, 'seeds': 3}`.
  """
  parsed = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(
        f"unknown config argument {key!r}; this config takes {', '.join(sorted(defaults))}"
      )
    kind = type(defaults[key])
    if kind is bool:
      parsed[key] = (value.lower() in ("1", "true", "yes")) if has_value else True
    else:
      parsed[key] = kind(value)
  return ml_collections.ConfigDict(parsed)
