"""A minimal exact Gramian of the shared-parameter gradients (vmap/jacrev), for the train step only.

This is the private stand-in for the Gramian engine (mtl_jax/gramian.py): the train step calls
`rows_gramian` and nothing else, so switching to the engine is a one-import change. Rows are
defined as in `weighting.base.LEVELS` (task: L_t; sample: Σ_t L_it / B; sample_task: L_it / B),
gradients are taken with respect to params['encoder'] only, in train mode.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from mtl_jax import tasks as tasks_lib
from mtl_jax.weighting.base import check_level


def _flatten_rows(tree, num_rows: int) -> jax.Array:
  """A pytree with leading axis R -> [R, P] float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.concatenate([jnp.reshape(leaf, (num_rows, -1)).astype(jnp.float32) for leaf in leaves], axis=1)


def rows_gramian(model, params, batch_stats, batch: Mapping[str, jax.Array], tasks: Sequence[tasks_lib.Task],
                 level: str) -> tuple[jax.Array, jax.Array]:
  """The Gramian of the rows' gradients with respect to the shared parameters, and the task losses.

  Args:
    model: a MultiTaskModel.
    params: its parameters {'encoder', 'heads'}.
    batch_stats: its batch statistics ({} without batch norm).
    batch: a training batch.
    tasks: the tasks, in row order.
    level: 'task', 'sample' or 'sample_task'.

  Returns:
    (G [R, R] float32, task batch-mean losses [T]).

  Raises:
    ValueError: for per-sample levels with train-mode batch norm (a sample's gradient is not
      defined on its own when batch statistics couple the samples).
  """
  level = check_level(level)
  heads = params["heads"]

  def losses_matrix(encoder, images, sample_batch):
    variables = {"params": {"encoder": encoder, "heads": heads}}
    if batch_stats:
      variables["batch_stats"] = batch_stats
      predictions, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    else:
      predictions = model.apply(variables, images, train=True)
    return tasks_lib.losses_matrix(tasks, predictions, sample_batch)

  if level == "task":
    def task_losses(encoder):
      return jnp.mean(losses_matrix(encoder, batch["image"], batch), axis=0)

    losses = task_losses(params["encoder"])
    jacobian = _flatten_rows(jax.jacrev(task_losses)(params["encoder"]), len(tasks))
    return jacobian @ jacobian.T, losses

  if batch_stats:
    raise ValueError(
        f"config.method.level={level!r} needs per-sample gradients, which train-mode batch norm does not "
        "define (its statistics couple the samples of a batch); use config.model.norm = 'group', 'layer' or "
        "'none', or level 'task'.")
  batch_size = batch["image"].shape[0]

  def sample_losses(encoder, sample):
    single = jax.tree_util.tree_map(lambda value: value[None], sample)
    return losses_matrix(encoder, single["image"], single)[0] / batch_size

  per_sample = jax.vmap(sample_losses, in_axes=(None, 0))(params["encoder"], dict(batch))
  losses = jnp.sum(per_sample, axis=0)
  if level == "sample":
    gradients = jax.vmap(jax.grad(lambda encoder, sample: jnp.sum(sample_losses(encoder, sample))),
                         in_axes=(None, 0))(params["encoder"], dict(batch))
    jacobian = _flatten_rows(gradients, batch_size)
  else:
    gradients = jax.vmap(jax.jacrev(sample_losses), in_axes=(None, 0))(params["encoder"], dict(batch))
    # [B, T, ...] -> rows ordered (sample, task), sample-major.
    jacobian = _flatten_rows(jax.tree_util.tree_map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), gradients),
                             batch_size * len(tasks))
  return jacobian @ jacobian.T, losses
