"""What a jaxkd command does with its command line: flags read into one clear error line.

Shared by `python -m jaxkd.main`, `python -m jaxkd.evaluate` and `python -m jaxkd.tools.*`.
"""

import logging as python_logging
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags
from ml_collections import config_flags

from jaxkd import errors


def flag_error_message(error: BaseException) -> str:
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


def read_flags(argv: list[str], flag_values: flags.FlagValues, config_flag) -> list[str]:
  """absl's flag parsing of `argv` and the config's loading and overrides.

  Returns the arguments left over; any mistake on the command line, the config file or an
  override is a `UserError` whose message is the one line to print.
  """
  try:
    remaining_argv = flag_values(argv)
    # A config file that cannot be loaded is reported only when the config is first read.
    config_flag.value.get("seed")
    return remaining_argv
  except (flags.Error, AttributeError, KeyError) as error:
    message = flag_error_message(error)
  except OSError as error:
    message = f"--config: {' '.join(str(error.__cause__ or error).split())}"
  raise errors.UserError(message)


def tool_flags() -> tuple[flags.FlagValues, Any]:
  """The flags of a command beside `jaxkd.main` (`jaxkd.evaluate`, `jaxkd.tools.*`): its own
  `FlagValues` (absl's global ones hold `jaxkd.main`'s --config when both are imported) with a
  locked, required --config. Returns the flag values and the config flag."""
  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
    "config",
    None,
    "A configs/*.py file (get_config(arg); ':arg' picks a variant).",
    flag_values=flag_values,
    lock_config=True,
  )
  flags.mark_flags_as_required(["config"], flag_values=flag_values)
  return flag_values, config_flag


def tool_flags_parser(flag_values: flags.FlagValues, config_flag) -> Callable[[list[str]], list]:
  """`app.run`'s flags_parser for a `tool_flags` command: a mistake is one `error:` line and
  status 1; absl's own flags (logging) keep their defaults."""

  def parse(argv: list[str]) -> list[str]:
    try:
      remaining_argv = read_flags(argv, flag_values, config_flag)
    except errors.UserError as error:
      exit_with_error(error)
    flags.FLAGS(argv[:1])
    return remaining_argv

  return parse


def exit_with_error(error: errors.UserError) -> NoReturn:
  """Prints `error` as one `error:` line, the last thing on screen, and exits with status 1."""
  # What was printed or logged before comes first (stdout may be a buffered pipe).
  sys.stdout.flush()
  for handler in python_logging.getLogger().handlers:
    handler.flush()
  message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  print(f"error: {message}", file=sys.stderr, flush=True)
  # Nothing may follow the line: what library threads log or warn while the interpreter shuts
  # down (an unfinished background read, an unclosed pool) is a consequence of the error.
  python_logging.disable(python_logging.CRITICAL)
  warnings.simplefilter("ignore")
  sys.exit(1)
