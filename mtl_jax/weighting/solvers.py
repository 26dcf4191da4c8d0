"""Small jit-able solvers in Gramian space shared by the gradient weightings.

Every solver runs inside the jitted train step (no data-dependent Python loops). The three
constrained problems (the min-norm point of the simplex, the box-constrained QP behind the
dual-cone projection, and CAGrad's dual) are solved the same way: short runs of accelerated
projected gradient find which weights are zero, an exact linear solve on the others (the
"polish") gives the optimum for that support, and the loop stops once a point carries a
certificate of optimality: its duality gap is at most `TOLERANCE`² times the objective (the
direction is then within `TOLERANCE` of the optimum's, relatively), or, for a polished point,
indistinguishable from zero in float32 (`ROUNDOFF`). A rule on how far the weights moved in one
iteration is not a certificate: slow progress looks like convergence (on nearly opposite
gradients such a rule ends CAGrad's solve with its dual objective at 3x the optimum).

What float32 cannot promise. On Gramians that are nearly singular (two gradients nearly
opposite), rounding the Gramian itself to float32 moves the exact optimum of the UPGrad and
CAGrad problems by up to a few percent (the information is below float32's resolution of G),
and float32 arithmetic on G moves the solvers' answer by as much. The certificate then says
that the answer is optimal up to the float32 round-off of the terms it is computed from.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Added to squared norms before dividing; the Gramians here are normalised to unit mean
# diagonal first, so this is far below any real gradient's squared norm.
EPSILON = 1e-8
# The relative accuracy of the directions the certificates promise: a gap of TOLERANCE² times
# the objective bounds the direction's error by about TOLERANCE times its norm.
TOLERANCE = 1e-4
# A float32 sum of n terms is exact to about n·eps times the sum of their magnitudes; a gap
# below this many eps of its terms' magnitudes cannot be told from zero.
ROUNDOFF = 16.0 * float(jnp.finfo(jnp.float32).eps)
# Accelerated projected gradient iterations between two polish-and-certify checks.
CHECK_EVERY = 8
# Checks in a row that must leave a support unchanged before it is polished.
SETTLED_ROUNDS = 2
# Primal-dual active-set steps of one box-QP polish (each one linear solve).
ACTIVE_SET_STEPS = 4


def symmetric(gramian: jax.Array) -> jax.Array:
  """(G + Gᵀ) / 2 in float32: removes round-off asymmetry before eigen-solvers."""
  gramian = jnp.asarray(gramian, jnp.float32)
  return 0.5 * (gramian + gramian.T)


def normalise(gramian: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scales G to unit mean diagonal; returns (G / s, s) with s = trace(G) / R (1 when G = 0).

  Every weighting in this package gives the same weights for G and s·G (their weights are
  scale-invariant), so normalising first only improves the conditioning of the solvers.
  """
  gramian = symmetric(gramian)
  scale = jnp.trace(gramian) / gramian.shape[0]
  scale = jnp.where(scale > 0, scale, 1.0)
  return gramian / scale, scale


def largest_eigenvalue(gramian: jax.Array) -> jax.Array:
  """λ_max of a symmetric PSD matrix, at least EPSILON (a safe inverse step size)."""
  return jnp.maximum(jnp.linalg.eigvalsh(gramian)[-1], EPSILON)


def project_to_simplex(vector: jax.Array) -> jax.Array:
  """Euclidean projection onto {w ≥ 0, Σ w = 1} (the sort-based algorithm of Duchi et al. 2008)."""
  size = vector.shape[-1]
  descending = jnp.sort(vector)[::-1]
  cumulative = jnp.cumsum(descending)
  ranks = jnp.arange(1, size + 1, dtype=vector.dtype)
  # The number of coordinates that stay positive; at least 1 since the first test is always 1 > 0.
  support = jnp.sum(descending - (cumulative - 1.0) / ranks > 0)
  threshold = (cumulative[support - 1] - 1.0) / support
  return jnp.maximum(vector - threshold, 0.0)


# ----------------------------------------------------------------------------------------------
# The shared machinery: accelerated steps, and the loop that stops on a certificate.


def accelerated_steps(
  gradient: Callable[[jax.Array], jax.Array],
  project: Callable[[jax.Array], jax.Array],
  step_size: jax.Array,
  state: tuple[jax.Array, jax.Array, jax.Array],
  steps: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`steps` iterations of FISTA with gradient-based adaptive restart (O'Donoghue & Candès).

  Problems may be batched along leading axes (one problem per row); each row restarts on its own.

  Args:
    gradient: x -> ∇f(x) of a smooth convex objective.
    project: Euclidean projection onto the feasible set.
    step_size: 1 / L for an L-smooth objective.
    state: (current, previous, momentum); momentum has the leading (batch) shape of current.
    steps: the number of iterations.

  Returns:
    The new state.
  """

  def body(_, carry):
    current, previous, momentum = carry
    factor = ((momentum - 1.0) / (momentum + 2.0))[..., None]
    extrapolated = current + factor * (current - previous)
    candidate = project(extrapolated - step_size * gradient(extrapolated))
    # Restart: drop the momentum when the step points uphill.
    uphill = jnp.sum((extrapolated - candidate) * (candidate - current), axis=-1) > 0
    candidate = jnp.where(
      uphill[..., None], project(current - step_size * gradient(current)), candidate
    )
    return candidate, current, jnp.where(uphill, 0.0, momentum + 1.0)

  return jax.lax.fori_loop(0, steps, body, state)


def _keep_better(candidate, candidate_excess, best, best_excess):
  """Per row, the point with the smaller certificate excess (non-finite excess never wins)."""
  candidate_excess = jnp.where(jnp.isfinite(candidate_excess), candidate_excess, jnp.inf)
  better = candidate_excess < best_excess
  return jnp.where(better[..., None], candidate, best), jnp.where(
    better, candidate_excess, best_excess
  )


def certified_minimum(
  advance: Callable,
  polish: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
  excess: Callable[[jax.Array], jax.Array],
  support: Callable[[jax.Array], jax.Array],
  state,
  current: Callable[[object], jax.Array],
  max_rounds: int,
) -> jax.Array:
  """Alternates `advance` with polish-and-certify until every row holds a certified point.

  The polish (a linear solve per row) runs at the start (unless every support is empty) and
  then only after a round that left the support of every uncertified row unchanged: while a
  support still moves, a solve on it would be wasted, and at R = 48 rows the solves cost more
  than the iterations.

  Args:
    advance: state -> state (a few iterations of an iterative method).
    polish: x -> (exact solution on x's support, its certificate excess); +inf when infeasible.
    excess: x -> certificate excess of an iterate: ≤ 0 certifies it.
    support: x -> boolean mask of the coordinates not at a bound.
    state: the iterative method's start state.
    current: state -> its current iterate.
    max_rounds: the most calls of `advance`.

  Returns:
    The certified point of each row, or the one with the smallest excess after max_rounds.
  """

  def with_polish(point, best, best_excess):
    polished, polished_excess = polish(point)
    return _keep_better(polished, polished_excess, best, best_excess)

  start = current(state)
  best, best_excess = start, jnp.full(start.shape[:-1], jnp.inf, start.dtype)
  # On an empty support the polish would only return the start (UPGrad's rows begin there).
  best, best_excess = jax.lax.cond(
    jnp.any(support(start)), with_polish, lambda _, b, e: (b, e), start, best, best_excess
  )
  best, best_excess = _keep_better(start, excess(start), best, best_excess)

  def body(carry):
    count, state, best, best_excess, previous_support, unchanged, polished_support = carry
    state = advance(state)
    point = current(state)
    point_support = support(point)
    open_rows = best_excess > 0
    unchanged = jnp.where(jnp.all(point_support == previous_support, axis=-1), unchanged + 1, 0)
    settled = (unchanged >= SETTLED_ROUNDS) | ~open_rows
    # A support already polished would give the same solution again.
    new = jnp.any(open_rows & jnp.any(point_support != polished_support, axis=-1))
    polish_now = jnp.all(settled) & new
    best, best_excess = jax.lax.cond(
      polish_now, with_polish, lambda _, b, e: (b, e), point, best, best_excess
    )
    polished_support = jnp.where(polish_now, point_support, polished_support)
    best, best_excess = _keep_better(point, excess(point), best, best_excess)
    return count + 1, state, best, best_excess, point_support, unchanged, polished_support

  def keep_going(carry):
    count, _, _, best_excess, _, _, _ = carry
    return (count < max_rounds) & jnp.any(best_excess > 0)

  start_support = support(start)
  carry = (
    jnp.zeros((), jnp.int32),
    state,
    best,
    best_excess,
    start_support,
    jnp.zeros(start.shape[:-1], jnp.int32),
    start_support,
  )
  return jax.lax.while_loop(keep_going, body, carry)[2]


def _rounds(iterations: int) -> int:
  """Check rounds for a budget of `iterations` accelerated steps (at least one)."""
  return max(1, -(-int(iterations) // CHECK_EVERY))


# ----------------------------------------------------------------------------------------------
# Quadratic programs over the simplex (MGDA's min-norm point).


def simplex_gap(
  linear: jax.Array, hessian: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Frank-Wolfe gap of q(w) = lᵀw + ½ wᵀHw over the simplex, and the magnitude of its terms.

  The gap ∇q(w)ᵀw - min_i ∇q(w)_i bounds q(w) - q* from above (convexity), and vanishes only at
  the optimum.
  """
  gradient = linear + hessian @ weights
  # Summed as Σ w_i (∇_i - min ∇): non-negative terms, so round-off cannot make it negative.
  gap = weights @ (gradient - jnp.min(gradient))
  magnitude = jnp.max(jnp.abs(linear) + jnp.abs(hessian) @ jnp.abs(weights))
  return gap, magnitude


def polish_on_simplex_support(
  linear: jax.Array, hessian: jax.Array, support: jax.Array
) -> jax.Array:
  """argmin of lᵀw + ½wᵀHw over {Σw = 1, w_i = 0 off the support} (its KKT system by LU).

  Unknowns (w, μ): support rows (Hw)_i - μ = -l_i, other rows w_i = 0, and Σ w = 1. Singular
  systems (duplicate or zero gradients on the support) give non-finite values, which the
  callers reject. (Not `lstsq`: on XLA:CPU its SVD is thousands of times slower than LU;
  BENCHMARKS.md, 'Gradient-weighting methods'.)
  """
  size = linear.shape[0]
  dtype = hessian.dtype
  identity = jnp.eye(size, dtype=dtype)
  top = jnp.concatenate(
    [jnp.where(support[:, None], hessian, identity), -support[:, None].astype(dtype)], axis=1
  )
  bottom = jnp.concatenate([jnp.ones((1, size), dtype), jnp.zeros((1, 1), dtype)], axis=1)
  right = jnp.concatenate([jnp.where(support, -linear, 0.0), jnp.ones((1,), dtype)])
  return jnp.linalg.solve(jnp.concatenate([top, bottom]), right)[:size]


def _feasible_weights(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(weights clipped to ≥ 0 and renormalised, whether they were ≥ 0 up to round-off)."""
  feasible = jnp.all(weights >= -ROUNDOFF * jnp.max(jnp.abs(weights))) & jnp.all(
    jnp.isfinite(weights)
  )
  clipped = jnp.maximum(weights, 0.0)
  return clipped / jnp.maximum(jnp.sum(clipped), EPSILON), feasible


def simplex_quadratic(
  linear: jax.Array, hessian: jax.Array, start: jax.Array, iterations: int
) -> jax.Array:
  """argmin over the simplex of lᵀw + ½wᵀHw (H PSD), certified by its Frank-Wolfe gap.

  For MGDA (l = 0, H = G) the gap also bounds the direction: ‖Jᵀ(w - w*)‖² ≤ 2·gap, so a gap of
  TOLERANCE² ½wᵀGw puts the direction within TOLERANCE of the optimum's.

  Args:
    linear: l, [R].
    hessian: H, [R, R].
    start: a point of the simplex.
    iterations: the most accelerated projected gradient iterations.
  """
  step = 1.0 / largest_eigenvalue(hessian)

  def allowed(weights, magnitude, exact):
    target = TOLERANCE**2 * jnp.maximum(0.5 * weights @ hessian @ weights, 0.0)
    return jnp.where(exact, jnp.maximum(target, ROUNDOFF * magnitude), target)

  def excess(weights):
    gap, magnitude = simplex_gap(linear, hessian, weights)
    return gap - allowed(weights, magnitude, False)

  def polish(weights):
    polished, feasible = _feasible_weights(polish_on_simplex_support(linear, hessian, weights > 0))
    gap, magnitude = simplex_gap(linear, hessian, polished)
    return polished, jnp.where(feasible, gap - allowed(polished, magnitude, True), jnp.inf)

  def advance(state):
    return accelerated_steps(
      lambda w: linear + hessian @ w, project_to_simplex, step, state, CHECK_EVERY
    )

  state = (start, start, jnp.zeros((), start.dtype))
  return certified_minimum(
    advance, polish, excess, lambda w: w > 0, state, lambda s: s[0], _rounds(iterations)
  )


def min_norm_simplex(gramian: jax.Array, iterations: int) -> jax.Array:
  """argmin over the simplex of wᵀGw (MGDA's min-norm point of the convex hull of the rows)."""
  size = gramian.shape[0]
  start = jnp.full((size,), 1.0 / size, gramian.dtype)
  return simplex_quadratic(jnp.zeros((size,), gramian.dtype), gramian, start, iterations)


# ----------------------------------------------------------------------------------------------
# The box-constrained QP of the dual-cone projection (UPGrad).


def _box_certificate(gramian, rows, lower_bounds, exact):
  """Certificate excess per row of V for min vᵀGv s.t. v ≥ u (the dual of projecting Jᵀu).

  With d = Jᵀv and Jd = Gv ≥ 0 (d in the cone), the duality gap of the projection is
  (v - u)ᵀGv and bounds ½‖d - d*‖²; a row is certified when the gap is at most TOLERANCE²·½vᵀGv
  and no (Gv)_i is negative beyond round-off.
  """
  products = rows @ gramian
  magnitudes = jnp.abs(rows) @ jnp.abs(gramian)
  gap = jnp.sum((rows - lower_bounds) * products, axis=-1)
  target = TOLERANCE**2 * jnp.maximum(0.5 * jnp.sum(rows * products, axis=-1), 0.0)
  rounding = ROUNDOFF * jnp.sum((rows - lower_bounds) * magnitudes, axis=-1)
  gap_excess = gap - jnp.where(exact, jnp.maximum(target, rounding), target)
  infeasibility = jnp.max(-products - ROUNDOFF * magnitudes, axis=-1)
  return jnp.maximum(gap_excess, infeasibility)


def _polish_box_row(gramian, row, bounds):
  """Exact solution of min vᵀGv s.t. v ≥ u by a few primal-dual active-set steps from `row`.

  Each step fixes at their bounds the coordinates whose multiplier (Gv)_k outweighs their
  distance to the bound, and solves (Gv)_i = 0 for the others (Hintermüller, Ito & Kunisch's
  primal-dual active-set method, finite on small problems). Starting from an iterate, a
  coordinate that the slow iterations have not yet lifted off its bound but whose gradient
  points up is freed at once, so the polish does not depend on the iterates' support being
  exact (on nearly opposite rows it is not, for thousands of iterations). Solves by LU
  (Cholesky is cheaper but up to 5x less accurate on nearly opposite rows); a singular system
  gives non-finite values, which the caller rejects.
  """
  size = gramian.shape[0]
  scale = jnp.trace(gramian) / size

  def solve(point, _):
    multipliers = point @ gramian
    free = multipliers - scale * (point - bounds) <= 0
    system = jnp.where(free[:, None], gramian, jnp.eye(size, dtype=gramian.dtype))
    return jnp.linalg.solve(system, jnp.where(free, 0.0, bounds)), None

  solution, _ = jax.lax.scan(solve, row, None, length=ACTIVE_SET_STEPS)
  largest = jnp.max(jnp.abs(solution))
  feasible = jnp.all(solution >= bounds - ROUNDOFF * largest) & jnp.all(jnp.isfinite(solution))
  return jnp.maximum(solution, bounds), feasible


def project_onto_dual_cone(
  gramian: jax.Array, lower_bounds: jax.Array, iterations: int
) -> jax.Array:
  """Rows of V with V[k] = argmin_{v ≥ lower_bounds[k]} vᵀ G v, solved jointly for all k.

  With lower_bounds[k] = u and G = J Jᵀ, Jᵀ V[k] is the projection of Jᵀu onto the dual cone
  {d : J d ≥ 0} (the dual of min ‖d - Jᵀu‖² s.t. J d ≥ 0 is this box-constrained QP). Each row
  stops on its own duality-gap certificate (`_box_certificate`); the loop ends when all hold.
  """
  step = 1.0 / (2.0 * largest_eigenvalue(gramian))

  def polish(rows):
    polished, feasible = jax.vmap(lambda row, bounds: _polish_box_row(gramian, row, bounds))(
      rows, lower_bounds
    )
    return polished, jnp.where(
      feasible, _box_certificate(gramian, polished, lower_bounds, True), jnp.inf
    )

  def advance(state):
    return accelerated_steps(
      lambda v: 2.0 * v @ gramian, lambda v: jnp.maximum(v, lower_bounds), step, state, CHECK_EVERY
    )

  state = (lower_bounds, lower_bounds, jnp.zeros(lower_bounds.shape[:1], lower_bounds.dtype))
  return certified_minimum(
    advance,
    polish,
    lambda rows: _box_certificate(gramian, rows, lower_bounds, False),
    lambda rows: rows > lower_bounds,
    state,
    lambda s: s[0],
    _rounds(iterations),
  )


# ----------------------------------------------------------------------------------------------
# CAGrad's dual.


def cagrad_gap(gramian, linear, radius, weights):
  """Frank-Wolfe gap of F(w) = wᵀs + ρ√(wᵀGw) over the simplex, and the magnitude of its terms.

  The magnitude includes the float32 uncertainty of η = √(wᵀGw) itself: wᵀGw is a sum of terms
  up to |w|ᵀ|G||w| that cancel when the rows nearly cancel, and ∇F depends on 1/η.
  """
  combined = gramian @ weights
  norm = jnp.sqrt(jnp.maximum(weights @ combined, EPSILON**2))
  gradient = linear + (radius / norm) * combined
  gap = weights @ (gradient - jnp.min(gradient))
  absolute = jnp.abs(gramian) @ jnp.abs(weights)
  norm_uncertainty = (jnp.abs(weights) @ absolute) / (2.0 * norm)
  magnitude = jnp.max(
    jnp.abs(linear)
    + (radius / norm) * absolute
    + (radius / norm**2) * jnp.abs(combined) * norm_uncertainty
  )
  return gap, magnitude


def polish_cagrad_on_support(gramian, linear, radius, support):
  """The exact minimiser of F(w) = wᵀs + ρ√(wᵀGw) over {Σw = 1, w = 0 off the support}.

  Stationarity on the support, s + (ρ/η) G w = μ1 with η = √(wᵀGw), is linear in w once
  t = η/ρ is fixed: w = p + t q, where p solves the min-norm KKT system (right side 1 for Σw)
  and q the same system with right side -s on the support and 0 for Σw (so Σq = 0). Then
  η² = (p + tq)ᵀG(p + tq) = (ρt)² is a quadratic in t, (ρ² - C)t² - 2Bt - A = 0 with
  A = pᵀGp, B = pᵀGq, C = qᵀGq, whose positive root is taken in the form without cancellation.
  When ρ² ≤ C the objective has no finite minimiser on the support's affine hull; the result is
  then non-finite and rejected by the caller.
  """
  size = linear.shape[0]
  dtype = gramian.dtype
  identity = jnp.eye(size, dtype=dtype)
  top = jnp.concatenate(
    [jnp.where(support[:, None], gramian, identity), -support[:, None].astype(dtype)], axis=1
  )
  bottom = jnp.concatenate([jnp.ones((1, size), dtype), jnp.zeros((1, 1), dtype)], axis=1)
  right = jnp.stack(
    [
      jnp.concatenate([jnp.zeros((size,), dtype), jnp.ones((1,), dtype)]),
      jnp.concatenate([jnp.where(support, -linear, 0.0), jnp.zeros((1,), dtype)]),
    ],
    axis=1,
  )
  solution = jnp.linalg.solve(jnp.concatenate([top, bottom]), right)[:size]
  p, q = solution[:, 0], solution[:, 1]
  a, b, c = p @ gramian @ p, p @ gramian @ q, q @ gramian @ q
  curvature = radius**2 - c
  root = jnp.sqrt(jnp.maximum(b * b + a * curvature, 0.0))
  t = jnp.where(b >= 0, (b + root) / curvature, jnp.maximum(a, 0.0) / (root - b))
  t = jnp.where(curvature > 0, t, jnp.nan)
  return p + t * q


def cagrad_dual(gramian: jax.Array, radius: jax.Array, iterations: int) -> jax.Array:
  """argmin over the simplex of F(w) = wᵀGb + ρ√(wᵀGw) (b = 1/R): CAGrad's dual, certified.

  The support is found by majorise-minimise: √x ≤ x/(2η) + η/2 at the current η = √(wᵀGw)
  turns F into a simplex QP, on which a few accelerated steps are taken before η is updated;
  after each such round the exact minimiser on the iterate's support (`polish_cagrad_on_support`)
  is certified by F's Frank-Wolfe gap.

  Args:
    gramian: [R, R] normalised Gramian.
    radius: ρ = c‖g_0‖.
    iterations: the most accelerated steps in all.
  """
  size = gramian.shape[0]
  linear = gramian @ jnp.full((size,), 1.0 / size, gramian.dtype)
  largest = largest_eigenvalue(gramian)

  def advance(weights):
    curvature = radius / jnp.sqrt(jnp.maximum(weights @ gramian @ weights, EPSILON**2))
    state = (weights, weights, jnp.zeros((), weights.dtype))
    state = accelerated_steps(
      lambda w: linear + curvature * (gramian @ w),
      project_to_simplex,
      1.0 / (curvature * largest + EPSILON),
      state,
      CHECK_EVERY,
    )
    return state[0]

  def polish(weights):
    polished, feasible = _feasible_weights(
      polish_cagrad_on_support(gramian, linear, radius, weights > 0)
    )
    gap, magnitude = cagrad_gap(gramian, linear, radius, polished)
    return polished, jnp.where(feasible, gap - ROUNDOFF * magnitude, jnp.inf)

  def excess(weights):
    gap, _ = cagrad_gap(gramian, linear, radius, weights)
    # An iterate is certified only by an exactly vanishing gap (an optimal vertex, equal rows).
    return jnp.where(gap <= 0, -1.0, gap)

  start = jnp.full((size,), 1.0 / size, gramian.dtype)
  return certified_minimum(
    advance, polish, excess, lambda w: w > 0, start, lambda w: w, _rounds(iterations)
  )


# ----------------------------------------------------------------------------------------------
# Nash-MTL's bargaining condition.


def nash_bargaining(gramian: jax.Array, iterations: int, ridge: float = 0.0) -> jax.Array:
  """The α > 0 with (G + ridge·I) α = 1/α, by damped Newton on a self-concordant objective.

  The condition is the stationarity condition of f(α) = ½ αᵀ(G + ridge·I)α - Σ log α_k, which
  is strictly convex and self-concordant on α > 0. The damped Newton step α ← α + Δ/(1 + λ),
  λ² = -∇fᵀΔ (the Newton decrement), never leaves α > 0 and converges quadratically near the
  solution (Nesterov & Nemirovski).

  Without a ridge (the default, as in Nash-MTL and TorchJD) the solution exists whenever no
  non-negative combination of the rows' gradients vanishes. When one does (a zero gradient,
  exactly opposite gradients), f is unbounded below along it and has no minimiser: the damped
  steps then grow α along that combination by a bounded factor per step, so α stays finite
  after `iterations` steps, and the part of α that grows multiplies a vanishing combination of
  gradients, so it does not change the direction Σ α_k g_k (which tends to the limit of the
  solutions). A ridge > 0 makes a finite solution exist (a zero gradient's α becomes
  1/√ridge), but of a different condition: a ridge of 1e-6 moves the direction by up to ~2e-3
  on well-conditioned Gramians and by ~0.5 when two gradients nearly cancel.

  Args:
    gramian: [R, R] PSD, normalised (e.g. to unit Frobenius norm as Nash-MTL does).
    iterations: fixed number of Newton steps.
    ridge: added to the diagonal (0 solves Nash-MTL's condition itself).

  Returns:
    α, shape [R].
  """
  size = gramian.shape[0]
  regularised = gramian + ridge * jnp.eye(size, dtype=gramian.dtype)
  # Exact when G is diagonal; a good start otherwise (a zero gradient starts large and grows).
  start = 1.0 / jnp.sqrt(jnp.maximum(jnp.diag(regularised), EPSILON))

  def body(_, alpha):
    residual = regularised @ alpha - 1.0 / alpha
    hessian = regularised + jnp.diag(1.0 / alpha**2)
    delta = -jnp.linalg.solve(hessian, residual)
    decrement = jnp.sqrt(jnp.maximum(-jnp.dot(residual, delta), 0.0))
    updated = alpha + delta / (1.0 + decrement)
    # Guards against round-off at the boundary (the exact damped step is always interior) and
    # keeps the last good iterate if a float32 solve breaks down.
    updated = jnp.maximum(updated, 1e-3 * alpha)
    return jnp.where(jnp.all(jnp.isfinite(updated)), updated, alpha)

  return jax.lax.fori_loop(0, iterations, body, start)


# ----------------------------------------------------------------------------------------------
# FairGrad's α-fair allocation.

# Step lengths tried by each Newton step's backtracking (1, 1/2, ..., 2^-29), all at once. NumPy,
# not jnp: a JAX array made at import would start a backend before jax.distributed.initialize.
_BACKTRACKING_STEPS = 0.5 ** np.arange(30, dtype=np.float32)


def alpha_fair_allocation(gramian: jax.Array, alpha: float, iterations: int) -> jax.Array:
  """The w > 0 with (G w)_i = w_i^(-1/α) for every i (FairGrad), by damped Newton steps.

  The condition is the stationarity condition of the strictly convex function
  f(w) = ½ wᵀGw - Σ_i ψ(w_i) on w > 0, with ψ(w) = α/(α-1) w^((α-1)/α) (log w when α = 1):
  its Hessian G + diag(w^(-1/α-1)/α) is positive definite. Each Newton step is backtracked
  : the longest of 1, 1/2, 1/4, ... that keeps w > 0 and either decreases f enough (Armijo) or
  reduces the residual ‖Gw - w^(-1/α)‖ (near the solution, where float32 cannot resolve f).
  The start w_i = G_ii^(-α/(α+1)) is exact for a diagonal G. At α = 1 this is Nash-MTL's
  bargaining condition. As in `nash_bargaining`, the condition has no solution when a
  non-negative combination of the rows vanishes (a zero row); w then grows along that
  combination, which leaves the direction Σ w_i g_i unchanged.

  Args:
    gramian: [R, R] PSD (normalised: the solution for sG is s^(-α/(α+1)) times that for G).
    alpha: α > 0.
    iterations: the number of Newton steps.

  Returns:
    w, shape [R].
  """
  exponent = -1.0 / alpha
  start = jnp.maximum(jnp.diag(gramian), EPSILON) ** (-alpha / (alpha + 1.0))
  steps = jnp.asarray(_BACKTRACKING_STEPS, gramian.dtype)

  def objective(weights):
    if alpha == 1.0:
      barrier = jnp.sum(jnp.log(weights))
    else:
      barrier = alpha / (alpha - 1.0) * jnp.sum(weights ** (1.0 + exponent))
    return 0.5 * weights @ gramian @ weights - barrier

  def residual(weights):
    return weights @ gramian - weights**exponent

  def body(_, weights):
    gradient = residual(weights)
    hessian = gramian + jnp.diag(weights ** (exponent - 1.0) / alpha)
    delta = -jnp.linalg.solve(hessian, gradient)
    candidates = weights[None, :] + steps[:, None] * delta[None, :]
    positive = jnp.all(candidates > 0, axis=1)
    safe = jnp.where(positive[:, None], candidates, 1.0)
    values = jax.vmap(objective)(safe)
    # Strict inequalities: a step too short to change f or the residual in float32 is no step.
    sufficient = values < objective(weights) + 1e-4 * steps * (gradient @ delta)
    smaller = jnp.sum(jax.vmap(residual)(safe) ** 2, axis=1) < jnp.sum(gradient**2)
    acceptable = positive & (sufficient | smaller) & jnp.isfinite(values)
    chosen = jnp.argmax(acceptable)
    accept = acceptable[chosen] & jnp.all(jnp.isfinite(delta))
    return jnp.where(accept, candidates[chosen], weights)

  return jax.lax.fori_loop(0, iterations, body, start)
