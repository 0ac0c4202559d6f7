"""Input rate of the data pipeline against the step's consumption rate, measured in one run.

  python benchmarks/input_pipeline.py                      # about 2 minutes on 2 CPU cores
  python benchmarks/input_pipeline.py --seconds 20 --workers 8 --imagenet-batch 64

Two synthetic datasets are written to a temporary directory as TFDS array_record files and
read the way training reads them (`data.open_split` → `data.train_batches`, host-local batches
normalised to float32):

  cifar     CIFAR-100-shaped records: 32×32×3 PNGs (TFDS's cifar100 encoding), 100 classes;
  imagenet  ImageNet-shaped records: JPEGs of ImageNet's typical sizes (500×375, 375×500,
            500×333, 500×500, 400×300, about 110 kB at quality 90 as ImageNet's average), cut
            on the host: RandomResizedCrop(224) + flip (`jaxkd.data.imagenet`).

Input rates (examples/s) are measured for grain threads alone (`--threads`) and for worker
processes (`--workers`, `num_threads=1` each), after the first batch (worker start-up). The
consumption rates are those of the compiled steps on the same machine, in the same run:

  cifar     the KD step resnet32x4 → resnet8x4 (CE 0.1 + KD 0.9, teacher forward inside), batch 64;
  imagenet  the ResNet-18 student step (CE) on 224×224×3, batch `--imagenet-batch`.

The ratio input / consumption says how far ahead the input runs (goal ≥ 5). The pipeline and
the step were timed one after the other, not concurrently: on a machine with few cores they
would compete for them. Model weights are random (drawn in numpy; speed does not depend on them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxkd import xla_flags  # noqa: E402

# ImageNet's most common sizes (height, width).
IMAGENET_SHAPES = ((375, 500), (500, 375), (333, 500), (500, 500), (300, 400))
KD_CONFIG = {"losses": {"ce": 0.1, "kd": 0.9}, "kd": {"temperature": 4.0}}


def _photo_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  """Smooth colour fields plus fine texture: JPEG sizes like photographs' (~110 kB)."""
  coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
  rows = np.linspace(0, 5, height)[:, None]
  cols = np.linspace(0, 7, width)[None, :]
  smooth = coarse[np.round(rows).astype(int), np.round(cols).astype(int)]
  texture = rng.normal(0, 18, (height, width, 3))
  return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def _encoded(pixels: np.ndarray, image_format: str, **options) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=image_format, **options)
  return buffer.getvalue()


def write_datasets(directory: str, num_cifar: int, num_imagenet: int) -> dict:
  """The two synthetic TFDS datasets (module docstring); returns their mean record sizes."""
  import tensorflow_datasets as tfds

  from jaxkd.data import sources

  tfds.disable_progress_bar()
  rng = np.random.default_rng(0)
  cifar = [
    {
      "id": f"train_{i}",
      "image": io.BytesIO(_encoded(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "PNG")),
      "label": i % 100,
      "coarse_label": i % 20,
    }
    for i in range(num_cifar)
  ]
  # TFDS's cifar100 features (tensorflow_datasets/image_classification/cifar.py).
  sources.write_tfds(
    directory,
    "cifar100",
    "3.0.2",
    {
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(32, 32, 3)),
      "label": tfds.features.ClassLabel(num_classes=100),
      "coarse_label": tfds.features.ClassLabel(num_classes=20),
    },
    {"train": cifar},
  )
  jpegs = [
    _encoded(_photo_like(*IMAGENET_SHAPES[i % len(IMAGENET_SHAPES)], rng), "JPEG", quality=90)
    for i in range(num_imagenet)
  ]
  sources.write_tfds(
    directory,
    "imagenet2012",
    "5.1.0",
    {
      "image": tfds.features.Image(encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=1000),
      "file_name": tfds.features.Text(),
    },
    {
      "train": [
        {"image": io.BytesIO(jpeg), "label": i % 1000, "file_name": f"{i}.JPEG"}
        for i, jpeg in enumerate(jpegs)
      ]
    },
  )
  return {"imagenet_jpeg_kb": np.mean([len(j) for j in jpegs]) / 1e3}


def input_rate(source, spec, batch_size: int, seconds: float, **pipeline) -> float:
  """Examples/s of `data.train_batches` after its first batch (start-up excluded)."""
  from jaxkd import data

  batches = data.train_batches(
    source,
    spec,
    seed=0,
    start_step=0,
    num_steps=1_000_000,
    global_batch_size=batch_size,
    num_examples=len(source),
    **pipeline,
  )
  next(batches)
  start, count = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(batches)
    count += 1
  rate = count * batch_size / (time.perf_counter() - start)
  if hasattr(batches, "close"):
    batches.close()  # stops the worker processes now, not at exit
  return rate


def _random_model(name: str, seed: int, **create_kwargs):
  """Model `name` with random weights drawn in numpy: no XLA initialiser to compile."""
  import jax
  from flax import nnx

  from jaxkd import models

  model = nnx.eval_shape(lambda: models.create(name, **create_kwargs))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    kind = path[-1].key
    if kind in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    std = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if kind in ("kernel", "embedding") else 0.1
    return rng.normal(0, std, leaf.shape).astype(leaf.dtype)

  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


def step_rate(student_name, teacher_name, image_shape, num_classes, batch_size, steps) -> dict:
  """Examples/s of the compiled training step (`jaxkd.step.train_step`), as `jaxkd.train`
  builds it: KD with the teacher inside when `teacher_name`, else the student's CE step."""
  import jax
  import optax

  from jaxkd import distill, parallel, tasks, teachers
  from jaxkd import state as train_state
  from jaxkd import step as kd_step

  mesh = parallel.make_mesh()
  task = tasks.Classification(image_shape=image_shape)
  student = _random_model(student_name, 0, num_classes=num_classes)
  teacher = _random_model(teacher_name, 1, num_classes=num_classes) if teacher_name else None
  method = distill.build(
    distill.plan(
      KD_CONFIG if teacher else {"losses": {"ce": 1.0}},
      info=distill.feature_info(task, student, teacher),
      has_teacher=teacher is not None,
    )
  )
  if teacher is not None:
    sources = teachers.from_models([teacher], task=task, mesh=mesh)
  else:
    sources = teachers.load(teachers.Settings(), task=task, feature_names=(), mesh=mesh)
  optimizer = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  learner = kd_step.Learner.create(student, method, optimizer, task)
  state = train_state.create(student, method.adapters, method.initial_state, optimizer, 0)
  state = parallel.shard_state(mesh, state)
  jitted = kd_step.jit_train_step(
    functools.partial(kd_step.train_step, learner),
    sources.train,
    mesh,
    jax.eval_shape(lambda: state),
  )
  rng = np.random.default_rng(0)
  batch = parallel.host_to_global(
    mesh,
    {
      "image": rng.standard_normal((batch_size, *image_shape), np.float32),
      "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
      "index": np.arange(batch_size, dtype=np.int32),
    },
  )
  start = time.perf_counter()
  compiled = jitted.lower(state, method.hparams, sources.state, batch).compile()
  compile_s = time.perf_counter() - start
  state, _ = compiled(state, method.hparams, sources.state, batch)  # warm-up
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, method.hparams, sources.state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  return {"examples_per_s": batch_size / seconds, "step_s": seconds, "compile_s": compile_s}


@dataclasses.dataclass
class Row:
  name: str
  batch_size: int
  step: str
  threads: float
  workers: float
  consumption: float

  @property
  def ratio(self) -> float:
    return max(self.threads, self.workers) / self.consumption


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=5.0, help="per input measurement")
  parser.add_argument("--threads", type=int, default=2, help="grain threads (no workers)")
  parser.add_argument("--workers", type=int, default=2, help="worker processes")
  parser.add_argument("--imagenet-batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per step rate")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()
  xla_flags.configure_cpu()  # As `python -m jaxkd.main`, before JAX starts a backend.
  import jax

  from jaxkd import data

  started = time.perf_counter()
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    sizes = write_datasets(directory, num_cifar=2048, num_imagenet=160)
    threads = dict(num_threads=args.threads)
    workers = dict(num_threads=1, num_workers=args.workers)
    datasets = (
      ("cifar100", 64, "resnet32x4 → resnet8x4 KD", ("resnet8x4", "resnet32x4", 100)),
      ("imagenet2012", args.imagenet_batch, "resnet18 CE", ("resnet18", None, 1000)),
    )
    for name, batch_size, step_name, (student, teacher, num_classes) in datasets:
      spec = data.DATASETS[name]
      source = data.open_split(name, "tfds", "train", directory)
      consumption = step_rate(
        student, teacher, spec.image_shape, num_classes, batch_size, args.steps
      )
      rows.append(
        Row(
          name=name,
          batch_size=batch_size,
          step=step_name,
          threads=input_rate(source, spec, batch_size, args.seconds, **threads),
          workers=input_rate(source, spec, batch_size, args.seconds, **workers),
          consumption=consumption["examples_per_s"],
        )
      )
      print(f"{name}: step {consumption}", flush=True)

  load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
  print(
    f"\n{os.cpu_count()} CPU cores, load average {' '.join(load)}, {jax.device_count()} "
    f"{jax.default_backend()} device(s); ImageNet-shaped JPEGs {sizes['imagenet_jpeg_kb']:.0f} kB "
    f"on average; {time.perf_counter() - started:.0f} s\n"
  )
  print(
    f"| data | batch | input, {args.threads} threads (ex/s) | input, {args.workers} workers "
    "(ex/s) | step | step (ex/s) | input / step |"
  )
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    print(
      f"| {row.name} | {row.batch_size} | {row.threads:,.0f} | {row.workers:,.0f} | {row.step} | "
      f"{row.consumption:,.1f} | {row.ratio:.1f} |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump([{**dataclasses.asdict(row), "ratio": row.ratio} for row in rows], f, indent=2)


if __name__ == "__main__":
  main()
