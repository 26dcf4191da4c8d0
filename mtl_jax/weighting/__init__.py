"""MTL methods as small pure weightings behind one registry keyed by name."""

from mtl_jax.weighting import loss_based  # noqa: F401  (registers EW, UW, UW-O, RLW)
from mtl_jax.weighting.base import KINDS, Weighting, get_weighting, method_names, register

__all__ = ["KINDS", "Weighting", "get_weighting", "method_names", "register"]
