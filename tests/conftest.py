"""Test session set-up: the persistent XLA compilation cache, shared with the experiments, and
reproducible property tests.

Hypothesis draws its examples from a fixed seed, so a CI run is reproducible and never fails by
chance; set MTL_JAX_HYPOTHESIS=explore to draw fresh random examples when hunting for
counterexamples (a failing one found that way belongs in an @example).
"""

import os

import hypothesis

from mtl_jax import runtime

runtime.enable_compilation_cache()
hypothesis.settings.register_profile("reproducible", derandomize=True, database=None)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(
  "explore" if os.environ.get("MTL_JAX_HYPOTHESIS") == "explore" else "reproducible"
)
