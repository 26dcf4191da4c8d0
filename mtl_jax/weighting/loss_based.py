"""Loss weightings that need only the per-task losses: EW, UW, UW-O, RLW."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mtl_jax.weighting.base import Weighting, register


def _no_parameters(num_tasks: int):
  del num_tasks
  return {}, {}


@register("ew")
def equal_weighting(options: ml_collections.ConfigDict) -> Weighting:
  """EW: the plain sum of task losses."""
  del options

  def combine(task_losses, params, state, rng, step):
    del params, rng, step
    return jnp.sum(task_losses), state, {}

  return Weighting("ew", "loss", _no_parameters, combine, "equal weights: sum of task losses")


@register("uw")
def uncertainty_weighting(options: ml_collections.ConfigDict) -> Weighting:
  """UW: learned log-variances s_t; total = sum_t L_t / (2 exp(s_t)) + s_t / 2."""
  initial = float(options.get("uw_initial_log_variance", -0.5))

  def init(num_tasks: int):
    return {"log_variance": jnp.full((num_tasks,), initial, jnp.float32)}, {}

  def combine(task_losses, params, state, rng, step):
    del rng, step
    log_variance = params["log_variance"]
    total = jnp.sum(task_losses / (2.0 * jnp.exp(log_variance)) + log_variance / 2.0)
    return total, state, {"weights": 1.0 / (2.0 * jnp.exp(log_variance))}

  return Weighting("uw", "loss", init, combine, "uncertainty weighting with learned log-variances")


@register("uw_o")
def optimal_uncertainty_weighting(options: ml_collections.ConfigDict) -> Weighting:
  """UW-O: total = sum_t L_t / (stop_gradient(L_t) + 1e-8), invariant to constant loss scales."""
  epsilon = float(options.get("uw_o_epsilon", 1e-8))

  def combine(task_losses, params, state, rng, step):
    del params, rng, step
    weights = 1.0 / (jax.lax.stop_gradient(task_losses) + epsilon)
    return jnp.sum(task_losses * weights), state, {"weights": weights}

  return Weighting("uw_o", "loss", _no_parameters, combine, "optimal uncertainty weighting (L_t / sg[L_t])")


@register("rlw")
def random_loss_weighting(options: ml_collections.ConfigDict) -> Weighting:
  """RLW: weights are the softmax of a fresh standard-normal draw at every step."""
  del options

  def combine(task_losses, params, state, rng, step):
    del params, step
    weights = jax.nn.softmax(jax.random.normal(rng, task_losses.shape))
    return jnp.sum(task_losses * weights), state, {"weights": weights}

  return Weighting("rlw", "loss", _no_parameters, combine, "random loss weighting (softmax of N(0, I))")
