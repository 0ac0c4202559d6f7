r"""Peak memory and time of dense vs chunked KD from hidden states (value and gradient).

Both variants compute the same loss, `kd` (T^2 KL, per-token mean) between the logits `h_s @ W_s` and
`h_t @ W_t`, and its gradient w.r.t. the student hidden states and unembedding, under one `jax.jit`:

* dense: `sequence_loss(kd, h_s @ W_s, h_t @ W_t, mask)`, which builds [B, S, V] logits;
* chunked: `chunked_kd(h_s, W_s, h_t, W_t, mask, chunk_size=C)`, a rematerialised scan over sequence chunks.

Each variant runs in its own subprocess so that its peak resident set size (ru_maxrss) is its own. The
compiled executable's `memory_analysis()` gives XLA's own accounting: temp (scratch) + argument + output
bytes. Peak RSS also counts the Python/JAX runtime and the compiler, so the compiled figure is the one to
compare; RSS confirms it.

  python benchmarks/chunked_kd_memory.py                 # B=2 S=1024 Ds=256 Dt=512 V=32000 C=128
  python benchmarks/chunked_kd_memory.py --batch=4 --chunk_size=256
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax

from jaxkd.losses.chunked import chunked_kd
from jaxkd.losses.logit import kd
from jaxkd.losses.sequence import sequence_loss

_BATCH = flags.DEFINE_integer("batch", 2, "Batch size B.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Sequence length S.")
_STUDENT_WIDTH = flags.DEFINE_integer("student_width", 256, "Student hidden width Ds.")
_TEACHER_WIDTH = flags.DEFINE_integer("teacher_width", 512, "Teacher hidden width Dt.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size V.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 128, "Positions per chunk C.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls after one warm-up call.")
_MODE = flags.DEFINE_enum(
  "mode",
  "both",
  ["both", "dense", "chunked"],
  "'both' runs each variant in a subprocess and prints the table.",
)

MIB = 2**20


def dense_loss(student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask):
  return sequence_loss(
    kd, student_hidden @ student_unembed, teacher_hidden @ teacher_unembed, mask, temperature=1.0
  )


def chunked_loss(student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask):
  return chunked_kd(
    student_hidden,
    student_unembed,
    teacher_hidden,
    teacher_unembed,
    mask,
    divergence=kd,
    chunk_size=_CHUNK_SIZE.value,
    temperature=1.0,
  )


def make_inputs():
  keys = jax.random.split(jax.random.key(0), 5)
  batch, seq_len, vocab = _BATCH.value, _SEQ_LEN.value, _VOCAB.value
  student_width, teacher_width = _STUDENT_WIDTH.value, _TEACHER_WIDTH.value
  return (
    jax.random.normal(keys[0], (batch, seq_len, student_width)),
    jax.random.normal(keys[1], (student_width, vocab)) / student_width**0.5,
    jax.random.normal(keys[2], (batch, seq_len, teacher_width)),
    jax.random.normal(keys[3], (teacher_width, vocab)) / teacher_width**0.5,
    jax.random.uniform(keys[4], (batch, seq_len)) < 0.9,
  )


def current_rss_bytes() -> int:
  with open("/proc/self/statm") as statm:
    return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(mode: str) -> dict:
  """Compiles, runs and times one variant in this process; returns its figures."""
  inputs = jax.block_until_ready(make_inputs())
  loss = dense_loss if mode == "dense" else chunked_loss
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(*inputs).compile()
  stats = compiled.memory_analysis()
  rss_before_run = current_rss_bytes()
  value, _ = jax.block_until_ready(compiled(*inputs))  # warm-up
  seconds = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    seconds.append(time.perf_counter() - start)
  return dict(
    mode=mode,
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
    peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
    best_seconds=min(seconds),
  )


def main(argv):
  del argv
  if _MODE.value != "both":
    print(json.dumps(measure(_MODE.value)))
    return
  flag_args = [
    f"--{flag.name}={flag.value}"
    for flag in (_BATCH, _SEQ_LEN, _STUDENT_WIDTH, _TEACHER_WIDTH, _VOCAB, _CHUNK_SIZE, _REPEATS)
  ]
  rows = []
  for mode in ("dense", "chunked"):
    output = subprocess.run(
      [sys.executable, __file__, f"--mode={mode}", *flag_args],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    rows.append(json.loads(output.strip().splitlines()[-1]))
  batch, seq_len, vocab = _BATCH.value, _SEQ_LEN.value, _VOCAB.value
  print(
    f"B={batch} S={seq_len} Ds={_STUDENT_WIDTH.value} Dt={_TEACHER_WIDTH.value} V={vocab} "
    f"C={_CHUNK_SIZE.value}; one [B, S, V] float32 buffer = {batch * seq_len * vocab * 4 / MIB:.0f} MiB; "
    f"jax {jax.__version__}, {jax.devices()[0].platform}"
  )
  header = (
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
  for row in rows:
    print(
      f"| {row['mode']} | {row['loss']:.6f} | {row['temp_mib']:.0f} | {row['argument_mib']:.0f} | "
      f"{row['output_mib']:.0f} | {row['compiled_total_mib']:.0f} | {row['rss_before_run_mib']:.0f} | "
      f"{row['peak_rss_mib']:.0f} | {row['best_seconds']:.2f} |"
    )
  dense, chunked = rows
  print(
    f"compiled total: dense / chunked = {dense['compiled_total_mib'] / chunked['compiled_total_mib']:.1f}x; "
    f"peak RSS: dense / chunked = {dense['peak_rss_mib'] / chunked['peak_rss_mib']:.1f}x; "
    f"time: chunked / dense = {chunked['best_seconds'] / dense['best_seconds']:.2f}x"
  )


if __name__ == "__main__":
  app.run(main)
