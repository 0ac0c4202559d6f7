"""Test setup: 8 simulated CPU devices for the sharding tests, and jaxkd's XLA:CPU options.

The flags must be set before jax initialises its backends, so they live here, ahead of any
test module import. Single-device tests are unaffected: they run on the default device. The
tests run with the XLA options `python -m jaxkd.main` uses (`jaxkd.xla_flags`).
"""
import os

from jaxkd import xla_flags

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
xla_flags.configure_cpu()
