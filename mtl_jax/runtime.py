"""Process set-up every experiment script runs first: multi-host connection, compile cache, quiet logs."""

from __future__ import annotations

import logging as python_logging

from absl import flags
from absl import logging

from mtl_jax import compilation_cache
from mtl_jax import sharding


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
  """Connects the hosts of a multi-host job (a no-op on one host), enables the persistent XLA
  compilation cache and quiets library logs. Call at the top of an experiment's main().

  Args:
    config: the experiment config, for `config.sharding` (None: defaults).
  """
  sharding.initialize_distributed(config)
  compilation_cache.enable()
  quiet_library_logs()
