"""jaxkd.xla_flags: which XLA:CPU options the entry points add, and that XLA accepts them."""

import os
import subprocess
import sys

import pytest

from jaxkd import xla_flags

MEASURED = (0, 10)
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


@pytest.mark.parametrize(
  "existing, expected",
  [
    ({}, YNN_OFF),
    (
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
      f"--xla_force_host_platform_device_count=8 {YNN_OFF}",
    ),
  ],
)
def test_adds_the_flags_after_the_users_own(existing, expected):
  environ = dict(existing)
  assert xla_flags.configure_cpu(environ, MEASURED) == [YNN_OFF]
  assert environ["XLA_FLAGS"] == expected


def test_a_value_the_user_set_wins():
  environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"}
  assert xla_flags.configure_cpu(environ, MEASURED) == []
  assert environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"


@pytest.mark.parametrize("release", [(0, 9), (0, 11), (1, 0)])
def test_unmeasured_jaxlib_releases_keep_xla_defaults(release):
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.configure_cpu(environ, release) == []
  assert environ == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_populations_keep_xla_defaults():
  environ = {}
  assert xla_flags.configure_cpu(environ, MEASURED, population=True) == []
  assert environ == {}


def test_jaxkd_xla_defaults_opts_out():
  environ = {"JAXKD_XLA_DEFAULTS": "1"}
  assert xla_flags.configure_cpu(environ, MEASURED) == []
  assert "XLA_FLAGS" not in environ


def test_the_installed_xla_accepts_what_configure_cpu_adds():
  """XLA aborts on an unknown flag: start a backend with exactly the flags jaxkd would add."""
  environ = {
    key: value
    for key, value in os.environ.items()
    if key not in ("XLA_FLAGS", "JAXKD_XLA_DEFAULTS")
  }
  if not xla_flags.configure_cpu(environ):
    pytest.skip("no flags for this jaxlib release")
  result = subprocess.run(
    [sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"],
    env=environ,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "2.0"
