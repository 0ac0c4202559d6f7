"""Test setup: 8 simulated CPU devices for the sharding tests.

The flag must be set before jax initialises its backends, so it lives here, ahead of any
test module import. Single-device tests are unaffected: they run on the default device.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
