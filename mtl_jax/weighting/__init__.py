"""MTL methods behind one registry: loss weightings, Gramian weightings and Jacobian methods."""

from mtl_jax.weighting import gramian_based  # noqa: F401  (PCGrad, CAGrad, MGDA, UPGrad, ...)
from mtl_jax.weighting import jacobian_based  # noqa: F401  (GradDrop, AdaTask, MTL-IO)
from mtl_jax.weighting import loss_based  # noqa: F401  (EW, UW, UW-O, RLW, DWA, FAMO)
from mtl_jax.weighting.base import JACOBIAN_MODES
from mtl_jax.weighting.base import LEVELS
from mtl_jax.weighting.base import GramianWeighting
from mtl_jax.weighting.base import JacobianMethod
from mtl_jax.weighting.base import LossWeighting
from mtl_jax.weighting.base import Method
from mtl_jax.weighting.base import NoState
from mtl_jax.weighting.base import check_level
from mtl_jax.weighting.base import check_method_level
from mtl_jax.weighting.base import get
from mtl_jax.weighting.base import gramian_method
from mtl_jax.weighting.base import make_optimizer
from mtl_jax.weighting.base import method_names
from mtl_jax.weighting.base import method_options
from mtl_jax.weighting.base import no_parameters
from mtl_jax.weighting.base import num_rows
from mtl_jax.weighting.base import register
from mtl_jax.weighting.base import state_size

__all__ = [
  "GramianWeighting",
  "JACOBIAN_MODES",
  "JacobianMethod",
  "LEVELS",
  "LossWeighting",
  "Method",
  "NoState",
  "check_level",
  "check_method_level",
  "get",
  "gramian_method",
  "make_optimizer",
  "method_names",
  "method_options",
  "no_parameters",
  "num_rows",
  "register",
  "state_size",
]
