"""Methods on the coordinates of each task's encoder gradient (Jacobian mode 'task_gradients').

* DB-MTL, MoCo and ExcessMTL keep state shaped like T copies of the encoder's parameters (an
  average of log-loss gradients, tracked gradients, AdaGrad sums), which no Gramian can replace:
  their direction is built from those coordinates.
* SDMGrad and MoDo need two independent estimates of the task gradients for their weights (a
  cross product J_ξ J_ξ'ᵀ, whose expectation is the Gramian of the expected gradients without
  the bias of one batch's Gramian) and a third for the step: the train step splits each batch
  into three disjoint parts (`batch_parts` = 3), one forward and T backward passes on each, so
  the step costs about one task-level Gramian step. LibMTL draws three batches instead; splitting
  one keeps the data pipeline and the epoch unchanged, at a third of the samples per estimate.

All are task level: their state follows a task across steps. The train step
(`train.gradient_steps.make_task_gradient_step`) hands each `combine` the parts' TaskGradients
and applies the returned encoder direction and head scales. Defaults live in configs/base.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mtl_jax.weighting import solvers
from mtl_jax.weighting.base import JacobianMethod
from mtl_jax.weighting.base import register


def _leading(vector: jax.Array, leaf: jax.Array) -> jax.Array:
  """vector [T] shaped to broadcast against a leaf [T, ...]."""
  return vector.reshape((-1,) + (1,) * (leaf.ndim - 1))


def cross_products(first: Any, second: Any) -> jax.Array:
  """[T, T] inner products ⟨first_t, second_s⟩ of two stacked pytrees ([T, ...] leaves), summed
  over leaves in full precision."""
  total = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    total = total + jnp.einsum("tp,sp->ts", a, b, precision=jax.lax.Precision.HIGHEST)
  return total


def task_norms(stacked: Any) -> jax.Array:
  """[T] Euclidean norms of each task's slice of a stacked pytree."""
  squares = sum(
    jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1)
    for leaf in jax.tree_util.tree_leaves(stacked)
  )
  return jnp.sqrt(squares)


def scale_tasks(scales: jax.Array, stacked: Any) -> Any:
  """Each task's slice of a stacked pytree multiplied by its scale."""
  return jax.tree_util.tree_map(lambda leaf: _leading(scales, leaf) * leaf, stacked)


def combine_tasks(weights: jax.Array, stacked: Any) -> Any:
  """Σ_t w_t stacked_t: a pytree like one task's slice."""
  return jax.tree_util.tree_map(lambda leaf: jnp.tensordot(weights, leaf, axes=1), stacked)


def _stacked_zeros(num_tasks: int, encoder: Any) -> Any:
  return jax.tree_util.tree_map(
    lambda leaf: jnp.zeros((num_tasks, *jnp.shape(leaf)), jnp.result_type(leaf)), encoder
  )


# ----------------------------------------------------------------------------------------------
# DB-MTL.


class DBMTLState(NamedTuple):
  """DB-MTL's moving average of each task's log-loss gradient ([T, ...] leaves) and step count."""

  average: Any
  count: jax.Array


def db_mtl_direction(
  gradients: Any, losses: jax.Array, state: DBMTLState, beta: float, sigma: float
) -> tuple[Any, jax.Array, DBMTLState]:
  """DB-MTL's encoder direction, its per-task multipliers α and the new state.

  Loss-scale balance: each task's gradient of log(L_t + 1e-8), h_t = g_t / (L_t + 1e-8).
  Gradient-magnitude balance: at step k (from 1), ĝ_t ← β_k ĝ_t + (1 - β_k) h_t with
  β_k = β k^(-σ) (no bias correction, as the reference), and d = Σ_t α_t ĝ_t with
  α_t = max_s ‖ĝ_s‖ / (‖ĝ_t‖ + 1e-8): every task contributes the largest task's norm.
  """
  log_gradients = scale_tasks(1.0 / (losses + 1e-8), gradients)
  count = state.count + 1
  rate = beta * count.astype(losses.dtype) ** (-sigma)
  average = jax.tree_util.tree_map(
    lambda old, new: rate * old + (1.0 - rate) * new, state.average, log_gradients
  )
  norms = task_norms(average)
  alpha = jnp.max(norms) / (norms + 1e-8)
  return combine_tasks(alpha, average), alpha, DBMTLState(average, count)


@register("db_mtl")
def dual_balancing(options: ml_collections.ConfigDict) -> JacobianMethod:
  """DB-MTL (Lin et al. 2023): log losses, and task gradients rescaled to the largest norm.

  See `db_mtl_direction`; β = `db_mtl_beta`, σ = `db_mtl_beta_sigma`. Head t descends its
  gradient of log(L_t + 1e-8), i.e. the plain gradient scaled by 1/(L_t + 1e-8), as LibMTL's
  backward of the log-losses gives it. Neither the sum nor the mean convention: every task's
  contribution has the norm of the largest.
  """
  beta = float(options.db_mtl_beta)
  sigma = float(options.db_mtl_beta_sigma)

  def init(num_tasks, encoder):
    return {}, DBMTLState(_stacked_zeros(num_tasks, encoder), jnp.zeros((), jnp.int32))

  def combine(parts, params, state, rng, step):
    del params, rng, step
    (part,) = parts
    direction, alpha, new_state = db_mtl_direction(part.encoder, part.losses, state, beta, sigma)
    return direction, 1.0 / (part.losses + 1e-8), new_state, {"weights": alpha}

  description = "dual balancing (log losses, gradients at the largest norm)"
  return JacobianMethod("db_mtl", "task_gradients", init, combine, description=description)


# ----------------------------------------------------------------------------------------------
# MoCo.


class MoCoState(NamedTuple):
  """MoCo's tracked gradients Y ([T, ...] leaves), its weights λ [T] and step count."""

  tracked: Any
  weights: jax.Array
  count: jax.Array


def moco_direction(
  gradients: Any, losses: jax.Array, state: MoCoState, options: ml_collections.ConfigDict
) -> tuple[Any, MoCoState]:
  """MoCo's encoder direction d = Σ_t λ_t Y_t and the new state.

  At step k (from 1): the gradients are scaled to norm L_t (`moco_gradient_scale` 'loss', as
  LibMTL) or kept ('none'); Y ← Y - β_k (Y - G) tracks them with β_k = β / k^σ_β; the weights
  take one step on λᵀ(YYᵀ + ρI)λ, λ ← P(λ - γ_k (YYᵀ + ρI) λ) with γ_k = γ / k^σ_γ, where P is
  the projection onto the simplex (the paper) or a softmax (`moco_weight_map` 'softmax',
  LibMTL). The weights need only YYᵀ, but the direction needs Y's coordinates.
  """
  if options.moco_gradient_scale == "loss":
    gradients = scale_tasks(losses / (task_norms(gradients) + 1e-8), gradients)
  count = state.count + 1
  step = count.astype(losses.dtype)
  beta = float(options.moco_beta) / step ** float(options.moco_beta_sigma)
  gamma = float(options.moco_gamma) / step ** float(options.moco_gamma_sigma)
  tracked = jax.tree_util.tree_map(
    lambda old, new: old - beta * (old - new), state.tracked, gradients
  )
  products = cross_products(tracked, tracked)
  products = products + float(options.moco_rho) * jnp.eye(products.shape[0], dtype=products.dtype)
  moved = state.weights - gamma * (products @ state.weights)
  if options.moco_weight_map == "softmax":
    weights = jax.nn.softmax(moved)
  else:
    weights = solvers.project_to_simplex(moved)
  return combine_tasks(weights, tracked), MoCoState(tracked, weights, count)


@register("moco")
def moco(options: ml_collections.ConfigDict) -> JacobianMethod:
  """MoCo (Fernando et al. 2023): MGDA-style weights on tracked (averaged) task gradients, which
  removes the bias of weights computed from one batch's gradients; see `moco_direction`. Mean
  convention (λ on the simplex); heads descend their plain gradients."""
  if options.moco_weight_map not in ("simplex", "softmax"):
    raise ValueError(
      f"config.method.moco_weight_map: must be 'simplex' or 'softmax', got "
      f"{options.moco_weight_map!r}."
    )

  def init(num_tasks, encoder):
    weights = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
    return {}, MoCoState(_stacked_zeros(num_tasks, encoder), weights, jnp.zeros((), jnp.int32))

  def combine(parts, params, state, rng, step):
    del params, rng, step
    (part,) = parts
    direction, new_state = moco_direction(part.encoder, part.losses, state, options)
    ones = jnp.ones_like(part.losses)
    return direction, ones, new_state, {"weights": new_state.weights}

  description = "tracked task gradients with simplex weights (MoCo)"
  return JacobianMethod("moco", "task_gradients", init, combine, description=description)


# ----------------------------------------------------------------------------------------------
# ExcessMTL.


class ExcessMTLState(NamedTuple):
  """ExcessMTL's AdaGrad sums of squared task gradients ([T, ...] leaves), its weights α [T]
  (summing to T), each task's first step's excess risk (the baseline) and whether it is set
  ([T]: with partial labels, a task sets it at its first labelled step)."""

  squared_sums: Any
  weights: jax.Array
  baseline: jax.Array
  started: jax.Array


def excess_mtl_weights(
  gradients: Any, state: ExcessMTLState, step_size: float
) -> tuple[jax.Array, ExcessMTLState]:
  """ExcessMTL's task weights α and the new state.

  Each task's excess risk is estimated to second order with an AdaGrad-diagonal curvature:
  S_t ← S_t + g_t ⊙ g_t, E_t = Σ_j g_tj² / √(S_tj + 1e-7) (the ½ of the expansion cancels).
  The first step's E is the baseline E⁰ and leaves α = 1; later steps move
  α_t ∝ α_t exp(η E_t / E⁰_t), renormalised to Σα = T (sum convention, LibMTL and the authors'
  code; TorchJD's α sums to 1 and also moves on the first step). A zero baseline counts as no
  excess.
  """
  squared_sums = jax.tree_util.tree_map(
    lambda total, gradient: total + gradient**2, state.squared_sums, gradients
  )
  excess = sum(
    jnp.sum((g**2 / jnp.sqrt(s + 1e-7)).reshape(g.shape[0], -1), axis=1)
    for g, s in zip(jax.tree_util.tree_leaves(gradients), jax.tree_util.tree_leaves(squared_sums))
  )
  baseline = jnp.where(state.started, state.baseline, excess)
  ratio = jnp.where(baseline > 0, excess / jnp.where(baseline > 0, baseline, 1.0), 0.0)
  num_tasks = ratio.shape[0]
  moved = num_tasks * jax.nn.softmax(jnp.log(state.weights) + step_size * ratio)
  weights = jnp.where(state.started, moved, state.weights)
  return weights, ExcessMTLState(squared_sums, weights, baseline, jnp.ones_like(state.started))


@register("excess_mtl")
def excess_risk(options: ml_collections.ConfigDict) -> JacobianMethod:
  """ExcessMTL (He et al. 2024): weights that grow with each task's estimated excess risk (how
  far it is from its own optimum), so tasks that are merely hard or noisy are not favoured;
  see `excess_mtl_weights` (η = `excess_mtl_step_size`). The step is Σ α_t L_t: the encoder
  descends Σ α_t g_t and head t its gradient times α_t."""
  step_size = float(options.excess_mtl_step_size)

  def init(num_tasks, encoder):
    ones = jnp.ones((num_tasks,), jnp.float32)
    state = ExcessMTLState(
      _stacked_zeros(num_tasks, encoder), ones, jnp.zeros_like(ones), jnp.zeros_like(ones, bool)
    )
    return {}, state

  def combine(parts, params, state, rng, step):
    del params, rng, step
    (part,) = parts
    weights, new_state = excess_mtl_weights(part.encoder, state, step_size)
    return combine_tasks(weights, part.encoder), weights, new_state, {"weights": weights}

  description = "excess-risk weighting (AdaGrad curvature)"
  return JacobianMethod("excess_mtl", "task_gradients", init, combine, description=description)


# ----------------------------------------------------------------------------------------------
# SDMGrad and MoDo: two independent estimates for the weights, a third for the step.


class SimplexWeightsState(NamedTuple):
  """Weights on the simplex [T] carried from step to step (SDMGrad's w, MoDo's λ)."""

  weights: jax.Array


def sdmgrad_weights(
  cross: jax.Array,
  weights: jax.Array,
  regularisation: float,
  learning_rate: float,
  momentum: float,
  iterations: int,
) -> tuple[jax.Array, jax.Array]:
  """SDMGrad's step weights u and its new inner weights w (Xiao et al. 2023).

  With A = J_ξ J_ξ'ᵀ scaled to Â = A / (s² + 1e-8), s = mean_t √max(A_tt, 0), and the
  preference w̃ = 1/T: `iterations` steps of heavy-ball SGD (fresh velocity, momentum μ) on w,
  v ← μv + Â(w + λw̃), w ← Π_simplex(w - lr·v), warm-started from the last step's w; then
  u = (w + λw̃)/(1 + λ) (mean convention: u is on the simplex). λ = `regularisation` pulls the
  direction towards the mean gradient.
  """
  size = cross.shape[0]
  # The inner loop runs in the Gramian's precision (float64 under jax.enable_x64); the kept
  # weights return in the state's, so the state's type does not change from step to step.
  state_dtype = weights.dtype
  weights = weights.astype(cross.dtype)
  scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diag(cross), 0.0)))
  scaled = cross / (scale**2 + 1e-8)
  preference = jnp.full((size,), 1.0 / size, cross.dtype)

  def body(index, carry):
    weights, velocity = carry
    gradient = scaled @ (weights + regularisation * preference)
    velocity = jnp.where(index == 0, gradient, momentum * velocity + gradient)
    return solvers.project_to_simplex(weights - learning_rate * velocity), velocity

  weights, _ = jax.lax.fori_loop(0, iterations, body, (weights, jnp.zeros_like(weights)))
  step_weights = (weights + regularisation * preference) / (1.0 + regularisation)
  return step_weights, weights.astype(state_dtype)


def modo_weights(cross: jax.Array, weights: jax.Array, step_size: float, rho: float) -> jax.Array:
  """MoDo's new weights λ ← Π_simplex(λ - γ(Aλ + ρλ)) with A = J_z1 J_z2ᵀ (Chen et al. 2023).

  A is the raw cross product, so the step depends on the scale of the gradients (as in the
  references; γ = `step_size` sets it).
  """
  return solvers.project_to_simplex(weights - step_size * (cross @ weights + rho * weights))


def _simplex_init(num_tasks, encoder):
  del encoder
  return {}, SimplexWeightsState(jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))


@register("sdmgrad")
def sdmgrad(options: ml_collections.ConfigDict) -> JacobianMethod:
  """SDMGrad: stochastic direction-oriented multi-objective gradient descent; see
  `sdmgrad_weights` (λ = `sdmgrad_lambda`, lr `sdmgrad_learning_rate`, momentum
  `sdmgrad_momentum`, `sdmgrad_iterations` inner steps). The batch is split in three parts:
  A = J_1 J_2ᵀ from the first two, the step Σ_t u_t g_t^(3) from the third; heads descend their
  plain gradients of the whole batch."""
  arguments = (
    float(options.sdmgrad_lambda),
    float(options.sdmgrad_learning_rate),
    float(options.sdmgrad_momentum),
    int(options.sdmgrad_iterations),
  )

  def combine(parts, params, state, rng, step):
    del params, rng, step
    first, second, third = parts
    cross = cross_products(first.encoder, second.encoder)
    step_weights, weights = sdmgrad_weights(cross, state.weights, *arguments)
    direction = combine_tasks(step_weights, third.encoder)
    ones = jnp.ones_like(third.losses)
    return direction, ones, SimplexWeightsState(weights), {"weights": step_weights}

  description = "stochastic direction-oriented MGDA (batch split in three)"
  return JacobianMethod(
    "sdmgrad", "task_gradients", _simplex_init, combine, description=description, batch_parts=3
  )


@register("modo")
def modo(options: ml_collections.ConfigDict) -> JacobianMethod:
  """MoDo: multi-objective gradient with double sampling; see `modo_weights` (γ = `modo_gamma`,
  ρ = `modo_rho`). The batch is split in three parts: the weights move with A = J_1 J_2ᵀ from
  the first two, and the step Σ_t λ_t g_t^(3) uses the updated λ and the third (LibMTL's
  three-sample form); heads descend their plain gradients of the whole batch."""
  step_size = float(options.modo_gamma)
  rho = float(options.modo_rho)

  def combine(parts, params, state, rng, step):
    del params, rng, step
    first, second, third = parts
    weights = modo_weights(
      cross_products(first.encoder, second.encoder), state.weights, step_size, rho
    )
    direction = combine_tasks(weights, third.encoder)
    ones = jnp.ones_like(third.losses)
    return direction, ones, SimplexWeightsState(weights), {"weights": weights}

  description = "multi-objective gradient with double sampling (batch split in three)"
  return JacobianMethod(
    "modo", "task_gradients", _simplex_init, combine, description=description, batch_parts=3
  )
