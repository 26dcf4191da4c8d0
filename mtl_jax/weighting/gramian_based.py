"""Gradient weightings that need only the Gramian of the rows' gradients: one small pure function
each.

Every method here ends in a direction d = Σ_k w_k g_k over the rows' gradients g_k (tasks,
samples or (sample, task) pairs, see `LEVELS`) whose weights w are a function of the Gramian
G_kl = ⟨g_k, g_l⟩ alone (plus state and a random key). The train step therefore computes G,
calls `weigh`, and descends Σ_k stop_gradient(w_k) g_k, assembled from the same per-row
gradients that gave G (see `mtl_jax.train.gradient_steps`). Each factory's docstring says why
its direction has this form and which conventions it follows (LibMTL's, unless stated
otherwise: sum or mean over rows, constants); defaults live in configs/base.py.

`weigh` has the signature of `base.GramianWeighting`:
  (gramian [R, R], task_losses [T], params, state, rng, step) -> (weights [R], new_state, aux)
`aux` may hold 'weighting_loss', a scalar differentiable in params that the optimizer
minimises for the weighting's own parameters (IMTL-L's loss scales, GradNorm's weights).

All weightings normalise G by its mean diagonal first (`solvers.normalise`); their weights are
invariant to that scale, so this only conditions the solvers. FairGrad's are not: it scales its
weights back (see `fairgrad_weights`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mtl_jax.weighting import solvers
from mtl_jax.weighting.base import GramianWeighting
from mtl_jax.weighting.base import NoState
from mtl_jax.weighting.base import check_level
from mtl_jax.weighting.base import get
from mtl_jax.weighting.base import gramian_method
from mtl_jax.weighting.base import no_parameters
from mtl_jax.weighting.base import register

EPSILON = solvers.EPSILON


def _row_orders(rng: jax.Array, size: int) -> jax.Array:
  """[R, R]: for each row, an independent random order of all rows (PCGrad, GradVac)."""
  return jax.vmap(lambda key: jax.random.permutation(key, size))(jax.random.split(rng, size))


# ----------------------------------------------------------------------------------------------
# The pure weight functions (also the reference for tests and benchmarks).


def pcgrad_weights(gramian: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad's weights: d = Σ_i pc_i, pc_i = g_i projected in turn off every conflicting g_j.

  Each projected gradient stays a combination pc_i = Σ_k C_ik g_k of the rows, so its inner
  products are C_i G[:, j] and the projection pc_i -= (⟨pc_i, g_j⟩ / ‖g_j‖²) g_j only changes
  C_ij: the whole procedure runs on G. Follows LibMTL: each row i visits all rows (itself
  included) in its own random order, projects onto the *original* g_j, and the rows' projected
  gradients are summed (sum convention: no conflict gives Σ_k g_k, the EW direction).

  Args:
    gramian: [R, R].
    orders: [R, R] integer; orders[i] is the order in which row i visits the rows.

  Returns:
    weights [R] (the column sums of C).
  """
  gramian, _ = solvers.normalise(gramian)
  size = gramian.shape[0]
  squared_norms = jnp.diag(gramian)

  def project_row(row, order):
    def visit(coefficients, other):
      inner = coefficients @ gramian[:, other]
      factor = jnp.where(inner < 0, inner / (squared_norms[other] + EPSILON), 0.0)
      return coefficients - factor * jax.nn.one_hot(other, size), None

    coefficients, _ = jax.lax.scan(visit, jax.nn.one_hot(row, size), order)
    return coefficients

  return jnp.sum(jax.vmap(project_row)(jnp.arange(size), orders), axis=0)


def gradvac_weights(
  gramian: jax.Array, targets: jax.Array, orders: jax.Array, beta: float
) -> tuple[jax.Array, jax.Array]:
  """GradVac's weights and updated similarity targets (LibMTL, whole-model group).

  Like PCGrad, pc_i = Σ_k C_ik g_k; for each other row j (random order) whose cosine with
  pc_i is below the running target φ_ij, GradVac adds a multiple of g_j that lifts the cosine
  to φ_ij; the multiple depends only on ‖pc_i‖, ‖g_j‖ and the cosine, all read off G. The
  targets are an exponential moving average (rate beta) of the observed cosines (state).
  Sum convention, as LibMTL.

  Args:
    gramian: [R, R].
    targets: [R, R] the similarity targets φ (zeros at start).
    orders: [R, R] as in `pcgrad_weights` (a row's own index is skipped).
    beta: EMA rate of the targets.

  Returns:
    (weights [R], new targets [R, R]).
  """
  gramian, _ = solvers.normalise(gramian)
  size = gramian.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gramian), 0.0))

  def vaccinate_row(row, order, row_targets):
    def visit(carry, other):
      coefficients, row_targets = carry
      skip = other == row
      projected_norm = jnp.sqrt(jnp.maximum(coefficients @ gramian @ coefficients, 0.0))
      cosine = (coefficients @ gramian[:, other]) / (projected_norm * norms[other] + EPSILON)
      cosine = jnp.clip(cosine, -1.0, 1.0)
      target = row_targets[other]
      amount = (
        projected_norm
        * (target * jnp.sqrt(1.0 - cosine**2) - cosine * jnp.sqrt(1.0 - target**2))
        / (norms[other] * jnp.sqrt(1.0 - target**2) + EPSILON)
      )
      apply = (cosine < target) & ~skip
      coefficients = coefficients + jnp.where(apply, amount, 0.0) * jax.nn.one_hot(other, size)
      updated = (1.0 - beta) * target + beta * cosine
      row_targets = row_targets.at[other].set(jnp.where(skip, target, updated))
      return (coefficients, row_targets), None

    (coefficients, row_targets), _ = jax.lax.scan(
      visit, (jax.nn.one_hot(row, size), row_targets), order
    )
    return coefficients, row_targets

  coefficients, new_targets = jax.vmap(vaccinate_row)(jnp.arange(size), orders, targets)
  return jnp.sum(coefficients, axis=0), new_targets


def imtl_g_weights(gramian: jax.Array) -> jax.Array:
  """IMTL-G's weights: the d = Σ α_k g_k, Σ α_k = 1, with equal projections on every unit gradient.

  LibMTL solves α_{2..R} = g_1 Uᵀ (D Uᵀ)⁻¹ with D_k = g_1 - g_k and U_k = u_1 - u_k
  (u = g/‖g‖), α_1 = 1 - Σ α_k; every entry of g_1Uᵀ and DUᵀ is ⟨g_a, g_b⟩ / ‖g_b‖, a Gramian
  entry. A pseudo-inverse keeps degenerate cases (identical or zero gradients) finite.
  """
  gramian, _ = solvers.normalise(gramian)
  size = gramian.shape[0]
  if size == 1:
    return jnp.ones((1,), jnp.float32)
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gramian), 0.0))
  inverse_norms = jnp.where(norms > 0, 1.0 / jnp.maximum(norms, EPSILON), 0.0)
  # against_unit[a, b] = ⟨g_a, u_b⟩.
  against_unit = gramian * inverse_norms[None, :]
  reference = against_unit[0, 0] - against_unit[0, 1:]  # g_1 Uᵀ, [R-1]
  differences = (
    against_unit[0, 0]
    - against_unit[0, 1:][None, :]
    - against_unit[1:, 0][:, None]
    + against_unit[1:, 1:]
  )  # D Uᵀ, [R-1, R-1]
  alpha = reference @ jnp.linalg.pinv(differences, rtol=1e-6)
  return jnp.concatenate([1.0 - jnp.sum(alpha, keepdims=True), alpha])


def cagrad_weights(
  gramian: jax.Array, c: float, rescale: int, outer_iterations: int, inner_iterations: int
) -> jax.Array:
  """CAGrad's weights: d = (g_0 + λ g_w) / (1 + c²) with g_0 the mean row gradient (LibMTL).

  w = argmin_{w ∈ simplex} wᵀ G b + c‖g_0‖ ‖g_w‖ (b = 1/R: the dual problem in LibMTL),
  λ = c‖g_0‖ / ‖g_w‖, ‖g_0‖² = mean(G), ‖g_w‖² = wᵀGw: all from G, so d = Σ_k
  (1/R + λ w_k)/(1 + c²) g_k. Mean convention, as LibMTL. The dual is solved to a certified
  optimum by `solvers.cagrad_dual`.

  Args:
    gramian: [R, R].
    c: the conflict-averse radius (0.5 in the study).
    rescale: 0 (none), 1 (divide by 1 + c², the study's setting) or 2 (divide by 1 + c).
    outer_iterations, inner_iterations: their product bounds the solver's accelerated steps
      (it stops earlier, on its optimality certificate).
  """
  gramian, _ = solvers.normalise(gramian)
  size = gramian.shape[0]
  mean = jnp.full((size,), 1.0 / size, jnp.float32)
  divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[int(rescale)]
  if c == 0:
    return mean / divisor
  radius = c * jnp.sqrt(jnp.maximum(jnp.mean(gramian), 0.0))
  weights = solvers.cagrad_dual(gramian, radius, int(outer_iterations) * int(inner_iterations))
  combined_norm = jnp.sqrt(jnp.maximum(weights @ gramian @ weights, 0.0))
  multiplier = radius / (combined_norm + EPSILON)
  return (mean + multiplier * weights) / divisor


def aligned_mtl_weights(gramian: jax.Array, relative_tolerance: float = 1e-5) -> jax.Array:
  """Aligned-MTL's weights: column sums of B = √σ_min V Σ^{-1/2} Vᵀ with G = V Σ Vᵀ (LibMTL).

  Aligning the rows' gradients makes the singular values of the gradient matrix equal: the
  aligned rows are B J, with B built from the eigen-decomposition of G alone, and d = 1ᵀ B J
  (sum convention, as LibMTL). Eigenvalues below relative_tolerance · λ_max count as zero
  (rank truncation; float32 needs a looser threshold than LibMTL's machine epsilon).
  """
  gramian, _ = solvers.normalise(gramian)
  eigenvalues, vectors = jnp.linalg.eigh(gramian)
  kept = eigenvalues > relative_tolerance * jnp.maximum(eigenvalues[-1], EPSILON)
  smallest = jnp.min(jnp.where(kept, eigenvalues, jnp.inf))
  smallest = jnp.where(jnp.any(kept), smallest, 0.0)
  inverse_roots = jnp.where(kept, 1.0 / jnp.sqrt(jnp.where(kept, eigenvalues, 1.0)), 0.0)
  alignment = jnp.sqrt(smallest) * (vectors * inverse_roots[None, :]) @ vectors.T
  return jnp.sum(alignment, axis=0)


def mgda_weights(gramian: jax.Array, iterations: int) -> jax.Array:
  """MGDA's weights: the min-norm point of the convex hull of the rows, min_{w ∈ simplex} wᵀGw.

  The objective ‖Σ w_k g_k‖² = wᵀGw is a function of G only. Weights sum to 1 (LibMTL's
  MinNormSolver with gradient normalisation 'none'); solved by accelerated projected gradient.
  """
  gramian, _ = solvers.normalise(gramian)
  return solvers.min_norm_simplex(gramian, iterations)


def upgrad_weights(gramian: jax.Array, iterations: int) -> jax.Array:
  """UPGrad's weights: the mean of every row's gradient projected onto the dual cone of the rows.

  The projection of g_i onto {d : J d ≥ 0} is Jᵀv with v = argmin_{v ≥ e_i} vᵀGv (its dual),
  so d = Jᵀ (1/R) Σ_i v_i (TorchJD's mean preference, without its regulariser). Each
  projection is in the dual cone, so the average has a non-negative inner product with every
  row's gradient.
  """
  gramian, _ = solvers.normalise(gramian)
  size = gramian.shape[0]
  projections = solvers.project_onto_dual_cone(
    gramian, jnp.eye(size, dtype=jnp.float32), iterations
  )
  return jnp.mean(projections, axis=0)


def nash_mtl_weights(
  gramian: jax.Array, iterations: int, max_norm: float, ridge: float = 0.0
) -> jax.Array:
  """Nash-MTL's weights: α > 0 solving Ĝα = 1/α with Ĝ = G / ‖G‖_F, then d clipped to max_norm.

  The Nash bargaining solution among the rows is d = Σ α_k g_k with (Gα)_k = 1/α_k, a
  condition on G only. Like LibMTL, G is normalised by its Frobenius norm and the direction's
  norm (√(αᵀGα), also from G) is clipped to max_norm (0 disables). LibMTL reaches α with
  cvxpy's concave-convex procedure; here damped Newton (`solvers.nash_bargaining`) solves the
  condition itself to float32 accuracy in `iterations` steps. `ridge` (0 by default, as in
  Nash-MTL) adds ridge·I to Ĝ; see `solvers.nash_bargaining` for what happens on singular
  Gramians without it.
  """
  gramian = solvers.symmetric(gramian)
  frobenius = jnp.sqrt(jnp.sum(gramian**2))
  normalised = gramian / jnp.where(frobenius > 0, frobenius, 1.0)
  alpha = solvers.nash_bargaining(normalised, iterations, ridge)
  if max_norm > 0:
    norm = jnp.sqrt(jnp.maximum(alpha @ gramian @ alpha, 0.0))
    alpha = alpha * jnp.minimum(1.0, max_norm / (norm + 1e-6))
  return alpha


def dualproj_weights(gramian: jax.Array, iterations: int) -> jax.Array:
  """DualProj's weights: the mean of the rows' gradients projected onto their dual cone.

  The projection of Jᵀu onto {d : J d ≥ 0} is Jᵀw with w = argmin_{w ≥ u} wᵀGw (the dual of the
  projection, Quinton & Rey 2024, Prop. 1), here with u = 1/R (TorchJD's default preference:
  mean convention, no conflict gives the mean gradient). UPGrad projects each row separately;
  DualProj projects their mean once.
  """
  gramian, _ = solvers.normalise(gramian)
  size = gramian.shape[0]
  preference = jnp.full((1, size), 1.0 / size, gramian.dtype)
  return solvers.project_onto_dual_cone(gramian, preference, iterations)[0]


def config_weights(gramian: jax.Array, eigenvalue_cutoff: float) -> jax.Array:
  """ConFIG's weights (Liu et al. 2025): the direction with equal cosine to every row's gradient.

  With unit rows u_i = g_i/‖g_i‖ (0 for a zero row) stacked in U, ConFIG's direction is
  b = U⁺1, rescaled to the length Σ_i ⟨g_i, b̂⟩ (b̂ = b/‖b‖). Since U⁺ = Uᵀ(UUᵀ)⁺ and
  UUᵀ = C = D⁻¹GD⁻¹ (the cosine matrix, D = diag(‖g_i‖)), b = Jᵀc with c = D⁻¹C⁺1: all from
  G. Then ‖b‖² = cᵀGc and Σ_i⟨g_i, b⟩ = 1ᵀGc, so the update is Jᵀω with ω = (1ᵀGc / cᵀGc)·c.
  Sum convention: orthogonal or identical rows give ω = 1 (EW). C⁺ drops eigenvalues below
  `eigenvalue_cutoff` times the largest (σ ratio √cutoff on U: float32 cannot resolve finer
  ones). Invariant to G → sG.
  """
  gramian, _ = solvers.normalise(gramian)
  squared_norms = jnp.diag(gramian)
  nonzero = squared_norms > EPSILON * jnp.max(squared_norms)
  inverse_norms = jnp.where(nonzero, 1.0 / jnp.sqrt(jnp.where(nonzero, squared_norms, 1.0)), 0.0)
  cosines = gramian * inverse_norms[:, None] * inverse_norms[None, :]
  eigenvalues, vectors = jnp.linalg.eigh(cosines)
  kept = eigenvalues > eigenvalue_cutoff * jnp.maximum(eigenvalues[-1], EPSILON)
  inverse = jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0)
  coefficients = inverse_norms * (vectors @ (inverse * jnp.sum(vectors, axis=0)))
  products = gramian @ coefficients
  squared_length = coefficients @ products
  scale = jnp.where(squared_length > 0, jnp.sum(products) / jnp.maximum(squared_length, 1e-30), 0)
  return scale * coefficients


def fairgrad_weights(gramian: jax.Array, alpha: float, iterations: int) -> jax.Array:
  """FairGrad's weights (Ban & Ji 2024): the α-fair allocation w > 0 with (Gw)_i = w_i^(-1/α).

  Unlike the other weightings, w depends on the scale of G: w(sG) = s^(-α/(α+1)) w(G). The
  solve runs on G normalised by its mean diagonal s (for conditioning) and the result is scaled
  back by s^(-α/(α+1)), so the weights are those of the raw Gramian, as in the reference
  implementations (LibMTL's convention: the step is Σ w_i g_i, no ×R and no norm clipping).
  α = 1 is Nash-MTL's condition without its normalisation and clipping.
  """
  normalised, scale = solvers.normalise(gramian)
  weights = solvers.alpha_fair_allocation(normalised, alpha, iterations)
  return weights * scale ** (-alpha / (alpha + 1.0))


# ----------------------------------------------------------------------------------------------
# Registered methods.


@register("pcgrad")
def pcgrad(options: ml_collections.ConfigDict) -> GramianWeighting:
  """PCGrad (Yu et al. 2020), random order per row each step; see `pcgrad_weights`."""
  del options

  def weigh(gramian, task_losses, params, state, rng, step):
    del task_losses, params, step
    weights = pcgrad_weights(gramian, _row_orders(rng, gramian.shape[0]))
    return weights, state, {"weights": weights}

  description = "projecting conflicting gradients (random order)"
  return GramianWeighting("pcgrad", no_parameters, weigh, description)


class GradVacState(NamedTuple):
  """GradVac's similarity targets φ [R, R] (an EMA of the observed cosines)."""

  targets: jax.Array


@register("gradvac")
def gradvac(options: ml_collections.ConfigDict) -> GramianWeighting:
  """GradVac (Wang et al. 2021) with EMA rate `gradvac_beta`; see `gradvac_weights`."""
  beta = float(options.gradvac_beta)

  def init(num_rows):
    return {}, GradVacState(jnp.zeros((num_rows, num_rows), jnp.float32))

  def weigh(gramian, task_losses, params, state: GradVacState, rng, step):
    del task_losses, params, step
    orders = _row_orders(rng, gramian.shape[0])
    weights, targets = gradvac_weights(gramian, state.targets, orders, beta)
    return weights, GradVacState(targets), {"weights": weights}

  description = "gradient vaccine (EMA cosine targets)"
  return GramianWeighting("gradvac", init, weigh, description)


@register("imtl")
def imtl(options: ml_collections.ConfigDict) -> GramianWeighting:
  """IMTL (Liu et al. 2021): IMTL-G on the Gramian, plus IMTL-L loss scales at level 'task'.

  IMTL-L (LibMTL's hybrid 'IMTL', on by default via `imtl_loss_scaling`) learns log-scales s_t:
  the gradients are those of e^{s_t} L_t (Gramian D G D, D = diag(e^s)), and s is trained by the
  model's optimizer on Σ_t e^{s_t} L_t - s_t. The model's weights are then α_t e^{s_t}.
  """
  level = check_level(options.level)
  loss_scaling = bool(options.imtl_loss_scaling) and level == "task"

  def init(num_rows):
    if loss_scaling:
      return {"log_scale": jnp.zeros((num_rows,), jnp.float32)}, NoState()
    return no_parameters(num_rows)

  def weigh(gramian, task_losses, params, state, rng, step):
    del rng, step
    aux = {}
    if loss_scaling:
      scales = jnp.exp(params["log_scale"])
      fixed = jax.lax.stop_gradient(scales)
      weights = imtl_g_weights(gramian * fixed[:, None] * fixed[None, :]) * fixed
      losses = jax.lax.stop_gradient(task_losses)
      aux["weighting_loss"] = jnp.sum(scales * losses - params["log_scale"])
    else:
      weights = imtl_g_weights(gramian)
    aux["weights"] = weights
    return weights, state, aux

  description = "impartial MTL (IMTL-G, with IMTL-L at task level)"
  return GramianWeighting("imtl", init, weigh, description)


@register("cagrad")
def cagrad(options: ml_collections.ConfigDict) -> GramianWeighting:
  """CAGrad (Liu et al. 2021) with radius `cagrad_c` and rescaling `cagrad_rescale`."""
  c = float(options.cagrad_c)
  rescale = int(options.cagrad_rescale)
  if rescale not in (0, 1, 2):
    raise ValueError(f"config.method.cagrad_rescale must be 0, 1 or 2, got {rescale}.")
  outer = int(options.cagrad_outer_iterations)
  inner = int(options.solver_iterations)

  def weigh(gramian, task_losses, params, state, rng, step):
    del task_losses, params, rng, step
    weights = cagrad_weights(gramian, c, rescale, outer, inner)
    return weights, state, {"weights": weights}

  return GramianWeighting("cagrad", no_parameters, weigh, f"conflict-averse gradient (c={c:g})")


@gramian_method("aligned_mtl", "aligned MTL (equalised singular values)")
def _aligned_mtl(gramian: jax.Array, options: ml_collections.ConfigDict) -> jax.Array:
  """Aligned-MTL (Senushkin et al. 2023); see `aligned_mtl_weights`."""
  del options
  return aligned_mtl_weights(gramian)


@gramian_method("mgda", "multiple-gradient descent (min-norm point)")
def _mgda(gramian: jax.Array, options: ml_collections.ConfigDict) -> jax.Array:
  """MGDA (Sener & Koltun 2018) min-norm weights; see `mgda_weights`."""
  return mgda_weights(gramian, int(options.solver_iterations))


@gramian_method("upgrad", "unconflicting projections of gradients")
def _upgrad(gramian: jax.Array, options: ml_collections.ConfigDict) -> jax.Array:
  """UPGrad (Quinton & Rey 2024, TorchJD); see `upgrad_weights`."""
  return upgrad_weights(gramian, int(options.solver_iterations))


@gramian_method("nash_mtl", "Nash bargaining among tasks")
def _nash_mtl(gramian: jax.Array, options: ml_collections.ConfigDict) -> jax.Array:
  """Nash-MTL (Navon et al. 2022): `nash_mtl_iterations` Newton steps, `nash_mtl_max_norm` clip,
  `nash_mtl_ridge` added to the normalised Gramian (0: the published condition)."""
  return nash_mtl_weights(
    gramian,
    int(options.nash_mtl_iterations),
    float(options.nash_mtl_max_norm),
    float(options.nash_mtl_ridge),
  )


class GradNormState(NamedTuple):
  """GradNorm's reference losses L_t(0) [T], each taken at the first step whose batch labels
  task t (`initial_set` [T] says which are taken)."""

  initial_losses: jax.Array
  initial_set: jax.Array


@register("gradnorm")
def gradient_normalization(options: ml_collections.ConfigDict) -> GramianWeighting:
  """GradNorm (Chen et al. 2018), at level 'task' only: it needs ‖g_t‖ = √G_tt of each task.

  The weights w = T softmax(s) (LibMTL) have trainable logits s, trained by the model's optimizer
  on Σ_t |w_t ‖g_t‖ - mean_k(w_k ‖g_k‖) r_t^α| with r_t = (L_t / L_t(0)) / mean(L / L(0)) held
  constant. L_t(0) is the loss at the first step (the paper's choice; LibMTL uses the first
  epoch's mean); with partial labels, at the first step whose batch labels task t. The model
  descends Σ_t sg(w_t) L_t.
  """
  alpha = float(options.gradnorm_alpha)
  if options.level != "task":
    raise ValueError(
      "GradNorm works on task gradients; config.method.level must be 'task', got "
      f"{options.level!r}."
    )

  def init(num_rows: int):
    zeros = jnp.zeros((num_rows,), jnp.float32)
    return {"logits": zeros}, GradNormState(zeros, jnp.zeros((num_rows,), jnp.bool_))

  def weigh(gramian, task_losses, params, state: GradNormState, rng, step):
    del rng, step
    num_tasks = task_losses.shape[0]
    losses = jax.lax.stop_gradient(task_losses)
    initial = jnp.where(state.initial_set, state.initial_losses, losses)
    weights = num_tasks * jax.nn.softmax(params["logits"])
    norms = jnp.sqrt(jnp.maximum(jnp.diag(jax.lax.stop_gradient(gramian)), 0.0))
    weighted_norms = weights * norms
    ratios = losses / jnp.where(initial > 0, initial, 1.0)
    relative = ratios / jnp.maximum(jnp.mean(ratios), 1e-12)
    target = jax.lax.stop_gradient(jnp.mean(weighted_norms) * relative**alpha)
    weighting_loss = jnp.sum(jnp.abs(weighted_norms - target))
    fixed = jax.lax.stop_gradient(weights)
    new_state = GradNormState(initial, jnp.ones_like(state.initial_set))
    return fixed, new_state, {"weights": fixed, "weighting_loss": weighting_loss}

  description = f"gradient normalisation (alpha {alpha:g})"
  return GramianWeighting("gradnorm", init, weigh, description, levels=("task",))


@gramian_method("imtl_g", "impartial MTL, gradient balance (IMTL-G alone)")
def _imtl_g(gramian: jax.Array, options: ml_collections.ConfigDict) -> jax.Array:
  """IMTL-G (Liu et al. 2021) alone, at every level; `imtl` adds IMTL-L's loss scales at level
  'task'. See `imtl_g_weights`."""
  del options
  return imtl_g_weights(gramian)


@gramian_method("dualproj", "the mean gradient projected onto the dual cone")
def _dualproj(gramian: jax.Array, options: ml_collections.ConfigDict) -> jax.Array:
  """DualProj (Lopez-Paz & Ranzato 2017's projection; Quinton & Rey 2024); see
  `dualproj_weights`."""
  return dualproj_weights(gramian, int(options.solver_iterations))


@gramian_method("config", "ConFIG: conflict-free inverse gradients")
def _config(gramian: jax.Array, options: ml_collections.ConfigDict) -> jax.Array:
  """ConFIG (Liu et al. 2025) with `config_eigenvalue_cutoff`; see `config_weights`."""
  return config_weights(gramian, float(options.config_eigenvalue_cutoff))


@gramian_method("fairgrad", "alpha-fair resource allocation among tasks")
def _fairgrad(gramian: jax.Array, options: ml_collections.ConfigDict) -> jax.Array:
  """FairGrad (Ban & Ji 2024) with `fairgrad_alpha` and `fairgrad_iterations` Newton steps; see
  `fairgrad_weights`."""
  return fairgrad_weights(gramian, float(options.fairgrad_alpha), int(options.fairgrad_iterations))


class CRMOGMState(NamedTuple):
  """CR-MOGM's state: the wrapped method's state and the last smoothed weights."""

  base: Any
  weights: jax.Array
  started: jax.Array


@register("cr_mogm")
def correlation_reduced(options: ml_collections.ConfigDict) -> GramianWeighting:
  """CR-MOGM (Zhou et al. 2022): a moving average of another Gramian weighting's weights.

  λ_k = α λ_{k-1} + (1 - α) λ̂_k with λ̂_k the weights of `cr_mogm_base` at step k and
  α = `cr_mogm_alpha`; the first step's weights are the base method's (λ_0 = λ̂_1, as TorchJD).
  The smoothed weights multiply the current gradients (the gradients are not averaged), which
  reduces the correlation between the weights and the gradients' sampling noise. Task level
  only: the average follows each row's identity across steps, which samples do not keep. The
  base method's parameters and weighting loss (e.g. IMTL-L's) pass through. α is constant here
  (the paper's analysis lets it grow towards 1 as the learning rate decays).
  """
  alpha = float(options.cr_mogm_alpha)
  base = get(str(options.cr_mogm_base), options)
  if not isinstance(base, GramianWeighting) or base.name == "cr_mogm" or "task" not in base.levels:
    raise ValueError(
      f"config.method.cr_mogm_base: must name a Gramian weighting defined at level 'task' "
      f"(not cr_mogm), got {options.cr_mogm_base!r}."
    )

  def init(num_rows):
    params, state = base.init(num_rows)
    weights = jnp.zeros((num_rows,), jnp.float32)
    return params, CRMOGMState(state, weights, jnp.zeros((), jnp.bool_))

  def weigh(gramian, task_losses, params, state: CRMOGMState, rng, step):
    current, base_state, aux = base.weigh(gramian, task_losses, params, state.base, rng, step)
    fixed = jax.lax.stop_gradient(current)
    weights = jnp.where(state.started, alpha * state.weights + (1.0 - alpha) * fixed, fixed)
    new_state = CRMOGMState(base_state, weights.astype(state.weights.dtype), jnp.ones((), bool))
    return weights, new_state, {**aux, "weights": weights}

  description = f"correlation-reduced {base.name} (moving average of weights, alpha {alpha:g})"
  return GramianWeighting("cr_mogm", init, weigh, description, levels=("task",))
