"""The reference path: materialised per-row gradients by `jax.vmap(jax.jacrev(...))`, and VJP helpers.

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


def stacked_vjp(pullback: Callable, cotangents: Any, unroll_limit: int = 16) -> Any:
  """`pullback` applied to each cotangent along the leading axis, results stacked.

  One VJP per cotangent, deliberately not `vmap`/`jacrev`: on XLA CPU (jax 0.10.2) a VJP
  vmapped over cotangents with a shared primal returned wrong gradients (measured: 125%
  relative error on a task Gramian of a small CNN; 59% already for the feature gradients of its
  three dense conv heads alone; disabling XLA's CSE pass made them exact), while one VJP per
  cotangent is exact (tests/test_gramian.py pins this against eager per-task gradients).

  A second fault of the same shape: XLA:CPU hands reductions to YNNPACK ("__ynn_fusion", the
  dot-library-rewriter pass), and in a fusion of two sibling minor-axis reductions, one of them
  of a product with an operand broadcast along the leading axis, the leading axis is cut into
  tiles of about 128 KiB of input and every tile after the first gets the first tile's product
  reduction (row t gets row t mod k's). A vmapped layer norm backward is that pattern (the
  cotangent axis leads; the primal's statistics are broadcast along it), which made the fast
  Gramian of a layer-normalised SegNet wrong by 2-4 relative. The same program compiled without
  YNNPACK reduce fusions is exact (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
  individual_convolution, or the jit compiler option xla_cpu_experimental_ynn_fusion_type='');
  tests/test_xla_cpu_faults.py records the fault and pins this workaround.

  Up to `unroll_limit` rows are unrolled, which measured 4-5x faster than `lax.map` (a loop XLA
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
