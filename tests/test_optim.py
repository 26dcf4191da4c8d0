"""Tests of the optimizer recipes against hand-written update rules."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mtl_jax import optim


def _config(**overrides):
  values = dict(
    name="adam",
    learning_rate=0.1,
    momentum=0.9,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    lr_decay_every_epochs=0,
    lr_decay_factor=0.5,
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _run(config, gradients, params):
  optimizer = optim.make_optimizer(config, steps_per_epoch=10)
  state = optimizer.init(params)
  history = []
  for gradient in gradients:
    updates, state = optimizer.update(gradient, state, params)
    params = optax.apply_updates(params, updates)
    history.append(np.asarray(params))
  return history


def test_sgd_momentum_with_coupled_weight_decay_matches_pytorch_rule():
  rng = np.random.default_rng(0)
  gradients = [jnp.asarray(rng.normal(size=4), jnp.float32) for _ in range(5)]
  params = jnp.asarray(rng.normal(size=4), jnp.float32)
  history = _run(_config(name="sgd", weight_decay=0.01), gradients, params)
  expected, buffer = np.asarray(params, np.float64), np.zeros(4)
  for gradient, got in zip(gradients, history):
    buffer = 0.9 * buffer + (np.asarray(gradient) + 0.01 * expected)
    expected = expected - 0.1 * buffer
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_adam_matches_textbook_rule():
  rng = np.random.default_rng(1)
  gradients = [jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(4)]
  params = jnp.zeros(3, jnp.float32)
  history = _run(_config(name="adam", learning_rate=0.01), gradients, params)
  m = v = np.zeros(3)
  expected = np.zeros(3)
  for t, (gradient, got) in enumerate(zip(gradients, history), start=1):
    g = np.asarray(gradient, np.float64)
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    expected = expected - 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_signsgd_moves_every_coordinate_by_the_learning_rate():
  gradients = [jnp.asarray([3.0, -1e-6, 0.5])]
  history = _run(_config(name="signsgd", momentum=0.0, learning_rate=0.5), gradients, jnp.zeros(3))
  np.testing.assert_allclose(history[0], [-0.5, 0.5, -0.5])


def test_decoupled_weight_decay_differs_from_coupled_under_adam():
  gradients = [jnp.ones(2)] * 3
  params = jnp.asarray([1.0, -2.0])
  coupled = _run(_config(weight_decay=0.1), gradients, params)[-1]
  decoupled = _run(_config(weight_decay=0.1, decoupled_weight_decay=True), gradients, params)[-1]
  assert not np.allclose(coupled, decoupled)
  adamw = _run(_config(name="adamw", weight_decay=0.1), gradients, params)[-1]
  np.testing.assert_allclose(adamw, decoupled)


def test_step_decay_halves_the_learning_rate_every_n_epochs():
  schedule = optim.learning_rate_schedule(_config(lr_decay_every_epochs=2), steps_per_epoch=5)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(9)) == pytest.approx(0.1)
  assert float(schedule(10)) == pytest.approx(0.05)
  assert float(schedule(20)) == pytest.approx(0.025)


def test_updates_scale_linearly_with_learning_rate():
  rng = np.random.default_rng(2)
  gradients = [jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(3)]
  for name in optim.OPTIMIZERS:
    small = _run(_config(name=name, learning_rate=0.01, weight_decay=0.01), gradients, jnp.zeros(3))
    large = _run(_config(name=name, learning_rate=0.02, weight_decay=0.01), gradients, jnp.zeros(3))
    # From zero parameters the first update is exactly proportional to the learning rate.
    np.testing.assert_allclose(large[0], 2 * small[0], rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1e-3])
def test_non_positive_learning_rate_is_rejected(bad):
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    optim.make_optimizer(_config(learning_rate=bad), steps_per_epoch=1)


def test_unknown_optimizer_lists_valid_ones():
  with pytest.raises(ValueError, match="valid optimizers: adam, sgd, signsgd, adamw"):
    optim.make_optimizer(_config(name="rmsprop"), steps_per_epoch=1)


@pytest.mark.parametrize("choice", [0, 1])
def test_switched_optimizer_runs_the_chosen_one_alone_under_jit(choice):
  # A traced choice selects one optimizer per update; the other's state does not move.
  optimizers = [optim.make_optimizer(_config(name=name), 10) for name in ("adam", "sgd")]
  params = jnp.asarray([1.0, -2.0, 3.0])
  gradients = [jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([-0.25, 0.5, 1.0])]

  @jax.jit
  def run(choice):
    optimizer = optim.switched(optimizers, choice)
    state, values = optimizer.init(params), params
    for gradient in gradients:
      updates, state = optimizer.update(gradient, state, values)
      values = optax.apply_updates(values, updates)
    return values, state

  values, state = run(jnp.int32(choice))
  alone = _run(_config(name=("adam", "sgd")[choice]), gradients, params)[-1]
  np.testing.assert_allclose(values, alone, rtol=1e-6)
  other = optimizers[1 - choice].init(params)
  chex.assert_trees_all_equal(state[1 - choice], other)
