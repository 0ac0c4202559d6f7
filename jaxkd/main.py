"""Command line: `python -m jaxkd.main --config=configs/<file>.py[:arg] --workdir=DIR`.

The config is locked: `--config.data.batch_size=256` overrides a field, a misspelt field is an
error. The program runs `train.train_and_evaluate`, or the experiment the config names in
`config.experiment` (`jaxkd.experiments`, e.g. the quickstart's teacher → scratch / KD
comparison). Problems a user fixes (`jaxkd.errors.UserError`: the config, the data, the disk)
end the program with one `error:` line on stderr, the last thing printed, and exit status 1.
On XLA:CPU the measured-faster options of `jaxkd.xla_flags` are set before JAX starts.
"""

import logging as python_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxkd import errors, experiments, plan, xla_flags
from jaxkd.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A configs/*.py file (get_config(arg); ':arg' picks a variant).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _flag_error_message(error: BaseException) -> str:
  """One line for a command-line error, without the traceback config_flags would embed."""
  # config_flags re-raises an error of get_config with its traceback pasted into the message;
  # the innermost user error of the chain is the one to show.
  user_error, cause = None, error
  while cause is not None:
    if isinstance(cause, errors.UserError):
      user_error = cause
    cause = cause.__cause__ or cause.__context__
  if user_error is not None:
    return str(user_error)
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections' answer to `--config.<field>` for a field the config lacks:
    # AttributeError(KeyError("'name'\nDid you mean ...?")).
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]
    message = str(error.args[0] if error.args else error).replace("\n", ": ")
    return f"--config override of a field the config does not have: {message}"
  return str(error)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; any error ends the program with one line and status 1."""
  try:
    remaining_argv = flags.FLAGS(argv)
    # A config file that cannot be loaded is reported only when the config is first read.
    _CONFIG.value.get("seed")
    return remaining_argv
  except (flags.Error, AttributeError, KeyError) as error:
    message = _flag_error_message(error)
  except OSError as error:
    message = f"--config: {' '.join(str(error.__cause__ or error).split())}"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _keep_library_warnings_only() -> None:
  """orbax and grain log every file operation at INFO; keep their warnings, drop the rest."""
  libraries = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "grain"))
  logging.get_absl_handler().addFilter(
    lambda record: (
      record.levelno >= python_logging.WARNING
      or not any(library in record.pathname for library in libraries)
    )
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _keep_library_warnings_only()
  config = _CONFIG.value
  # XLA reads XLA_FLAGS when the first backend starts: the config is read, nothing has run yet.
  xla_flags.configure_cpu(population=config.population.size > 1)
  if not jax.config.jax_compilation_cache_dir:  # Unless JAX_COMPILATION_CACHE_DIR says where.
    # Reruns, and the runs of one comparison (its seeds), share their compiled programs.
    jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value, "xla_cache"))
  try:
    plan.check_experiment(config.experiment, experiments.EXPERIMENTS)
    run = experiments.EXPERIMENTS.get(config.experiment, train_and_evaluate)
    run(config, _WORKDIR.value)
  except errors.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
