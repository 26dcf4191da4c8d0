"""The reference path: materialised per-row gradients by `jax.vmap(jax.jacrev(...))`, and VJP
helpers.

Exact and simple, with memory B·T·P: the ground truth the fast path is tested against, and the
path for what the fast one cannot do (training-mode batch statistics, layers it cannot see).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.gramian import modes
from mtl_jax.models import apply as apply_lib

Batch = dict[str, jax.Array]


def stack_trees(trees: Sequence[Any]) -> Any:
  """Pytrees of one structure stacked leaf by leaf along a new leading axis (arrays: jnp.stack).

  Features are one array under hard sharing and a pytree under the other architectures
  (`models.architectures`); per-task feature cotangents are stacked with this either way.
  """
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def stacked_vjp(pullback: Callable, cotangents: Any, unroll_limit: int = 16) -> Any:
  """`pullback` applied to each cotangent along the leading axis, results stacked.

  One VJP per cotangent, deliberately not `vmap`/`jacrev`: XLA:CPU miscompiled a VJP vmapped
  over cotangents with a shared primal (wrong gradients through its CSE pass, and a vmapped
  layer norm backward through its YNNPACK reduce fusions). See docs/xla_cpu_faults.md;
  tests/test_gramian.py and tests/test_xla_cpu_faults.py pin this against eager gradients.

  Up to `unroll_limit` rows are unrolled, which ran 4-5x faster than `lax.map` (a loop XLA
  optimises less); longer stacks use `lax.map` to bound compile time.
  """
  count = jax.tree_util.tree_leaves(cotangents)[0].shape[0]
  if count > unroll_limit:
    return jax.lax.map(pullback, cotangents)
  results = [
    pullback(jax.tree_util.tree_map(lambda leaf, index=index: leaf[index], cotangents))
    for index in range(count)
  ]
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *results)


def jacobian_rows(function: Callable, primal: Any) -> Any:
  """Jacobian of a function with a small output, row by row through `stacked_vjp`.

  Returns the pytree of `primal`'s structure with the output's shape as leading axes.
  """
  outputs, pullback = jax.vjp(function, primal)
  size = int(np.prod(outputs.shape))
  basis = jnp.eye(size, dtype=outputs.dtype).reshape((size, *outputs.shape))
  (rows,) = stacked_vjp(pullback, basis)
  return jax.tree_util.tree_map(lambda leaf: leaf.reshape((*outputs.shape, *leaf.shape[1:])), rows)


def per_sample_losses(
  model: nn.Module,
  params: Any,
  batch_stats: Any,
  batch: Batch,
  tasks: Sequence[tasks_lib.Task],
  train: bool = True,
) -> jax.Array:
  """Every task's per-sample losses.

  Args:
    model: a `MultiTaskModel`.
    params: its parameters {'encoder': ..., 'heads': ...}.
    batch_stats: its batch-norm statistics ({} without batch norm).
    batch: the batch dict; `batch['image']` is [B, H, W, 3].
    tasks: the tasks, in column order.
    train: training mode (batch norm uses the batch's statistics) or evaluation mode.

  Returns:
    float32 [B, T].
  """
  predictions, _ = apply_lib.predict(model, params, batch_stats, batch["image"], train)
  return tasks_lib.losses_matrix(tasks, predictions, batch)


def reference_jacobian(model, params, batch_stats, batch, tasks, train, coupled, rows=None):
  """Flattened encoder gradients of rows (i, t): [B, T, P], or [n_s, n_t, P] for `rows`.

  `rows` = (sample_indices, task_indices) restricts the computation to those rows.
  """
  sample_indices, task_indices = rows if rows is not None else (None, None)

  def losses_of(encoder_params, sub_batch):
    full = {**params, "encoder": encoder_params}
    return per_sample_losses(model, full, batch_stats, sub_batch, tasks, train)

  if coupled:
    # Every row depends on the whole batch: the Jacobian of the [B, T] matrix, row by row.
    def selected(encoder_params):
      losses = losses_of(encoder_params, batch)
      if sample_indices is not None:
        losses = losses[np.asarray(sample_indices)][:, np.asarray(task_indices)]
      return losses

    jacobian = jacobian_rows(selected, params["encoder"])
    return modes.flatten_rows(jacobian, 2)

  if sample_indices is not None:
    batch = jax.tree_util.tree_map(lambda leaf: leaf[np.asarray(sample_indices)], batch)

  def sample_losses(encoder_params, sample):
    losses = losses_of(encoder_params, jax.tree_util.tree_map(lambda leaf: leaf[None], sample))[0]
    return losses if task_indices is None else losses[np.asarray(task_indices)]

  jacobian = jax.vmap(jax.jacrev(sample_losses), in_axes=(None, 0))(params["encoder"], batch)
  return modes.flatten_rows(jacobian, 2)


def per_sample_gradients(
  model: nn.Module,
  params: Any,
  batch_stats: Any,
  batch: Batch,
  tasks: Sequence[tasks_lib.Task],
  sample_indices: Sequence[int],
  task_indices: Sequence[int],
  batch_norm: str = "error",
) -> jax.Array:
  """Materialised, flattened encoder gradients of chosen rows, for coordinate statistics.

  Args:
    model, params, batch_stats, batch, tasks: as in `compute_gramian`.
    sample_indices: which samples (static ints).
    task_indices: which tasks, as column indices into `tasks` (static ints).
    batch_norm: see the module docstring; 'batch_statistics' keeps the whole batch in the
      computation (the rows of the training-mode Jacobian).

  Returns:
    float32 [n_s, n_t, P]; the parameter axis follows `jax.tree_util.tree_leaves(params['encoder'])`
    order, each leaf flattened in row-major order.
  """
  train, coupled = modes.resolve_mode(batch_stats, "reference", batch_norm)
  rows = (tuple(int(i) for i in sample_indices), tuple(int(t) for t in task_indices))
  return reference_jacobian(model, params, batch_stats, batch, tasks, train, coupled, rows)
