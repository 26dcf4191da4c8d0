"""Process set-up every experiment script runs first: multi-host connection, compile cache, quiet
logs.

The persistent XLA compilation cache matters here: sweeps, resumed runs and test sessions
compile the same programs again and again; on a CPU a SegNet initialisation plus train step
takes tens of seconds to compile and under a second to load from the cache. The cache directory
is `$MTL_JAX_COMPILATION_CACHE` when set (an empty value disables the cache), else
`~/.cache/mtl_jax/xla`.
"""

from __future__ import annotations

import logging as python_logging
import os

from absl import flags
from absl import logging
import jax

from mtl_jax import parallel

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
  """Hides INFO lines of libraries (Orbax logs several per checkpoint) unless --verbosity was given.

  Our own progress goes through `metric_writers.status` (print), so it is unaffected; warnings
  and errors still show.
  """
  verbosity = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
  if verbosity is not None and verbosity.present:
    return
  logging.set_verbosity(logging.WARNING)
  python_logging.getLogger().setLevel(python_logging.WARNING)


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
