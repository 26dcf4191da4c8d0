"""Loss weightings whose weights are trained on held-out data through a virtual step (Auto-Lambda).

The train step (`train.gradient_steps.with_bilevel`) splits each batch in two halves and hands
the method the task losses of both as functions of the model parameters; the method updates its
weights from them (the `bilevel` hook of `base.LossWeighting`) before the model descends the
weighted losses of the first half. The second half plays the part of the reference's second
batch from an independently shuffled loader: the same training set, never seen by this step's
model update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mtl_jax import optim
from mtl_jax.weighting.base import LossWeighting
from mtl_jax.weighting.base import register

Losses = Callable[[Any], jax.Array]


def auto_lambda_hypergradient(
  train_losses: Losses,
  meta_losses: Losses,
  params: Any,
  weights: jax.Array,
  learning_rate: jax.Array,
  weight_decay: float,
) -> jax.Array:
  """∂/∂λ of the meta loss Σ_t L_t^meta(θ') after one virtual SGD step θ' on Σ_t λ_t L_t^train.

  θ' = θ - η (∇_θ Σ_t λ_t L_t^train(θ) + wd·θ) depends on λ only through the virtual gradient,
  so ∂θ'/∂λ_t = -η ∇L_t^train(θ) and the hypergradient is -η ⟨∇L_t^train(θ), d⟩ with
  d = ∇_θ' Σ_t L_t^meta(θ'). The inner products are one forward-mode pass (a JVP of the train
  losses along d), exact where the reference takes central differences.

  Args:
    train_losses, meta_losses: model parameters -> task losses [T] on the two halves.
    params: the model parameters θ (encoder and heads).
    weights: λ [T].
    learning_rate: η, the model's learning rate at this step.
    weight_decay: the optimizer's weight decay, part of the reference's virtual step.

  Returns:
    [T] the gradient of the meta loss with respect to λ.
  """
  weights = jax.lax.stop_gradient(weights)
  gradient = jax.grad(lambda p: jnp.sum(weights * train_losses(p)))(params)
  virtual = jax.tree_util.tree_map(
    lambda p, g: p - learning_rate * (g + weight_decay * p), params, gradient
  )
  direction = jax.grad(lambda p: jnp.sum(meta_losses(p)))(virtual)
  _, products = jax.jvp(train_losses, (params,), (direction,))
  return -learning_rate * products


class AutoLambdaState(NamedTuple):
  """Auto-Lambda's task weights λ [T] and their Adam state."""

  weights: jax.Array
  optimizer: Any


@register("auto_lambda")
def auto_lambda(options: ml_collections.ConfigDict) -> LossWeighting:
  """Auto-Lambda (Liu et al. 2022): task weights λ trained so that a step on Σ λ_t L_t lowers
  the loss of held-out data.

  Per step (all tasks are primary, the multi-task setting): the hypergradient of
  `auto_lambda_hypergradient` on the two halves of the batch, with η the model's current
  learning rate (config.optimizer's schedule; in a grouped sweep, the group's first config's) and
  the optimizer's weight decay; one Adam step on λ (learning rate
  `auto_lambda_learning_rate`, default betas); then the model descends Σ_t λ_t L_t on the first
  half with the updated λ. λ starts at `auto_lambda_initial_weight` and is unconstrained (sum
  convention with raw weights: 0.1·EW at the start, as the reference).
  """
  initial = float(options.auto_lambda_initial_weight)
  weights_optimizer = optax.adam(float(options.auto_lambda_learning_rate))
  schedule = optim.learning_rate_schedule(options.optimizer, int(options.steps_per_epoch))
  weight_decay = float(options.optimizer.weight_decay)

  def init(num_tasks: int):
    weights = jnp.full((num_tasks,), initial, jnp.float32)
    return {}, AutoLambdaState(weights, weights_optimizer.init(weights))

  def combine(task_losses, params, state: AutoLambdaState, rng, step):
    del params, rng, step
    weights = jax.lax.stop_gradient(state.weights)
    return jnp.sum(weights * task_losses), state, {"weights": weights}

  def bilevel(train_losses, meta_losses, model_params, state: AutoLambdaState, step):
    hypergradient = auto_lambda_hypergradient(
      train_losses, meta_losses, model_params, state.weights, schedule(step), weight_decay
    )
    updates, optimizer_state = weights_optimizer.update(hypergradient, state.optimizer)
    return AutoLambdaState(optax.apply_updates(state.weights, updates), optimizer_state)

  description = "task weights learned on held-out data (bilevel; batch split in two)"
  return LossWeighting("auto_lambda", init, combine, description, bilevel=bilevel)
