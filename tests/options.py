"""Config sections with configs/base.py's defaults, for tests that build methods or probes
directly."""

import ml_collections

from configs import base


def _section(name: str, overrides) -> ml_collections.ConfigDict:
  section = base.get_config()[name]
  section.unlock()
  section.update(overrides)
  return section


def method_options(**overrides) -> ml_collections.ConfigDict:
  """config.method (every method's defaults) with overrides; steps_per_epoch for DWA."""
  return _section("method", {"steps_per_epoch": 1, **overrides})


def conflict_options(**overrides) -> ml_collections.ConfigDict:
  """config.conflicts (the probe's defaults) with overrides."""
  return _section("conflicts", overrides)
