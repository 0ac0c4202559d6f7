"""The errors a user fixes by changing the command line, the config, the data or the disk.

`python -m jaxkd.main` prints any `UserError` as one `error: <message>` line on stderr, as the
last thing on screen, and exits with status 1; the message names the field, path or value.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem the user fixes; its message is one line naming the field, path or value."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the field."""


class DataUnavailableError(UserError, RuntimeError):
  """The prepared data is not where the config says; the message says how to get it."""


class CheckpointError(UserError):
  """A checkpoint or model directory that cannot be read or written; the message names it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A model directory that is not there (or has no `model.json`); the message names the path."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
  """The workdir holds checkpoints of a different run than the config describes."""


class NonFiniteError(UserError, FloatingPointError):
  """The train state holds NaN or infinity (training diverged); the message names the leaf."""
