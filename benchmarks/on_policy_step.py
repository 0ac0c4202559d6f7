"""Benchmark of sampling as a batch source: generation time vs the KD update, side by side.

One process, rounds interleaved (each variant once per round, in turn) so that load changes on a
shared machine hit every variant alike; each figure is the median over rounds of the mean time
of a call within a round. Byte-level decoders with random weights (the speed does not depend on
the weights), a batch of random windows.

  python benchmarks/on_policy_step.py                  # lm_kd.py's small pair, B 8, S 128, P 64
  python benchmarks/on_policy_step.py --rounds 5 --steps 3 --seq-len 256 --prompt-len 128

Variants (`jaxkd.sampling`, every batch generated: λ = 1):
  on_policy    the student samples the N = S + 1 − P continuation tokens (`generate`)
  seq_kd       the teacher samples them (`generate`)
  speculative  student proposals in blocks of 5, teacher top-25 verification
               (`speculative_generate`, the speculative KD authors' settings)
  update       the KD step on a sampled batch: teacher forward + generalized JSD (β = 0.5)
               loss, gradients and an AdamW update of the student (`jaxkd.step`)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxkd import distill, models, parallel, sampling, tasks, teachers, xla_flags  # noqa: E402
from jaxkd import state as train_state  # noqa: E402
from jaxkd import step as kd_step  # noqa: E402
from jaxkd.data.tokenizer import ByteTokenizer  # noqa: E402

# configs/lm_kd.py, size 'small'.
TEACHER = {"num_layers": 4, "width": 128, "num_heads": 4}
STUDENT = {"num_layers": 2, "width": 64, "num_heads": 4}
JSD_CONFIG = {"losses": {"jsd": 1.0}, "jsd": {"beta": 0.5, "temperature": 1.0}}


class Timed:
  """A compiled callable; `advance(output)` gives the next call's arguments (threaded state)."""

  def __init__(self, name, jitted, args, advance=None):
    start = time.perf_counter()
    self.compiled = jitted.lower(*args).compile()
    self.compile_s = time.perf_counter() - start
    self.name, self.args, self.advance, self.times = name, args, advance, []
    self.run(1)  # warm-up

  def run(self, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
      output = self.compiled(*self.args)
      if self.advance is not None:
        self.args = self.advance(self.args, output)
    jax.block_until_ready(output)
    return (time.perf_counter() - start) / calls


def _host_batch(batch_size, seq_len, tokenizer, seed=0):
  window = np.random.default_rng(seed).integers(0, 256, (batch_size, seq_len + 1), np.int32)
  return {
    "inputs": window[:, :-1],
    "targets": window[:, 1:],
    "loss_mask": np.ones((batch_size, seq_len), bool),
    "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
    "segment_ids": np.ones((batch_size, seq_len), np.int32),
    "target_bytes": tokenizer.token_bytes[window[:, 1:]],
    "index": np.arange(batch_size, dtype=np.int32),
  }


def run(args) -> dict:
  tokenizer = ByteTokenizer()
  vocab = tokenizer.vocab_size
  mesh = parallel.make_mesh()
  task = tasks.CausalLM(seq_len=args.seq_len)
  student = models.create("transformer_lm", vocab_size=vocab, seed=0, **STUDENT)
  teacher = models.create("transformer_lm", vocab_size=vocab, seed=1, **TEACHER)
  live = teachers.from_models([teacher], task=task, mesh=mesh)
  method = distill.build(
    distill.plan(JSD_CONFIG, info=distill.feature_info(task, student, teacher), has_teacher=True)
  )
  optimizer = optax.adamw(1e-3)
  learner = kd_step.Learner.create(student, method, optimizer, task)
  state = train_state.create(student, method.adapters, method.initial_state, optimizer, seed=0)
  state = parallel.shard_state(mesh, state)
  batch = parallel.host_to_global(mesh, _host_batch(args.batch, args.seq_len, tokenizer))

  def sampler(kind):
    return sampling.Sampler(
      kind=kind,
      prompt_len=args.prompt_len,
      token_bytes=tokenizer.token_bytes,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id,
      fraction=1.0,
    )

  def next_key(arguments, output):
    del output
    return (*arguments[:3], jax.random.split(arguments[3])[0])

  variants = []
  student_state = jax.tree.map(jnp.copy, state.student)  # the update donates `state`
  for kind in ("on_policy", "seq_kd", "speculative"):
    jitted = sampling.jit_sample(sampler(kind), learner.student, live.train.graphdef, mesh)
    arguments = (student_state, live.state, batch, jax.random.key(0))
    variants.append(Timed(kind, jitted, arguments, next_key))
  sampled_batch, _ = variants[0].compiled(*variants[0].args)
  sample_metrics = {v.name: v.compiled(*v.args)[1] for v in variants}
  train_step = kd_step.jit_train_step(
    lambda *a: kd_step.train_step(learner, *a), live.train, mesh, jax.eval_shape(lambda: state)
  )
  variants.append(
    Timed(
      "update",
      train_step,
      (state, method.hparams, live.state, sampled_batch),
      lambda arguments, output: (output[0], *arguments[1:]),
    )
  )
  for _ in range(args.rounds):
    for variant in variants:
      variant.times.append(variant.run(args.steps))
  times = {v.name: statistics.median(v.times) for v in variants}
  return {
    "setup": {
      "batch": args.batch,
      "seq_len": args.seq_len,
      "prompt_len": args.prompt_len,
      "new_tokens": args.seq_len + 1 - args.prompt_len,
      "student": STUDENT,
      "teacher": TEACHER,
      "vocab": vocab,
      "rounds": args.rounds,
      "steps": args.steps,
      "devices": [str(d) for d in jax.devices()],
    },
    "times_s": times,
    "compile_s": {v.name: v.compile_s for v in variants},
    "sample_metrics": jax.tree.map(float, sample_metrics),
    "generation_over_update": {
      kind: times[kind] / times["update"] for kind in ("on_policy", "seq_kd", "speculative")
    },
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  xla_flags.configure_cpu()  # before the first computation starts the backend
  result = run(args)
  print(f"{'variant':<12} {'seconds':>9} {'x update':>9} {'compile s':>10}")
  for name, seconds in result["times_s"].items():
    ratio = seconds / result["times_s"]["update"]
    print(f"{name:<12} {seconds:9.4f} {ratio:9.2f} {result['compile_s'][name]:10.1f}")
  print("sample metrics:", json.dumps(result["sample_metrics"]))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
