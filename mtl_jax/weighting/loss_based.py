"""Loss weightings that need only the per-task losses (EW, UW, UW-O, RLW, DWA, FAMO), and GradNorm."""

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


@register("dwa")
def dynamic_weight_average(options: ml_collections.ConfigDict) -> Weighting:
  """DWA (Liu et al. 2019): w_t = T softmax(r_t / temperature), r_t = L̄_t(e-1) / L̄_t(e-2).

  L̄_t(e) is task t's mean training loss over epoch e (LibMTL's convention; weights sum to T,
  and are 1 during the first two epochs). The state accumulates the current epoch's losses and
  keeps the last two epochs' means; `steps_per_epoch` is filled in by the trainer.
  """
  temperature = float(options.get("dwa_temperature", 2.0))
  steps_per_epoch = int(options.get("steps_per_epoch", 0) or 0)
  if steps_per_epoch <= 0:
    raise ValueError("DWA needs options.steps_per_epoch > 0 (the trainer sets it from the dataset).")

  def init(num_tasks: int):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {}, {"sum": zeros, "count": jnp.zeros((), jnp.float32), "last": zeros, "before_last": zeros,
                "epochs_done": jnp.zeros((), jnp.int32)}

  def combine(task_losses, params, state, rng, step):
    del params, rng
    # At an epoch's first step, close the previous epoch (its mean becomes 'last').
    new_epoch = (step % steps_per_epoch == 0) & (state["count"] > 0)
    closed_mean = state["sum"] / jnp.maximum(state["count"], 1.0)
    last = jnp.where(new_epoch, closed_mean, state["last"])
    before_last = jnp.where(new_epoch, state["last"], state["before_last"])
    epochs_done = state["epochs_done"] + new_epoch.astype(jnp.int32)
    running_sum = jnp.where(new_epoch, 0.0, state["sum"])
    count = jnp.where(new_epoch, 0.0, state["count"])
    num_tasks = task_losses.shape[0]
    ratios = last / jnp.where(before_last > 0, before_last, 1.0)
    weights = jnp.where(epochs_done >= 2, num_tasks * jax.nn.softmax(ratios / temperature), jnp.ones((num_tasks,)))
    new_state = {"sum": running_sum + jax.lax.stop_gradient(task_losses), "count": count + 1.0, "last": last,
                 "before_last": before_last, "epochs_done": epochs_done}
    return jnp.sum(task_losses * weights), new_state, {"weights": weights}

  return Weighting("dwa", "loss", init, combine, f"dynamic weight average (temperature {temperature:g})")


@register("famo")
def fast_adaptive_multitask_optimization(options: ml_collections.ConfigDict) -> Weighting:
  """FAMO (Liu et al. 2023): logits ξ (state), z = softmax(ξ); total = Σ_t z_t log(L_t) / c.

  With c = Σ_t z_t / L_t (a constant), the gradient is Σ_t (z_t / (c L_t)) ∇L_t. After the
  model update, the train step recomputes the losses on the same batch and `after_update`
  moves ξ along the observed log-loss decreases δ_t = log L_t - log L_t' through the softmax
  Jacobian, with Adam (lr `famo_learning_rate`, coupled L2 `famo_weight_decay`), as the
  authors' code does. Minimum losses are taken as 0.
  """
  learning_rate = float(options.get("famo_learning_rate", 0.025))
  weight_decay = float(options.get("famo_weight_decay", 1e-3))
  epsilon = 1e-8

  def init(num_tasks: int):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {}, {"logits": zeros, "previous_losses": jnp.ones((num_tasks,), jnp.float32), "adam_m": zeros,
                "adam_v": zeros, "adam_count": jnp.zeros((), jnp.int32)}

  def combine(task_losses, params, state, rng, step):
    del params, rng, step
    shifted = task_losses + epsilon
    probabilities = jax.nn.softmax(state["logits"])
    normaliser = jax.lax.stop_gradient(jnp.sum(probabilities / shifted))
    total = jnp.sum(jnp.log(shifted) * probabilities / normaliser)
    new_state = dict(state, previous_losses=jax.lax.stop_gradient(task_losses))
    weights = probabilities / (normaliser * jax.lax.stop_gradient(shifted))
    return total, new_state, {"weights": weights}

  def after_update(losses_after, state):
    decrease = jnp.log(state["previous_losses"] + epsilon) - jnp.log(losses_after + epsilon)
    _, pullback = jax.vjp(jax.nn.softmax, state["logits"])
    (gradient,) = pullback(decrease)
    gradient = gradient + weight_decay * state["logits"]
    count = state["adam_count"] + 1
    m = 0.9 * state["adam_m"] + 0.1 * gradient
    v = 0.999 * state["adam_v"] + 0.001 * gradient**2
    corrected_m = m / (1.0 - 0.9**count)
    corrected_v = v / (1.0 - 0.999**count)
    logits = state["logits"] - learning_rate * corrected_m / (jnp.sqrt(corrected_v) + 1e-8)
    return dict(state, logits=logits, adam_m=m, adam_v=v, adam_count=count)

  return Weighting("famo", "loss", init, combine, "fast adaptive multitask optimization",
                   after_update=after_update)


@register("gradnorm")
def gradient_normalization(options: ml_collections.ConfigDict) -> Weighting:
  """GradNorm (Chen et al. 2018), at level 'task' only; kind 'gramian' since it needs ‖g_t‖.

  The weights w = T softmax(s) (LibMTL) have trainable logits s, trained by the model's optimizer
  on Σ_t |w_t ‖g_t‖ - mean_k(w_k ‖g_k‖) r_t^α| with r_t = (L_t / L_t(0)) / mean(L / L(0)) held
  constant; ‖g_t‖ = √G_tt is the Gramian's diagonal. L_t(0) is the loss at the first step (the
  paper's choice; LibMTL uses the first epoch's mean). The model descends Σ_t sg(w_t) L_t.
  """
  alpha = float(options.get("gradnorm_alpha", 1.5))
  if options.get("level", "task") != "task":
    raise ValueError(f"GradNorm works on task gradients; config.method.level must be 'task', got "
                     f"{options.get('level')!r}.")

  def init(num_rows: int):
    return ({"logits": jnp.zeros((num_rows,), jnp.float32)},
            {"initial_losses": jnp.zeros((num_rows,), jnp.float32)})

  def combine(gramian, task_losses, params, state, rng, step):
    del rng
    num_tasks = task_losses.shape[0]
    losses = jax.lax.stop_gradient(task_losses)
    initial = jnp.where(step == 0, losses, state["initial_losses"])
    weights = num_tasks * jax.nn.softmax(params["logits"])
    norms = jnp.sqrt(jnp.maximum(jnp.diag(jax.lax.stop_gradient(gramian)), 0.0))
    weighted_norms = weights * norms
    ratios = losses / jnp.where(initial > 0, initial, 1.0)
    relative = ratios / jnp.maximum(jnp.mean(ratios), 1e-12)
    target = jax.lax.stop_gradient(jnp.mean(weighted_norms) * relative**alpha)
    weighting_loss = jnp.sum(jnp.abs(weighted_norms - target))
    return (jax.lax.stop_gradient(weights), {"initial_losses": initial},
            {"weights": jax.lax.stop_gradient(weights), "weighting_loss": weighting_loss})

  return Weighting("gradnorm", "gramian", init, combine, f"gradient normalisation (alpha {alpha:g})")
