"""The Gramian engine: inner products of the per-sample, per-task gradients of the shared encoder.

Rows are (sample i, task t), or coarser rows built from them (see `levels`), and a row's
gradient is taken with respect to the encoder parameters `params['encoder']` only (heads are
task-specific and never enter a Gramian). `compute` is the one entry: it returns the Gramian at
a level, the task losses and the rows' weighted gradient, on one device or a mesh, by the fast
(ghost) path or the reference path. All functions are jit-able when `model` and `tasks` are
closed over (or static).
"""

from mtl_jax.gramian.blocks import layer_strategy
from mtl_jax.gramian.engine import Gramian
from mtl_jax.gramian.engine import compute
from mtl_jax.gramian.levels import FULL
from mtl_jax.gramian.levels import LEVELS
from mtl_jax.gramian.levels import at_level
from mtl_jax.gramian.levels import check_level
from mtl_jax.gramian.levels import num_rows
from mtl_jax.gramian.levels import row_norms
from mtl_jax.gramian.levels import sample_gramian
from mtl_jax.gramian.levels import task_gramian
from mtl_jax.gramian.modes import BATCH_NORM_MODES
from mtl_jax.gramian.modes import PATHS
from mtl_jax.gramian.reference import jacobian_rows
from mtl_jax.gramian.reference import per_sample_gradients
from mtl_jax.gramian.reference import per_sample_losses
from mtl_jax.gramian.reference import stacked_vjp

__all__ = [
  "BATCH_NORM_MODES",
  "FULL",
  "Gramian",
  "LEVELS",
  "PATHS",
  "at_level",
  "check_level",
  "compute",
  "jacobian_rows",
  "layer_strategy",
  "num_rows",
  "per_sample_gradients",
  "per_sample_losses",
  "row_norms",
  "sample_gramian",
  "stacked_vjp",
  "task_gramian",
]
