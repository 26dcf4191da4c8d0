"""mtl_jax: multi-task learning research in JAX/Flax, organised around the gradient Gramian.

Importing the package first keeps XLA:CPU away from a known miscompilation, before any JAX
backend starts: jaxlib 0.10.x hands reductions to YNNPACK, whose reduce fusion miscompiles
sibling minor-axis reductions of an operand broadcast along the leading axis (normalisation
backward passes make that pattern; docs/xla_cpu_faults.md, tests/test_xla_cpu_faults.py).
`avoid_known_miscompilations` keeps YNNPACK for dot products only by adding
--xla_cpu_experimental_ynn_fusion_type=individual_dot to XLA_FLAGS, unless XLA_FLAGS already sets
that flag (the user's choice wins) or jaxlib is a version it was not measured on (the flag is
experimental, and an unknown flag stops XLA). JAX reads XLA_FLAGS when its first backend starts,
so a program that ran JAX computations before importing mtl_jax keeps the default; the Gramian
self-check (`gramian.check`) still compares the fast path with the reference path there.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping

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


avoid_known_miscompilations()

__version__ = "0.1.0"
