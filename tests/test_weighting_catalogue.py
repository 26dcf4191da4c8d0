"""The catalogue's methods: a training step of every registered method not covered by
test_weighting_methods_train.py, and hand-solved cases and properties of the methods without a
reference implementation (DB-MTL, MoCo, GO4Align, CR-MOGM, STCH's phases, Auto-Lambda)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from mtl_jax import config_validation
from mtl_jax import weighting
from mtl_jax.train import gradient_steps
from mtl_jax.weighting import bilevel
from mtl_jax.weighting import gramian_based as gb
from mtl_jax.weighting import loss_based
from mtl_jax.weighting import task_gradients as tg
from tests import test_weighting_methods_train as train_tests
from tests.options import method_options

ELSEWHERE = set(train_tests.NEW_METHODS) | {"ew"}  # ew: every other training test
CATALOGUE = sorted(set(weighting.method_names()) - ELSEWHERE)


def test_the_registry_holds_the_whole_catalogue():
  assert len(weighting.method_names()) >= 32
  assert ELSEWHERE <= set(weighting.method_names())


@pytest.mark.parametrize("name", CATALOGUE)
def test_every_catalogue_method_trains_a_few_steps(name, dataset):
  train_tests.test_every_method_trains_a_few_steps(name, dataset)


dataset = train_tests.dataset


# ----------------------------------------------------------------------------------------------
# Hand-solved cases.


def test_db_mtl_rescales_every_log_gradient_to_the_largest_norm():
  # Orthogonal gradients of norms 1 and 4 with losses 1 and 2: log-gradients (1, 0) and (0, 2);
  # with β = 0 the average is the log-gradient, and each task contributes norm 2.
  gradients = {"w": jnp.asarray([[1.0, 0.0], [0.0, 4.0]])}
  state = tg.DBMTLState({"w": jnp.zeros((2, 2))}, jnp.zeros((), jnp.int32))
  direction, alpha, new_state = tg.db_mtl_direction(
    gradients, jnp.asarray([1.0, 2.0]), state, 0.0, 0.0
  )
  np.testing.assert_allclose(direction["w"], [2.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(alpha, [2.0, 1.0], rtol=1e-6)
  # β = 0.5: the average halves the new log-gradients (no bias correction); the direction does not
  # change, since every task is rescaled to the largest norm.
  direction, _, new_state = tg.db_mtl_direction(gradients, jnp.asarray([1.0, 2.0]), state, 0.5, 0.0)
  np.testing.assert_allclose(new_state.average["w"], [[0.5, 0.0], [0.0, 1.0]], rtol=1e-6)
  np.testing.assert_allclose(direction["w"], [1.0, 1.0], rtol=1e-6)


def test_moco_weights_step_from_the_tracked_gradients_gramian():
  # One step from λ = (½, ½) with β = 1 (Y = G), γ = 0.1, ρ = 0, no scaling: Y Yᵀ = diag(1, 4),
  # λ - 0.1 Y Yᵀ λ = (0.45, 0.3), projected onto the simplex: (0.575, 0.425).
  options = method_options(
    moco_beta=1.0, moco_beta_sigma=0.0, moco_gamma=0.1, moco_gamma_sigma=0.0, moco_rho=0.0
  )
  options.moco_gradient_scale = "none"
  gradients = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}
  state = tg.MoCoState({"w": jnp.zeros((2, 2))}, jnp.full((2,), 0.5), jnp.zeros((), jnp.int32))
  direction, new_state = tg.moco_direction(gradients, jnp.ones(2), state, options)
  np.testing.assert_allclose(new_state.weights, [0.575, 0.425], rtol=1e-6)
  np.testing.assert_allclose(direction["w"], [0.575, 0.85], rtol=1e-6)


def test_go4align_weights_by_hand():
  # Losses (1, 3), η = 0: γ = (4, 4/3), p = (½, ½), ω = (2, 2/3); one group: both mean(ω) = 4/3.
  for groups, expected in ((1, [4 / 3, 4 / 3]), (2, [2.0, 2 / 3])):
    method = weighting.get(
      "go4align", method_options(go4align_step_size=0.0, go4align_groups=groups)
    )
    _, state = method.init(2)
    _, _, aux = method.combine(jnp.asarray([1.0, 3.0]), {}, state, None, 0)
    np.testing.assert_allclose(aux["weights"], expected, rtol=1e-6)


def test_one_dimensional_kmeans_is_the_optimal_grouping():
  values = np.random.default_rng(0).normal(size=7).astype(np.float32)
  for groups in (1, 2, 3):
    means = np.asarray(loss_based.kmeans_1d(jnp.asarray(values), groups))
    order = np.sort(values)
    best = np.inf
    # Brute force over the contiguous splits of the sorted values.
    for cuts in itertools.combinations(range(1, 7), groups - 1):
      parts = np.split(order, cuts)
      best = min(best, sum(np.sum((part - part.mean()) ** 2) for part in parts))
    assert np.sum((values - means) ** 2) == pytest.approx(best, rel=1e-4, abs=1e-6)
    assert len(np.unique(np.round(means, 5))) == groups


def test_cr_mogm_is_a_moving_average_of_its_base_weights():
  method = weighting.get("cr_mogm", method_options(cr_mogm_base="imtl_g", cr_mogm_alpha=0.75))
  params, state = method.init(3)
  rng = np.random.default_rng(1)
  expected = None
  for step in range(3):
    jacobian = rng.normal(size=(3, 6))
    gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
    base = np.asarray(gb.imtl_g_weights(gramian))
    expected = base if expected is None else 0.75 * expected + 0.25 * base
    weights, state, _ = jax.jit(method.weigh)(gramian, jnp.ones(3), params, state, None, step)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)


def test_stch_uses_log_losses_in_warm_up_then_a_smooth_max_above_the_nadir():
  method = weighting.get(
    "stch", method_options(steps_per_epoch=1, stch_warmup_epochs=1, stch_mu=1.0)
  )
  _, state = method.init(2)
  losses = jnp.asarray([2.0, 4.0])
  for step in range(2):  # epoch 0: warm-up; epoch 1: warm-up that also records the nadir
    _, state, aux = method.combine(losses, {}, state, None, step)
    np.testing.assert_allclose(aux["weights"], [0.5, 0.25], rtol=1e-6)
  later = jnp.asarray([1.0, 4.0])  # task 0 halved, task 1 at its nadir
  total, state, aux = method.combine(later, {}, state, None, 2)
  logs = np.log([0.5, 1.0])
  softmax = np.exp(logs) / np.exp(logs).sum()
  np.testing.assert_allclose(total, 2 * np.log(np.exp(logs).sum()), rtol=1e-5)
  np.testing.assert_allclose(aux["weights"], 2 * softmax / np.asarray(later), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize("name", ["config", "dualproj", "fairgrad", "imtl_g"])
def test_gramian_methods_permute_with_the_rows(name):
  method = weighting.get(name, method_options())
  jacobian = np.random.default_rng(2).normal(size=(4, 9))
  permutation = np.array([2, 0, 3, 1])

  def weights(matrix):
    gramian = jnp.asarray(matrix @ matrix.T, jnp.float32)
    return np.asarray(method.weigh(gramian, jnp.ones(4), {}, method.init(4)[1], None, 0)[0])

  np.testing.assert_allclose(
    weights(jacobian[permutation]), weights(jacobian)[permutation], rtol=1e-3
  )


@pytest.mark.parametrize("name", ["config", "dualproj"])
def test_non_conflicting_methods_never_oppose_a_row(name):
  method = weighting.get(name, method_options())
  rng = np.random.default_rng(3)
  for _ in range(5):
    jacobian = rng.normal(size=(3, 6))
    jacobian[2] = -jacobian[0] + 0.3 * jacobian[2]
    gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
    weights = np.asarray(method.weigh(gramian, jnp.ones(3), {}, method.init(3)[1], None, 0)[0])
    inner = jacobian @ (weights @ jacobian)
    norms = np.linalg.norm(jacobian, axis=1)
    assert np.all(inner >= -1e-3 * norms * norms.max())


def test_config_gives_equal_cosines_and_fairgrad_scales_as_stated():
  jacobian = np.random.default_rng(4).normal(size=(3, 7))
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  direction = np.asarray(gb.config_weights(gramian, 1e-6)) @ jacobian
  cosines = jacobian @ direction / np.linalg.norm(jacobian, axis=1) / np.linalg.norm(direction)
  np.testing.assert_allclose(cosines, cosines[0], rtol=1e-4)
  # FairGrad: w(sG) = s^(-α/(α+1)) w(G), the scale dependence the references have.
  for alpha in (0.5, 2.0):
    base = np.asarray(gb.fairgrad_weights(gramian, alpha, 20))
    scaled = np.asarray(gb.fairgrad_weights(9.0 * gramian, alpha, 20))
    np.testing.assert_allclose(scaled, base * 9.0 ** (-alpha / (alpha + 1)), rtol=1e-4)


def test_gls_direction_ignores_a_constant_loss_scale():
  losses = jnp.asarray([0.5, 2.0, 1.5])
  scales = jnp.asarray([1.0, 10.0, 0.1])
  gls = weighting.get("gls", method_options())
  weights = gls.combine(losses, {}, {}, None, 0)[2]["weights"]
  scaled = gls.combine(losses * scales, {}, {}, None, 0)[2]["weights"]
  # GLS's gradient in the original losses: w_t s_t must be proportional to w_t.
  ratio = np.asarray(scaled * scales / weights)
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_auto_lambda_hypergradient_equals_a_finite_difference():
  rng = np.random.default_rng(5)
  a, b = (jnp.asarray(rng.normal(size=(2, 3)), jnp.float32) for _ in range(2))
  params = {"theta": jnp.asarray(rng.normal(size=3), jnp.float32)}

  def losses(data):
    return lambda p: jnp.sum((data - p["theta"]) ** 2, axis=1)

  weights = jnp.asarray([0.3, 0.7])
  hypergradient = bilevel.auto_lambda_hypergradient(
    losses(a), losses(b), params, weights, 0.1, 0.01
  )

  def meta(weights):
    gradient = jax.grad(lambda p: jnp.sum(weights * losses(a)(p)))(params)
    virtual = jax.tree_util.tree_map(lambda p, g: p - 0.1 * (g + 0.01 * p), params, gradient)
    return jnp.sum(losses(b)(virtual))

  np.testing.assert_allclose(hypergradient, jax.grad(meta)(weights), rtol=1e-5)


def test_split_batch_cuts_disjoint_parts_and_keeps_per_task_arrays():
  batch = {"image": jnp.arange(7.0)[:, None], "scales": jnp.ones((2,))}
  parts, shares = gradient_steps.split_batch(batch, 3)
  assert [int(part["image"].shape[0]) for part in parts] == [3, 2, 2]
  np.testing.assert_array_equal(np.concatenate([part["image"] for part in parts]), batch["image"])
  assert all(part["scales"].shape == (2,) for part in parts) and sum(shares) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="config.training.batch_size"):
    gradient_steps.split_batch(batch, 8)


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("fairgrad_alpha", -1.0, r"config\.method\.fairgrad_alpha.*> 0"),
    ("sdmgrad_momentum", 1.0, r"config\.method\.sdmgrad_momentum.*\[0, 1\)"),
    ("go4align_groups", 0, r"config\.method\.go4align_groups"),
    ("moco_weight_map", "sigmoid", r"config\.method\.moco_weight_map"),
    ("cr_mogm_base", "nope", r"config\.method\.cr_mogm_base"),
  ],
)
def test_catalogue_options_are_validated_with_one_line_naming_the_key(key, value, message):
  config = test_config.get_config()
  config.unlock()
  with config.method.ignore_type():
    config.method[key] = value
  with pytest.raises(config_validation.ConfigError, match=message) as error:
    config_validation.validate_config(config, device_count=1)
  assert len(str(error.value).splitlines()) == 1


def test_a_batch_too_small_to_split_is_rejected_naming_the_batch_size():
  config = test_config.get_config("method=sdmgrad")
  config.unlock()
  config.training.batch_size = 2
  with pytest.raises(config_validation.ConfigError, match=r"config\.training\.batch_size.*3 parts"):
    config_validation.validate_config(config, device_count=1)
