"""Train steps for the gradient-based methods (Gramian and Jacobian kinds) and FAMO's extra pass.

`train.make_train_step` keeps the loss-weighting step (EW pays nothing for any of this) and
hands every other method here. The conventions shared by all steps:

* Methods act on the shared (encoder) parameters, as in LibMTL; every head receives its own
  task's plain gradient. In one backward pass this is done with a gradient-scaling identity on
  the encoder features seen by each head: forward f, backward cotangent × s_it, so the encoder
  receives Σ_it s_it ∂L_it/∂f / B while head t still receives ∂(mean_i L_it)/∂ψ_t.
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
from mtl_jax import sharding as sharding_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.weighting import Weighting

Batch = Mapping[str, jax.Array]


def scale_gradient(value: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity in the forward pass; multiplies the cotangent by `scale` (broadcast) going back."""
  fixed = jax.lax.stop_gradient(value)
  return fixed + scale * (value - fixed)


def rows_gramian(model, params, batch_stats, batch, tasks, level, mesh=None):
  """The Gramian of the rows' encoder gradients at `level`, and the task batch-mean losses [T].

  Rows follow `weighting.base.LEVELS`: task rows are the batch-mean losses L_t (exact under
  every norm, train-mode batch norm included); per-sample rows are L_it / B ('sample_task') or
  sum_t L_it / B ('sample'), so every level's rows sum to the EW objective. Per-sample rows come
  from the engine's fast path, which never materialises B·T·P gradients.

  With a `mesh` (the batch split over its 'data' axis), per-sample rows come from the
  `shard_map` engine (`sharding.sharded_rows_gramian`: each device its block rows, only the
  level's Gramian gathered) and both results are replicated.

  Raises:
    ValueError: for per-sample levels with train-mode batch norm, which couples the samples.
  """
  level = weighting_lib.check_level(level)
  if level == "task":
    # T per-task gradients of batch means: under GSPMD these are ordinary data-parallel gradients.
    return gramian_lib.task_level_gramian(model, params, batch_stats, batch, tasks)
  if batch_stats:
    raise ValueError(
        f"config.method.level={level!r} needs per-sample gradients, which train-mode batch norm does not "
        "define (its statistics couple the samples of a batch); use config.model.norm = 'group', 'layer' or "
        "'none', or level 'task'.")
  if mesh is not None:
    batch_size = batch["image"].shape[0]
    rows, task_losses = sharding_lib.sharded_rows_gramian(model, params, batch_stats, batch, tasks, mesh, level)
    return rows / (batch_size * batch_size), task_losses
  captured = gramian_lib.capture(model, params, batch_stats, batch, tasks, train=True)
  full = gramian_lib.fast_gramian_from_capture(captured)
  batch_size = full.shape[0]
  # The engine's rows are L_t(x_i); the step's rows are L_it / B (and their sum over t).
  rows = gramian_lib.rows_gramian(full, level) / (batch_size * batch_size)
  return rows, jnp.mean(captured.losses, axis=0)


def _encode(model, params, batch_stats, images):
  """Train-mode features and updated batch stats."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    features, updates = model.apply(variables, images, train=True, method=model.encode, mutable=["batch_stats"])
    return features, updates["batch_stats"]
  return model.apply(variables, images, train=True, method=model.encode), batch_stats


def _head_losses(model, tasks, head_params, features_per_task, batch) -> jax.Array:
  """[B, T] per-sample losses, head t applied to features_per_task[t]."""
  predictions = {task.name: model.heads[task.name].apply({"params": head_params[task.name]}, features_per_task[index],
                                                         True)
                 for index, task in enumerate(tasks)}
  return tasks_lib.losses_matrix(tasks, predictions, batch)


def _feature_scales(weights: jax.Array, level: str, batch_size: int, num_tasks: int) -> jax.Array:
  """Row weights [R] -> per-(sample, task) scales [B or 1, T or 1] (see weighting.base.LEVELS)."""
  if level == "task":
    return weights.reshape(1, num_tasks)
  if level == "sample":
    return weights.reshape(batch_size, 1)
  return weights.reshape(batch_size, num_tasks)


def _broadcast_to_features(scale: jax.Array, features: jax.Array) -> jax.Array:
  """[B or 1] -> broadcastable against features [B, ...]."""
  return scale.reshape(scale.shape + (1,) * (features.ndim - 1))


def _finish(state, optimizer, grads, batch_stats, weighting_state, rng, task_losses, aux, extra=None):
  """Applies one optimizer update and assembles the new state and metrics."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  new_state = state.replace(step=state.step + 1, params=trainable["model"], batch_stats=batch_stats,
                            weighting_params=trainable["weighting"], weighting_state=weighting_state,
                            opt_state=opt_state, rng=rng)
  metrics = {"loss": jnp.sum(task_losses), "task_losses": task_losses,
             "grad_norm": optax.global_norm(extra if extra is not None else grads)}
  if "weights" in aux and aux["weights"].shape == task_losses.shape:
    metrics["task_weights"] = aux["weights"]
  return new_state, metrics


def make_gramian_step(model, tasks: Sequence[tasks_lib.Task], weighting: Weighting,
                      optimizer: optax.GradientTransformation, level: str, mesh=None) -> Callable:
  """Gramian kind: G at `level` -> weights -> one backward of Σ_r sg(w_r) L_r on the encoder.

  With a `mesh` the step is for `sharding.shard_train_step`: the Gramian comes from
  `rows_gramian(..., mesh)` and the weighting runs as one replicated program on every device
  (`sharding.replicated_program`), never partitioned by GSPMD.
  """
  num_tasks = len(tasks)

  def weigh(gramian, task_losses, weighting_params, weighting_state, rng, step):
    """(weights, new weighting state, aux) and the gradient of the weighting's own loss."""

    def weighting_objective(weighting_params):
      weights, new_state, aux = weighting.combine(gramian, task_losses, weighting_params, weighting_state, rng, step)
      return aux.get("weighting_loss", jnp.zeros(())), (weights, new_state, aux)

    (_, outputs), weighting_grads = jax.value_and_grad(weighting_objective, has_aux=True)(weighting_params)
    return outputs, weighting_grads

  if mesh is not None:
    weigh = sharding_lib.replicated_program(weigh, mesh)

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state.rng)
    gramian, task_losses = rows_gramian(model, state.params, state.batch_stats, batch, tasks, level, mesh)
    gramian, task_losses = jax.lax.stop_gradient((gramian, task_losses))
    (weights, weighting_state, aux), weighting_grads = weigh(gramian, task_losses, state.weighting_params,
                                                             state.weighting_state, step_rng, state.step)
    scales = _feature_scales(jax.lax.stop_gradient(weights), level, batch["image"].shape[0], num_tasks)

    def model_objective(params):
      features, batch_stats = _encode(model, params, state.batch_stats, batch["image"])
      per_task = [scale_gradient(features, _broadcast_to_features(scales[:, index], features))
                  for index in range(num_tasks)]
      losses = jnp.mean(_head_losses(model, tasks, params["heads"], per_task, batch), axis=0)
      return jnp.sum(losses), (losses, batch_stats)

    (_, (losses, batch_stats)), model_grads = jax.value_and_grad(model_objective, has_aux=True)(state.params)
    grads = {"model": model_grads, "weighting": weighting_grads}
    return _finish(state, optimizer, grads, batch_stats, weighting_state, rng, losses, aux)

  return train_step


def _per_task_feature_gradients(model, tasks, state, batch):
  """Features, encoder pullback, per-task feature gradients [T, ...], summed head gradients, losses."""
  num_tasks = len(tasks)
  params = state.params

  def encode(encoder):
    return _encode(model, {"encoder": encoder, "heads": params["heads"]}, state.batch_stats, batch["image"])

  features, pullback, batch_stats = jax.vjp(encode, params["encoder"], has_aux=True)

  def head_losses(features, heads):
    return jnp.mean(_head_losses(model, tasks, heads, [features] * num_tasks, batch), axis=0)

  losses, head_pullback = jax.vjp(head_losses, features, params["heads"])
  feature_gradients, head_gradients = gramian_lib.stacked_vjp(head_pullback, jnp.eye(num_tasks, dtype=losses.dtype))
  # Head t's parameters only appear in L_t, so summing the rows gives each head its own gradient.
  head_gradients = jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), head_gradients)
  return features, pullback, batch_stats, feature_gradients, head_gradients, losses


def make_feature_jacobian_step(model, tasks, weighting: Weighting, optimizer) -> Callable:
  """Jacobian kind in feature space (GradDrop): per-task feature gradients -> one cotangent."""

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state.rng)
    features, pullback, batch_stats, feature_gradients, head_gradients, losses = _per_task_feature_gradients(
        model, tasks, state, batch)
    cotangent, weighting_state, aux = weighting.combine(feature_gradients, features, state.weighting_params,
                                                        state.weighting_state, step_rng, state.step)
    (encoder_gradients,) = pullback(cotangent)
    grads = {"model": {"encoder": encoder_gradients, "heads": head_gradients},
             "weighting": jax.tree_util.tree_map(jnp.zeros_like, state.weighting_params)}
    return _finish(state, optimizer, grads, batch_stats, weighting_state, rng, losses, aux)

  return train_step


def make_per_task_optimizer_step(model, tasks, weighting: Weighting, optimizer) -> Callable:
  """Jacobian kind with per-task optimizer moments (AdaTask): stacked encoder gradients [T, ...]."""

  def train_step(state, batch):
    rng, _ = jax.random.split(state.rng)
    _, pullback, batch_stats, feature_gradients, head_gradients, losses = _per_task_feature_gradients(
        model, tasks, state, batch)
    (encoder_gradients,) = gramian_lib.stacked_vjp(pullback, feature_gradients)
    grads = {"model": {"encoder": encoder_gradients, "heads": head_gradients},
             "weighting": jax.tree_util.tree_map(jnp.zeros_like, state.weighting_params)}
    summed = {"encoder": jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), encoder_gradients),
              "heads": head_gradients}
    return _finish(state, optimizer, grads, batch_stats, state.weighting_state, rng, losses, {}, extra=summed)

  return train_step


def make_sequential_step(model, tasks, weighting: Weighting, optimizer) -> Callable:
  """One optimizer step per task in turn (MTL-IO); `optimizer.transforms[t]` is task t's."""
  del weighting
  num_tasks = len(tasks)

  def train_step(state, batch):
    rng, _ = jax.random.split(state.rng)
    trainable, batch_stats = state.trainable, state.batch_stats
    opt_states, losses, norms = list(state.opt_state), [], []
    for index in range(num_tasks):
      def objective(trainable, batch_stats=batch_stats, index=index):
        features, new_stats = _encode(model, trainable["model"], batch_stats, batch["image"])
        task_losses = jnp.mean(_head_losses(model, tasks, trainable["model"]["heads"], [features] * num_tasks, batch),
                               axis=0)
        return task_losses[index], (task_losses[index], new_stats)

      (_, (loss, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
      updates, opt_states[index] = optimizer.transforms[index].update(grads, opt_states[index], trainable)
      trainable = optax.apply_updates(trainable, updates)
      losses.append(loss)
      norms.append(optax.global_norm(grads))
    new_state = state.replace(step=state.step + 1, params=trainable["model"], batch_stats=batch_stats,
                              weighting_params=trainable["weighting"], opt_state=tuple(opt_states), rng=rng)
    losses = jnp.stack(losses)
    return new_state, {"loss": jnp.sum(losses), "task_losses": losses,
                       "grad_norm": jnp.sqrt(jnp.sum(jnp.stack(norms) ** 2))}

  return train_step


def with_after_update(train_step: Callable, model, tasks, weighting: Weighting) -> Callable:
  """Adds one forward pass after the update, on the same batch, for `weighting.after_update` (FAMO)."""

  def step(state, batch):
    new_state, metrics = train_step(state, batch)
    features, _ = _encode(model, new_state.params, new_state.batch_stats, batch["image"])
    losses = jnp.mean(_head_losses(model, tasks, new_state.params["heads"], [features] * len(tasks), batch), axis=0)
    weighting_state = weighting.after_update(jax.lax.stop_gradient(losses), new_state.weighting_state)
    return new_state.replace(weighting_state=weighting_state), metrics

  return step


def make_method_step(model, tasks, weighting: Weighting, optimizer, level: str, mesh=None) -> Callable:
  """The train step of a non-loss weighting (dispatch on kind and jacobian_mode); `mesh`: see make_gramian_step."""
  if weighting.kind == "gramian":
    return make_gramian_step(model, tasks, weighting, optimizer, level, mesh)
  if weighting.kind == "jacobian":
    if level != "task":
      raise ValueError(f"Method {weighting.name!r} works on task gradients; config.method.level must be 'task', "
                       f"got {level!r}.")
    builders = {"features": make_feature_jacobian_step, "per_task_optimizer": make_per_task_optimizer_step,
                "sequential": make_sequential_step}
    if weighting.jacobian_mode not in builders:
      raise ValueError(f"Method {weighting.name!r} has jacobian_mode {weighting.jacobian_mode!r}; valid modes: "
                       f"{', '.join(builders)}.")
    return builders[weighting.jacobian_mode](model, tasks, weighting, optimizer)
  raise ValueError(f"Method {weighting.name!r} has kind {weighting.kind!r}, which has no method step.")


