"""Test session set-up: the persistent XLA compilation cache, shared with the experiments."""

from mtl_jax import runtime

runtime.enable_compilation_cache()
