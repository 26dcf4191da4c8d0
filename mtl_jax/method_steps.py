"""Train steps for the gradient-based methods (Gramian and Jacobian kinds) and FAMO's extra pass.

`train.make_train_step` keeps the loss-weighting step (EW pays nothing for any of this) and
hands every other method here. The conventions shared by all steps:

* Methods act on the shared (encoder) parameters, as in LibMTL; every head receives its own
  task's plain gradient ∂(mean_i L_it)/∂ψ_t.
* A Gramian step takes one forward and T backward passes: the per-row gradients that give the
  Gramian also give the weighted encoder gradient Σ_r w_r ∇L_r (a weighted sum of task rows, or
  `gramian.weighted_gradients` of the per-sample capture), so no second backward pass of
  Σ_r w_r L_r is spent once the weights are known.
* A step returns the same metrics as the loss step: 'loss' (for gradient methods the plain sum
  of the task losses, since their objective is implicit), 'task_losses' [T], 'grad_norm', and
  'task_weights' [T] where the method has per-task weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from mtl_jax import gramian as gramian_lib
from mtl_jax import sharding as sharding_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.weighting import Weighting

Batch = Mapping[str, jax.Array]


_BATCH_NORM_LEVEL_ERROR = (
    "config.method.level={level!r} needs per-sample gradients, which train-mode batch norm does not define "
    "(its statistics couple the samples of a batch); use config.model.norm = 'group', 'layer' or 'none', or "
    "level 'task'.")


class _Rows(NamedTuple):
  """What a Gramian step needs from its rows: G, the task losses, and weights -> gradients."""

  gramian: jax.Array          # [R, R]
  task_losses: jax.Array      # [T] batch means
  batch_stats: Any            # updated by the training-mode forward
  gradients: Callable         # weights [R] -> {'encoder': Σ_r w_r ∇L_r, 'heads': plain gradients}


def _rows(model, params, batch_stats, batch, tasks, level) -> _Rows:
  """The rows' Gramian and their weighted gradient, from one forward and T backward passes.

  Task rows (L_t, exact under every norm, train-mode batch norm included) come from
  `gramian.task_gradients`: G = J Jᵀ and the encoder gradient is wᵀJ. Per-sample rows come
  from the engine's fast path (`gramian.capture`, never materialising B·T·P gradients), whose
  `weighted_gradients` assembles the encoder gradient from the same capture. Heads always get
  their own task's plain gradient ∂(mean_i L_it)/∂ψ_t.
  """
  level = weighting_lib.check_level(level)
  num_tasks = len(tasks)
  if level == "task":
    result = gramian_lib.task_gradients(model, params, batch_stats, batch, tasks)
    gramian = gramian_lib.gramian_of_task_gradients(result)

    def task_combination(weights):
      encoder = jax.tree_util.tree_map(lambda leaf: jnp.tensordot(weights, leaf, axes=1), result.encoder)
      return {"encoder": encoder, "heads": result.heads}

    return _Rows(gramian, result.losses, result.batch_stats, task_combination)
  if batch_stats:
    raise ValueError(_BATCH_NORM_LEVEL_ERROR.format(level=level))
  captured = gramian_lib.capture(model, params, batch_stats, batch, tasks, train=True)
  materialised = gramian_lib.materialised_rows(captured)
  full = gramian_lib.fast_gramian_from_capture(captured, materialised)
  batch_size = full.shape[0]
  # The engine's rows are L_t(x_i); the step's rows are L_it / B (and their sum over t).
  gramian = gramian_lib.rows_gramian(full, level) / (batch_size * batch_size)

  def sample_combination(weights):
    if level == "sample":
      weights = jnp.broadcast_to(weights[:, None], (batch_size, num_tasks))
    row_weights = weights.reshape(batch_size, num_tasks) / batch_size
    encoder = gramian_lib.weighted_gradients(captured, params, row_weights, materialised)["encoder"]
    heads = {name: jax.tree_util.tree_map(lambda leaf: leaf / batch_size, gradient)
             for name, gradient in captured.head_gradients.items()}
    return {"encoder": encoder, "heads": heads}

  return _Rows(gramian, jnp.mean(captured.losses, axis=0), batch_stats, sample_combination)


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
  if mesh is not None and level != "task":
    if batch_stats:
      raise ValueError(_BATCH_NORM_LEVEL_ERROR.format(level=level))
    batch_size = batch["image"].shape[0]
    rows, task_losses = sharding_lib.sharded_rows_gramian(model, params, batch_stats, batch, tasks, mesh, level)
    return rows / (batch_size * batch_size), task_losses
  # Task rows under a mesh: T per-task gradients of batch means, ordinary data-parallel gradients under GSPMD.
  rows = _rows(model, params, batch_stats, batch, tasks, level)
  return rows.gramian, rows.task_losses


def _head_losses(model, tasks, head_params, features_per_task, batch, batch_stats):
  """[B, T] per-sample losses with head t applied to features_per_task[t] (training mode), and
  `batch_stats` with the statistics of heads that have batch norm (DeepLab's ASPP) updated."""
  predictions, head_stats = {}, {}
  for index, task in enumerate(tasks):
    predictions[task.name], head_stats[task.name] = gramian_lib.apply_head(
        model, task.name, head_params[task.name], batch_stats, features_per_task[index], True)
  return tasks_lib.losses_matrix(tasks, predictions, batch), gramian_lib.with_head_stats(batch_stats, head_stats)


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


def scale_gradient(value: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity in the forward pass; multiplies the cotangent by `scale` (broadcast) going back."""
  fixed = jax.lax.stop_gradient(value)
  return fixed + scale * (value - fixed)


def _weighted_backward(model, tasks, params, batch, level, weights):
  """Gradient of Σ_r w_r L_r on the encoder (heads: their plain gradients) by one ordinary backward.

  Per-sample levels, no batch norm. The rows' weights scale the cotangent of the encoder features
  seen by each head, so head t still receives ∂(mean_i L_it)/∂ψ_t.
  """
  batch_size, num_tasks = batch["image"].shape[0], len(tasks)
  # 'sample' has one weight per sample (shared by its tasks), 'sample_task' one per (sample, task).
  scales = jnp.broadcast_to(weights.reshape(batch_size, 1 if level == "sample" else num_tasks), (batch_size, num_tasks))

  def objective(params):
    features, _ = gramian_lib.encode_train(model, params, {}, batch["image"])
    shape = (batch_size,) + (1,) * (features.ndim - 1)
    per_task = [scale_gradient(features, scales[:, index].reshape(shape)) for index in range(num_tasks)]
    losses, _ = _head_losses(model, tasks, params["heads"], per_task, batch, {})
    return jnp.sum(jnp.mean(losses, axis=0))

  return jax.grad(objective)(params)


def make_gramian_step(model, tasks: Sequence[tasks_lib.Task], weighting: Weighting,
                      optimizer: optax.GradientTransformation, level: str, mesh=None) -> Callable:
  """Gramian kind: per-row gradients -> G at `level` -> weights -> their weighted sum (no second backward).

  With a `mesh` the step is for `sharding.shard_train_step`: the weighting runs as one replicated
  program on every device (`sharding.replicated_program`), never partitioned by GSPMD; at the
  per-sample levels G comes from `sharding.sharded_rows_gramian` (only the level's Gramian
  crosses devices) and the weighted gradient from one ordinary backward of Σ_r sg(w_r) L_r,
  which GSPMD computes as a data-parallel gradient.
  """
  level = weighting_lib.check_level(level)
  sharded_rows = mesh is not None and level != "task"

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
    if sharded_rows:
      gramian, task_losses = rows_gramian(model, state.params, state.batch_stats, batch, tasks, level, mesh)
      batch_stats = state.batch_stats
      combination = functools.partial(_weighted_backward, model, tasks, state.params, batch, level)
    else:
      rows = _rows(model, state.params, state.batch_stats, batch, tasks, level)
      gramian, task_losses, batch_stats, combination = rows.gramian, rows.task_losses, rows.batch_stats, rows.gradients
    gramian, task_losses = jax.lax.stop_gradient((gramian, task_losses))
    (weights, weighting_state, aux), weighting_grads = weigh(gramian, task_losses, state.weighting_params,
                                                             state.weighting_state, step_rng, state.step)
    model_grads = combination(jax.lax.stop_gradient(weights).astype(jnp.float32))
    grads = {"model": model_grads, "weighting": weighting_grads}
    return _finish(state, optimizer, grads, batch_stats, weighting_state, rng, task_losses, aux)

  return train_step


def _per_task_feature_gradients(model, tasks, state, batch):
  """Features, encoder pullback, per-task feature gradients [T, ...], summed head gradients, losses."""
  num_tasks = len(tasks)
  params = state.params

  def encode(encoder):
    return gramian_lib.encode_train(model, {"encoder": encoder, "heads": params["heads"]}, state.batch_stats,
                                    batch["image"])

  features, pullback, batch_stats = jax.vjp(encode, params["encoder"], has_aux=True)

  def head_losses(features, heads):
    losses, stats = _head_losses(model, tasks, heads, [features] * num_tasks, batch, batch_stats)
    return jnp.mean(losses, axis=0), stats

  losses, head_pullback, batch_stats = jax.vjp(head_losses, features, params["heads"], has_aux=True)
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
        features, new_stats = gramian_lib.encode_train(model, trainable["model"], batch_stats, batch["image"])
        task_losses, new_stats = _head_losses(model, tasks, trainable["model"]["heads"], [features] * num_tasks,
                                              batch, new_stats)
        task_losses = jnp.mean(task_losses, axis=0)
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
    features, _ = gramian_lib.encode_train(model, new_state.params, new_state.batch_stats, batch["image"])
    losses, _ = _head_losses(model, tasks, new_state.params["heads"], [features] * len(tasks), batch,
                             new_state.batch_stats)
    losses = jnp.mean(losses, axis=0)
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


