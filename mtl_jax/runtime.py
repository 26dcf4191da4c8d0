"""What every experiment script shares: its config flag, user errors as one line, and process
set-up (multi-host connection, compile cache, quiet logs).

`run(main)` is each script's `__main__`: absl's `app.run` with a flag parser and a main that turn
the user's mistakes (a bad or unknown config key, a config file that does not load, data that is
not prepared, a workdir in use, a disk that refuses a write) into `error: ...` lines naming the
key or path, and exit status 2, with no traceback. Errors that are not the user's (bugs) still
raise with their traceback. `define_config_file` defines the config flag so that a bad override
without `--config=` (which ml_collections parses while the flag is defined, at import) is reported
the same way.

The persistent XLA compilation cache matters here: sweeps, resumed runs and test sessions
compile the same programs again and again; on a CPU a SegNet initialisation plus train step
takes tens of seconds to compile and under a second to load from the cache. The cache directory
is `$MTL_JAX_COMPILATION_CACHE` when set (an empty value disables the cache), else
`~/.cache/mtl_jax/xla`.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import logging as python_logging
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from mtl_jax import checkpoint
from mtl_jax import config_validation
from mtl_jax import parallel
from mtl_jax.data import validation as data_validation
from mtl_jax.train import workdir_lock

USER_ERROR_EXIT_CODE = 2
# Errors that describe a mistake in the command, the config, the data or the workdir.
USER_ERRORS = (
  config_validation.ConfigError,
  data_validation.DataError,
  checkpoint.CheckpointWriteError,
  workdir_lock.WorkdirInUseError,
  FileNotFoundError,
  PermissionError,
  IsADirectoryError,
  NotADirectoryError,
)
# Operating-system errors of a write the disk refused (full, read-only, over quota, too large).
STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM)
CACHE_VARIABLE = "MTL_JAX_COMPILATION_CACHE"
DEFAULT_CACHE_DIRECTORY = os.path.join("~", ".cache", "mtl_jax", "xla")


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Enables the persistent cache; returns the directory used, or None when disabled."""
  if directory is None:
    directory = os.environ.get(CACHE_VARIABLE, DEFAULT_CACHE_DIRECTORY)
  if not directory:
    return None
  directory = os.path.expanduser(directory)
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  # Small programs are worth caching too: compiling them still costs ~0.2 s each here.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def quiet_library_logs() -> None:
  """Hides INFO lines of libraries (Orbax logs several per checkpoint) and the tracebacks Orbax
  logs for a failed save, unless --verbosity was given.

  Our own progress goes through `metric_writers.status` (print), so it is unaffected; warnings
  and errors still show.
  """
  verbosity = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
  if verbosity is not None and verbosity.present:
    return
  logging.set_verbosity(logging.WARNING)
  python_logging.getLogger().setLevel(python_logging.WARNING)
  logging.get_absl_logger().addFilter(_drop_checkpoint_library_tracebacks)


def _drop_checkpoint_library_tracebacks(record: python_logging.LogRecord) -> bool:
  """Keeps Orbax's and TensorStore's error lines but not their tracebacks: a save they failed is
  reported as one `CheckpointWriteError` line (rerun with --verbosity=0 to see them)."""
  if record.exc_info and any(name in record.pathname for name in ("orbax", "tensorstore")):
    record.exc_info, record.exc_text = None, None
  return True


def setup(config=None) -> None:
  """Quiets library logs, connects the processes of a multi-process job (a no-op for one) and
  enables the persistent XLA compilation cache. Call at the top of an experiment's main().

  Args:
    config: the experiment config, for `config.sharding` (None: defaults).

  Raises:
    ConfigError: a bad config.sharding key.
  """
  quiet_library_logs()
  parallel.initialize_distributed(config)
  enable_compilation_cache()


def is_user_error(error: BaseException) -> bool:
  """Whether error is the user's to fix (printed as one line) rather than a bug (a traceback)."""
  if isinstance(error, USER_ERRORS):
    return True
  return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def exit_with_error(message: str) -> NoReturn:
  """Prints each line of message as `error: <line>` on stderr and exits with status 2."""
  for line in filter(None, (line.strip() for line in message.splitlines())):
    print(f"error: {line}", file=sys.stderr)
  sys.stderr.flush()
  sys.exit(USER_ERROR_EXIT_CODE)


# Config flags defined by `define_config_file`: name -> default file, and name -> the error
# ml_collections raised while defining it.
_CONFIG_DEFAULTS: dict[str, str] = {}
_DEFINITION_ERRORS: dict[str, str] = {}


def define_config_file(name: str, default: str, help_string: str) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file(..., lock_config=True)`, whose errors reach `parse_flags`.

  Without `--<name>=` on the command line, ml_collections loads the default file and applies the
  `--<name>.<key>=` overrides while the flag is defined (at import, before `run`); an error there
  is kept, the flag is defined without the overrides, and `parse_flags` reports the error.
  """
  _CONFIG_DEFAULTS[name] = default
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except Exception as error:  # Whatever the override raised; reported as a flag error.
    _DEFINITION_ERRORS[name] = _flag_error_message(error, sys.argv, name)
    return config_flags.DEFINE_config_file(
      name, default, help_string, lock_config=True, sys_argv=sys.argv[:1]
    )


def _overrides(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
  """(dotted key, argument) of each `--<name>.<key>=value` in argv."""
  prefixes = (f"--{name}.", f"-{name}.")
  return [
    (argument.split("=", 1)[0].split(".", 1)[1], argument)
    for argument in argv
    if argument.startswith(prefixes)
  ]


def _config_path(argv: Sequence[str], name: str) -> str | None:
  for argument in argv:
    for prefix in (f"--{name}=", f"-{name}="):
      if argument.startswith(prefix):
        return argument[len(prefix) :]
  return _CONFIG_DEFAULTS.get(name)


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config(argument)` of a config file given as 'file.py[:argument]', without overrides."""
  file, _, argument = path.partition(":")
  spec = importlib.util.spec_from_file_location("config_file_for_message", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def _unknown_key(argv: Sequence[str], name: str) -> str | None:
  """'<argument>: ...' for the first override whose key the config file does not have."""
  try:
    config = _load_config_file(_config_path(argv, name))
  except Exception:  # The file itself does not load: the original error says why.
    return None
  for key, argument in _overrides(argv, name):
    node, walked = config, name
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        valid = ", ".join(node.keys()) if isinstance(node, ml_collections.ConfigDict) else ""
        return (
          f"{argument}: config key {walked}.{part} does not exist; valid keys of {walked}: {valid}."
        )
      node, walked = node[part], f"{walked}.{part}"
  return None


def _flag_error_message(error: Exception, argv: Sequence[str], name: str | None = None) -> str:
  """One line for an error raised while the flags were parsed."""
  names = [name] if name else list(_CONFIG_DEFAULTS)
  if isinstance(error, (AttributeError, KeyError)):
    for config_name in names:
      unknown = _unknown_key(argv, config_name)
      if unknown:
        return unknown
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if len(lines) > 1:  # ml_collections puts a config file's traceback inside the message.
    return f"{lines[0]} {lines[-1]}"
  return lines[0] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every flag or config error as one `error:` line and exit status 2.

  Config files are loaded here (ml_collections would load them at first use), so a file that does
  not exist or does not load is reported before `main` starts.
  """
  for message in _DEFINITION_ERRORS.values():
    exit_with_error(message)
  try:
    remaining = flags.FLAGS(argv)
    for name in _CONFIG_DEFAULTS:
      flags.FLAGS[name].value.keys()
  except Exception as error:  # Any flag or config-file error is the command line's.
    exit_with_error(_flag_error_message(error, argv))
  return remaining


def _main_reporting_user_errors(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  try:
    return main(argv)
  except Exception as error:
    if not is_user_error(error):
      raise
    exit_with_error(str(error) or type(error).__name__)


def run(main: Callable[[list[str]], Any]) -> None:
  """Runs an experiment's main under absl; a user error becomes `error:` lines and exit status 2.

  Exits main chooses itself (`sys.exit(75)` after preemption, ...) pass through unchanged.
  """
  app.run(functools.partial(_main_reporting_user_errors, main), flags_parser=parse_flags)
