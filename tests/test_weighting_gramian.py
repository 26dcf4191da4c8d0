"""Property tests of the Gramian weightings, and comparisons with textbook Jacobian implementations.

Every method's weights w come from the Gramian G = J Jᵀ only; here each is checked against an
independent implementation that works on an explicit random Jacobian J [T, P] in float64
(coordinates, scipy solvers), comparing the directions d = wᵀJ.
"""

import functools

from hypothesis import example, given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtl_jax import weighting
from mtl_jax.weighting import gramian_based as gb
from mtl_jax.weighting import solvers
from tests.options import method_options

SETTINGS = settings(max_examples=20, deadline=None)
DIMENSION = 8
SOLVER_ITERATIONS = 1000

# One jitted function per method (shapes vary only over a few task counts); cheap test-only
# compilation, since each runs on a handful of tiny inputs.
_jit = functools.partial(
  jax.jit,
  compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
)
WEIGHTS = {
  "mgda": _jit(lambda g: gb.mgda_weights(g, SOLVER_ITERATIONS)),
  "upgrad": _jit(lambda g: gb.upgrad_weights(g, SOLVER_ITERATIONS)),
  "nash_mtl": _jit(lambda g: gb.nash_mtl_weights(g, 50, 0.0)),
  "nash_mtl_clipped": _jit(lambda g: gb.nash_mtl_weights(g, 50, 1.0)),
  "cagrad": _jit(lambda g: gb.cagrad_weights(g, 0.5, 1, 20, SOLVER_ITERATIONS)),
  "aligned_mtl": _jit(gb.aligned_mtl_weights),
  "imtl": _jit(gb.imtl_g_weights),
  "pcgrad": _jit(gb.pcgrad_weights),
  "gradvac": _jit(functools.partial(gb.gradvac_weights, beta=0.5)),
}
GRAMIAN_METHODS = (
  "imtl",
  "pcgrad",
  "cagrad",
  "aligned_mtl",
  "mgda",
  "nash_mtl",
  "upgrad",
  "gradvac",
)


def _jacobian(seed, tasks, dimension=DIMENSION, spread=True):
  """A random J [T, P] whose rows have norms spread over two orders of magnitude."""
  generator = np.random.default_rng(seed)
  jacobian = generator.normal(size=(tasks, dimension))
  if spread:
    jacobian *= np.exp(generator.uniform(np.log(0.1), np.log(10.0), size=(tasks, 1)))
  return jacobian


def _orders(seed, tasks):
  generator = np.random.default_rng(seed + 1)
  return np.stack([generator.permutation(tasks) for _ in range(tasks)])


def _weights(method, jacobian, seed=0):
  """Our weights for J (through its float32 Gramian), with deterministic orders where needed."""
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  tasks = jacobian.shape[0]
  if method == "pcgrad":
    return np.asarray(WEIGHTS[method](gramian, jnp.asarray(_orders(seed, tasks))))
  if method == "gradvac":
    targets = jnp.asarray(
      np.random.default_rng(seed + 2).uniform(-0.5, 0.8, (tasks, tasks)), jnp.float32
    )
    return np.asarray(WEIGHTS[method](gramian, targets, jnp.asarray(_orders(seed, tasks)))[0])
  return np.asarray(WEIGHTS[method](gramian))


# ----------------------------------------------------------------------------------------------
# Textbook implementations on coordinates (float64).


def textbook_pcgrad(jacobian, orders):
  projected = jacobian.copy()
  for row in range(len(jacobian)):
    for other in orders[row]:
      inner = projected[row] @ jacobian[other]
      if inner < 0:
        projected[row] -= inner * jacobian[other] / (jacobian[other] @ jacobian[other])
  return projected.sum(0)


def textbook_gradvac(jacobian, targets, orders, beta=0.5):
  targets = targets.copy()
  projected = jacobian.copy()
  for row in range(len(jacobian)):
    for other in orders[row]:
      if other == row:
        continue
      norm_row, norm_other = np.linalg.norm(projected[row]), np.linalg.norm(jacobian[other])
      cosine = projected[row] @ jacobian[other] / (norm_row * norm_other)
      target = targets[row, other]
      if cosine < target:
        amount = (
          norm_row
          * (target * np.sqrt(1 - cosine**2) - cosine * np.sqrt(1 - target**2))
          / (norm_other * np.sqrt(1 - target**2))
        )
        projected[row] += amount * jacobian[other]
      targets[row, other] = (1 - beta) * target + beta * cosine
  return projected.sum(0), targets


def textbook_imtl_g(jacobian):
  """Solves for the direction with equal projections on all unit gradients, Σ α = 1."""
  tasks = len(jacobian)
  units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
  # Unknown α [T]: (Jᵀα)·(u_1 - u_k) = 0 for k ≥ 2 and Σ α = 1.
  system = np.vstack([(units[0] - units[1:]) @ jacobian.T, np.ones((1, tasks))])
  alpha = np.linalg.solve(system, np.eye(tasks)[-1])
  return alpha @ jacobian


def textbook_cagrad(jacobian, c=0.5):
  tasks = len(jacobian)
  mean = jacobian.mean(0)
  radius = c * np.linalg.norm(mean)

  def objective(w):
    combined = w @ jacobian
    return combined @ mean + radius * np.linalg.norm(combined)

  result = optimize.minimize(
    objective,
    np.full(tasks, 1 / tasks),
    method="SLSQP",
    bounds=[(0, 1)] * tasks,
    constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
    options={"ftol": 1e-14, "maxiter": 1000},
  )
  combined = result.x @ jacobian
  return (mean + radius / np.linalg.norm(combined) * combined) / (1 + c**2)


def textbook_aligned_mtl(jacobian):
  left, singular, right = np.linalg.svd(jacobian, full_matrices=False)
  kept = singular > 1e-5**0.5 * singular[0]
  aligned = singular[kept][-1] * left[:, kept] @ right[kept]
  return aligned.sum(0)


def textbook_mgda(jacobian):
  tasks = len(jacobian)
  result = optimize.minimize(
    lambda w: np.sum((w @ jacobian) ** 2),
    np.full(tasks, 1 / tasks),
    method="SLSQP",
    bounds=[(0, 1)] * tasks,
    constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
    options={"ftol": 1e-15, "maxiter": 1000},
  )
  return result.x @ jacobian


def textbook_upgrad(jacobian):
  """Projects each row onto {d : J d ≥ 0} in coordinates, then averages."""
  projections = []
  for row in jacobian:
    result = optimize.minimize(
      lambda d, row=row: np.sum((d - row) ** 2),
      row,
      jac=lambda d, row=row: 2 * (d - row),
      method="SLSQP",
      constraints={"type": "ineq", "fun": lambda d: jacobian @ d, "jac": lambda d: jacobian},
      options={"ftol": 1e-15, "maxiter": 1000},
    )
    projections.append(result.x)
  return np.mean(projections, axis=0)


def textbook_nash_mtl(jacobian, max_norm=0.0):
  """Minimises ½‖Jᵀα‖² - Σ log α for the Frobenius-normalised J, so J Jᵀα = 1/α; then clips."""
  scaled = jacobian / np.sqrt(np.linalg.norm(jacobian @ jacobian.T))

  def objective(log_alpha):
    alpha = np.exp(log_alpha)
    combined = alpha @ scaled
    return 0.5 * combined @ combined - log_alpha.sum(), alpha * (scaled @ combined) - 1.0

  result = optimize.minimize(
    objective, np.zeros(len(jacobian)), jac=True, method="BFGS", options={"gtol": 1e-12}
  )
  direction = np.exp(result.x) @ jacobian
  if max_norm > 0:
    direction *= min(1.0, max_norm / (np.linalg.norm(direction) + 1e-6))
  return direction


TEXTBOOK = {
  "imtl": textbook_imtl_g,
  "cagrad": textbook_cagrad,
  "aligned_mtl": textbook_aligned_mtl,
  "mgda": textbook_mgda,
  "upgrad": textbook_upgrad,
  "nash_mtl": textbook_nash_mtl,
  "nash_mtl_clipped": functools.partial(textbook_nash_mtl, max_norm=1.0),
}


def _assert_directions_close(ours, reference, jacobian, tolerance):
  scale = np.max(np.linalg.norm(jacobian, axis=1))
  np.testing.assert_allclose(ours, reference, atol=tolerance * scale, rtol=tolerance)


@SETTINGS
@given(
  method=st.sampled_from(sorted(TEXTBOOK)), tasks=st.integers(2, 4), seed=st.integers(0, 10**6)
)
def test_direction_equals_textbook_implementation(method, tasks, seed):
  jacobian = _jacobian(seed, tasks)
  ours = _weights(method, jacobian) @ jacobian
  reference = TEXTBOOK[method](jacobian)
  _assert_directions_close(ours, reference, jacobian, 2e-3)


@SETTINGS
@given(tasks=st.integers(2, 4), seed=st.integers(0, 10**6))
def test_pcgrad_and_gradvac_equal_sequential_coordinate_projections(tasks, seed):
  jacobian = _jacobian(seed, tasks)
  orders = _orders(seed, tasks)
  _assert_directions_close(
    _weights("pcgrad", jacobian, seed) @ jacobian, textbook_pcgrad(jacobian, orders), jacobian, 1e-4
  )
  targets = np.random.default_rng(seed + 2).uniform(-0.5, 0.8, (tasks, tasks)).astype(np.float32)
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  weights, new_targets = WEIGHTS["gradvac"](gramian, jnp.asarray(targets), jnp.asarray(orders))
  reference, reference_targets = textbook_gradvac(jacobian, targets.astype(np.float64), orders)
  _assert_directions_close(np.asarray(weights) @ jacobian, reference, jacobian, 1e-3)
  np.testing.assert_allclose(np.asarray(new_targets), reference_targets, atol=1e-4)


@SETTINGS
@given(
  method=st.sampled_from(sorted(TEXTBOOK)), tasks=st.integers(2, 3), seed=st.integers(0, 10**6)
)
def test_permuting_rows_permutes_weights(method, tasks, seed):
  jacobian = _jacobian(seed, tasks)
  permutation = np.random.default_rng(seed).permutation(tasks)
  np.testing.assert_allclose(
    _weights(method, jacobian[permutation]),
    _weights(method, jacobian)[permutation],
    rtol=2e-3,
    atol=2e-3 * np.max(np.abs(_weights(method, jacobian))),
  )


@SETTINGS
@given(tasks=st.integers(2, 3), seed=st.integers(0, 10**6))
def test_permuting_rows_permutes_pcgrad_and_gradvac_weights_with_their_orders(tasks, seed):
  jacobian = _jacobian(seed, tasks)
  permutation = np.random.default_rng(seed).permutation(tasks)
  inverse = np.argsort(permutation)
  orders = _orders(seed, tasks)
  # Row p of the permuted problem is row permutation[p]; it visits the same rows in the same order.
  permuted_orders = inverse[orders[permutation]]
  gramian = jacobian @ jacobian.T
  permuted_gramian = gramian[np.ix_(permutation, permutation)]
  original = np.asarray(WEIGHTS["pcgrad"](jnp.asarray(gramian, jnp.float32), jnp.asarray(orders)))
  permuted = np.asarray(
    WEIGHTS["pcgrad"](jnp.asarray(permuted_gramian, jnp.float32), jnp.asarray(permuted_orders))
  )
  np.testing.assert_allclose(permuted, original[permutation], rtol=1e-4, atol=1e-5)
  targets = np.zeros((tasks, tasks), np.float32)
  original = np.asarray(
    WEIGHTS["gradvac"](jnp.asarray(gramian, jnp.float32), targets, jnp.asarray(orders))[0]
  )
  permuted = np.asarray(
    WEIGHTS["gradvac"](
      jnp.asarray(permuted_gramian, jnp.float32), targets, jnp.asarray(permuted_orders)
    )[0]
  )
  np.testing.assert_allclose(permuted, original[permutation], rtol=1e-4, atol=1e-5)


@SETTINGS
@given(
  method=st.sampled_from(["mgda", "upgrad"]),
  tasks=st.integers(2, 4),
  seed=st.integers(0, 10**6),
  conflicting=st.booleans(),
)
# Nearly opposite rows with condition number 6e5: accelerated iterations alone had not found
# the support after 1000 iterations, and UPGrad's direction opposed the first row.
@example(method="upgrad", tasks=4, seed=701, conflicting=True)
def test_non_conflicting_methods_never_oppose_a_row(method, tasks, seed, conflicting):
  jacobian = _jacobian(seed, tasks)
  if conflicting:
    jacobian[-1] = -jacobian[0] + 0.1 * jacobian[-1]
  direction = _weights(method, jacobian) @ jacobian
  inner = jacobian @ direction
  # Exact arithmetic gives inner >= 0; float32 solves on Gramians with condition numbers up to
  # ~1e6 (the near-opposite case) leave round-off of order 1e-4 ‖g_i‖ max_j ‖g_j‖. A direction
  # that really conflicts (e.g. EW's here) is off by ~0.1 ‖g_i‖².
  norms = np.linalg.norm(jacobian, axis=1)
  assert np.all(inner >= -1e-3 * norms * norms.max())


def _degenerate_jacobians():
  base = _jacobian(7, 3, spread=False)
  zero_row = base.copy()
  zero_row[1] = 0.0
  identical = np.repeat(base[:1], 3, axis=0)
  opposite = np.stack([base[0], -base[0]])
  return {
    "zero_row": zero_row,
    "identical": identical,
    "single": base[:1],
    "opposite": opposite,
    "all_zero": np.zeros((3, DIMENSION)),
  }


@pytest.mark.parametrize("case", sorted(_degenerate_jacobians()))
@pytest.mark.parametrize("method", sorted(set(WEIGHTS) - {"nash_mtl_clipped"}))
def test_degenerate_inputs_give_finite_weights(method, case):
  jacobian = _degenerate_jacobians()[case]
  weights = _weights(method, jacobian)
  assert weights.shape == (len(jacobian),)
  assert np.all(np.isfinite(weights)), weights
  direction = weights @ jacobian
  if case == "single" and method != "nash_mtl":
    # One row: every method follows it (Nash-MTL rescales it to Ĝα = 1/α instead).
    cosine = direction @ jacobian[0] / (np.linalg.norm(direction) * np.linalg.norm(jacobian[0]))
    assert cosine == pytest.approx(1.0, abs=1e-5)
  if case == "identical":
    assert np.linalg.norm(direction) > 0
    np.testing.assert_allclose(
      direction / np.linalg.norm(direction), jacobian[0] / np.linalg.norm(jacobian[0]), atol=1e-4
    )
  if case == "opposite" and method in ("mgda", "upgrad", "imtl"):
    # The min-norm point, the dual-cone projections and IMTL's equal projections all cancel.
    assert np.linalg.norm(direction) <= 1e-3 * np.linalg.norm(jacobian[0])
  if case == "zero_row" and method in ("mgda",):
    assert np.linalg.norm(direction) <= 1e-4 * np.linalg.norm(jacobian[0])


def test_nash_mtl_solves_its_optimality_condition():
  for seed in range(5):
    jacobian = _jacobian(seed, 4)
    gramian = jacobian @ jacobian.T
    normalised = gramian / np.linalg.norm(gramian)
    alpha = np.asarray(
      _jit(lambda g: solvers.nash_bargaining(g, 50))(jnp.asarray(normalised, jnp.float32))
    )
    assert np.all(alpha > 0)
    # Ĝα = 1/α exactly (no ridge by default), to float32 round-off.
    np.testing.assert_allclose(alpha * (normalised @ alpha), 1.0, atol=1e-5)
    ridged = np.asarray(
      _jit(lambda g: solvers.nash_bargaining(g, 50, 1e-3))(jnp.asarray(normalised, jnp.float32))
    )
    np.testing.assert_allclose(ridged * (normalised @ ridged) + 1e-3 * ridged**2, 1.0, atol=1e-5)


def test_simplex_projection_matches_a_brute_force_solution():
  generator = np.random.default_rng(0)
  for _ in range(20):
    vector = generator.normal(size=5) * 2
    ours = np.asarray(solvers.project_to_simplex(jnp.asarray(vector, jnp.float32)))
    result = optimize.minimize(
      lambda w, vector=vector: np.sum((w - vector) ** 2),
      np.full(5, 0.2),
      method="SLSQP",
      bounds=[(0, None)] * 5,
      constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
      options={"ftol": 1e-14},
    )
    np.testing.assert_allclose(ours, result.x, atol=1e-4)


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_registered_weightings_return_finite_weights_and_keep_their_state_shape(name):
  method = weighting.get(name, method_options())
  assert isinstance(method, weighting.GramianWeighting)
  params, state = method.init(3)
  jacobian = _jacobian(3, 3)
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  weights, new_state, aux = jax.jit(method.weigh)(
    gramian, jnp.ones(3), params, state, jax.random.PRNGKey(0), jnp.zeros((), jnp.int32)
  )
  assert weights.shape == (3,) and np.all(np.isfinite(weights))
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  assert "weights" in aux


def test_pcgrad_uses_the_random_key_for_its_order():
  # Three rows with two conflicts: the result depends on the order of projection.
  jacobian = np.array([[1.0, 0.0, 0.0], [-0.8, 1.0, 0.0], [-0.5, -0.9, 0.3]])
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  method = weighting.get("pcgrad", method_options())
  results = {
    tuple(
      np.round(np.asarray(method.weigh(gramian, None, {}, {}, jax.random.PRNGKey(seed), 0)[0]), 5)
    )
    for seed in range(12)
  }
  assert len(results) > 1


def test_unknown_level_is_rejected_with_the_valid_ones():
  with pytest.raises(
    ValueError, match=r"config.method.level 'pixel'; valid levels: task, sample, sample_task"
  ):
    weighting.get("imtl", method_options(level="pixel"))
