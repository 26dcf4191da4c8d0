"""Train steps for the gradient-based methods (Gramian weightings, Jacobian methods), FAMO's
extra pass and the bilevel split of Auto-Lambda.

The conventions shared by all of them:

* Methods act on the shared (encoder) parameters, as in LibMTL; every head receives its own
  task's plain gradient ∂(mean_i L_it)/∂ψ_t (a 'task_gradients' method may scale it per task,
  as its reference does: DB-MTL's heads descend log L_t, ExcessMTL's α_t L_t).
* A Gramian step takes one forward and T backward passes: the per-row gradients that give the
  Gramian also give the weighted encoder gradient Σ_r w_r ∇L_r (`gramian.compute` returns both),
  so no second backward pass of Σ_r w_r L_r is spent once the weights are known.
* A step returns the same metrics as the loss step: 'loss' (for gradient methods the plain sum
  of the task losses, since their objective is implicit), 'task_losses' [T], 'grad_norm', and
  'task_weights' [T] where the method has per-task weights.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from mtl_jax import gramian as gramian_lib
from mtl_jax import parallel
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.models import apply as apply_lib
from mtl_jax.weighting import present as present_lib

BATCH_NORM_LEVEL_ERROR = (
  "config.method.level={level!r} needs per-sample gradients, which train-mode batch norm does not "
  "define (its statistics couple the samples of a batch); use config.model.norm = 'group', 'layer' "
  "or 'none', or level 'task'."
)


def head_losses(model, tasks, head_params, features_per_task, batch, batch_stats):
  """[B, T] per-sample losses with head t applied to features_per_task[t] (training mode), and
  `batch_stats` with the statistics of heads that have batch norm (DeepLab's ASPP) updated."""
  predictions, batch_stats = apply_lib.apply_heads(
    model, [task.name for task in tasks], head_params, batch_stats, features_per_task, True
  )
  return tasks_lib.losses_matrix(tasks, predictions, batch), batch_stats


def _finish(
  state,
  optimizer,
  grads,
  batch_stats,
  weighting_state,
  rng,
  task_losses,
  aux,
  norm_of=None,
  update_args=None,
):
  """Applies one optimizer update and assembles the new state and the step's metrics.

  `update_args`: extra keyword arguments of the optimizer's update (AdaTask's task_present).
  """
  new_state = state.apply_gradients(
    optimizer, grads, batch_stats, weighting_state, rng, **(update_args or {})
  )
  metrics = {
    "loss": jnp.sum(task_losses),
    "task_losses": task_losses,
    "grad_norm": optax.global_norm(norm_of if norm_of is not None else grads),
  }
  if "weights" in aux and aux["weights"].shape == task_losses.shape:
    metrics["task_weights"] = aux["weights"]
  return new_state, metrics


def _weigh_with_gradient(method: weighting_lib.GramianWeighting, level: str) -> Callable:
  """`(gramian, task_losses, params, state, rng, step, present) -> ((weights, state, aux), params
  gradient)`.

  The gradient is that of the weighting's own objective (aux['weighting_loss'], e.g. GradNorm's
  or IMTL-L's), which the optimizer descends for the weighting's parameters; zero without one.
  `present` (bool [R] or None) restricts the method to the rows present (`weighting.present`).
  """

  def weigh(gramian, task_losses, weighting_params, weighting_state, rng, step, present):
    def weighting_objective(weighting_params):
      weights, new_state, aux = present_lib.weigh(
        method, level, present, gramian, task_losses, weighting_params, weighting_state, rng, step
      )
      return aux.get("weighting_loss", jnp.zeros(())), (weights, new_state, aux)

    gradient_fn = jax.value_and_grad(weighting_objective, has_aux=True)
    (_, outputs), weighting_grads = gradient_fn(weighting_params)
    return outputs, weighting_grads

  return weigh


def make_gramian_step(
  model, tasks: Sequence[tasks_lib.Task], method, optimizer, level: str, mesh=None
) -> Callable:
  """Gramian weighting: per-row gradients -> G at `level` -> weights -> their weighted sum.

  With a `mesh` the weighting runs as one replicated program on every device
  (`parallel.replicated_program`), never partitioned by GSPMD, and the per-sample levels' G
  comes from the sharded engine (see `gramian.compute`).
  """
  level = weighting_lib.check_level(level)
  weighting_lib.check_method_level(method, level)
  weigh = _weigh_with_gradient(method, level)
  if mesh is not None:
    weigh = parallel.replicated_program(weigh, mesh)

  def train_step(state, batch):
    if level != "task" and apply_lib.has_batch_norm(state.batch_stats):
      raise ValueError(BATCH_NORM_LEVEL_ERROR.format(level=level))
    rng, step_rng = jax.random.split(state.rng)
    rows = gramian_lib.compute(
      model, state.params, state.batch_stats, batch, tasks, level, mesh=mesh
    )
    gramian, task_losses = jax.lax.stop_gradient((rows.gramian, rows.task_losses))
    present = present_lib.present_rows(tasks_lib.label_mask(batch), level)
    (weights, weighting_state, aux), weighting_grads = weigh(
      gramian,
      task_losses,
      state.weighting_params,
      state.weighting_state,
      step_rng,
      state.step,
      present,
    )
    model_grads = rows.gradient(jax.lax.stop_gradient(weights).astype(jnp.float32))
    grads = {"model": model_grads, "weighting": weighting_grads}
    return _finish(
      state, optimizer, grads, rows.batch_stats, weighting_state, rng, task_losses, aux
    )

  return train_step


def per_task_feature_gradients(model, tasks, state, batch):
  """What the Jacobian methods start from, after one encoder forward and T head backward passes.

  Returns:
    (features, the encoder's pullback, batch_stats after the forward pass, per-task feature
    gradients [T, ...] of the batch-mean losses, each head's gradient, task losses [T]).
  """
  num_tasks = len(tasks)
  params = state.params

  def encode(encoder):
    return apply_lib.encode(
      model, {"encoder": encoder, "heads": params["heads"]}, state.batch_stats, batch["image"], True
    )

  features, pullback, batch_stats = jax.vjp(encode, params["encoder"], has_aux=True)

  def task_losses(features, heads):
    losses, stats = head_losses(model, tasks, heads, [features] * num_tasks, batch, batch_stats)
    return tasks_lib.task_mean_losses(losses, batch), stats

  losses, head_pullback, batch_stats = jax.vjp(task_losses, features, params["heads"], has_aux=True)
  basis = jnp.eye(num_tasks, dtype=losses.dtype)
  feature_gradients, head_gradients = gramian_lib.stacked_vjp(head_pullback, basis)
  # Head t's parameters only appear in L_t, so summing the rows gives each head its own gradient.
  head_gradients = jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), head_gradients)
  return features, pullback, batch_stats, feature_gradients, head_gradients, losses


def _zero_weighting_gradients(state) -> Any:
  return jax.tree_util.tree_map(jnp.zeros_like, state.weighting_params)


def make_feature_jacobian_step(model, tasks, method, optimizer) -> Callable:
  """Jacobian method in feature space (GradDrop): per-task feature gradients -> one cotangent."""

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state.rng)
    features, pullback, batch_stats, feature_gradients, head_gradients, losses = (
      per_task_feature_gradients(model, tasks, state, batch)
    )
    cotangent, weighting_state, aux = method.combine(
      feature_gradients,
      features,
      state.weighting_params,
      state.weighting_state,
      step_rng,
      state.step,
    )
    (encoder_gradients,) = pullback(cotangent)
    grads = {
      "model": {"encoder": encoder_gradients, "heads": head_gradients},
      "weighting": _zero_weighting_gradients(state),
    }
    return _finish(state, optimizer, grads, batch_stats, weighting_state, rng, losses, aux)

  return train_step


def make_per_task_optimizer_step(model, tasks, method, optimizer) -> Callable:
  """Jacobian method with per-task optimizer moments (AdaTask): stacked encoder gradients
  [T, ...]; with a label mask the optimizer also gets the tasks present (`task_present`)."""
  del method

  def train_step(state, batch):
    rng, _ = jax.random.split(state.rng)
    _, pullback, batch_stats, feature_gradients, head_gradients, losses = (
      per_task_feature_gradients(model, tasks, state, batch)
    )
    (encoder_gradients,) = gramian_lib.stacked_vjp(pullback, feature_gradients)
    grads = {
      "model": {"encoder": encoder_gradients, "heads": head_gradients},
      "weighting": _zero_weighting_gradients(state),
    }
    summed = {
      "encoder": jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), encoder_gradients),
      "heads": head_gradients,
    }
    present = tasks_lib.task_present(batch, len(tasks))
    return _finish(
      state,
      optimizer,
      grads,
      batch_stats,
      state.weighting_state,
      rng,
      losses,
      {},
      norm_of=summed,
      update_args=None if present is None else {"task_present": present},
    )

  return train_step


def make_sequential_step(model, tasks, method, optimizer) -> Callable:
  """One optimizer step per task in turn (MTL-IO); `optimizer.transforms[t]` is task t's."""
  del method
  num_tasks = len(tasks)

  def task_objective(trainable, batch_stats, batch, index):
    features, new_stats = apply_lib.encode(
      model, trainable["model"], batch_stats, batch["image"], True
    )
    task_losses, new_stats = head_losses(
      model, tasks, trainable["model"]["heads"], [features] * num_tasks, batch, new_stats
    )
    task_losses = tasks_lib.task_mean_losses(task_losses, batch)
    return task_losses[index], (task_losses[index], new_stats)

  def train_step(state, batch):
    rng, _ = jax.random.split(state.rng)
    trainable, batch_stats = state.trainable, state.batch_stats
    opt_states, losses, norms = list(state.opt_state), [], []
    gradient_fn = jax.value_and_grad(task_objective, has_aux=True)
    present = tasks_lib.task_present(batch, num_tasks)
    for index in range(num_tasks):
      (_, (loss, batch_stats)), grads = gradient_fn(trainable, batch_stats, batch, index)
      transform = optimizer.transforms[index]
      updates, opt_state = transform.update(grads, opt_states[index], trainable)
      updated = optax.apply_updates(trainable, updates)
      if present is None:
        trainable, opt_states[index] = updated, opt_state
      else:
        # A task without labels takes no step: its optimizer's momentum would still move the
        # parameters, and its state would age.
        trainable, opt_states[index] = jax.tree_util.tree_map(
          lambda new, old, index=index: jnp.where(present[index], new, old),
          (updated, opt_state),
          (trainable, opt_states[index]),
        )
      losses.append(loss)
      norms.append(optax.global_norm(grads))
    new_state = state.replace(
      step=state.step + 1,
      params=trainable["model"],
      batch_stats=batch_stats,
      weighting_params=trainable["weighting"],
      opt_state=tuple(opt_states),
      rng=rng,
    )
    losses = jnp.stack(losses)
    grad_norm = jnp.sqrt(jnp.sum(jnp.stack(norms) ** 2))
    return new_state, {"loss": jnp.sum(losses), "task_losses": losses, "grad_norm": grad_norm}

  return train_step


def split_batch(batch: Mapping[str, jax.Array], parts: int) -> tuple[list[dict], list[float]]:
  """The batch cut into `parts` consecutive disjoint parts, and each part's share of the batch.

  Part sizes differ by at most one sample (the first B mod K parts get the extra one). An array
  whose leading axis is not the batch's (a per-task input such as the invariance study's loss
  scales) goes whole to every part.

  Raises:
    ValueError: fewer samples than parts.
  """
  size = int(batch["image"].shape[0])
  if size < parts:
    raise ValueError(
      f"config.training.batch_size: the method splits each batch into {parts} parts, which "
      f"needs at least {parts} samples (per device); got {size}."
    )
  sizes = [size // parts + (1 if index < size % parts else 0) for index in range(parts)]
  starts = [sum(sizes[:index]) for index in range(parts)]

  def cut(start, length):
    return {
      key: value[start : start + length] if jnp.ndim(value) and value.shape[0] == size else value
      for key, value in batch.items()
    }

  return [cut(start, length) for start, length in zip(starts, sizes)], [n / size for n in sizes]


def _task_gradient_part(model, tasks, state, part):
  """(TaskGradients of one part of the batch, its head gradients, its batch statistics)."""
  _, pullback, batch_stats, feature_gradients, head_gradients, losses = per_task_feature_gradients(
    model, tasks, state, part
  )
  (encoder_gradients,) = gramian_lib.stacked_vjp(pullback, feature_gradients)
  return weighting_lib.TaskGradients(losses, encoder_gradients), head_gradients, batch_stats


def make_task_gradient_step(model, tasks, method, optimizer) -> Callable:
  """Jacobian method on the encoder's per-task gradients (DB-MTL, MoCo, ExcessMTL), of the batch
  or of `method.batch_parts` disjoint parts of it (SDMGrad, MoDo): one forward and T backward
  passes per part, so splitting costs no more passes over the samples than one Gramian step.

  Head t descends head_scales[t] times its plain gradient of the batch-mean loss (the parts'
  gradients weighted by their shares of the batch); batch statistics are those of the last
  part's forward pass.
  """

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state.rng)
    parts, shares = split_batch(batch, method.batch_parts)
    results = [_task_gradient_part(model, tasks, state, part) for part in parts]
    direction, head_scales, weighting_state, aux = present_lib.task_gradients_combine(
      method,
      tasks_lib.task_present(batch, len(tasks)),
      tuple(result[0] for result in results),
      state.weighting_params,
      state.weighting_state,
      step_rng,
      state.step,
    )
    heads = {}
    for index, task in enumerate(tasks):
      heads[task.name] = jax.tree_util.tree_map(
        lambda *leaves, index=index: (
          head_scales[index] * sum(share * leaf for share, leaf in zip(shares, leaves))
        ),
        *(result[1][task.name] for result in results),
      )
    losses = sum(share * result[0].losses for share, result in zip(shares, results))
    grads = {
      "model": {"encoder": direction, "heads": heads},
      "weighting": _zero_weighting_gradients(state),
    }
    return _finish(state, optimizer, grads, results[-1][2], weighting_state, rng, losses, aux)

  return train_step


def with_bilevel(train_step: Callable, model, tasks, method) -> Callable:
  """Splits the batch in two halves: `method.bilevel` updates the weighting state from the task
  losses of both (as functions of the model parameters), then `train_step` runs on the first
  half only, so the second is held out from the model's update (Auto-Lambda)."""

  def losses_on(part, batch_stats):
    def task_losses(model_params):
      predictions, _ = apply_lib.predict(model, model_params, batch_stats, part["image"], True)
      return tasks_lib.task_mean_losses(tasks_lib.losses_matrix(tasks, predictions, part), part)

    return task_losses

  def step(state, batch):
    (train_part, meta_part), _ = split_batch(batch, 2)
    weighting_state = present_lib.bilevel(
      method,
      tasks_lib.task_present(train_part, len(tasks)),
      losses_on(train_part, state.batch_stats),
      losses_on(meta_part, state.batch_stats),
      state.params,
      state.weighting_state,
      state.step,
    )
    return train_step(state.replace(weighting_state=weighting_state), train_part)

  return step


def with_after_update(train_step: Callable, model, tasks, method) -> Callable:
  """Adds one forward pass after the update, on the same batch, for `method.after_update` (FAMO)."""

  def step(state, batch):
    new_state, metrics = train_step(state, batch)
    features, _ = apply_lib.encode(
      model, new_state.params, new_state.batch_stats, batch["image"], True
    )
    losses, _ = head_losses(
      model,
      tasks,
      new_state.params["heads"],
      [features] * len(tasks),
      batch,
      new_state.batch_stats,
    )
    losses = jax.lax.stop_gradient(tasks_lib.task_mean_losses(losses, batch))
    present = tasks_lib.task_present(batch, len(tasks))
    weighting_state = present_lib.after_update(method, present, losses, new_state.weighting_state)
    return new_state.replace(weighting_state=weighting_state), metrics

  return step


_JACOBIAN_STEPS = {
  "features": make_feature_jacobian_step,
  "per_task_optimizer": make_per_task_optimizer_step,
  "sequential": make_sequential_step,
  "task_gradients": make_task_gradient_step,
}


def make_method_step(model, tasks, method, optimizer, level: str, mesh=None) -> Callable:
  """The train step of a Gramian weighting or a Jacobian method; `mesh`: see make_gramian_step."""
  if isinstance(method, weighting_lib.GramianWeighting):
    return make_gramian_step(model, tasks, method, optimizer, level, mesh)
  weighting_lib.check_method_level(method, level)
  return _JACOBIAN_STEPS[method.mode](model, tasks, method, optimizer)
