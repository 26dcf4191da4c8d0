"""Which model mode the per-sample losses use, and the exact float32 products every path shares.

Batch normalisation in training mode makes a sample's loss depend on the other samples through
the batch statistics, so "the gradient of sample i" needs a definition. `batch_norm` chooses:

* 'error' (default): models with batch norm raise a ValueError that explains the choices.
* 'eval': every per-sample loss uses the running statistics (the model in evaluation mode);
  samples are then independent and both paths compute the exact per-sample gradients of that
  model.
* 'batch_statistics' (reference path only): L_t(x_i) is the per-sample loss of the model in
  training mode, with the batch's statistics; its gradient is the full derivative, including the
  dependence of the shared statistics on every sample's activations (a row of the Jacobian of the
  [B, T] loss matrix). Rows still sum to the batch gradient, but row (i, t) is not the gradient
  of any single-sample model. The fast path cannot compute it (its output gradients are only
  per-sample when samples are independent) and raises.

Group, layer and no normalisation keep samples independent and work on both paths.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.models import apply as apply_lib

PATHS = ("reference", "fast")
BATCH_NORM_MODES = ("error", "eval", "batch_statistics")

_HIGHEST = jax.lax.Precision.HIGHEST

_BATCH_NORM_ERROR = (
  "The model uses batch normalisation, which couples the samples of a batch: in training mode "
  "a per-sample gradient is not the gradient of the model applied to that sample alone. Pass "
  "batch_norm='eval' for exact per-sample gradients of the model with its running statistics, "
  "batch_norm='batch_statistics' (reference path only) for the rows of the Jacobian of the "
  "training-mode [B, T] loss matrix, or use norm='group', 'layer' or 'none'. The task-level "
  "Gramian of batch-mean losses is well defined under batch norm: use level 'task'."
)
_FAST_BATCH_STATISTICS_ERROR = (
  "batch_norm='batch_statistics' is only available on the 'reference' path: the fast path's "
  "output gradients are per-sample only when samples are independent, and under training-mode "
  "batch norm each sample's loss depends on every sample's activations. Use path='reference', "
  "or batch_norm='eval'."
)


def einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
  """float32 einsum at full precision: Gramian entries are differences of large products."""
  return jnp.einsum(subscripts, *operands, precision=_HIGHEST, preferred_element_type=jnp.float32)


def flatten_rows(tree: Any, leading: int) -> jax.Array:
  """Concatenates a pytree's leaves, keeping `leading` axes: [..., P] in tree_leaves order."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.concatenate(
    [leaf.reshape(*leaf.shape[:leading], -1).astype(jnp.float32) for leaf in leaves], axis=-1
  )


def check_choice(value: str, valid: Sequence[str], what: str) -> str:
  """Returns value, or raises a ValueError listing the valid choices."""
  if value not in valid:
    raise ValueError(f"Unknown {what} {value!r}; valid choices: {', '.join(valid)}.")
  return value


def resolve_mode(batch_stats: Any, path: str, batch_norm: str) -> tuple[bool, bool]:
  """(train, coupled): the model mode for per-sample losses, and whether samples interact.

  Raises:
    ValueError: an unknown path or mode, or a batch-norm model with a mode the path cannot do.
  """
  check_choice(path, PATHS, "Gramian path")
  check_choice(batch_norm, BATCH_NORM_MODES, "batch_norm mode")
  if not apply_lib.has_batch_norm(batch_stats):
    return True, False
  if batch_norm == "error":
    raise ValueError(_BATCH_NORM_ERROR)
  if batch_norm == "eval":
    return False, False
  if path == "fast":
    raise ValueError(_FAST_BATCH_STATISTICS_ERROR)
  return True, True
