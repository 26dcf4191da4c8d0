"""Test session set-up: the persistent XLA compilation cache, shared with the experiments, and
reproducible property tests, the slow tier, and the order in which files start.

Tests marked `slow` are wider or larger variants of cases the default run already covers (every
method on every architecture, every encoder and norm, the paper-size steps compiled); they run with
MTL_JAX_SLOW_TESTS=1 and are skipped otherwise, so the default run stays within CI's budget.

Hypothesis draws its examples from a fixed seed, so a CI run is reproducible and never fails by
chance; set MTL_JAX_HYPOTHESIS=explore to draw fresh random examples when hunting for
counterexamples (a failing one found that way belongs in an @example).
"""

import os

import hypothesis
import pytest

from mtl_jax import runtime

runtime.enable_compilation_cache()
hypothesis.settings.register_profile("reproducible", derandomize=True, database=None)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(
  "explore" if os.environ.get("MTL_JAX_HYPOTHESIS") == "explore" else "reproducible"
)


SLOW_TESTS = os.environ.get("MTL_JAX_SLOW_TESTS") == "1"

# The longest files (warm seconds on 2 cores, 2026-11-29), run first: pytest-xdist hands out whole
# files (--dist loadfile) in collection order (--no-loadscope-reorder), so a long file that came
# last would run alone on one core at the end while the other waits.
LONGEST_FIRST = (
  "test_multiprocess.py",  # 190 s: real processes
  "test_train.py",  # 63 s
  "test_device_suite.py",  # 49 s
  "test_sharding.py",  # 44 s: 8-device subprocesses
  "test_partial_labels.py",  # 40 s
  "test_gramian.py",  # 39 s
)


def _start_rank(item) -> int:
  name = item.path.name
  return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=_start_rank)  # stable: the other files keep their order
  if SLOW_TESTS:
    return
  skip = pytest.mark.skip(reason="slow: set MTL_JAX_SLOW_TESTS=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
