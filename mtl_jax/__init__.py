"""mtl_jax: multi-task learning research in JAX/Flax, organised around the gradient Gramian."""

from mtl_jax import runtime

# Before any JAX backend starts: XLA:CPU miscompiles normalisation backward passes otherwise.
runtime.avoid_known_miscompilations()

__version__ = "0.1.0"
