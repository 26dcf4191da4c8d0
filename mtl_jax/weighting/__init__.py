"""MTL methods as small pure weightings behind one registry keyed by name."""

from mtl_jax.weighting import gramian_based  # noqa: F401  (IMTL, PCGrad, CAGrad, Aligned-MTL, MGDA, ...)
from mtl_jax.weighting import jacobian_based  # noqa: F401  (GradDrop, AdaTask, MTL-IO)
from mtl_jax.weighting import loss_based  # noqa: F401  (EW, UW, UW-O, RLW, DWA, FAMO, GradNorm)
from mtl_jax.weighting.base import (JACOBIAN_MODES, KINDS, LEVELS, Weighting, check_level, get_weighting,
                                    method_names, num_rows, register)

__all__ = ["JACOBIAN_MODES", "KINDS", "LEVELS", "Weighting", "check_level", "get_weighting", "method_names",
           "num_rows", "register"]
