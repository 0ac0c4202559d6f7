"""XLA:CPU options that jaxkd's entry points set before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first backend starts, so `jaxkd.main` (once it has read
the config), the benchmarks and the test suite call `configure_cpu()` before any JAX
computation. Library users who import only
`jaxkd.losses` or build their own step are not affected.

The option, and why (figures and commands in BENCHMARKS.md, "XLA:CPU"):

- `--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions). jaxlib 0.10 hands
  convolutions and reductions to YNNPACK; on the CIFAR ResNets' narrow NHWC convolutions XLA's
  own (Eigen) convolutions are faster: the KD step took 0.84× (resnet56 → resnet20) and 0.82×
  (resnet32x4 → resnet8x4) of its time with XLA's defaults, side by side
  (`python benchmarks/xla_cpu_flags.py --pairs resnet56:resnet20,resnet32x4:resnet8x4`).

  Not for populations: a step that updates P students one after the other (the CPU setting of
  `jaxkd.step`) ran faster with YNNPACK, whose small single-threaded kernels let the
  independent members run side by side on the cores: 8 quickstart students took 0.41 and 0.48
  of 8 single steps with it, 0.64 and 0.54 without
  (`python benchmarks/xla_cpu_flags.py --pairs "" --population-pairs quickstart`).

The flag is experimental, and XLA aborts at start-up on a flag it does not know, so it is set
only for the jaxlib releases it was measured on (`_MEASURED_JAXLIB`); other releases run with
XLA's defaults. A value the user already put in `XLA_FLAGS` for the same flag wins.
"""

from collections.abc import MutableMapping
from importlib import metadata
import os

# (flag, value) pairs, each measured to speed up the KD step on XLA:CPU.
CPU_FLAGS = (("--xla_cpu_experimental_ynn_fusion_type", ""),)

# jaxlib (major, minor) releases whose XLA:CPU knows CPU_FLAGS and was measured with them.
_MEASURED_JAXLIB = ((0, 10),)


def _jaxlib_release() -> tuple[int, int] | None:
  try:
    major, minor = metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)
  except (metadata.PackageNotFoundError, ValueError):
    return None


def configure_cpu(
  environ: MutableMapping[str, str] = os.environ,
  jaxlib_release: tuple[int, int] | None = None,
  *,
  population: bool = False,
) -> list[str]:
  """Adds `CPU_FLAGS` to `environ['XLA_FLAGS']` where they apply; returns the flags added.

  Nothing is added for a student population (`population=True`), for a jaxlib release outside
  `_MEASURED_JAXLIB`, for a flag `XLA_FLAGS` already names, or when `JAXKD_XLA_DEFAULTS=1` asks
  for XLA's own defaults. The flags only concern XLA:CPU: GPU and TPU runs ignore them. Must
  run before JAX starts a backend.
  """
  release = jaxlib_release or _jaxlib_release()
  if population or release not in _MEASURED_JAXLIB or environ.get("JAXKD_XLA_DEFAULTS") == "1":
    return []
  existing = environ.get("XLA_FLAGS", "")
  added = [f"{flag}={value}" for flag, value in CPU_FLAGS if f"{flag}=" not in existing]
  if added:
    environ["XLA_FLAGS"] = " ".join([existing, *added]).strip()
  return added
