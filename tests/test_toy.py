"""Tests of the 2-D toy: its global minimum, the two-task PCGrad/CAGrad closed forms, the runner."""

import jax
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
  f1 = (np.log(max(abs(-(x + 7) / 2 + np.tanh(y)), 5e-6)) + 6) * upper + (
    ((x - 7) ** 2 + 0.1 * (y + 8) ** 2) / 10 - 20
  ) * lower
  f2 = (np.log(max(abs((3 - x) / 2 - np.tanh(y) + 2), 5e-6)) + 6) * upper + (
    ((x + 7) ** 2 + 0.1 * (y + 8) ** 2) / 10 - 20
  ) * lower
  return 0.5 * (f1 + f2)


def test_global_minimum_of_the_mean_matches_a_dense_grid_search():
  axis = np.linspace(-10, 10, 401)
  values = np.array([[_mean_numpy((x, y)) for y in axis] for x in axis])
  i, j = np.unravel_index(np.argmin(values), values.shape)
  refined = optimize.minimize(
    _mean_numpy,
    x0=[axis[i], axis[j]],
    method="Nelder-Mead",
    options=dict(xatol=1e-10, fatol=1e-12, maxiter=5000),
  )
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
    np.testing.assert_allclose(
      toy.pcgrad_direction(jnp.asarray(g1), jnp.asarray(g2)),
      0.5 * (expected[0] + expected[1]),
      rtol=1e-5,
      atol=1e-6,
    )


def test_cagrad_matches_brute_force_dual_with_cagrad_toy_constants_and_improves_worst_task():
  """CAGrad's toy.py: R = c·√(|g0|² + 2.5e-5), dual ⟨g_w, g0⟩ + R√(|g_w|² + 1e-4),
  λ = R/(√(|g_w|² + 1e-4) + 1e-4)."""
  rng = np.random.default_rng(1)
  weights = np.linspace(0, 1, 200001)
  for trial in range(60):
    g1, g2 = rng.normal(size=(2, 2)) * rng.choice([0.003, 0.1, 1.0, 10.0])
    c = [0.0, 0.5, 2.0][trial % 3]
    g0 = 0.5 * (g1 + g2)
    radius = c * 0.5 * np.sqrt(np.sum((g1 + g2) ** 2) + 1e-4)
    g_w = g2[None] + weights[:, None] * (g1 - g2)[None]
    dual = g_w @ g0 + radius * np.sqrt(np.sum(g_w**2, 1) + 1e-4)
    best = weights[np.argmin(dual)]
    gb = g2 + best * (g1 - g2)
    expected = (g0 + radius / (np.sqrt(gb @ gb + 1e-4) + 1e-4) * gb) / (1 + c)
    direction = np.asarray(toy.cagrad_direction(jnp.asarray(g1), jnp.asarray(g2), c))
    np.testing.assert_allclose(direction, expected, rtol=1e-3, atol=1e-4 * np.linalg.norm(g0))
    # The primal promise, up to the square roots' epsilons: within the ball, the worst task
    # improves at least as much as under g0.
    assert min(direction @ g1, direction @ g2) * (1 + c) >= min(g0 @ g1, g0 @ g2) - 1e-4


def _adam_config(iterations):
  config = toy_config.get_config("quick")
  config.optimizers, config.methods, config.learning_rates = ("adam",), ("ew",), (10.0,)
  config.max_iterations, config.dense_iterations, config.record_every = iterations, iterations, 1
  return config


def _pytorch_adam_path(start, iterations, lr=10.0, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam's update written in numpy float64 (bias corrections 1 - βᵗ in float64)."""
  point, first, second, path = np.asarray(start, np.float64), 0.0, 0.0, []
  with jax.enable_x64(True):
    gradient_of = jax.jit(jax.jacrev(toy.objectives))
    for step in range(1, iterations + 1):
      jacobian = np.asarray(gradient_of(jnp.asarray(point, jnp.float64)))
      direction = 0.5 * (jacobian[0] + jacobian[1])
      first = b1 * first + (1 - b1) * direction
      second = b2 * second + (1 - b2) * direction * direction
      denominator = np.sqrt(second) / np.sqrt(1 - b2**step) + eps
      point = point - (lr / (1 - b1**step)) * first / denominator
      path.append(point)
  return np.stack(path)


def test_adam_steps_match_pytorch_in_float64_and_float32():
  iterations, start = 5, np.array([[-8.5, 7.5]])
  expected = _pytorch_adam_path(start[0], iterations)
  config = _adam_config(iterations)
  minimiser, minimum = toy.global_minimum()
  for dtype, tolerance in (("float64", 1e-11), ("float32", 1e-4)):
    outputs, _, _ = toy_study._run_grid(config, minimiser, minimum, [start], dtype)
    np.testing.assert_allclose(
      outputs["dense"][0][:, 0], expected, rtol=tolerance, atol=tolerance, err_msg=dtype
    )
  # The first step at lr 10 in float32 is PyTorch's to float32 precision (computing 1 - βᵗ in
  # float32 would leave it 6e-6 short, which this tolerance catches).
  first_step = outputs["dense"][0][0, 0] - start[0]
  np.testing.assert_allclose(first_step, expected[0] - start[0], rtol=3e-7)


def test_toy_runs_in_float64_without_leaving_x64_on_and_reports_sensitivity():
  config = toy_config.get_config("quick")
  config.optimizers, config.methods, config.learning_rates = (
    ("adam",),
    ("ew", "cagrad"),
    (1.0, 1e-4),
  )
  config.max_iterations, config.dense_iterations, config.record_every = 400, 200, 100
  assert config.dtype == "float64"
  results = toy_study.run_toy(config)
  assert not jax.config.jax_enable_x64
  sensitivity = results["sensitivity"]
  assert (
    len(sensitivity["names"]) == config.perturbed_starts + 1
    and sensitivity["names"][-1] == "float32"
  )
  assert results["cells"] == 4 and 0 <= results["reproducible_cells"] <= 4
  for key, row in results["table"].items():
    for value, variants, reproducible in zip(
      row, sensitivity["variants"][key], sensitivity["reproducible"][key]
    ):
      assert len(variants) == len(sensitivity["names"])
      if value is not None and reproducible:
        assert all(abs(variant - value) <= 0.1 * value for variant in variants)
  assert "cells are reproducible" in results["markdown"]


def test_sensitivity_marks_cells_whose_variants_disagree():
  config = toy_config.get_config()
  table = {"adam/ew": [100, 100, None, None]}
  variants = {"a": {"adam/ew": [100, 130, None, 50]}, "b": {"adam/ew": [105, 100, None, None]}}
  sensitivity = toy_study._sensitivity(config, table, variants)
  assert sensitivity["reproducible"]["adam/ew"] == [True, False, True, False]
  text = toy_study.format_table(table, (10.0, 5.0, 1.0, 0.5), paper=False, sensitivity=sensitivity)
  assert "| 100 [100, 105] | 100* [100, 130] | - | -* [50, -] |" in text


def test_runner_finds_convergence_at_high_adam_lr_and_not_at_tiny_lr():
  config = toy_config.get_config("quick")
  config.optimizers, config.methods = ("adam", "gd"), ("ew", "cagrad")
  config.learning_rates = (1.0, 1e-4)
  config.max_iterations, config.dense_iterations, config.record_every = 1200, 200, 100
  results = toy_study.run_toy(config)
  assert results["num_runs"] == 2 * 2 * 2 * 3
  assert results["table"]["adam/ew"][0] is not None and results["table"]["adam/ew"][0] <= 1200
  assert results["table"]["adam/ew"][1] is None and results["table"]["gd/cagrad"][1] is None
  assert (
    "1e-04" in results["markdown"].splitlines()[0]
    or "0.0001" in results["markdown"].splitlines()[0]
  )
