"""Loss weightings: the task losses [T] -> the scalar the optimizer descends (EW, UW, UW-O, RLW,
DWA, FAMO, GLS, IMTL-L, STCH, GO4Align)."""

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
  """DWA's running record of each task's epoch-mean losses.

  Every field is per task [T]: a task's record only advances on the steps whose batch labels it
  (`weighting.present`), so a task absent from some batches averages its own steps only.
  """

  sum: jax.Array  # this epoch's summed losses so far
  count: jax.Array  # steps summed this epoch
  last: jax.Array  # the last finished epoch's mean
  before_last: jax.Array  # the one before it
  epochs_done: jax.Array  # epochs closed
  epoch: jax.Array  # the epoch `sum` belongs to


@register("dwa")
def dynamic_weight_average(options: ml_collections.ConfigDict) -> LossWeighting:
  """DWA (Liu et al. 2019): w_t = T softmax(r_t / temperature), r_t = L̄_t(e-1) / L̄_t(e-2).

  L̄_t(e) is task t's mean training loss over epoch e (LibMTL's convention; weights sum to T,
  and are 1 until every task has closed two epochs). The state accumulates the current epoch's
  losses and keeps the last two epochs' means; a task closes its epoch at its first step in a
  later epoch. `steps_per_epoch` is filled in by the trainer.
  """
  temperature = float(options.dwa_temperature)
  steps_per_epoch = int(options.get("steps_per_epoch", 0) or 0)
  if steps_per_epoch <= 0:
    raise ValueError(
      "DWA needs options.steps_per_epoch > 0 (the trainer sets it from the dataset)."
    )

  def init(num_tasks: int):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    integers = jnp.zeros((num_tasks,), jnp.int32)
    return {}, DWAState(zeros, zeros, zeros, zeros, integers, integers)

  def combine(task_losses, params, state: DWAState, rng, step):
    del params, rng
    # At a task's first step of a later epoch, close its epoch (the mean becomes 'last').
    epoch = (jnp.asarray(step) // steps_per_epoch).astype(jnp.int32)
    new_epoch = (epoch > state.epoch) & (state.count > 0)
    closed_mean = state.sum / jnp.maximum(state.count, 1.0)
    last = jnp.where(new_epoch, closed_mean, state.last)
    before_last = jnp.where(new_epoch, state.last, state.before_last)
    epochs_done = state.epochs_done + new_epoch.astype(jnp.int32)
    running_sum = jnp.where(new_epoch, 0.0, state.sum)
    count = jnp.where(new_epoch, 0.0, state.count)
    num_tasks = task_losses.shape[0]
    ratios = last / jnp.where(before_last > 0, before_last, 1.0)
    softmax_weights = num_tasks * jax.nn.softmax(ratios / temperature)
    weights = jnp.where(jnp.all(epochs_done >= 2), softmax_weights, jnp.ones((num_tasks,)))
    new_state = DWAState(
      running_sum + jax.lax.stop_gradient(task_losses),
      count + 1.0,
      last,
      before_last,
      epochs_done,
      jnp.broadcast_to(epoch, state.epoch.shape),
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
    # The state keeps its own dtype (float32) when the losses are float64 (jax.enable_x64).
    previous = jax.lax.stop_gradient(task_losses).astype(state.previous_losses.dtype)
    new_state = state._replace(previous_losses=previous)
    weights = probabilities / (normaliser * jax.lax.stop_gradient(shifted))
    return total, new_state, {"weights": weights}

  def after_update(losses_after, state: FAMOState) -> FAMOState:
    decrease = jnp.log(state.previous_losses + epsilon) - jnp.log(losses_after + epsilon)
    decrease = decrease.astype(state.logits.dtype)
    _, pullback = jax.vjp(jax.nn.softmax, state.logits)
    (gradient,) = pullback(decrease)
    gradient = gradient + weight_decay * state.logits
    count = state.adam_count + 1
    m = 0.9 * state.adam_m + 0.1 * gradient
    v = 0.999 * state.adam_v + 0.001 * gradient**2
    steps = count.astype(state.logits.dtype)
    corrected_m = m / (1.0 - 0.9**steps)
    corrected_v = v / (1.0 - 0.999**steps)
    logits = state.logits - learning_rate * corrected_m / (jnp.sqrt(corrected_v) + 1e-8)
    return state._replace(logits=logits, adam_m=m, adam_v=v, adam_count=count)

  return LossWeighting(
    "famo", init, combine, "fast adaptive multitask optimization", after_update=after_update
  )


@register("gls")
def geometric_loss_strategy(options: ml_collections.ConfigDict) -> LossWeighting:
  """GLS (Chennupati et al. 2019): the geometric mean of the task losses, (Π_t L_t)^(1/T).

  Computed as exp(mean_t log L_t) (a product of T small losses underflows); its gradient is
  Σ_t w_t ∇L_t with w_t = GLS / (T L_t), logged as the weights. The direction does not change
  when a task's loss is multiplied by a constant. Losses must be positive.
  """
  del options

  def combine(task_losses, params, state, rng, step):
    del params, rng, step
    total = jnp.exp(jnp.mean(jnp.log(task_losses)))
    weights = jax.lax.stop_gradient(total / (task_losses.shape[0] * task_losses))
    return total, state, {"weights": weights}

  return LossWeighting("gls", no_parameters, combine, "geometric mean of the task losses")


@register("imtl_l")
def impartial_loss_balance(options: ml_collections.ConfigDict) -> LossWeighting:
  """IMTL-L (Liu et al. 2021): learned log-scales s_t (init 0); total = Σ_t e^{s_t} L_t - s_t.

  The model descends Σ_t e^{s_t} ∇L_t; the optimizer trains s on the same total, whose fixed
  point e^{s_t} = 1/L_t makes every scaled loss 1 (sum convention: EW at the start). `imtl`
  combines this with IMTL-G; `imtl_g` is the gradient part alone.
  """
  del options

  def init(num_tasks: int):
    return {"log_scale": jnp.zeros((num_tasks,), jnp.float32)}, {}

  def combine(task_losses, params, state, rng, step):
    del rng, step
    log_scale = params["log_scale"]
    total = jnp.sum(jnp.exp(log_scale) * task_losses - log_scale)
    return total, state, {"weights": jax.lax.stop_gradient(jnp.exp(log_scale))}

  return LossWeighting("imtl_l", init, combine, "impartial MTL, loss balance (learned scales)")


def smooth_tchebycheff(
  values: jax.Array, mu: float, preference: jax.Array, reference: jax.Array
) -> jax.Array:
  """μ log Σ_t exp(p_t (v_t - z_t) / μ): the smooth Tchebycheff scalarization (Lin et al. 2024).

  It tends to max_t p_t (v_t - z_t) as μ → 0. The largest term is taken out of the exponentials
  (and added back), so no term overflows.
  """
  scaled = preference * (values - reference) / mu
  top = jax.lax.stop_gradient(jnp.max(scaled))
  return mu * (top + jnp.log(jnp.sum(jnp.exp(scaled - top))))


class STCHState(NamedTuple):
  """STCH's nadir point, per task [T]: the losses summed over the last warm-up epoch (on the
  steps whose batch labels the task), then their mean."""

  loss_sum: jax.Array
  count: jax.Array
  nadir: jax.Array
  nadir_set: jax.Array


@register("stch")
def smooth_tchebycheff_scalarization(options: ml_collections.ConfigDict) -> LossWeighting:
  """STCH (Lin et al. 2024) for MTL, as the authors' code runs it: log-losses, then a smooth max.

  Epochs count from 0, with W = `stch_warmup_epochs`:
  * epochs < W and epoch W: total = Σ_t log L_t (epoch W also sums the losses);
  * after: the nadir n = epoch W's mean losses, ℓ_t = log(L_t / n_t) and
    total = T · smooth_tchebycheff(ℓ, μ, 1, 0) with μ = `stch_mu`: the weights
    w_t = T softmax(ℓ/μ)_t / L_t go to the task furthest above its nadir as μ → 0, and to
    1/L_t (the log-loss objective) as μ → ∞.
  A task sets its nadir at its first step after epoch W; one that no batch of epoch W labelled
  takes its loss of that step. 1e-20 is added inside the logarithms, as in the authors' code.
  """
  mu = float(options.stch_mu)
  warmup_epochs = int(options.stch_warmup_epochs)
  steps_per_epoch = int(options.steps_per_epoch)
  epsilon = 1e-20

  def init(num_tasks: int):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    ones = jnp.ones((num_tasks,), jnp.float32)
    return {}, STCHState(zeros, zeros, ones, jnp.zeros((num_tasks,), jnp.bool_))

  def combine(task_losses, params, state: STCHState, rng, step):
    del params, rng
    num_tasks = task_losses.shape[0]
    epoch = jnp.asarray(step) // steps_per_epoch
    fixed = jax.lax.stop_gradient(task_losses)
    accumulate = epoch == warmup_epochs
    loss_sum = state.loss_sum + jnp.where(accumulate, fixed, 0.0)
    count = state.count + accumulate.astype(state.count.dtype)
    after = epoch > warmup_epochs
    set_now = after & ~state.nadir_set
    mean = jnp.where(count > 0, loss_sum / jnp.maximum(count, 1.0), fixed)
    nadir = jnp.where(set_now, mean, state.nadir)
    log_losses = jnp.log(task_losses / nadir + epsilon)
    smooth = num_tasks * smooth_tchebycheff(log_losses, mu, 1.0, 0.0)
    warmup = jnp.sum(jnp.log(task_losses + epsilon))
    total = jnp.where(after, smooth, warmup)
    softmax = jax.nn.softmax(jax.lax.stop_gradient(log_losses) / mu)
    weights = jnp.where(
      after, num_tasks * softmax / (fixed + epsilon * nadir), 1.0 / (fixed + epsilon)
    )
    new_state = STCHState(loss_sum, count, nadir, state.nadir_set | after)
    return total, new_state, {"weights": weights}

  description = f"smooth Tchebycheff scalarization (mu {mu:g})"
  return LossWeighting("stch", init, combine, description)


def kmeans_1d(values: jax.Array, groups: int) -> jax.Array:
  """Each value replaced by its cluster's mean under the optimal 1-D k-means with `groups` groups.

  Optimal 1-D clusters are contiguous once sorted, so dynamic programming over the split points
  finds the exact optimum (deterministic and jittable; Lloyd's iterations from random centres
  can stop at a local one). Every cluster is non-empty; groups ≥ len(values) returns values.
  """
  size = values.shape[0]
  groups = min(int(groups), size)
  order = jnp.argsort(values)
  ordered = values[order]
  sums = jnp.concatenate([jnp.zeros((1,), values.dtype), jnp.cumsum(ordered)])
  squares = jnp.concatenate([jnp.zeros((1,), values.dtype), jnp.cumsum(ordered**2)])
  start, end = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  lengths = jnp.maximum(end - start + 1, 1)
  segment_sum = sums[end + 1] - sums[start]
  # cost[i, j]: the squared error of one cluster holding ordered[i..j] (inf when i > j).
  cost = squares[end + 1] - squares[start] - segment_sum**2 / lengths
  cost = jnp.where(end >= start, jnp.maximum(cost, 0.0), jnp.inf)
  best = cost[0]  # best[j]: one cluster over ordered[0..j].
  splits = []
  for _ in range(1, groups):
    # The last cluster starts at i ≥ 1 and follows the best partition of ordered[0..i-1].
    previous = jnp.concatenate([jnp.full((1,), jnp.inf, values.dtype), best[:-1]])
    candidates = previous[:, None] + cost
    splits.append(jnp.argmin(candidates, axis=0))
    best = jnp.min(candidates, axis=0)
  means = jnp.zeros_like(ordered)
  positions = jnp.arange(size)
  last = size - 1
  for split in reversed([jnp.zeros((size,), jnp.int32)] + splits):
    first = split[last]
    mean = (sums[last + 1] - sums[first]) / (last - first + 1)
    means = jnp.where((positions >= first) & (positions <= last), mean, means)
    last = first - 1
  return jnp.zeros_like(values).at[order].set(means)


class GO4AlignState(NamedTuple):
  """GO4Align's risk-guided indicators p [T] (on the simplex)."""

  indicators: jax.Array


@register("go4align")
def group_optimization_alignment(options: ml_collections.ConfigDict) -> LossWeighting:
  """GO4Align (Shen et al. 2024), as its released code computes the weights from the losses.

  With L̂ the losses (held constant): scale balance γ_t = Σ_s L̂_s / L̂_t; risk-guided
  indicators p ← p ⊙ exp(-η L̂), renormalised to sum 1 (start 1/T; η = `go4align_step_size`);
  ω_t = γ_t p_t; the T values ω are grouped by 1-D k-means into K = `go4align_groups` groups
  (exactly, `kmeans_1d`), and each task's weight is its group's mean. The total is Σ_t ω̄_t L_t.
  K = 1 (the code's default) gives every task mean(ω); K ≥ T gives ω itself.
  """
  step_size = float(options.go4align_step_size)
  groups = int(options.go4align_groups)

  def init(num_tasks: int):
    return {}, GO4AlignState(jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

  def combine(task_losses, params, state: GO4AlignState, rng, step):
    del params, rng, step
    fixed = jax.lax.stop_gradient(task_losses)
    balance = jnp.sum(fixed) / fixed
    indicators = state.indicators * jnp.exp(-step_size * fixed)
    indicators = indicators / jnp.sum(indicators)
    weights = kmeans_1d(balance * indicators, groups)
    return jnp.sum(weights * task_losses), GO4AlignState(indicators), {"weights": weights}

  description = f"group optimization for alignment ({groups} group(s))"
  return LossWeighting("go4align", init, combine, description)
