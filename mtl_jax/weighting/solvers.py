"""Small jit-able solvers in Gramian space shared by the gradient weightings.

Every solver runs inside the jitted train step (no data-dependent Python loops). The iterative
ones take a maximum iteration count and stop earlier, inside a `lax.while_loop`, once an
iteration changes no weight by more than a tolerance: at T = 3 a fixed 1000-iteration solve
(20 000 for CAGrad's nested one) cost more than the rest of a small train step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Added to squared norms before dividing; the Gramians here are normalised to unit mean
# diagonal first, so this is far below any real gradient's squared norm.
EPSILON = 1e-8


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


# Default stopping tolerance of the iterative solvers: the largest change of any weight in one
# iteration, for Gramians normalised to unit mean diagonal. Below it float32 iterates only
# wander in round-off (weights are O(1), float32 resolves ~1e-7 relative).
TOLERANCE = 1e-6


def accelerated_projected_gradient(
    gradient: Callable[[jax.Array], jax.Array],
    project: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    step_size: jax.Array,
    iterations: int,
    tolerance: float = TOLERANCE,
) -> jax.Array:
  """FISTA with gradient-based adaptive restart for a smooth convex objective over a convex set.

  Args:
    gradient: x -> ∇f(x).
    project: Euclidean projection onto the feasible set.
    start: a feasible starting point.
    step_size: 1 / L for an L-smooth objective.
    iterations: the maximum number of iterations.
    tolerance: stop once an iteration moves no coordinate by more than this (0: run all
      `iterations`). A small move means the extrapolated point was close to the iterate and
      the projected gradient step from it stayed put: the iterate is a near fixed point of
      x -> project(x - step·∇f(x)), which characterises the optimum.

  Returns:
    The last iterate. For a convex quadratic f(v) = ‖Jᵀv‖², ‖Jᵀ(v - v*)‖² ≤ f(v) - f(v*), so
    the direction error shrinks like 1/k without any dependence on the conditioning of G.
  """

  def body(carry):
    count, current, previous, momentum, _ = carry
    extrapolated = current + ((momentum - 1.0) / (momentum + 2.0)) * (current - previous)
    candidate = project(extrapolated - step_size * gradient(extrapolated))
    # O'Donoghue & Candès restart: drop the momentum when it points uphill.
    uphill = jnp.sum((extrapolated - candidate) * (candidate - current)) > 0
    next_momentum = jnp.where(uphill, 0.0, momentum + 1.0)
    candidate = jnp.where(uphill, project(current - step_size * gradient(current)), candidate)
    change = jnp.max(jnp.abs(candidate - current))
    return count + 1, candidate, current, next_momentum, change

  def keep_going(carry):
    count, _, _, _, change = carry
    return (count < iterations) & (change > tolerance)

  zero = jnp.zeros((), start.dtype)
  start_carry = (jnp.zeros((), jnp.int32), start, start, zero, jnp.full((), jnp.inf, start.dtype))
  _, final, _, _, _ = jax.lax.while_loop(keep_going, body, start_carry)
  return final


def _solve(matrix: jax.Array, right: jax.Array) -> jax.Array:
  """A polishing solve by LU: non-finite where the system is singular, which the callers reject.

  Not `lstsq`: its SVD measured 0.1-2 s per 48x48 system on XLA:CPU (jax 0.10.2), on Gramians
  of per-sample rows, against ~0.05 ms for LU. A singular system (duplicate or zero rows on
  the support) only means the polish is skipped and the iterative solution is kept.
  """
  return jnp.linalg.solve(matrix, right)


def _better(gramian: jax.Array, candidate: jax.Array, incumbent: jax.Array, feasible: jax.Array) -> jax.Array:
  """candidate where it is feasible and its quadratic objective is no worse, else incumbent."""
  quadratic = lambda v: jnp.einsum("...i,ij,...j->...", v, gramian, v)
  accept = feasible & (quadratic(candidate) <= quadratic(incumbent) * (1.0 + 1e-6) + 1e-12)
  return jnp.where(accept[..., None], candidate, incumbent)


def min_norm_simplex(gramian: jax.Array, iterations: int) -> jax.Array:
  """argmin over the simplex of wᵀ G w (MGDA's min-norm point of the convex hull of the rows).

  Accelerated projected gradient finds the support; one KKT solve on that support (G_FF w_F =
  μ1, Σ w_F = 1) then polishes the result to the exact optimum when the support is right.
  """
  size = gramian.shape[0]
  step = 1.0 / (2.0 * largest_eigenvalue(gramian))
  start = jnp.full((size,), 1.0 / size, jnp.float32)
  weights = accelerated_projected_gradient(lambda w: 2.0 * gramian @ w, project_to_simplex, start, step, iterations)
  free = weights > 1e-5 * jnp.max(weights)
  identity = jnp.eye(size, dtype=gramian.dtype)
  # Unknowns (w, μ): free rows (G w)_i - μ = 0, fixed rows w_i = 0, and Σ w = 1.
  top = jnp.concatenate([jnp.where(free[:, None], gramian, identity), -free[:, None].astype(gramian.dtype)], axis=1)
  bottom = jnp.concatenate([jnp.ones((1, size), gramian.dtype), jnp.zeros((1, 1), gramian.dtype)], axis=1)
  right = jnp.concatenate([jnp.zeros((size,), gramian.dtype), jnp.ones((1,), gramian.dtype)])
  solution = _solve(jnp.concatenate([top, bottom]), right)[:size]
  feasible = jnp.all(solution >= -1e-6) & (jnp.abs(jnp.sum(solution) - 1.0) < 1e-4) & jnp.all(jnp.isfinite(solution))
  polished = jnp.maximum(solution, 0.0)
  polished = polished / jnp.maximum(jnp.sum(polished), EPSILON)
  return _better(gramian, polished, weights, feasible)


def project_onto_dual_cone(gramian: jax.Array, lower_bounds: jax.Array, iterations: int) -> jax.Array:
  """Rows of V with V[k] = argmin_{v ≥ lower_bounds[k]} vᵀ G v, solved jointly for all k.

  With lower_bounds[k] = u and G = J Jᵀ, Jᵀ V[k] is the projection of Jᵀu onto the dual cone
  {d : J d ≥ 0} (the dual of min ‖d - Jᵀu‖² s.t. J d ≥ 0 is this box-constrained QP).
  """
  step = 1.0 / (2.0 * largest_eigenvalue(gramian))
  projections = accelerated_projected_gradient(
      lambda v: 2.0 * v @ gramian, lambda v: jnp.maximum(v, lower_bounds), lower_bounds, step, iterations
  )
  # Polish each row on the active set found: free coordinates satisfy (G v)_i = 0, the others
  # sit at their bound; accepted only where feasible and no worse.
  size = gramian.shape[0]
  identity = jnp.eye(size, dtype=gramian.dtype)

  def polish(row, bounds):
    free = row - bounds > 1e-5 * jnp.maximum(jnp.max(row - bounds), EPSILON)
    system = jnp.where(free[:, None], gramian, identity)
    solution = _solve(system, jnp.where(free, 0.0, bounds))
    return solution, jnp.all(solution >= bounds - 1e-6) & jnp.all(jnp.isfinite(solution))

  solutions, feasible = jax.vmap(polish)(projections, lower_bounds)
  return _better(gramian, jnp.maximum(solutions, lower_bounds), projections, feasible)


def nash_bargaining(gramian: jax.Array, iterations: int, ridge: float = 1e-6) -> jax.Array:
  """The α > 0 with (G + ridge·I) α = 1/α, by damped Newton on a self-concordant objective.

  The condition is the stationarity condition of f(α) = ½ αᵀ(G + ridge·I)α - Σ log α_k, which
  is strictly convex and self-concordant on α > 0. The damped Newton step α ← α + Δ/(1 + λ),
  λ² = -∇fᵀΔ (the Newton decrement), never leaves α > 0 and converges quadratically near the
  solution (Nesterov & Nemirovski). The ridge keeps the solution finite when a row's gradient is
  zero (that row's α is then 1/√ridge, and it multiplies a zero gradient).

  Args:
    gramian: [R, R] PSD, normalised (e.g. to unit Frobenius norm as Nash-MTL does).
    iterations: fixed number of Newton steps.
    ridge: added to the diagonal.

  Returns:
    α, shape [R].
  """
  size = gramian.shape[0]
  regularised = gramian + ridge * jnp.eye(size, dtype=gramian.dtype)
  # Exact when G is diagonal; a good start otherwise.
  start = 1.0 / jnp.sqrt(jnp.diag(regularised))

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
