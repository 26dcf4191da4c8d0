"""Test session set-up: the persistent XLA compilation cache, shared with the experiments."""

from mtl_jax import compilation_cache

compilation_cache.enable()
