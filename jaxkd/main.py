"""Command line: `python -m jaxkd.main --config=configs/<file>.py[:arg] --workdir=DIR`.

The config is locked: `--config.data.batch_size=256` overrides a field, a misspelt field is an
error. The program runs `train.train_and_evaluate`, or the experiment the config names in
`config.experiment` (`jaxkd.experiments`, e.g. the quickstart's teacher → scratch / KD
comparison). Problems a user fixes (`jaxkd.errors.UserError`: the config, the data, the disk)
end the program with one `error:` line on stderr, the last thing printed, and exit status 1.
SIGTERM or SIGINT (preemption) checkpoints the step the run reached and exits with status
`jaxkd.preemption.EXIT_CODE` (75); the same command resumes. Log lines that tell a user nothing
are dropped (`_is_noise`): orbax's and grain's file operations, and jax's probe of a TPU backend
on a machine without libtpu.
On XLA:CPU the measured-faster options of `jaxkd.xla_flags` are set before JAX starts.
"""

import logging as python_logging
import os
import sys

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from jaxkd import cli, errors, experiments, plan, preemption, xla_flags
from jaxkd.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A configs/*.py file (get_config(arg); ':arg' picks a variant).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's `flags_parser`: a mistake ends the program with the one line."""
  try:
    return cli.read_flags(argv, flags.FLAGS, _CONFIG)
  except errors.UserError as error:
    cli.exit_with_error(error)


def _is_noise(record: python_logging.LogRecord) -> bool:
  """Log records that say nothing to a user.

  * orbax and grain log every file operation at INFO (their warnings are kept).
  * jax logs at INFO every optional backend it probes and cannot start: on any machine without
    libtpu, "Unable to initialize backend 'tpu': ... Failed to open libtpu.so". jax itself warns
    (WARNING, kept) when the hardware of such a backend is present but cannot be used, and a
    backend the user asks for with JAX_PLATFORMS fails loudly, so the line adds nothing.
  """
  if record.levelno >= python_logging.WARNING:
    return False
  if any(f"{os.sep}{library}{os.sep}" in record.pathname for library in ("orbax", "grain")):
    return True
  return record.name.startswith("jax") and record.getMessage().startswith(
    "Unable to initialize backend"
  )


def _drop_log_noise() -> None:
  """Installs `_is_noise` on absl's handler, which every library's logging reaches."""
  logging.get_absl_handler().addFilter(lambda record: not _is_noise(record))


def _check_workdir_flag(workdir: str) -> None:
  """The flag's own value: a directory path (the plan checks what the directory holds)."""
  if not workdir.strip():
    raise errors.UserError("--workdir is empty: name the run's directory")
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise errors.UserError(f"--workdir={workdir} is a file, not a directory")


def main(argv):
  _drop_log_noise()
  try:
    if len(argv) > 1:
      raise errors.UserError(
        f"unexpected arguments: {' '.join(argv[1:])} (every option is --name=value)"
      )
    _check_workdir_flag(_WORKDIR.value)
    config = _CONFIG.value
    # XLA reads XLA_FLAGS when the first backend starts: the config is read, nothing has run.
    xla_flags.configure_cpu(population=config.population.size > 1)
    if not jax.config.jax_compilation_cache_dir:  # Unless JAX_COMPILATION_CACHE_DIR says where.
      # Reruns, and the runs of one comparison (its seeds), share their compiled programs.
      jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value, "xla_cache"))
    plan.check_experiment(config.experiment, experiments.EXPERIMENTS)
    run = experiments.EXPERIMENTS.get(config.experiment, train_and_evaluate)
    run(config, _WORKDIR.value)
  except errors.UserError as error:
    cli.exit_with_error(error)
  except preemption.Preempted as stopped:
    print(f"jaxkd: {stopped}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
