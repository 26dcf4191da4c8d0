"""Tests of the loss-based weightings (EW, UW, UW-O, RLW) and the method registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import weighting
from tests.options import method_options


def _combine(name, losses, seed=0, options=None):
  method = weighting.get(name, method_options(**(options or {})))
  params, state = method.init(len(losses))
  return (
    method,
    params,
    method.combine(jnp.asarray(losses), params, state, jax.random.PRNGKey(seed), 0),
  )


def test_ew_is_the_plain_sum():
  _, _, (total, _, _) = _combine("ew", [1.0, 2.0, 3.5])
  assert float(total) == pytest.approx(6.5)


def test_uw_formula_and_learned_log_variance_gradient():
  method, params, (total, _, _) = _combine("uw", [2.0, 4.0])
  s = -0.5
  assert float(total) == pytest.approx(
    sum(loss / (2 * np.exp(s)) + s / 2 for loss in (2.0, 4.0)), rel=1e-6
  )

  def total_of(log_variance):
    return method.combine(jnp.asarray([2.0, 4.0]), {"log_variance": log_variance}, {}, None, 0)[0]

  gradient = jax.grad(total_of)(params["log_variance"])
  np.testing.assert_allclose(
    gradient, [-loss / (2 * np.exp(s)) + 0.5 for loss in (2.0, 4.0)], rtol=1e-6
  )


def test_uw_o_gradient_is_invariant_to_constant_loss_scales():
  method = weighting.get("uw_o", method_options())

  def total(theta, scale):
    losses = jnp.stack([scale * jnp.sum(theta**2), jnp.sum(jnp.abs(theta - 1.0))])
    return method.combine(losses, {}, {}, None, 0)[0]

  theta = jnp.asarray([0.3, -1.2])
  unscaled = jax.grad(total)(theta, 1.0)
  scaled = jax.grad(total)(theta, 100.0)
  np.testing.assert_allclose(scaled, unscaled, rtol=1e-5)


def test_rlw_weights_are_a_fresh_softmax_each_step():
  _, _, (_, _, first) = _combine("rlw", [1.0, 1.0, 1.0], seed=0)
  _, _, (_, _, second) = _combine("rlw", [1.0, 1.0, 1.0], seed=1)
  assert float(jnp.sum(first["weights"])) == pytest.approx(1.0, rel=1e-6)
  assert bool(jnp.all(first["weights"] > 0))
  assert not np.allclose(first["weights"], second["weights"])


def test_unknown_method_lists_valid_ones():
  with pytest.raises(
    ValueError, match=r"Unknown method 'pcgradd'; valid methods: .*ew.*rlw.*uw.*uw_o"
  ):
    weighting.get("pcgradd", method_options())
