"""Loss weightings: the task losses [T] -> the scalar the optimizer descends (EW, UW, UW-O, RLW,
DWA, FAMO)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mtl_jax.weighting.base import LossWeighting
from mtl_jax.weighting.base import no_parameters
from mtl_jax.weighting.base import register


@register("ew")
def equal_weighting(options: ml_collections.ConfigDict) -> LossWeighting:
  """EW: the plain sum of task losses."""
  del options

  def combine(task_losses, params, state, rng, step):
    del params, rng, step
    return jnp.sum(task_losses), state, {}

  return LossWeighting("ew", no_parameters, combine, "equal weights: sum of task losses")


@register("uw")
def uncertainty_weighting(options: ml_collections.ConfigDict) -> LossWeighting:
  """UW: learned log-variances s_t; total = sum_t L_t / (2 exp(s_t)) + s_t / 2."""
  initial = float(options.uw_initial_log_variance)

  def init(num_tasks: int):
    return {"log_variance": jnp.full((num_tasks,), initial, jnp.float32)}, {}

  def combine(task_losses, params, state, rng, step):
    del rng, step
    log_variance = params["log_variance"]
    total = jnp.sum(task_losses / (2.0 * jnp.exp(log_variance)) + log_variance / 2.0)
    return total, state, {"weights": 1.0 / (2.0 * jnp.exp(log_variance))}

  return LossWeighting("uw", init, combine, "uncertainty weighting with learned log-variances")


@register("uw_o")
def optimal_uncertainty_weighting(options: ml_collections.ConfigDict) -> LossWeighting:
  """UW-O: total = sum_t L_t / (stop_gradient(L_t) + 1e-8), invariant to constant loss scales."""
  epsilon = float(options.uw_o_epsilon)

  def combine(task_losses, params, state, rng, step):
    del params, rng, step
    weights = 1.0 / (jax.lax.stop_gradient(task_losses) + epsilon)
    return jnp.sum(task_losses * weights), state, {"weights": weights}

  return LossWeighting(
    "uw_o", no_parameters, combine, "optimal uncertainty weighting (L_t / sg[L_t])"
  )


@register("rlw")
def random_loss_weighting(options: ml_collections.ConfigDict) -> LossWeighting:
  """RLW: weights are the softmax of a fresh standard-normal draw at every step."""
  del options

  def combine(task_losses, params, state, rng, step):
    del params, step
    weights = jax.nn.softmax(jax.random.normal(rng, task_losses.shape))
    return jnp.sum(task_losses * weights), state, {"weights": weights}

  return LossWeighting("rlw", no_parameters, combine, "random loss weighting (softmax of N(0, I))")


class DWAState(NamedTuple):
  """DWA's running record of the epoch-mean task losses."""

  sum: jax.Array  # [T] this epoch's summed losses so far
  count: jax.Array  # steps summed this epoch
  last: jax.Array  # [T] the last finished epoch's mean
  before_last: jax.Array  # [T] the one before it
  epochs_done: jax.Array


@register("dwa")
def dynamic_weight_average(options: ml_collections.ConfigDict) -> LossWeighting:
  """DWA (Liu et al. 2019): w_t = T softmax(r_t / temperature), r_t = L̄_t(e-1) / L̄_t(e-2).

  L̄_t(e) is task t's mean training loss over epoch e (LibMTL's convention; weights sum to T,
  and are 1 during the first two epochs). The state accumulates the current epoch's losses and
  keeps the last two epochs' means; `steps_per_epoch` is filled in by the trainer.
  """
  temperature = float(options.dwa_temperature)
  steps_per_epoch = int(options.get("steps_per_epoch", 0) or 0)
  if steps_per_epoch <= 0:
    raise ValueError(
      "DWA needs options.steps_per_epoch > 0 (the trainer sets it from the dataset)."
    )

  def init(num_tasks: int):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    return {}, DWAState(zeros, count, zeros, zeros, jnp.zeros((), jnp.int32))

  def combine(task_losses, params, state: DWAState, rng, step):
    del params, rng
    # At an epoch's first step, close the previous epoch (its mean becomes 'last').
    new_epoch = (step % steps_per_epoch == 0) & (state.count > 0)
    closed_mean = state.sum / jnp.maximum(state.count, 1.0)
    last = jnp.where(new_epoch, closed_mean, state.last)
    before_last = jnp.where(new_epoch, state.last, state.before_last)
    epochs_done = state.epochs_done + new_epoch.astype(jnp.int32)
    running_sum = jnp.where(new_epoch, 0.0, state.sum)
    count = jnp.where(new_epoch, 0.0, state.count)
    num_tasks = task_losses.shape[0]
    ratios = last / jnp.where(before_last > 0, before_last, 1.0)
    softmax_weights = num_tasks * jax.nn.softmax(ratios / temperature)
    weights = jnp.where(epochs_done >= 2, softmax_weights, jnp.ones((num_tasks,)))
    new_state = DWAState(
      running_sum + jax.lax.stop_gradient(task_losses), count + 1.0, last, before_last, epochs_done
    )
    return jnp.sum(task_losses * weights), new_state, {"weights": weights}

  description = f"dynamic weight average (temperature {temperature:g})"
  return LossWeighting("dwa", init, combine, description)


class FAMOState(NamedTuple):
  """FAMO's task logits, the losses they were last applied to, and their Adam moments."""

  logits: jax.Array
  previous_losses: jax.Array
  adam_m: jax.Array
  adam_v: jax.Array
  adam_count: jax.Array


@register("famo")
def fast_adaptive_multitask_optimization(options: ml_collections.ConfigDict) -> LossWeighting:
  """FAMO (Liu et al. 2023): logits ξ (state), z = softmax(ξ); total = Σ_t z_t log(L_t) / c.

  With c = Σ_t z_t / L_t (a constant), the gradient is Σ_t (z_t / (c L_t)) ∇L_t. After the
  model update, the train step recomputes the losses on the same batch and `after_update`
  moves ξ along the observed log-loss decreases δ_t = log L_t - log L_t' through the softmax
  Jacobian, with Adam (lr `famo_learning_rate`, coupled L2 `famo_weight_decay`), as the
  authors' code does. Minimum losses are taken as 0.
  """
  learning_rate = float(options.famo_learning_rate)
  weight_decay = float(options.famo_weight_decay)
  epsilon = 1e-8

  def init(num_tasks: int):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    ones = jnp.ones((num_tasks,), jnp.float32)
    return {}, FAMOState(zeros, ones, zeros, zeros, jnp.zeros((), jnp.int32))

  def combine(task_losses, params, state: FAMOState, rng, step):
    del params, rng, step
    shifted = task_losses + epsilon
    probabilities = jax.nn.softmax(state.logits)
    normaliser = jax.lax.stop_gradient(jnp.sum(probabilities / shifted))
    total = jnp.sum(jnp.log(shifted) * probabilities / normaliser)
    new_state = state._replace(previous_losses=jax.lax.stop_gradient(task_losses))
    weights = probabilities / (normaliser * jax.lax.stop_gradient(shifted))
    return total, new_state, {"weights": weights}

  def after_update(losses_after, state: FAMOState) -> FAMOState:
    decrease = jnp.log(state.previous_losses + epsilon) - jnp.log(losses_after + epsilon)
    _, pullback = jax.vjp(jax.nn.softmax, state.logits)
    (gradient,) = pullback(decrease)
    gradient = gradient + weight_decay * state.logits
    count = state.adam_count + 1
    m = 0.9 * state.adam_m + 0.1 * gradient
    v = 0.999 * state.adam_v + 0.001 * gradient**2
    corrected_m = m / (1.0 - 0.9**count)
    corrected_v = v / (1.0 - 0.999**count)
    logits = state.logits - learning_rate * corrected_m / (jnp.sqrt(corrected_v) + 1e-8)
    return state._replace(logits=logits, adam_m=m, adam_v=v, adam_count=count)

  return LossWeighting(
    "famo", init, combine, "fast adaptive multitask optimization", after_update=after_update
  )
