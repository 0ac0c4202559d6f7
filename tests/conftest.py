"""Test setup: 8 simulated CPU devices for the sharding tests, and jaxkd's XLA:CPU options.

In CI (``CI=true``) a test that would skip for a missing optional dependency fails instead.

The flags must be set before jax initialises its backends, so they live here, ahead of any
test module import. Single-device tests are unaffected: they run on the default device. The
tests run with the XLA options `python -m jaxkd.main` uses (`jaxkd.xla_flags`).
"""

import importlib
import os

from jaxkd import xla_flags

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs reads this when first imported (by any test): its gRPC bucket-layout probe stalls
# against the local GCS emulator of the gs:// tests (tests/fake_gcs.py).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
xla_flags.configure_cpu()

import jax  # noqa: E402  (after the XLA flags: jax reads them when its backend starts)
import pytest  # noqa: E402

import testing_utils  # noqa: E402

if os.environ.get("CI") == "true":
  # CI installs every test dependency ('.[test,torch]'): a parity test that would skip for a
  # missing torch (or transformers, ...) must fail there instead of passing silently.
  def _import_or_fail(module_name: str, *args, **kwargs):
    del args, kwargs
    return importlib.import_module(module_name)

  pytest.importorskip = _import_or_fail


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """The trainer runs compile the same few programs again and again, as `jaxkd.main` would."""
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  yield
  jax.config.update("jax_compilation_cache_dir", previous)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  """A fake Fashion-MNIST IDX directory: 128 training and 96 test images."""
  return testing_utils.write_dataset(tmp_path_factory.mktemp("fashion_mnist"), 128, 96)
