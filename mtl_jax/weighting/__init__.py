"""MTL methods behind one registry: loss weightings, Gramian weightings and Jacobian methods."""

from mtl_jax.weighting import bilevel  # noqa: F401  (Auto-Lambda)
from mtl_jax.weighting import gramian_based  # noqa: F401  (PCGrad, CAGrad, MGDA, UPGrad, ...)
from mtl_jax.weighting import jacobian_based  # noqa: F401  (GradDrop, AdaTask, MTL-IO)
from mtl_jax.weighting import loss_based  # noqa: F401  (EW, UW, UW-O, RLW, DWA, FAMO, STCH, ...)
from mtl_jax.weighting import task_gradients  # noqa: F401  (DB-MTL, MoCo, ExcessMTL, SDMGrad, MoDo)
from mtl_jax.weighting.base import JACOBIAN_MODES
from mtl_jax.weighting.base import LEVELS
from mtl_jax.weighting.base import GramianWeighting
from mtl_jax.weighting.base import JacobianMethod
from mtl_jax.weighting.base import LossWeighting
from mtl_jax.weighting.base import Method
from mtl_jax.weighting.base import NoState
from mtl_jax.weighting.base import batch_parts
from mtl_jax.weighting.base import brings_own_optimizer
from mtl_jax.weighting.base import TaskGradients
from mtl_jax.weighting.base import check_level
from mtl_jax.weighting.base import check_method_level
from mtl_jax.weighting.base import get
from mtl_jax.weighting.base import gramian_method
from mtl_jax.weighting.base import initial_state
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
  "TaskGradients",
  "batch_parts",
  "brings_own_optimizer",
  "check_level",
  "check_method_level",
  "get",
  "gramian_method",
  "initial_state",
  "make_optimizer",
  "method_names",
  "method_options",
  "no_parameters",
  "num_rows",
  "register",
  "state_size",
]
