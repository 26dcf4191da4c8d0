"""Tests of the 2-D toy: its global minimum, the two-task PCGrad/CAGrad closed forms, the runner."""

import numpy as np
import jax.numpy as jnp
from scipy import optimize

from configs import toy as toy_config
from mtl_jax.data import toy
from mtl_jax.studies import toy as toy_study


def _mean_numpy(point):
  """The mean objective written again in numpy (float64), independent of the jnp version."""
  x, y = point
  upper, lower = max(np.tanh(y / 2), 0.0), max(np.tanh(-y / 2), 0.0)
  f1 = (np.log(max(abs(-(x + 7) / 2 + np.tanh(y)), 5e-6)) + 6) * upper + (((x - 7) ** 2 + 0.1 * (y + 8) ** 2) / 10 - 20) * lower
  f2 = (np.log(max(abs((3 - x) / 2 - np.tanh(y) + 2), 5e-6)) + 6) * upper + (((x + 7) ** 2 + 0.1 * (y + 8) ** 2) / 10 - 20) * lower
  return 0.5 * (f1 + f2)


def test_global_minimum_of_the_mean_matches_a_dense_grid_search():
  axis = np.linspace(-10, 10, 401)
  values = np.array([[_mean_numpy((x, y)) for y in axis] for x in axis])
  i, j = np.unravel_index(np.argmin(values), values.shape)
  refined = optimize.minimize(_mean_numpy, x0=[axis[i], axis[j]], method="Nelder-Mead",
                              options=dict(xatol=1e-10, fatol=1e-12, maxiter=5000))
  point, value = toy.global_minimum()
  np.testing.assert_allclose(point, refined.x, atol=1e-4)
  assert abs(value - refined.fun) < 1e-8
  assert value <= values.min() + 1e-9
  # The numpy and jnp definitions agree away from the minimiser too.
  for probe in [(-8.5, 7.5), (3.0, -2.0), (9.0, 9.0), (0.5, 0.1)]:
    assert abs(float(toy.mean_objective(jnp.asarray(probe))) - _mean_numpy(probe)) < 1e-4


def test_pcgrad_matches_explicit_projection():
  rng = np.random.default_rng(0)
  for _ in range(50):
    g1, g2 = rng.normal(size=(2, 3))
    expected = []
    for own, other in ((g1, g2), (g2, g1)):
      if own @ other < 0:
        own = own - (own @ other) / (other @ other) * other
      expected.append(own)
    np.testing.assert_allclose(toy.pcgrad_direction(jnp.asarray(g1), jnp.asarray(g2)),
                               0.5 * (expected[0] + expected[1]), rtol=1e-5, atol=1e-6)


def test_cagrad_matches_brute_force_dual_and_improves_worst_task():
  rng = np.random.default_rng(1)
  weights = np.linspace(0, 1, 200001)
  for trial in range(60):
    g1, g2 = rng.normal(size=(2, 2)) * rng.choice([0.1, 1.0, 10.0])
    c = [0.0, 0.5, 2.0][trial % 3]
    g0 = 0.5 * (g1 + g2)
    radius = c * np.sqrt(g0 @ g0 + 1e-4)
    g_w = g2[None] + weights[:, None] * (g1 - g2)[None]
    dual = g_w @ g0 + radius * np.sqrt(np.sum(g_w**2, 1) + 1e-4)
    best = weights[np.argmin(dual)]
    gb = g2 + best * (g1 - g2)
    expected = (g0 + radius / np.sqrt(gb @ gb + 1e-4) * gb) / (1 + c)
    direction = np.asarray(toy.cagrad_direction(jnp.asarray(g1), jnp.asarray(g2), c))
    np.testing.assert_allclose(direction, expected, rtol=1e-3, atol=1e-4 * np.linalg.norm(g0))
    # The primal promise: within the ball, the worst task improves at least as much as under g0.
    assert min(direction @ g1, direction @ g2) * (1 + c) >= min(g0 @ g1, g0 @ g2) - 1e-4


def test_runner_finds_convergence_at_high_adam_lr_and_not_at_tiny_lr():
  config = toy_config.get_config("quick")
  config.optimizers, config.methods = ("adam", "gd"), ("ew", "cagrad")
  config.learning_rates = (1.0, 1e-4)
  config.max_iterations, config.dense_iterations, config.record_every = 1200, 200, 100
  results = toy_study.run_toy(config)
  assert results["num_runs"] == 2 * 2 * 2 * 3
  assert results["table"]["adam/ew"][0] is not None and results["table"]["adam/ew"][0] <= 1200
  assert results["table"]["adam/ew"][1] is None and results["table"]["gd/cagrad"][1] is None
  assert "1e-04" in results["markdown"].splitlines()[0] or "0.0001" in results["markdown"].splitlines()[0]
