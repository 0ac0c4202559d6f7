r"""Peak memory and time of the dense vs the chunked language-model distillation loss (value + grad).

Both variants compute the same loss, `(1 - α) · CE(student, targets) + α · KD(teacher ‖ student)`
(per-token means over the scored tokens, `kd` at T = 1, α = 0.5) from the student's and the teacher's
final hidden states and unembeddings, and its gradient w.r.t. the student's hidden states and
unembedding, under one `jax.jit`:

* dense: `logits = h_s @ W_s` and `h_t @ W_t` as [B, S, V] arrays, then `sequence_cross_entropy` and
  `sequence_loss(kd, ...)`;
* chunked: `chunked_lm_loss(LMHead(h_s, W_s), mask, targets=..., teacher=LMHead(h_t, W_t), ...)`, a
  scan over chunks of tokens with the backward pass fused into it.

Each (variant, vocabulary) runs in its own subprocess, so its peak resident set size (ru_maxrss) is its
own. The compiled executable's `memory_analysis()` gives XLA's accounting: temp (scratch), argument and
output bytes. Peak RSS also counts the Python/JAX runtime and the compiler; "RSS before run" is the
process after compiling, with the inputs resident. The subprocesses save their loss and gradients; the
parent compares them (largest difference relative to the largest dense entry).

  python benchmarks/chunked_lm_loss_memory.py     # B=1 S=2048 Ds=256 Dt=512, V=32000 and 128000
  python benchmarks/chunked_lm_loss_memory.py --vocabs=32000 --chunk_size=128 --softcap=30
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from jaxkd.losses.chunked import LMHead
from jaxkd.losses.chunked import chunked_lm_loss
from jaxkd.losses.chunked import soft_cap
from jaxkd.losses.logit import kd
from jaxkd.losses.sequence import sequence_cross_entropy
from jaxkd.losses.sequence import sequence_loss

_BATCH = flags.DEFINE_integer("batch", 1, "Batch size B.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Sequence length S.")
_STUDENT_WIDTH = flags.DEFINE_integer("student_width", 256, "Student hidden width Ds.")
_TEACHER_WIDTH = flags.DEFINE_integer("teacher_width", 512, "Teacher hidden width Dt.")
_VOCABS = flags.DEFINE_list("vocabs", ["32000", "128000"], "Vocabulary sizes V, one row pair each.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 256, "Tokens per chunk C.")
_SOFTCAP = flags.DEFINE_float("softcap", 0.0, "Final-logit soft-cap c of both models (0 = none).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls after one warm-up call.")
# Set by the parent for its subprocesses.
_MODE = flags.DEFINE_enum("mode", "both", ["both", "dense", "chunked"], "'both' runs the table.")
_VOCAB = flags.DEFINE_integer("vocab", 0, "Vocabulary of one subprocess.")
_SAVE = flags.DEFINE_string("save", "", "Where a subprocess saves its loss and gradients (.npz).")

MIB = 2**20
ALPHA = 0.5


def softcap_value():
  return _SOFTCAP.value or None


def dense_loss(student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, mask):
  logits = soft_cap(student_hidden @ student_unembed, softcap_value())
  teacher_logits = jax.lax.stop_gradient(
    soft_cap(teacher_hidden @ teacher_unembed, softcap_value())
  )
  return (1 - ALPHA) * sequence_cross_entropy(logits, targets, mask) + ALPHA * sequence_loss(
    kd, logits, teacher_logits, mask, temperature=1.0
  )


def chunked_loss(student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, mask):
  total, _ = chunked_lm_loss(
    LMHead(student_hidden, student_unembed, softcap_value()),
    mask,
    targets=targets,
    teacher=LMHead(teacher_hidden, teacher_unembed, softcap_value()),
    ce_weight=1 - ALPHA,
    kd_weight=ALPHA,
    chunk_size=_CHUNK_SIZE.value,
    temperature=1.0,
  )
  return total


def make_inputs(vocab):
  keys = jax.random.split(jax.random.key(0), 6)
  batch, seq_len = _BATCH.value, _SEQ_LEN.value
  student_width, teacher_width = _STUDENT_WIDTH.value, _TEACHER_WIDTH.value
  return (
    jax.random.normal(keys[0], (batch, seq_len, student_width)),
    jax.random.normal(keys[1], (student_width, vocab)) / student_width**0.5,
    jax.random.normal(keys[2], (batch, seq_len, teacher_width)),
    jax.random.normal(keys[3], (teacher_width, vocab)) / teacher_width**0.5,
    jax.random.randint(keys[4], (batch, seq_len), 0, vocab),
    jax.random.uniform(keys[5], (batch, seq_len)) < 0.9,
  )


def current_rss_bytes() -> int:
  with open("/proc/self/statm") as statm:
    return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(mode: str, vocab: int) -> dict:
  """Compiles, runs and times one variant in this process; saves its loss and gradients."""
  inputs = jax.block_until_ready(make_inputs(vocab))
  loss = dense_loss if mode == "dense" else chunked_loss
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(*inputs).compile()
  stats = compiled.memory_analysis()
  rss_before_run = current_rss_bytes()
  value, grads = jax.block_until_ready(compiled(*inputs))  # warm-up
  seconds = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    seconds.append(time.perf_counter() - start)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  np.savez(_SAVE.value, value=np.asarray(value), hidden=grads[0], unembed=grads[1])
  return dict(
    mode=mode,
    vocab=vocab,
    loss=float(value),
    temp_mib=stats.temp_size_in_bytes / MIB,
    argument_mib=stats.argument_size_in_bytes / MIB,
    output_mib=stats.output_size_in_bytes / MIB,
    compiled_total_mib=(
      stats.temp_size_in_bytes
      + stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      - stats.alias_size_in_bytes
    )
    / MIB,
    rss_before_run_mib=rss_before_run / MIB,
    peak_rss_mib=peak_rss / MIB,
    best_seconds=min(seconds),
  )


def relative_difference(dense: np.ndarray, chunked: np.ndarray) -> float:
  return float(np.max(np.abs(dense - chunked)) / np.max(np.abs(dense)))


def main(argv):
  del argv
  if _MODE.value != "both":
    print(json.dumps(measure(_MODE.value, _VOCAB.value)))
    return
  flag_args = [
    f"--{flag.name}={flag.value}"
    for flag in (
      _BATCH,
      _SEQ_LEN,
      _STUDENT_WIDTH,
      _TEACHER_WIDTH,
      _CHUNK_SIZE,
      _SOFTCAP,
      _REPEATS,
    )
  ]
  batch, seq_len = _BATCH.value, _SEQ_LEN.value
  print(
    f"B={batch} S={seq_len} Ds={_STUDENT_WIDTH.value} Dt={_TEACHER_WIDTH.value} "
    f"C={_CHUNK_SIZE.value} softcap={softcap_value()}; (1 - α) CE + α KD, α={ALPHA}; "
    f"jax {jax.__version__}, {jax.devices()[0].platform}; load average at start "
    f"{open('/proc/loadavg').read().split()[0]}"
  )
  header = (
    "V",
    "variant",
    "loss",
    "temp MiB",
    "args MiB",
    "out MiB",
    "compiled total MiB",
    "RSS before run MiB",
    "peak RSS MiB",
    "best s",
  )
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  summaries = []
  with tempfile.TemporaryDirectory() as workdir:
    for vocab in map(int, _VOCABS.value):
      rows, saved = [], []
      for mode in ("dense", "chunked"):
        save = os.path.join(workdir, f"{mode}_{vocab}.npz")
        output = subprocess.run(
          [sys.executable, __file__, f"--mode={mode}", f"--vocab={vocab}", f"--save={save}"]
          + flag_args,
          check=True,
          capture_output=True,
          text=True,
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        saved.append(np.load(save))
      for row in rows:
        print(
          f"| {vocab} | {row['mode']} | {row['loss']:.6f} | {row['temp_mib']:.0f} | "
          f"{row['argument_mib']:.0f} | {row['output_mib']:.0f} | {row['compiled_total_mib']:.0f} | "
          f"{row['rss_before_run_mib']:.0f} | {row['peak_rss_mib']:.0f} | "
          f"{row['best_seconds']:.2f} |"
        )
      dense, chunked = rows
      summaries.append(
        f"V={vocab}: one [B, S, V] float32 buffer = {batch * seq_len * vocab * 4 / MIB:.0f} MiB; "
        f"chunked / dense: compiled total {chunked['compiled_total_mib'] / dense['compiled_total_mib']:.3f}, "
        f"temp {chunked['temp_mib'] / dense['temp_mib']:.3f}, "
        f"peak RSS {chunked['peak_rss_mib'] / dense['peak_rss_mib']:.3f}, "
        f"peak RSS above the pre-run RSS "
        f"{(chunked['peak_rss_mib'] - chunked['rss_before_run_mib']) / (dense['peak_rss_mib'] - dense['rss_before_run_mib']):.3f}, "
        f"time {chunked['best_seconds'] / dense['best_seconds']:.2f}; "
        f"max relative difference: loss {relative_difference(saved[0]['value'], saved[1]['value']):.1e}, "
        f"d hidden {relative_difference(saved[0]['hidden'], saved[1]['hidden']):.1e}, "
        f"d unembed {relative_difference(saved[0]['unembed'], saved[1]['unembed']):.1e}"
      )
  print()
  print("\n".join(summaries))
  print(f"load average at end {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
  app.run(main)
