"""Process set-up every experiment script runs first: multi-host connection, compile cache, quiet
logs.

The persistent XLA compilation cache matters here: sweeps, resumed runs and test sessions
compile the same programs again and again; on a CPU a SegNet initialisation plus train step
takes tens of seconds to compile and under a second to load from the cache. The cache directory
is `$MTL_JAX_COMPILATION_CACHE` when set (an empty value disables the cache), else
`~/.cache/mtl_jax/xla`.

`avoid_known_miscompilations` runs when mtl_jax is imported, before any JAX backend starts: jaxlib
0.10.2's XLA:CPU hands reductions to YNNPACK, whose reduce fusion miscompiles sibling minor-axis
reductions of an operand broadcast along the leading axis (normalisation backward passes make
that pattern; docs/xla_cpu_faults.md, tests/test_xla_cpu_faults.py). It keeps YNNPACK for dot
products only by adding --xla_cpu_experimental_ynn_fusion_type=individual_dot to XLA_FLAGS,
unless XLA_FLAGS already sets that flag (the user's choice wins) or jaxlib is a version it was not
measured on (the flag is experimental, and an unknown flag stops XLA). JAX reads XLA_FLAGS when
its first backend starts, so a program that ran JAX computations before importing mtl_jax keeps
the default; the Gramian self-check (`gramian.check`) still compares the fast path with the
reference path there.
"""

from __future__ import annotations

import importlib.metadata
import logging as python_logging
import os
from typing import MutableMapping

from absl import flags
from absl import logging
import jax

from mtl_jax import parallel

CACHE_VARIABLE = "MTL_JAX_COMPILATION_CACHE"
DEFAULT_CACHE_DIRECTORY = os.path.join("~", ".cache", "mtl_jax", "xla")
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# YNNPACK for dot products only; jaxlib 0.10.2's default also gives it reductions.
YNN_FUSION_TYPES = "individual_dot"
# jaxlib versions the fault and the flag were measured on.
AFFECTED_JAXLIB_PREFIXES = ("0.10.",)


def installed_jaxlib_version() -> str:
  """The installed jaxlib's version, or '' when there is none."""
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


def avoid_known_miscompilations(
  environment: MutableMapping[str, str] | None = None, jaxlib_version: str | None = None
) -> bool:
  """Adds the YNNPACK flag to XLA_FLAGS (see the module docstring); returns whether it did."""
  environment = os.environ if environment is None else environment
  jaxlib_version = installed_jaxlib_version() if jaxlib_version is None else jaxlib_version
  flags = environment.get("XLA_FLAGS", "")
  if YNN_FUSION_FLAG in flags or not jaxlib_version.startswith(AFFECTED_JAXLIB_PREFIXES):
    return False
  environment["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}={YNN_FUSION_TYPES}".strip()
  return True


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
