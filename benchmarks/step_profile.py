"""Where a CIFAR ResNet step spends its time, JAX vs PyTorch on CPU: forward, forward + backward
(with batch or running BatchNorm statistics, and without `jaxkd.models.layers.fusion_barrier`),
and single 3×3 convolutions split into forward, input gradient and kernel gradient.

  python benchmarks/step_profile.py --model resnet20 --torch-threads 2
  python benchmarks/step_profile.py --convs-only

Each figure: median over 3 rounds of the mean of 3 calls, after a warm-up; variants interleaved.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kd_step  # noqa: E402  (the benchmark's model code: zoo models and the torch ResNet)
from jaxkd import xla_flags  # noqa: E402
from jaxkd.models import layers  # noqa: E402


def _median_times(fns, rounds=3, calls=3):
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        fn()
      times[name].append((time.perf_counter() - start) / calls)
  return {name: round(statistics.median(values), 4) for name, values in times.items()}


@contextlib.contextmanager
def _without_fusion_barrier():
  """Functions traced inside see `layers.fusion_barrier` as the identity (XLA fuses freely)."""
  barrier = layers.fusion_barrier
  layers.fusion_barrier = lambda x, anchor: x
  try:
    yield
  finally:
    layers.fusion_barrier = barrier


def network(model_name: str, batch: int):
  model = kd_step._create(model_name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = np.random.default_rng(0).standard_normal((batch, 32, 32, 3), np.float32)

  @jax.jit
  def forward(params, rest, images):
    return nnx.merge(graphdef, params, rest, copy=True)(images, train=False)[0]

  def make_grad(train):
    def grad(params, rest, images):
      def loss(p):
        logits = nnx.merge(graphdef, p, rest, copy=True)(images, train=train)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1))

      return jax.grad(loss)(params)

    return jax.jit(grad).lower(params, rest, images).compile()

  grad_batch_stats, grad_running_stats = make_grad(True), make_grad(False)
  with _without_fusion_barrier():
    grad_no_barrier = make_grad(True)
  torch_model = kd_step._torch_resnet(model_name)
  torch_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

  def torch_forward():
    torch_model.eval()
    with torch.no_grad():
      torch_model(torch_images)

  def torch_forward_backward():
    torch_model.train()
    torch_model.zero_grad()
    torch.logsumexp(torch_model(torch_images), -1).mean().backward()

  return _median_times(
    {
      "jax_fwd": lambda: jax.block_until_ready(forward(params, rest, images)),
      "jax_fwd_bwd": lambda: jax.block_until_ready(grad_batch_stats(params, rest, images)),
      "jax_fwd_bwd_running_bn": lambda: jax.block_until_ready(
        grad_running_stats(params, rest, images)
      ),
      "jax_fwd_bwd_no_barrier": lambda: jax.block_until_ready(
        grad_no_barrier(params, rest, images)
      ),
      "torch_fwd": torch_forward,
      "torch_fwd_bwd": torch_forward_backward,
    }
  )


def _convolution_times(batch: int, channels: int, size: int) -> dict[str, float]:
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, channels, channels), np.float32))
  conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  forward = jax.jit(conv)
  input_grad = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), 0))
  kernel_grad = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), 1))
  torch_images = torch.randn(batch, channels, size, size, requires_grad=True)
  torch_kernel = torch.randn(channels, channels, 3, 3, requires_grad=True)

  def torch_forward():
    with torch.no_grad():
      torch.nn.functional.conv2d(torch_images, torch_kernel, padding=1)

  def torch_all():
    torch_images.grad = torch_kernel.grad = None
    torch.nn.functional.conv2d(torch_images, torch_kernel, padding=1).sum().backward()

  return _median_times(
    {
      "jax_fwd": lambda: forward(images, kernel).block_until_ready(),
      "jax_dx": lambda: input_grad(images, kernel).block_until_ready(),
      "jax_dw": lambda: kernel_grad(images, kernel).block_until_ready(),
      "torch_fwd": torch_forward,
      "torch_fwd_dx_dw": torch_all,
    },
    calls=5,
  )


def convolutions(batch: int):
  return {
    f"B={batch} {size}x{size}x{channels}": _convolution_times(batch, channels, size)
    for channels, size in ((16, 32), (64, 8), (128, 32))
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
  parser.add_argument("--convs-only", action="store_true")
  args = parser.parse_args()
  xla_flags.configure_cpu()  # as python -m jaxkd.main does; JAXKD_XLA_DEFAULTS=1 to leave out
  torch.set_num_threads(args.torch_threads)
  print("load", os.getloadavg(), "XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  if not args.convs_only:
    print(args.model, f"torch threads {args.torch_threads}", network(args.model, args.batch))
  for shape, times in convolutions(args.batch).items():
    print(shape, {name: f"{seconds * 1e3:.1f} ms" for name, seconds in times.items()})


if __name__ == "__main__":
  main()
