"""Benchmark of the distillation step: KD vs student-only, cached teacher, populations, PyTorch.

Measured side by side in one process, rounds interleaved (A B C A B C ...) so that load changes on
a shared machine hit every variant alike; each figure is the median over rounds of the mean step
time within a round. FLOPs are XLA's `cost_analysis()` of the compiled step.

  python benchmarks/kd_step.py                          # both CIFAR pairs + populations + torch
  python benchmarks/kd_step.py --pairs resnet56:resnet20 --rounds 3 --no-torch
  python benchmarks/kd_step.py --pairs quickstart --population-pairs "" --steps 5

XLA:CPU options: those `python -m jaxkd.main` would use (`jaxkd.xla_flags`), for single
students when `--pairs` is given, for populations when only `--population-pairs` is: measure the
two kinds in separate runs (`--population-pairs ""`, then `--pairs ""`).

Setups: 'teacher:student' CIFAR pairs, or 'quickstart' (configs/quickstart.py's small CNNs,
28×28×1, batch 128, 10 classes; no PyTorch variant).

Variants per teacher → student pair (batch 64, 32×32×3, 100 classes, SGD momentum):
  student_only  CE step of the student alone (no teacher)
  kd            CE 0.1 + KD 0.9 step, the teacher forward inside (jaxkd.step)
  teacher_fwd   the teacher's eval-mode forward alone
  cached        the KD step with teacher logits read from the batch (jaxkd.teachers.cache)
  torch_kd      the same KD step in PyTorch (eval-mode teacher under no_grad)
Populations: one vmapped step of P students vs P single-student steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxkd import distill, models, parallel, population, tasks, teachers, xla_flags  # noqa: E402
from jaxkd import state as train_state  # noqa: E402
from jaxkd import step as kd_step  # noqa: E402

NUM_CLASSES = 100
KD_CONFIG = {"losses": {"ce": 0.1, "kd": 0.9}, "kd": {"temperature": 4.0}}


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


class Timed:
  """A compiled callable whose first argument is threaded through calls (the donated state)."""

  def __init__(self, name, jitted, state, *args):
    start = time.perf_counter()
    self.compiled = jitted.lower(state, *args).compile()
    self.compile_s = time.perf_counter() - start
    self.name, self.state, self.args = name, state, args
    self.flops = _flops(self.compiled)
    self.times = []
    self.run(1)  # warm-up

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      output = self.compiled(self.state, *self.args)
      if isinstance(output, tuple) and self.state is not None:
        self.state = output[0]
    jax.block_until_ready(output)
    return (time.perf_counter() - start) / steps


class ForwardTimed(Timed):
  """A compiled stateless callable (the teacher forward)."""

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      output = self.compiled(self.state, *self.args)
    jax.block_until_ready(output)
    return (time.perf_counter() - start) / steps


def _interleave(variants, rounds: int, steps: int):
  for _ in range(rounds):
    for variant in variants:
      variant.times.append(variant.run(steps))
  return {v.name: statistics.median(v.times) for v in variants}


def _host_batch(batch_size, image_shape, num_classes=NUM_CLASSES, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.standard_normal((batch_size, *image_shape), np.float32),
    "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
    "index": np.arange(batch_size, dtype=np.int32),
  }


def _method(config, student, teacher, task):
  info = distill.feature_info(task, student, teacher)
  return distill.build(distill.plan(config, info=info, has_teacher=teacher is not None))


def _compiled_step(
  name, task, student, method, optimizer, mesh, teacher, batch, members=None, chunk=None
):
  """A `Timed` compiled step as `jaxkd.train` builds it (one student, or a population)."""
  learner = kd_step.Learner.create(student, method, optimizer, task)

  def fresh_state(seed, new_weights=False):
    del new_weights  # every member starts from `student`'s weights
    return train_state.create(student, method.adapters, method.initial_state, optimizer, seed)

  if members is None:
    state, hparams = fresh_state(0), method.hparams
    step_fn = lambda *args: kd_step.train_step(learner, *args)
  else:
    state, hparams = population.init(members, fresh_state, method.hparams, seed=0)
    step_fn = lambda *args: population.train_step(learner, *args, chunk=chunk)
  leading_axes = int(members is not None)
  state = parallel.shard_state(mesh, state, leading_axes)
  jitted = kd_step.jit_train_step(
    step_fn, teacher.train, mesh, jax.eval_shape(lambda: state), leading_axes=leading_axes
  )
  return Timed(name, jitted, state, hparams, teacher.state, batch)


def _jax_variants(student, teacher, mesh, host_batch):
  """The four jaxkd variants of one pair, compiled."""
  optimizer = optax.sgd(0.05, momentum=0.9)
  task = tasks.Classification(image_shape=host_batch["image"].shape[1:])
  batch = parallel.host_to_global(mesh, host_batch)
  kd_method = _method(KD_CONFIG, student, teacher, task)
  ce_method = _method({"losses": {"ce": 1.0}}, student, None, task)
  live = teachers.from_models([teacher], task=task, mesh=mesh)
  no_teacher = dataclasses.replace(live, train=teachers.Teacher(source="none", task=task))
  teacher_logits = jax.jit(lambda state, b: live.eval.outputs(state, b["image"], b).logits)(
    live.state, batch
  )
  cached = dataclasses.replace(
    live, train=teachers.Teacher(source="cached", task=task, num_classes=NUM_CLASSES)
  )
  return [
    _compiled_step("student_only", task, student, ce_method, optimizer, mesh, no_teacher, batch),
    _compiled_step("kd", task, student, kd_method, optimizer, mesh, live, batch),
    ForwardTimed(
      "teacher_fwd",
      jax.jit(lambda state, b: live.eval.outputs(state, b["image"], b).logits),
      live.state,
      batch,
    ),
    _compiled_step(
      "cached",
      task,
      student,
      kd_method,
      optimizer,
      mesh,
      cached,
      {**batch, teachers.cache.LOGITS_KEY: teacher_logits},
    ),
  ]


def _population_variants(student, teacher, mesh, host_batch, size, chunks):
  """Population steps of `size` students (vmapped in chunks) vs one single student step."""
  optimizer = optax.sgd(0.05, momentum=0.9)
  task = tasks.Classification(image_shape=host_batch["image"].shape[1:])
  batch = parallel.host_to_global(mesh, host_batch)
  method = _method(KD_CONFIG, student, teacher, task)
  live = teachers.from_models([teacher], task=task, mesh=mesh)
  members = population.parse(
    {"size": size, "sweep": {"kd.temperature": list(np.linspace(1.0, 8.0, size))}}
  )
  return [
    _compiled_step("single", task, student, method, optimizer, mesh, live, batch),
    *[
      _compiled_step(
        f"population{size}_chunk{chunk or size}",
        task,
        student,
        method,
        optimizer,
        mesh,
        live,
        batch,
        members=members,
        chunk=chunk,
      )
      for chunk in chunks
    ],
  ]


# ------------------------------------------------------------------------------------------
# PyTorch: a compact RepDistiller CIFAR ResNet (resnet.py: BasicBlock, option-B shortcuts).
# ------------------------------------------------------------------------------------------


def _torch_resnet(name: str):
  import torch
  from torch import nn

  depth = int(name.removeprefix("resnet").removesuffix("x4"))
  widths = [32, 64, 128, 256] if name.endswith("x4") else [16, 16, 32, 64]
  blocks = (depth - 2) // 6

  class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or inplanes != planes:
        self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
        )

    def forward(self, x):
      residual = x if self.downsample is None else self.downsample(x)
      out = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(out)) + residual)

  layers = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
  inplanes = widths[0]
  for stage, planes in enumerate(widths[1:]):
    for block in range(blocks):
      layers.append(BasicBlock(inplanes, planes, 2 if stage > 0 and block == 0 else 1))
      inplanes = planes
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, NUM_CLASSES)]
  return nn.Sequential(*layers)


class TorchTimed:
  """The KD step (or student-only step) in PyTorch, channels-last NCHW tensors."""

  def __init__(self, name, student_name, teacher_name, host_batch, threads):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.name, self.times, self.compile_s, self.flops = name, [], 0.0, float("nan")
    student = _torch_resnet(student_name).train()
    teacher = _torch_resnet(teacher_name).eval() if teacher_name else None
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    images = torch.from_numpy(host_batch["image"]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(host_batch["label"]).long()
    temperature = 4.0

    def step():
      logits = student(images)
      loss = F.cross_entropy(logits, labels)
      if teacher is not None:
        with torch.no_grad():
          teacher_logits = teacher(images)
        kd = (
          F.kl_div(
            F.log_softmax(logits / temperature, 1),
            F.softmax(teacher_logits / temperature, 1),
            reduction="batchmean",
          )
          * temperature**2
        )
        loss = 0.1 * loss + 0.9 * kd
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      return loss

    self.step = step
    self.run(1)

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.step()
    return (time.perf_counter() - start) / steps


def _create(name, num_classes=NUM_CLASSES, **kwargs):
  return models.create(name, num_classes=num_classes, seed=0, **kwargs)


def _setup(spec: str, batch_size: int):
  """(teacher, student, host batch) of 'quickstart' or a 'teacher:student' CIFAR pair."""
  if spec == "quickstart":  # configs/quickstart.py: 28×28×1, batch 128, 10 classes
    return (
      _create("small_cnn", 10, widths=(32, 64, 128), depth=1, flatten=True),
      _create("small_cnn", 10, widths=(8, 16, 32), depth=1, flatten=True),
      _host_batch(128, (28, 28, 1), num_classes=10),
    )
  teacher_name, student_name = spec.split(":")
  return _create(teacher_name), _create(student_name), _host_batch(batch_size, (32, 32, 3))


def benchmark_pair(spec, args, mesh):
  teacher, student, host_batch = _setup(spec, args.batch)
  variants = _jax_variants(student, teacher, mesh, host_batch)
  if args.torch and spec != "quickstart":
    teacher_name, student_name = spec.split(":")
    variants += [
      TorchTimed("torch_student_only", student_name, None, host_batch, args.threads),
      TorchTimed("torch_kd", student_name, teacher_name, host_batch, args.threads),
    ]
  times = _interleave(variants, args.rounds, args.steps)
  by_name = {v.name: v for v in variants}
  row = {
    "pair": spec,
    "times_s": times,
    "compile_s": {v.name: v.compile_s for v in variants},
    "flops": {v.name: v.flops for v in variants},
  }
  student_flops, teacher_flops = by_name["student_only"].flops, by_name["teacher_fwd"].flops
  row["kd_over_student"] = times["kd"] / times["student_only"]
  row["flop_bound"] = (student_flops + teacher_flops) / student_flops
  row["kd_over_student_plus_teacher"] = times["kd"] / (times["student_only"] + times["teacher_fwd"])
  row["cached_over_student"] = times["cached"] / times["student_only"]
  row["examples_per_s_kd"] = len(host_batch["label"]) / times["kd"]
  if "torch_kd" in times:
    row["jax_over_torch_kd"] = times["kd"] / times["torch_kd"]
    row["jax_over_torch_student"] = times["student_only"] / times["torch_student_only"]
  return row


def benchmark_population(name, teacher, student, host_batch, args, mesh):
  chunks = [int(c) if c != "all" else None for c in args.population_chunks.split(",")]
  variants = _population_variants(student, teacher, mesh, host_batch, args.population, chunks)
  times = _interleave(variants, args.rounds, args.steps)
  return {
    "setup": name,
    "times_s": times,
    "compile_s": {v.name: v.compile_s for v in variants},
    "population_over_sequential": {
      v.name: times[v.name] / (args.population * times["single"]) for v in variants[1:]
    },
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--pairs",
    default="resnet56:resnet20,resnet32x4:resnet8x4",
    help="comma-separated 'teacher:student' pairs or 'quickstart'",
  )
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--population", type=int, default=8)
  parser.add_argument("--population-pairs", default="quickstart,resnet56:resnet20")
  parser.add_argument(
    "--population-chunks",
    default="all,1",
    help="members vmapped together: 'all' (one vmap) or a chunk size",
  )
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args()

  # The XLA options python -m jaxkd.main picks: populations only (--pairs "") keep XLA's.
  xla_flags.configure_cpu(population=not args.pairs)
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  results = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "threads": args.threads,
    "load_before": os.getloadavg(),
    "pairs": [],
    "populations": [],
  }
  for spec in filter(None, args.pairs.split(",")):
    results["pairs"].append(benchmark_pair(spec, args, mesh))
    print(json.dumps(results["pairs"][-1], indent=1, ensure_ascii=False), flush=True)
  for setup in filter(None, args.population_pairs.split(",")):
    teacher, student, host_batch = _setup(setup, args.batch)
    results["populations"].append(
      benchmark_population(setup, teacher, student, host_batch, args, mesh)
    )
    print(json.dumps(results["populations"][-1], indent=1), flush=True)
  results["load_after"] = os.getloadavg()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
  main()
