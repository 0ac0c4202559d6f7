"""Benchmark of the language-model distillation step: KD vs its parts, stored logits, on-policy.

Measured side by side in one process, rounds interleaved (A B C A B C ...) so that load changes on
a shared machine hit every variant alike; each figure is the median over rounds of the mean step
time within a round, reported as tokens per second.

  python benchmarks/lm_step.py                                 # configs/lm_kd.py's small pair
  python benchmarks/lm_step.py --rounds 5 --steps 3 --batch 16 --seq-len 256
  python benchmarks/lm_step.py --size base --batch 8                  # lm_kd.py:size=base's pair

Variants (byte-level vocabulary 259, the `configs/lm_kd.py:size=...` teacher and student):
  student_only  CE step of the student alone (no teacher)
  teacher_fwd   the teacher's forward alone
  kd            (1 − α)·CE + α·KL step with the live teacher inside (jaxkd.step)
  stored        the same step reading the teacher's stored top-p-k distributions (batch keys),
                `kd` on them expanded to [B, S, V] with -inf outside the kept ids
  stored_sparse the same loss as `sparse_topk_kd` on the stored pair itself (no [B, S, V] teacher)
  generate      on-policy GKD's sampling of the continuation (second half of the window)
  gkd_update    the JSD update on the sampled batch, teacher scoring inside
Ratios printed: kd / (student_only + teacher_fwd), stored(_sparse) / student_only, and the on-policy step
(generate + update) broken down.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxkd import distill, models, parallel, sampling, tasks, teachers, xla_flags  # noqa: E402
from jaxkd import state as train_state  # noqa: E402
from jaxkd import step as kd_step  # noqa: E402
from jaxkd.data import ByteTokenizer, open_text_split  # noqa: E402
from jaxkd.losses import sequence  # noqa: E402

KL = {"temperature": 1.0, "scale_by_temperature_squared": False}


class Timed:
  """A compiled callable; its first argument (a donated state) is threaded through calls."""

  def __init__(self, name, fn, *args, threads_state=True):
    start = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    self.compiled = jitted.lower(*args).compile()
    self.compile_s = time.perf_counter() - start
    self.name, self.args, self.threads_state = name, list(args), threads_state
    self.times = []
    self.run(1)  # warm-up

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      output = self.compiled(*self.args)
      if self.threads_state:
        self.args[0] = output[0]
    jax.block_until_ready(output)
    return (time.perf_counter() - start) / steps


def _method(config, student, teacher, task):
  info = distill.feature_info(task, student, teacher)
  return distill.build(distill.plan(config, info=info, has_teacher=teacher is not None))


def _step(name, task, student, method, optimizer, mesh, teacher_source, teacher_state, batch):
  learner = kd_step.Learner.create(student, method, optimizer, task)
  state = parallel.shard_state(
    mesh, train_state.create(student, method.adapters, method.initial_state, optimizer, 0)
  )
  jitted = kd_step.jit_train_step(
    lambda *args: kd_step.train_step(learner, *args),
    teacher_source,
    mesh,
    jax.eval_shape(lambda: state),
  )
  return Timed(name, jitted, state, method.hparams, teacher_state, batch)


def _lm_kd_config(size: str):
  """configs/lm_kd.py:size=<size>, for its teacher's and student's architectures."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  spec = importlib.util.spec_from_file_location("lm_kd", os.path.join(path, "lm_kd.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"size={size}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument(
    "--size", default="small", help="configs/lm_kd.py's model sizes: 'small' or 'base'"
  )
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args(argv)
  xla_flags.configure_cpu()

  tokenizer = ByteTokenizer()
  source = open_text_split("stdlib", "train", seq_len=args.seq_len, tokenizer=tokenizer)
  host_batch = {
    **source.read(np.arange(args.batch)),
    "index": np.arange(args.batch, dtype=np.int32),
  }
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  task = tasks.CausalLM(seq_len=args.seq_len)
  vocab = tokenizer.vocab_size
  config = _lm_kd_config(args.size)
  teacher = models.create("transformer_lm", num_classes=vocab, seed=1, **config.teacher.kwargs)
  student = models.create("transformer_lm", num_classes=vocab, seed=0, **config.student.kwargs)
  optimizer = optax.adamw(3e-3, weight_decay=0.01)
  batch = parallel.host_to_global(mesh, host_batch)
  live = teachers.from_models([teacher], task=task, mesh=mesh)
  none = dataclasses.replace(live, train=teachers.Teacher(source="none", task=task))

  # The stored teacher: top-p 0.95 then top-50, float16, as configs/lm_kd.py stores it.
  logits = jax.jit(lambda state, b: live.eval.outputs(state, b["inputs"], b).logits)(
    live.state, batch
  )
  stored_ids, stored_logprobs = sequence.encode_sparse_teacher(
    sequence.truncate_teacher(logits, top_p=0.95, top_k=50), vocab, "float16"
  )
  stored = sequence.decode_sparse_teacher(stored_ids, stored_logprobs, vocab)
  stored_batch = parallel.host_to_global(
    mesh,
    {
      **host_batch,
      teachers.cache.TOPK_IDS_KEY: stored.ids,
      teachers.cache.TOPK_LOGPROBS_KEY: stored.logprobs,
    },
  )
  cached = dataclasses.replace(
    live, train=teachers.Teacher(source="cached", task=task, num_classes=vocab)
  )
  kd_config = {"losses": {"ce": 0.5, "kd": 0.5}, "kd": KL}
  kd_method = _method(kd_config, student, teacher, task)
  # The same loss on the stored pair itself: KL from the renormalised top-k teacher (equal to
  # `kd` on the teacher expanded with -inf outside its top-k) without a [B, S, V] teacher.
  sparse_method = _method(
    {
      "losses": {"ce": 0.5, "sparse_topk_kd": 0.5},
      "sparse_topk_kd": {"scale_by_temperature_squared": False},
    },
    student,
    teacher,
    task,
  )
  ce_method = _method({"losses": {"ce": 1.0}}, student, None, task)
  gkd_method = _method({"losses": {"jsd": 1.0}, "jsd": {"beta": 0.5}}, student, teacher, task)

  sampler = sampling.Sampler(
    kind="on_policy",
    prompt_len=args.seq_len // 2,
    token_bytes=tokenizer.token_bytes,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id,
    fraction=1.0,
  )
  learner = kd_step.Learner.create(student, gkd_method, optimizer, task)
  sample = sampling.jit_sample(sampler, learner.student, live.train.graphdef, mesh)
  student_state = parallel.shard_state(
    mesh, train_state.create(student, gkd_method.adapters, {}, optimizer, 0)
  )
  sampled_batch, _ = sample(student_state.student, live.state, batch, jax.random.key(0))

  variants = [
    _step("student_only", task, student, ce_method, optimizer, mesh, none.train, None, batch),
    Timed(
      "teacher_fwd",
      lambda state, b: live.eval.outputs(state, b["inputs"], b).logits,
      live.state,
      batch,
      threads_state=False,
    ),
    _step("kd", task, student, kd_method, optimizer, mesh, live.train, live.state, batch),
    _step(
      "stored", task, student, kd_method, optimizer, mesh, cached.train, live.state, stored_batch
    ),
    _step(
      "stored_sparse",
      task,
      student,
      sparse_method,
      optimizer,
      mesh,
      cached.train,
      live.state,
      stored_batch,
    ),
    Timed(
      "generate",
      sample,
      student_state.student,
      live.state,
      batch,
      jax.random.key(1),
      threads_state=False,
    ),
    _step(
      "gkd_update",
      task,
      student,
      gkd_method,
      optimizer,
      mesh,
      live.train,
      live.state,
      sampled_batch,
    ),
  ]
  for _ in range(args.rounds):
    for variant in variants:
      variant.times.append(variant.run(args.steps))
  seconds = {v.name: statistics.median(v.times) for v in variants}
  tokens = args.batch * args.seq_len
  results = {
    "setup": {
      "batch": args.batch,
      "seq_len": args.seq_len,
      "vocab": vocab,
      "size": args.size,
      "rounds": args.rounds,
      "steps": args.steps,
      "backend": jax.default_backend(),
      "loadavg_start": open("/proc/loadavg").read().split()[:3],
    },
    "tokens_per_s": {name: tokens / value for name, value in seconds.items()},
    "compile_s": {v.name: v.compile_s for v in variants},
    "kd_over_parts": seconds["kd"] / (seconds["student_only"] + seconds["teacher_fwd"]),
    "stored_over_student": seconds["stored"] / seconds["student_only"],
    "stored_sparse_over_student": seconds["stored_sparse"] / seconds["student_only"],
    "on_policy": {
      "generate_s": seconds["generate"],
      "update_s": seconds["gkd_update"],
      "generate_share": seconds["generate"] / (seconds["generate"] + seconds["gkd_update"]),
    },
  }
  print(json.dumps(results, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
