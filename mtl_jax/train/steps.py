"""The pure train step `(state, batch) -> (new state, metrics)` of every kind of method, and the
eval step.

`batch -> model -> losses [B, T] -> weighting -> direction -> optax update`. Loss weightings
descend their scalar of the task losses with one ordinary backward pass (EW pays for nothing
else); Gramian weightings and Jacobian methods get their steps from `gradient_steps`. Every step
returns the metrics the loop checks and logs: 'loss', 'task_losses' [T], 'grad_norm' and, where
the method has per-task weights, 'task_weights' [T].
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.models import apply as apply_lib
from mtl_jax.train import gradient_steps
from mtl_jax.train.state import Experiment
from mtl_jax.train.state import TrainState
from mtl_jax.weighting import present as present_lib

Step = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
  model,
  tasks: Sequence[tasks_lib.Task],
  method: weighting_lib.Method,
  optimizer: optax.GradientTransformation,
  level: str = "task",
  mesh: jax.sharding.Mesh | None = None,
) -> Step:
  """Returns the pure train step `(state, batch) -> (new state, metrics)`; jit it at the call site.

  Args:
    model: the `MultiTaskModel`.
    tasks: its tasks, in column order.
    method: a loss weighting, Gramian weighting or Jacobian method (`weighting.get`).
    optimizer: the optax transformation of `state.trainable`.
    level: the rows of a Gramian method's Gramian (see `weighting.LEVELS`).
    mesh: the training mesh, for Gramian methods at per-sample levels (their Gramian then comes
      from the sharded engine); None on one device. Other steps are plain GSPMD programs.
  """
  if not isinstance(method, weighting_lib.LossWeighting):
    return gradient_steps.make_method_step(model, tasks, method, optimizer, level, mesh)
  step = _loss_weighting_step(model, tasks, method, optimizer)
  if method.after_update is not None:
    step = gradient_steps.with_after_update(step, model, tasks, method)
  if method.bilevel is not None:
    step = gradient_steps.with_bilevel(step, model, tasks, method)
  return step


def experiment_train_step(
  experiment: Experiment,
  optimizer: optax.GradientTransformation | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> Step:
  """`make_train_step` of the experiment's model, tasks, method and level, with its optimizer
  unless another is given."""
  return make_train_step(
    experiment.model,
    experiment.tasks,
    experiment.weighting,
    experiment.optimizer if optimizer is None else optimizer,
    level=experiment.level,
    mesh=mesh,
  )


def _loss_weighting_step(model, tasks, method: weighting_lib.LossWeighting, optimizer) -> Step:
  """One backward pass of the weighting's scalar of the batch-mean task losses."""

  def loss_fn(trainable, state: TrainState, batch, rng):
    predictions, batch_stats = apply_lib.predict(
      model, trainable["model"], state.batch_stats, batch["image"], train=True
    )
    task_losses = tasks_lib.task_mean_losses(
      tasks_lib.losses_matrix(tasks, predictions, batch), batch
    )
    present = tasks_lib.task_present(batch, len(tasks))
    total, weighting_state, aux = present_lib.combine(
      method, present, task_losses, trainable["weighting"], state.weighting_state, rng, state.step
    )
    return total, (task_losses, batch_stats, weighting_state, aux)

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    gradient_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, (task_losses, batch_stats, weighting_state, aux)), grads = gradient_fn(
      state.trainable, state, batch, step_rng
    )
    new_state = state.apply_gradients(optimizer, grads, batch_stats, weighting_state, rng)
    step_metrics = {
      "loss": total,
      "task_losses": task_losses,
      "grad_norm": optax.global_norm(grads),
    }
    if "weights" in aux:
      step_metrics["task_weights"] = aux["weights"]
    return new_state, step_metrics

  return train_step


def with_prepared_batch(step: Step, prepare: Callable[[Mapping[str, jax.Array]], dict]) -> Step:
  """`step` on `prepare(batch)`, in the same compiled program (the image's conversion to float and
  the augmentation on the device: `data.augment_device.prepare_batch`)."""

  def prepared_step(state: TrainState, batch):
    return step(state, prepare(batch))

  return prepared_step


def with_skipping(step: Step) -> Step:
  """`step`, except that a step with a non-finite loss or gradient leaves the state unchanged.

  The data position and the random key still advance, as if the step had run; the metrics gain
  'finite', which the loop counts (config.training.on_non_finite = 'skip').
  """

  def skipping_step(state: TrainState, batch):
    new_state, step_metrics = step(state, batch)
    finite = is_finite(step_metrics)
    kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    step_metrics = {**step_metrics, "finite": finite}
    return kept.replace(step=state.step + 1, rng=new_state.rng), step_metrics

  return skipping_step


def is_finite(step_metrics: Mapping[str, jax.Array]) -> jax.Array:
  """Whether a step's loss, gradient norm and every task loss are finite (a traced bool)."""
  return (
    jnp.isfinite(step_metrics["loss"])
    & jnp.isfinite(step_metrics["grad_norm"])
    & jnp.all(jnp.isfinite(step_metrics["task_losses"]))
  )


def make_eval_step(model, tasks: Sequence[tasks_lib.Task]):
  """Returns `(params, batch_stats, batch, mask) -> statistics`, additive across batches.

  `mask` marks the real (non-padding) examples; a batch's label mask further restricts each
  task's metrics and loss to its labelled examples ('loss_count' counts them).
  """

  def eval_step(params, batch_stats, batch, mask):
    predictions, _ = apply_lib.predict(model, params, batch_stats, batch["image"], train=False)
    losses = tasks_lib.losses_matrix(tasks, predictions, batch)
    labelled = tasks_lib.label_mask(batch)
    weights = mask.astype(jnp.float32)
    statistics = {}
    for index, task in enumerate(tasks):
      task_mask = mask if labelled is None else (mask > 0) & labelled[:, index]
      task_weights = task_mask.astype(jnp.float32)
      task_statistics = dict(task.metric_statistics(predictions[task.name], batch, task_mask))
      task_statistics["loss_sum"] = jnp.sum(jnp.where(task_mask, losses[:, index], 0.0))
      task_statistics["loss_count"] = jnp.sum(task_weights)
      statistics[task.name] = task_statistics
    statistics["_count"] = jnp.sum(weights)
    return statistics

  return eval_step
