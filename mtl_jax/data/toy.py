"""The two-objective 2-D toy problem of the CAGrad paper, and two-gradient PCGrad/CAGrad directions.

The problem (Liu et al., "Conflict-Averse Gradient Descent", NeurIPS 2021) has two objectives
of a point z = (x, y). Above the x-axis each objective is a shifted log of an absolute value
(a sharp, narrow trough), below it each is a wide quadratic bowl; smooth tanh gates blend the
two halves. The troughs of the two objectives do not meet, so the mean objective's global
minimum lies in the lower half, at the end of a long, narrow valley that plain GD follows badly.

Everything here is pure `jax.numpy` on a single point `[2]` (vmap for batches), so a whole
grid of optimisation runs compiles into one program (see experiments/toy.py).

The direction functions take the two gradients and return the vector the optimiser descends:
`mean_direction` (EW on the mean objective), `pcgrad_direction` and `cagrad_direction` are the
closed forms for exactly two tasks; the general Gramian-based weightings live in
`mtl_jax.weighting`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The log pieces are clamped below at this value so that log|.| stays finite in the trough.
LOG_FLOOR = 5e-6
# The three starting points used in the CAGrad paper and in the studied paper's Table 1.
STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
# CAGrad's own toy.py (Liu et al.) keeps its square roots away from zero with these: the radius
# is c·√(|g0|² + RADIUS_EPS), the dual uses √(|g_w|² + NORM_EPS), and λ = R / (√(|g_w|² +
# NORM_EPS) + NORM_EPS). Near the valley |g0| ≈ 0.009, so they shape the direction there.
CAGRAD_RADIUS_EPS = 2.5e-5
CAGRAD_NORM_EPS = 1e-4


def objectives(point: jax.Array) -> jax.Array:
  """Both objectives at one point.

  Args:
    point: [2], the coordinates (x, y).

  Returns:
    [2]: (f1, f2).
  """
  x, y = point[0], point[1]
  # Upper half: log-troughs along the curves x = -7 + 2 tanh(y) (f1) and x = 7 - 2 tanh(y) (f2).
  trough_1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x - 7.0) - jnp.tanh(-y)), LOG_FLOOR)) + 6.0
  trough_2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x + 3.0) + jnp.tanh(-y) + 2.0), LOG_FLOOR)) + 6.0
  # Lower half: bowls centred at x = +7 (f1) and x = -7 (f2), both at y = -8, shallow in y.
  bowl_1 = ((7.0 - x) ** 2 + 0.1 * (y + 8.0) ** 2) / 10.0 - 20.0
  bowl_2 = ((-7.0 - x) ** 2 + 0.1 * (y + 8.0) ** 2) / 10.0 - 20.0
  upper_gate = jnp.maximum(jnp.tanh(0.5 * y), 0.0)
  lower_gate = jnp.maximum(jnp.tanh(-0.5 * y), 0.0)
  return jnp.stack(
    [trough_1 * upper_gate + bowl_1 * lower_gate, trough_2 * upper_gate + bowl_2 * lower_gate]
  )


def mean_objective(point: jax.Array) -> jax.Array:
  """The mean of the two objectives at one point (scalar)."""
  return jnp.mean(objectives(point))


def gradients(point: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Objective values [2] and their gradients [2 objectives, 2 coordinates] at one point."""
  return objectives(point), jax.jacrev(objectives)(point)


def mean_direction(gradient_1: jax.Array, gradient_2: jax.Array) -> jax.Array:
  """EW on the mean objective: the average of the two gradients."""
  return 0.5 * (gradient_1 + gradient_2)


def pcgrad_direction(gradient_1: jax.Array, gradient_2: jax.Array) -> jax.Array:
  """PCGrad for two tasks: when the gradients conflict, each loses its component along the other.

  With two tasks the random task order of PCGrad does not matter: each gradient is projected
  onto the normal plane of the *original* other gradient.

  Args:
    gradient_1: [D] the first task's gradient.
    gradient_2: [D] the second task's gradient.

  Returns:
    [D]: the average of the (projected) gradients, which equals the mean without conflict.
  """
  inner = jnp.dot(gradient_1, gradient_2)
  squared_1 = jnp.maximum(jnp.dot(gradient_1, gradient_1), 1e-30)
  squared_2 = jnp.maximum(jnp.dot(gradient_2, gradient_2), 1e-30)
  conflict = inner < 0
  projected_1 = gradient_1 - jnp.where(conflict, inner / squared_2, 0.0) * gradient_2
  projected_2 = gradient_2 - jnp.where(conflict, inner / squared_1, 0.0) * gradient_1
  return 0.5 * (projected_1 + projected_2)


def cagrad_weight(gradient_1: jax.Array, gradient_2: jax.Array, c: float) -> jax.Array:
  """The minimiser w in [0, 1] of CAGrad's dual objective for two tasks, in closed form.

  CAGrad looks for the direction d maximising the worst task's improvement within a ball of
  radius R = c |g0| around the mean gradient g0. Its dual over the simplex is, with
  g_w = g2 + w (g1 - g2),  F(w) = <g_w, g0> + R |g_w|, convex in w; as in CAGrad's toy.py,
  R = c sqrt(|g0|^2 + CAGRAD_RADIUS_EPS) and |g_w| is sqrt(|g_w|^2 + CAGRAD_NORM_EPS). Writing
  |g_w|^2 + CAGRAD_NORM_EPS = A w^2 + 2 B w + C and u = A w + B, the stationarity condition
  u sqrt(A) / sqrt(u^2 + D) = -<g1 - g2, g0> / R  (D = A C - B^2 >= 0) has the one root
  below; clipping it to [0, 1] gives the constrained minimiser because F is convex. When the
  right-hand side reaches +-sqrt(A), F is monotone and the minimiser is an end point. (toy.py
  searches for it numerically, to about 1e-5.)

  Args:
    gradient_1: [D] the first task's gradient.
    gradient_2: [D] the second task's gradient.
    c: the radius factor (c >= 0).

  Returns:
    Scalar w.
  """
  g0 = 0.5 * (gradient_1 + gradient_2)
  difference = gradient_1 - gradient_2
  radius = c * jnp.sqrt(jnp.dot(g0, g0) + CAGRAD_RADIUS_EPS)
  a = jnp.dot(difference, difference)
  b = jnp.dot(difference, gradient_2)
  gap = jnp.maximum(a * (jnp.dot(gradient_2, gradient_2) + CAGRAD_NORM_EPS) - b * b, 0.0)
  target = -jnp.dot(difference, g0) / jnp.maximum(radius, 1e-30)
  safe_a = jnp.maximum(a, 1e-30)
  interior = target * target < safe_a
  u = jnp.sign(target) * jnp.sqrt(
    target * target * gap / jnp.where(interior, safe_a - target * target, 1.0)
  )
  w = jnp.where(interior, (u - b) / safe_a, jnp.where(target > 0, 1.0, 0.0))
  # Equal gradients make every w the same direction; pick the middle.
  return jnp.where(a > 0, jnp.clip(w, 0.0, 1.0), 0.5)


def cagrad_direction(gradient_1: jax.Array, gradient_2: jax.Array, c: float = 0.5) -> jax.Array:
  """CAGrad's update direction for two tasks, rescaled by 1 / (1 + c) as in the CAGrad paper.

  Args:
    gradient_1: [D] the first task's gradient.
    gradient_2: [D] the second task's gradient.
    c: the radius factor; c = 0 gives the mean gradient.

  Returns:
    [D]: (g0 + λ g_w) / (1 + c) at the dual minimiser w, λ = R / (|g_w| + CAGRAD_NORM_EPS) with
    R and |g_w| as in `cagrad_weight` (CAGrad's toy.py).
  """
  g0 = 0.5 * (gradient_1 + gradient_2)
  w = cagrad_weight(gradient_1, gradient_2, c)
  g_w = w * gradient_1 + (1.0 - w) * gradient_2
  radius = c * jnp.sqrt(jnp.dot(g0, g0) + CAGRAD_RADIUS_EPS)
  multiplier = radius / (jnp.sqrt(jnp.dot(g_w, g_w) + CAGRAD_NORM_EPS) + CAGRAD_NORM_EPS)
  return (g0 + multiplier * g_w) / (1.0 + c)


DIRECTIONS = {"ew": mean_direction, "pcgrad": pcgrad_direction, "cagrad": cagrad_direction}


def global_minimum(
  grid_points: int = 801, bound: float = 10.0, newton_steps: int = 20
) -> tuple[jax.Array, float]:
  """The global minimiser of the mean objective, found numerically (no remembered constants).

  A dense grid over [-bound, bound]^2 picks the best cell; Newton's method in float64 then
  refines it (the minimiser lies in the smooth lower half, where the Hessian is positive).

  Args:
    grid_points: grid points per axis.
    bound: half-width of the searched square.
    newton_steps: Newton refinement steps.

  Returns:
    (minimiser [2] as float64 numpy-compatible array, mean objective there as a float).
  """
  with jax.enable_x64(True):
    axis = jnp.linspace(-bound, bound, grid_points, dtype=jnp.float64)
    grid = jnp.stack(jnp.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    values = jax.jit(jax.vmap(mean_objective))(grid)
    point = grid[jnp.argmin(values)]
    gradient_fn, hessian_fn = (
      jax.jit(jax.grad(mean_objective)),
      jax.jit(jax.hessian(mean_objective)),
    )
    for _ in range(newton_steps):
      point = point - jnp.linalg.solve(hessian_fn(point), gradient_fn(point))
    return jax.device_get(point), float(mean_objective(point))
