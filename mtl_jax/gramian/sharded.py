"""The per-sample Gramian with the batch split over a mesh's 'data' axis (`shard_map`).

Each device captures its own rows (b = B / n of them) and computes its block rows of the
Gramian, G[its rows, :, all rows, :]. Per encoder layer it all-gathers what the other devices'
rows contribute, whichever is smaller by the static `blocks.layer_strategy` choice: the
captured layer inputs [B, ...] and output gradients [T, B, ...] (ghost form; raw inputs, k·k
times smaller than their patches), or the per-row layer gradients [T, B, K·N] (materialised
form). No [B·T, P] Jacobian is formed or sent for ghost-form layers. Then each device reduces
its block rows to the level asked for before the gather: B² numbers at 'sample', B²T² at
'sample_task' and 'full', plus a psum of the T losses. Under partial labels the rows' coefficients
c_it = m_it / n_t need the global labelled counts n_t: one more psum of T numbers.

Honestly: only the weights computed from the Gramian are "small Gramian only"; forming the
exact Gramian needs the other devices' layer activations and output gradients (or per-row
layer gradients). The task level needs no shard_map: its T gradients of batch means are
ordinary data-parallel gradients under GSPMD.

Why shard_map: GSPMD auto-sharding of `vmap(grad)` over conv kernels gave wrong per-sample
gradients on emulated CPU devices (docs/xla_cpu_faults.md), while shard_map is exact.
Samples must be independent on each device: norms 'group', 'layer', 'none', or batch norm with
batch_norm='eval' (running statistics).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec
import jax.numpy as jnp

from mtl_jax import parallel
from mtl_jax import tasks as tasks_lib
from mtl_jax.gramian import blocks
from mtl_jax.gramian import capture as capture_lib
from mtl_jax.gramian import levels
from mtl_jax.gramian import modes
from mtl_jax.models import apply as apply_lib


def _gather(value: jax.Array, axis: int) -> jax.Array:
  return jax.lax.all_gather(value, parallel.DATA_AXIS, axis=axis, tiled=True)


def _block_rows(captured: capture_lib.Capture, total_batch: int) -> jax.Array:
  """This device's block rows [b, T, B, T] of the Gramian from its local capture.

  Materialised layers (`blocks.materialised_rows`, chosen for the whole batch) send their
  per-row gradients [b, T, F]; ghost-form layers their inputs and output gradients.
  """
  rows = blocks.materialised_rows(captured, total_batch)
  total = None
  if rows.matrix is not None:
    total = modes.einsum("btf,csf->btcs", rows.matrix, _gather(rows.matrix, 0))
  materialised = {path for path, _, _ in rows.segments}
  for path, info in captured.infos.items():
    if path in materialised:
      continue
    inputs, gradients = captured.inputs[path], captured.output_gradients[path]
    block = blocks.ghost_contribution(
      info, inputs, gradients, _gather(inputs, 0), _gather(gradients, 1)
    )
    total = block if total is None else total + block
  return total


def batch_size(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> int:
  """The global batch size, checked to split evenly over the mesh's 'data' axis."""
  size = int(next(iter(batch.values())).shape[0])
  parallel.check_batch_size(size, mesh)
  return size


def gramian_at_level(
  model,
  params: Any,
  batch_stats: Any,
  batch: Mapping[str, jax.Array],
  tasks: Sequence[tasks_lib.Task],
  mesh: jax.sharding.Mesh,
  level: str,
  batch_norm: str = "error",
) -> tuple[jax.Array, jax.Array]:
  """The Gramian of a per-sample level ('full', 'sample' or 'sample_task') and the task losses.

  Args:
    model, params, batch_stats, batch, tasks, batch_norm: as in `gramian.compute` (fast
      path); params are replicated, batch is split (global arrays or host arrays).
    mesh: from `parallel.make_mesh`.
    level: see `levels`; 'full' is [B, T, B, T], split over 'data' along its first axis.

  Returns:
    (gramian, task losses [T] batch means); both replicated except the 'full' Gramian.
  """
  if level not in (levels.FULL, "sample", "sample_task"):
    raise ValueError(f"The sharded engine computes the per-sample levels, got {level!r}.")
  total_batch = batch_size(batch, mesh)
  train, _ = modes.resolve_mode(batch_stats, "fast", batch_norm)

  def per_device(params, batch_stats, batch):
    captured = capture_lib.capture(model, params, batch_stats, batch, tasks, train)
    rows = _block_rows(captured, total_batch)
    mask = tasks_lib.label_mask(batch)
    if mask is None:
      task_losses = jax.lax.psum(jnp.sum(captured.losses, axis=0), parallel.DATA_AXIS)
      task_losses, divisor = task_losses / total_batch, total_batch * total_batch
    else:
      # Partial labels: coefficients c_it = m_it / n_t with the global labelled counts n_t.
      counts = jnp.maximum(jax.lax.psum(jnp.sum(mask, axis=0), parallel.DATA_AXIS), 1)
      local_scales = mask.astype(jnp.float32) / counts
      labelled_losses = jnp.sum(jnp.where(mask, captured.losses, 0.0), axis=0)
      task_losses = jax.lax.psum(labelled_losses, parallel.DATA_AXIS) / counts
      divisor = 1.0
      if level != levels.FULL:  # 'full' stays the Gramian of the unscaled L_t(x_i)
        rows = rows * local_scales[:, :, None, None] * _gather(local_scales, 0)[None, None]
    if level == levels.FULL:
      return rows, task_losses
    local_batch, num_tasks = rows.shape[:2]
    if level == "sample":
      local = jnp.sum(rows, axis=(1, 3))
    else:
      local = rows.reshape(local_batch * num_tasks, total_batch * num_tasks)
    return _gather(local, 0) / divisor, task_losses

  data = PartitionSpec(parallel.DATA_AXIS)
  gramian_spec = data if level == levels.FULL else PartitionSpec()
  function = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(PartitionSpec(), PartitionSpec(), data),
    out_specs=(gramian_spec, PartitionSpec()),
    check_vma=False,
  )
  return function(params, batch_stats, batch)


def scale_gradient(value: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity in the forward pass; multiplies the cotangent by `scale` (broadcast) going back."""
  fixed = jax.lax.stop_gradient(value)
  return fixed + scale * (value - fixed)


def weighted_backward(model, tasks, params, batch, level: str, weights: jax.Array) -> Any:
  """Gradient of Σ_r w_r L_r by one ordinary (GSPMD data-parallel) backward pass.

  For a per-sample level's rows, without batch norm. The rows' weights scale the cotangent of
  the encoder features each head sees, so head t still receives ∂(mean_i L_it)/∂ψ_t: the
  encoder gets Σ_r w_r ∇L_r, the heads their plain gradients (as on one device).
  """
  batch_size, num_tasks = batch["image"].shape[0], len(tasks)
  # 'sample' has one weight per sample (shared by its tasks), 'sample_task' one per (sample, task)
  # of rows L_it / B, 'full' one per (sample, task) of rows L_it (hence the factor B).
  per_row = weights.reshape(batch_size, 1 if level == "sample" else num_tasks)
  if level == levels.FULL:
    per_row = per_row * batch_size
  scales = jnp.broadcast_to(per_row, (batch_size, num_tasks))
  names = [task.name for task in tasks]

  def objective(params):
    features, _ = apply_lib.encode(model, params, {}, batch["image"], True)

    def scaled(index):
      # Features are an array (hard sharing) or a pytree of [B, ...] leaves (architectures).
      return jax.tree_util.tree_map(
        lambda leaf: scale_gradient(
          leaf, scales[:, index].reshape((batch_size,) + (1,) * (leaf.ndim - 1))
        ),
        features,
      )

    per_task = [scaled(index) for index in range(num_tasks)]
    predictions, _ = apply_lib.apply_heads(model, names, params["heads"], {}, per_task, True)
    losses = tasks_lib.losses_matrix(tasks, predictions, batch)
    if level == levels.FULL:  # rows L_it whatever the labels
      return jnp.sum(jnp.mean(losses, axis=0))
    # Under partial labels the rows are c_it L_it: the masked means supply c_it.
    return jnp.sum(tasks_lib.task_mean_losses(losses, batch))

  return jax.grad(objective)(params)
