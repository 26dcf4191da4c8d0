"""The solvers of MGDA, UPGrad, CAGrad and Nash-MTL against float64 optima of the same problems.

Our weights come from a float32 Gramian under jax.jit. The references are computed here in
float64 on coordinates, by other methods than the solvers': MGDA's min-norm point and UPGrad's
dual-cone projections by non-negative least squares, CAGrad from its primal problem (maximise
the worst task's improvement within a ball, by SLSQP), Nash-MTL's α by BFGS on log α.

Two families of inputs: rows of random directions with norms spread over 0.1-10 (well posed:
the float64 optimum of J is the target), and nearly opposite rows (g1 = -g0 + 1e-3 noise),
where the float32 Gramian no longer determines the optimum to 1e-4: rounding G to float32
moves the exact optimum by up to several percent. There the target is the float64 optimum of
the float32 Gramian we pass, up to that problem's own sensitivity to one float32 ulp.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtl_jax.weighting import gramian_based as gb
from mtl_jax.weighting import solvers

C = 0.5
_jit = functools.partial(
  jax.jit,
  compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
)
WEIGHTS = {
  "mgda": _jit(lambda g: gb.mgda_weights(g, 1000)),
  "upgrad": _jit(lambda g: gb.upgrad_weights(g, 1000)),
  "cagrad": _jit(lambda g: gb.cagrad_weights(g, C, 1, 20, 1000)),
  "nash_mtl": _jit(lambda g: gb.nash_mtl_weights(g, 50, 0.0)),
}
SEEDS = range(8)


def spread_jacobian(seed, tasks=4, dimension=17):
  generator = np.random.default_rng(seed)
  norms = np.exp(generator.uniform(np.log(0.1), np.log(10.0), size=(tasks, 1)))
  return generator.normal(size=(tasks, dimension)) * norms


def nearly_opposite_jacobian(seed, dimension=17):
  generator = np.random.default_rng(seed)
  jacobian = generator.normal(size=(3, dimension))
  jacobian[1] = -jacobian[0] + 1e-3 * generator.normal(size=dimension)
  return jacobian


def factor(gramian):
  """Rows F with F Fᵀ = G (float64), standing for the gradients a Gramian describes."""
  eigenvalues, vectors = np.linalg.eigh(gramian)
  return vectors * np.sqrt(np.maximum(eigenvalues, 0.0))


# ----------------------------------------------------------------------------------------------
# float64 references: each returns the coefficients c with direction cᵀJ.


def mgda_coefficients(jacobian):
  """min ‖Jᵀw‖ over the simplex: with x ≥ 0 minimising ‖Jᵀx‖² + (Σx - 1)², w = x / Σx."""
  tasks = len(jacobian)
  system = np.vstack([jacobian.T, np.ones((1, tasks))])
  target = np.concatenate([np.zeros(jacobian.shape[1]), [1.0]])
  solution, _ = optimize.nnls(system, target, maxiter=1000)
  return solution / solution.sum()


def upgrad_coefficients(jacobian):
  """The mean over rows k of u_k + μ_k, μ_k ≥ 0 minimising ‖Jᵀ(e_k + μ_k)‖² (dual-cone
  projections)."""
  tasks = len(jacobian)
  rows = [
    np.eye(tasks)[k] + optimize.nnls(jacobian.T, -jacobian[k], maxiter=1000)[0]
    for k in range(tasks)
  ]
  return np.mean(rows, axis=0)


def cagrad_primal(jacobian, c=C):
  """max_d min_k ⟨g_k, d⟩ s.t. ‖d - g_0‖ ≤ c‖g_0‖: returns (d*, the optimal value)."""
  size = jacobian.shape[1]
  mean = jacobian.mean(0)
  radius = c * np.linalg.norm(mean)
  constraints = [
    {
      "type": "ineq",
      "fun": lambda x: jacobian @ x[:size] - x[size],
      "jac": lambda x: np.hstack([jacobian, -np.ones((len(jacobian), 1))]),
    },
    {
      "type": "ineq",
      "fun": lambda x: radius**2 - np.sum((x[:size] - mean) ** 2),
      "jac": lambda x: np.concatenate([-2 * (x[:size] - mean), [0.0]])[None],
    },
  ]
  start = np.concatenate([mean, [np.min(jacobian @ mean)]])
  result = optimize.minimize(
    lambda x: -x[size],
    start,
    jac=lambda x: np.concatenate([np.zeros(size), [-1.0]]),
    method="SLSQP",
    constraints=constraints,
    options={"ftol": 1e-16, "maxiter": 2000},
  )
  return result.x[:size], result.x[size]


def cagrad_coefficients(jacobian, c=C):
  """CAGrad's direction d*/(1 + c²) written in the rows (least squares; the rows span it here)."""
  direction, _ = cagrad_primal(jacobian, c)
  return np.linalg.lstsq(jacobian.T, direction / (1 + c**2), rcond=None)[0]


def nash_mtl_coefficients(jacobian):
  """α > 0 with Ĝα = 1/α (Ĝ = G/‖G‖_F): the minimiser of ½‖Ĵᵀα‖² - Σ log α, no ridge."""
  scaled = jacobian / np.sqrt(np.linalg.norm(jacobian @ jacobian.T))

  def objective(log_alpha):
    alpha = np.exp(log_alpha)
    combined = alpha @ scaled
    return 0.5 * combined @ combined - log_alpha.sum(), alpha * (scaled @ combined) - 1.0

  result = optimize.minimize(
    objective,
    np.zeros(len(jacobian)),
    jac=True,
    method="BFGS",
    options={"gtol": 1e-13, "maxiter": 10000},
  )
  return np.exp(result.x)


REFERENCES = {
  "mgda": mgda_coefficients,
  "upgrad": upgrad_coefficients,
  "cagrad": cagrad_coefficients,
  "nash_mtl": nash_mtl_coefficients,
}


def _relative_error(ours, reference):
  return np.linalg.norm(ours - reference) / np.linalg.norm(reference)


def _our_weights(method, gramian):
  return np.asarray(WEIGHTS[method](jnp.asarray(gramian, jnp.float32)), np.float64)


@pytest.mark.parametrize("method", sorted(WEIGHTS))
def test_directions_are_within_1e_4_of_float64_optima_on_spread_rows(method):
  for seed in SEEDS:
    jacobian = spread_jacobian(seed)
    ours = _our_weights(method, jacobian @ jacobian.T) @ jacobian
    reference = REFERENCES[method](jacobian) @ jacobian
    assert _relative_error(ours, reference) < 1e-4, seed


@pytest.mark.parametrize("method", sorted(WEIGHTS))
def test_nearly_opposite_rows_are_solved_as_well_as_float32_allows(method):
  for seed in SEEDS:
    gramian = np.asarray(
      np.float32(nearly_opposite_jacobian(seed) @ nearly_opposite_jacobian(seed).T), np.float64
    )
    rows = factor(gramian)
    reference = REFERENCES[method](rows) @ rows
    # The float64 optimum's own change when every entry of G moves by one float32 ulp, all in the
    # direction that moves wᵀGw the most for w ≥ 0 (G ± ulp·|G|; a uniform scaling would not).
    sensitivity = max(
      _relative_error(
        REFERENCES[method](factor(gramian + sign * 2.0**-23 * np.abs(gramian))) @ rows, reference
      )
      for sign in (1.0, -1.0)
    )
    # What rounding the optimum's own coefficients to float32 can cost.
    coefficients = REFERENCES[method](rows)
    representation = (
      2.0**-24 * np.abs(coefficients) @ np.linalg.norm(rows, axis=1) / np.linalg.norm(reference)
    )
    error = _relative_error(_our_weights(method, gramian) @ rows, reference)
    assert error <= max(1e-4, 4.0 * (sensitivity + representation)), (
      seed,
      error,
      sensitivity,
      representation,
    )


def test_cagrad_reaches_its_dual_optimum_on_nearly_opposite_rows():
  """F(w) = wᵀGb + c‖g_0‖‖g_w‖ at the solver's w equals the primal optimum (strong duality).

  To 1e-7 of the mean G_kk, below the float32 round-off of F's terms (~6e-7); stopping when no
  weight moved by more than 1e-6 left it 2e-4 above.
  """
  dual_solver = _jit(solvers.cagrad_dual, static_argnums=2)
  mean = np.full(3, 1.0 / 3)
  for seed in SEEDS:
    jacobian = nearly_opposite_jacobian(seed)
    gramian = jacobian @ jacobian.T
    gramian = np.asarray(np.float32(gramian / np.mean(np.diag(gramian))), np.float64)
    radius = C * np.sqrt(mean @ gramian @ mean)
    weights = np.asarray(
      dual_solver(jnp.asarray(gramian, jnp.float32), jnp.float32(radius), 20000), np.float64
    )
    dual = weights @ gramian @ mean + radius * np.sqrt(weights @ gramian @ weights)
    _, optimum = cagrad_primal(factor(gramian))
    assert abs(dual - optimum) < 1e-7, (seed, dual, optimum)
