"""The one entry of the Gramian engine: `compute`, on one device or a mesh, at any level of rows.

The train step, the conflict probe, the run-time self-check, the benchmarks and the tests all
call `compute`; it picks the computation:

* level 'task': `task_rows.task_gradients` (one forward, T backward passes; exact under every
  norm), G = J Jᵀ. On a mesh the same program runs under GSPMD (T data-parallel gradients).
* per-sample levels ('sample', 'sample_task', 'full'), path 'fast': `capture` and the ghost /
  materialised blocks, never forming the B·T·P Jacobian; on a mesh the `shard_map` engine
  (`sharded`).
* per-sample levels, path 'reference': `vmap(jacrev)`, materialised (the ground truth).

Along with G it returns the task losses and `gradient(weights)`: the encoder gradient Σ_r w_r
∇_encoder(row_r) (heads: each its own task's plain gradient of the batch-mean loss), formed
from the same per-row quantities as G where it can be, so a Gramian method's step needs no
second backward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax import tasks as tasks_lib
from mtl_jax.gramian import blocks
from mtl_jax.gramian import capture as capture_lib
from mtl_jax.gramian import levels
from mtl_jax.gramian import modes
from mtl_jax.gramian import reference
from mtl_jax.gramian import sharded
from mtl_jax.gramian import task_rows

Batch = Mapping[str, jax.Array]


class Gramian(NamedTuple):
  """What `compute` returns.

  Attributes:
    gramian: [R, R] at a training level (see `levels`), or [B, T, B, T] at level 'full'
      (G[i, t, j, s] = <∇L_t(x_i), ∇L_s(x_j)> over the encoder parameters).
    task_losses: [T] batch-mean task losses.
    batch_stats: the batch statistics after the forward pass (changed only by a training-mode
      forward of a batch-norm model, at level 'task').
    gradient: weights [R] ([B, T] at level 'full') -> {'encoder': Σ_r w_r ∇_encoder(row_r),
      'heads': {task: plain gradient of its batch-mean loss}}. A Python closure: call it
      inside the traced function that called `compute`.
  """

  gramian: jax.Array
  task_losses: jax.Array
  batch_stats: Any
  gradient: Callable[[jax.Array], Any]


def compute(
  model: nn.Module,
  params: Any,
  batch_stats: Any,
  batch: Batch,
  tasks: Sequence[tasks_lib.Task],
  level: str = levels.FULL,
  *,
  path: str = "fast",
  batch_norm: str = "error",
  mesh: jax.sharding.Mesh | None = None,
) -> Gramian:
  """The Gramian of the rows' encoder gradients at `level`, their task losses and weighted gradient.

  Args:
    model: a `MultiTaskModel` whose encoder is built from `mtl_jax.models.layers` (the fast path
      sees only those layers; other encoders need path 'reference').
    params: {'encoder': ..., 'heads': {task: ...}}.
    batch_stats: batch-norm statistics ({} without batch norm).
    batch: 'image' [B, H, W, 3] plus the tasks' targets; on a mesh, split over 'data'.
    tasks: the T tasks, in row order.
    level: 'task', 'sample', 'sample_task' (training rows, `levels`) or 'full'.
    path: 'fast' (ghost, no B·T·P memory) or 'reference' (vmap(jacrev), materialised); the
      task level has one exact computation and ignores it.
    batch_norm: how per-sample levels treat batch norm: 'error', 'eval' or
      'batch_statistics' (see `modes`); the task level needs no choice.
    mesh: a mesh whose 'data' axis splits the batch, or None on one device.

  Raises:
    ValueError: an unknown level, path or mode, or a batch-norm model with a mode the path
      cannot compute.
  """
  levels.check_level(level, allow_full=True)
  if level == "task":
    return _task_level(model, params, batch_stats, batch, tasks)
  train, coupled = modes.resolve_mode(batch_stats, path, batch_norm)
  if mesh is not None and path == "fast":
    gramian, task_losses = sharded.gramian_at_level(
      model, params, batch_stats, batch, tasks, mesh, level, batch_norm
    )

    def mesh_gradient(weights):
      return sharded.weighted_backward(model, tasks, params, batch, level, weights)

    return Gramian(gramian, task_losses, batch_stats, mesh_gradient)
  if path == "fast":
    return _fast(model, params, batch_stats, batch, tasks, level, train)
  return _reference(model, params, batch_stats, batch, tasks, level, train, coupled)


def _task_level(model, params, batch_stats, batch, tasks) -> Gramian:
  result = task_rows.task_gradients(model, params, batch_stats, batch, tasks)

  def gradient(weights):
    encoder = jax.tree_util.tree_map(
      lambda leaf: jnp.tensordot(weights, leaf, axes=1), result.encoder
    )
    return {"encoder": encoder, "heads": result.heads}

  gramian = task_rows.gramian_of_task_gradients(result)
  return Gramian(gramian, result.losses, result.batch_stats, gradient)


def _row_weights(
  weights: jax.Array, level: str, batch_size: int, num_tasks: int, scales: jax.Array | None
) -> jax.Array:
  """[B, T] weights of the per-sample losses L_t(x_i) equivalent to a level's row weights;
  `scales`: the rows' coefficients under partial labels (`tasks.label_scales`), None for 1/B."""
  if level == levels.FULL:
    return weights.reshape(batch_size, num_tasks)
  if level == "sample":
    weights = jnp.broadcast_to(weights[:, None], (batch_size, num_tasks))
  if scales is not None:
    return weights.reshape(batch_size, num_tasks) * scales
  return weights.reshape(batch_size, num_tasks) / batch_size


def _fast(model, params, batch_stats, batch, tasks, level, train) -> Gramian:
  captured = capture_lib.capture(model, params, batch_stats, batch, tasks, train)
  materialised = blocks.materialised_rows(captured)
  full = blocks.fast_gramian_from_capture(captured, materialised)
  batch_size, num_tasks = captured.losses.shape
  scales = tasks_lib.label_scales(batch)

  def gradient(weights):
    row_weights = _row_weights(weights, level, batch_size, num_tasks, scales)
    encoder = blocks.weighted_gradients(captured, params, row_weights, materialised)["encoder"]
    if scales is None:
      heads = {
        name: jax.tree_util.tree_map(lambda leaf: leaf / batch_size, head_gradient)
        for name, head_gradient in captured.head_gradients.items()
      }
    else:
      heads = {
        name: captured.head_vjps[name](scales[:, index])[0]
        for index, name in enumerate(captured.head_gradients)
      }
    return {"encoder": encoder, "heads": heads}

  task_losses = tasks_lib.task_mean_losses(captured.losses, batch)
  return Gramian(levels.at_level(full, level, scales), task_losses, batch_stats, gradient)


def _reference(model, params, batch_stats, batch, tasks, level, train, coupled) -> Gramian:
  jacobian = reference.reference_jacobian(model, params, batch_stats, batch, tasks, train, coupled)
  full = modes.einsum("itp,jsp->itjs", jacobian, jacobian)
  batch_size, num_tasks = jacobian.shape[:2]

  def losses_of(all_params):
    return reference.per_sample_losses(model, all_params, batch_stats, batch, tasks, train)

  losses, losses_vjp = jax.vjp(losses_of, params)
  scales = tasks_lib.label_scales(batch)

  def gradient(weights):
    row_weights = _row_weights(weights, level, batch_size, num_tasks, scales)
    (weighted,) = losses_vjp(row_weights)
    head_scales = jnp.full_like(losses, 1.0 / batch_size) if scales is None else scales
    (plain,) = losses_vjp(head_scales.astype(losses.dtype))
    return {"encoder": weighted["encoder"], "heads": plain["heads"]}

  task_losses = tasks_lib.task_mean_losses(losses, batch)
  return Gramian(levels.at_level(full, level, scales), task_losses, batch_stats, gradient)
