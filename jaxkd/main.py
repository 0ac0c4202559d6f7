"""Command line: `python -m jaxkd.main --config=configs/<file>.py[:arg] --workdir=DIR`.

The config is locked: `--config.data.batch_size=256` overrides a field, a misspelt field is an
error. A config with a `compare` section (configs/quickstart.py) runs the teacher → scratch / KD
students comparison of jaxkd.compare; any other config one `train.train_and_evaluate` run.
Configuration and data problems end the program with one line on stderr and exit status 1.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxkd import checkpoint, compare, configlib, data, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file (get_config(arg); ':arg' picks a variant).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])

# Problems a user fixes by changing the command line, the config or the data on disk.
_USER_ERRORS = (configlib.ConfigError, data.DataUnavailableError,
                checkpoint.IncompatibleCheckpointError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  logging.info("Config:\n%s", config)
  try:
    if "compare" in config:
      compare.run(config, _WORKDIR.value)
    else:
      train.train_and_evaluate(config, _WORKDIR.value)
  except _USER_ERRORS as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
