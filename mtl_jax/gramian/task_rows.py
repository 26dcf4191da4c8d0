"""Task rows: every task's gradient of its batch-mean loss, from one forward and T backward passes.

With a label mask in the batch a task's batch loss is the mean over its labelled examples
(`tasks.task_mean_losses`), so an absent task's row is exactly zero.

Exact under every normalisation, training-mode batch norm included: batch-mean losses are what
training minimises. The encoder pullback is applied to the T feature cotangents one at a time
(`reference.stacked_vjp`: XLA:CPU miscompiled a vmapped VJP, docs/xla_cpu_faults.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax import tasks as tasks_lib
from mtl_jax.gramian import modes
from mtl_jax.gramian.reference import stack_trees
from mtl_jax.gramian.reference import stacked_vjp
from mtl_jax.models import apply as apply_lib

Batch = dict[str, jax.Array]


class TaskGradients(NamedTuple):
  """Per-task gradients of the batch-mean task losses (see `task_gradients`).

  Attributes:
    losses: [T] batch-mean task losses L_t.
    encoder: a pytree like `params['encoder']` whose leaves have a leading [T] axis: row t is
      the gradient of L_t with respect to the encoder.
    heads: {task: gradient of L_t with respect to that task's head} (no other loss reaches it).
    batch_stats: batch-norm statistics updated by the training-mode forward ({} without).
  """

  losses: jax.Array
  encoder: Any
  heads: dict
  batch_stats: Any


def task_gradients(
  model: nn.Module,
  params: Any,
  batch_stats: Any,
  batch: Batch,
  tasks: Sequence[tasks_lib.Task],
) -> TaskGradients:
  """Every task's gradient of its batch-mean loss, from one forward and T backward passes.

  The model runs in training mode (batch-mean losses are well defined under training-mode batch
  norm: they are what training minimises). After one encoder forward, each head's VJP gives
  that head's gradient and the task's feature cotangent, and the encoder pullback is applied
  to the T cotangents one at a time (`stacked_vjp`, see docs/xla_cpu_faults.md).
  This is everything a task-level gradient method needs: the Gramian is rows rowsᵀ and any
  combination Σ_t w_t rows_t is the weighted encoder gradient, with no second backward pass.

  Args:
    model, params, batch_stats, batch, tasks: as in `compute_gramian`.

  Returns:
    A `TaskGradients`.
  """

  def encode(encoder_params):
    encoder_params = {**params, "encoder": encoder_params}
    return apply_lib.encode(model, encoder_params, batch_stats, batch["image"], True)

  features, pullback, new_stats = jax.vjp(encode, params["encoder"], has_aux=True)
  losses, heads, feature_gradients, head_stats = [], {}, [], {}
  for index, task in enumerate(tasks):

    def task_loss(head_params, features, task=task, index=index):
      prediction, stats = apply_lib.apply_head(
        model, task.name, head_params, batch_stats, features, True
      )
      return tasks_lib.task_mean_loss(task.loss(prediction, batch), batch, index), stats

    loss, head_vjp, head_stats[task.name] = jax.vjp(
      task_loss, params["heads"][task.name], features, has_aux=True
    )
    heads[task.name], feature_gradient = head_vjp(jnp.ones_like(loss))
    losses.append(loss)
    feature_gradients.append(feature_gradient)
  (encoder_rows,) = stacked_vjp(pullback, stack_trees(feature_gradients))
  new_stats = apply_lib.with_head_statistics(new_stats, head_stats)
  return TaskGradients(jnp.stack(losses), encoder_rows, heads, new_stats)


def gramian_of_task_gradients(result: TaskGradients) -> jax.Array:
  """[T, T] Gramian of the encoder rows of a `task_gradients` result."""
  jacobian = modes.flatten_rows(result.encoder, 1)
  return modes.einsum("tp,sp->ts", jacobian, jacobian)
