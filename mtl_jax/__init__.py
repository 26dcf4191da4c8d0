"""mtl_jax: multi-task learning research in JAX/Flax, organised around the gradient Gramian."""

__version__ = "0.1.0"
