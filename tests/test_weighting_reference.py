"""mtl_jax's methods against TorchJD 0.18.0 and LibMTL 1.1.5 outputs on fixed inputs.

The references were computed once into tests/reference/reference_outputs.npz (float64; see
tests/reference/NOTES.md for every record and make_reference_outputs.py for how to regenerate
it). Each test converts between the conventions explicitly (sum vs mean, raw vs normalised
Gramian, first-call rules) and runs mtl_jax under jax.jit in float32, as training does.

Tolerances: a float32 solve on a Gramian with condition number κ loses about κ·6e-8 relative
accuracy, so the solver-based comparisons use only cases with κ below a stated bound and a
tolerance a few times κ_max·6e-8; closed forms on well-conditioned inputs get 1e-4 to 1e-5.
Directions are compared relative to the largest row norm (the scale of every direction here).
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import weighting
from mtl_jax.weighting import gramian_based as gb
from mtl_jax.weighting import loss_based
from mtl_jax.weighting import task_gradients as tg
from tests.options import method_options

REFERENCE = np.load(pathlib.Path(__file__).parent / "reference" / "reference_outputs.npz")
METADATA = json.loads(str(REFERENCE["metadata"]))
CASES = tuple(METADATA["jacobian_cases"])
LOSS_CASES = tuple(METADATA["loss_cases"])
SEQUENCES = ("seqA_m3_n10", "seqB_m5_n12", "seqC_m2_n6")
ITERATIONS = 1000

_jit = functools.partial(
  jax.jit,
  compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
)


def _jacobian(case):
  return REFERENCE[f"inputs/J/{case}"]


def _gramian32(jacobian):
  return jnp.asarray(jacobian @ jacobian.T, jnp.float32)


def _condition(jacobian):
  eigenvalues = np.linalg.eigvalsh(jacobian @ jacobian.T)
  return np.inf if eigenvalues[0] <= 1e-12 * eigenvalues[-1] else eigenvalues[-1] / eigenvalues[0]


def _cases_below(condition, normal_scale=False):
  """Cases whose Gramian's condition number is below `condition`; with `normal_scale`, without
  tiny_m3_n6, whose trace (8e-6) is under TorchJD's norm_eps (1e-4): there TorchJD's UPGrad,
  DualProj and CAGrad replace G by 0 and return the mean or zero, by design."""
  return [
    case
    for case in CASES
    if _condition(_jacobian(case)) < condition and not (normal_scale and case.startswith("tiny"))
  ]


def _assert_direction_close(weights, reference_vector, jacobian, tolerance):
  scale = np.max(np.linalg.norm(jacobian, axis=1))
  error = np.linalg.norm(np.asarray(weights, np.float64) @ jacobian - reference_vector) / scale
  assert error <= tolerance, f"direction error {error:.2e} (relative to the largest row norm)"


# ----------------------------------------------------------------------------------------------
# Gramian weightings on the 49 Jacobians.

WEIGHTS = {
  "upgrad": _jit(lambda g: gb.upgrad_weights(g, ITERATIONS)),
  "dualproj": _jit(lambda g: gb.dualproj_weights(g, ITERATIONS)),
  "mgda": _jit(lambda g: gb.mgda_weights(g, ITERATIONS)),
  "imtl_g": _jit(gb.imtl_g_weights),
  "aligned_mtl": _jit(gb.aligned_mtl_weights),
  "config": _jit(lambda g: gb.config_weights(g, 1e-6)),
  "cagrad": _jit(lambda g, c: gb.cagrad_weights(g, c, 0, 20, ITERATIONS), static_argnums=1),
  "pcgrad": _jit(gb.pcgrad_weights),
}


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_projections_match_torchjd_without_its_regulariser(name):
  # TorchJD's default adds 1e-4·I to G/trace(G), which moves the result by up to 68% (NOTES.md);
  # its reg_eps=1e-10 variant is the exact projection that mtl_jax solves.
  reference = {"upgrad": "UPGrad_reg1e-10", "dualproj": "DualProj_reg1e-10"}[name]
  cases = _cases_below(1e4, normal_scale=True)
  assert len(cases) >= 20
  for case in cases:
    jacobian = _jacobian(case)
    weights = WEIGHTS[name](_gramian32(jacobian))
    _assert_direction_close(
      weights, REFERENCE[f"torchjd/{reference}/vector/{case}"], jacobian, 2e-3
    )


def test_mgda_reaches_the_exact_min_norm_point():
  # TorchJD's and LibMTL's MGDA stop early (up to 0.037 off); the npz's exact min-norm point is
  # enumerated over supports in float64.
  for case in _cases_below(1e4):
    jacobian = _jacobian(case)
    weights = WEIGHTS["mgda"](_gramian32(jacobian))
    _assert_direction_close(weights, REFERENCE[f"derived/min_norm/vector/{case}"], jacobian, 1e-3)


def test_imtl_g_and_aligned_mtl_match_torchjd_on_full_rank_inputs():
  # IMTL-G: both sum to 1 (TorchJD via pinv(G)·√diag G; mtl_jax via LibMTL's D Uᵀ inverse, equal
  # on full rank). Aligned-MTL: mtl_jax sums the aligned rows (sum convention, LibMTL), TorchJD
  # averages them: mtl_jax = m × TorchJD.
  for case in _cases_below(1e3):
    jacobian = _jacobian(case)
    gramian = _gramian32(jacobian)
    np.testing.assert_allclose(
      WEIGHTS["imtl_g"](gramian), REFERENCE[f"torchjd/IMTLG/weights/{case}"], rtol=1e-3, atol=1e-4
    )
    aligned = REFERENCE[f"torchjd/AlignedMTL/weights/{case}"] * jacobian.shape[0]
    np.testing.assert_allclose(WEIGHTS["aligned_mtl"](gramian), aligned, rtol=1e-3, atol=1e-4)


def test_config_matches_torchjd():
  # ConFIG is TorchJD's sum convention on both sides. Its pseudo-inverse drops the null
  # directions of an exactly singular cosine matrix alike; a nearly singular one (the opposite
  # rows, cosine eigenvalues ~1e-7) is decided by the cut-off (float32 cannot resolve it), so
  # those cases are left out.
  for case in CASES:
    jacobian = _jacobian(case)
    norms = np.linalg.norm(jacobian, axis=1, keepdims=True)
    cosine_condition = _condition(jacobian / np.where(norms > 0, norms, 1.0))
    if np.isfinite(cosine_condition) and cosine_condition > 1e4:
      continue
    weights = WEIGHTS["config"](_gramian32(jacobian))
    reference = REFERENCE[f"torchjd/ConFIG/vector/{case}"]
    _assert_direction_close(weights, reference, jacobian, 1e-3)


@pytest.mark.parametrize("c", [0.5, 0.2])
def test_cagrad_matches_torchjd_without_rescaling(c):
  # TorchJD divides by nothing (cagrad_rescale 0); it returns zero weights when ‖g_w‖ < 1e-4 on
  # G/trace(G) (0 in the hull), where mtl_jax returns the mean: those cases are left out.
  for case in _cases_below(1e4, normal_scale=True):
    jacobian = _jacobian(case)
    weights = WEIGHTS["cagrad"](_gramian32(jacobian), c)
    reference = REFERENCE[f"torchjd/CAGrad_c{c}/vector/{case}"]
    _assert_direction_close(weights, reference, jacobian, 2e-3)


def test_pcgrad_matches_libmtl_with_its_recorded_orders():
  # Sum convention on both sides; each row visits the rows (itself included) in LibMTL's order.
  for case in _cases_below(1e4):
    jacobian = _jacobian(case)
    orders = jnp.asarray(REFERENCE[f"libmtl/PCGrad/orders/{case}"], jnp.int32)
    weights = WEIGHTS["pcgrad"](_gramian32(jacobian), orders)
    _assert_direction_close(weights, REFERENCE[f"libmtl/PCGrad/vector/{case}"], jacobian, 1e-4)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_matches_torchjd_on_the_raw_gramian(alpha):
  # Both solve G w = w^(-1/α) on the raw (unnormalised) G; mtl_jax solves on G/s and scales the
  # weights back. Only cases where the reference solved its equation (relative residual < 1e-5)
  # count: on zero rows, the tiny case and singular hulls there is no solution (NOTES.md).
  solve = _jit(lambda g: gb.fairgrad_weights(g, alpha, 20))
  name = f"FairGrad_a{alpha:g}"
  compared = 0
  for case in _cases_below(1e4):
    jacobian = _jacobian(case)
    gramian = jacobian @ jacobian.T
    reference = REFERENCE[f"torchjd/{name}/weights/{case}"]
    residual = gramian @ reference - reference ** (-1.0 / alpha)
    if np.linalg.norm(residual) > 1e-5 * np.linalg.norm(reference ** (-1.0 / alpha)):
      continue
    compared += 1
    np.testing.assert_allclose(solve(_gramian32(jacobian)), reference, rtol=2e-3)
  assert compared >= 20


def test_nash_mtl_matches_torchjd_first_calls():
  # Both: G / ‖G‖_F, (Gα)_i = 1/α_i, then α scaled so that ‖Jᵀα‖ ≤ 1 (max_norm 1). TorchJD's 20
  # ECOS rounds reach about 1e-5 (NOTES.md); mtl_jax's Newton steps float32 accuracy.
  solve = _jit(lambda g: gb.nash_mtl_weights(g, 50, 1.0))
  for case in _cases_below(1e4, normal_scale=True):
    jacobian = _jacobian(case)
    reference = REFERENCE[f"torchjd/NashMTL/weights/{case}"]
    np.testing.assert_allclose(solve(_gramian32(jacobian)), reference, rtol=2e-3, atol=1e-5)


def test_gradvac_matches_torchjd_with_its_recorded_orders():
  # TorchJD and mtl_jax both move every visited target (LibMTL only the corrected ones); TorchJD
  # records each row's order of the other rows [m, m-1]; mtl_jax's orders also list the row
  # itself, which it skips: appended at the end.
  update = _jit(lambda g, targets, orders: gb.gradvac_weights(g, targets, orders, 0.5))

  def orders_of(perms):
    return jnp.asarray(np.concatenate([perms, np.arange(len(perms))[:, None]], axis=1), jnp.int32)

  for case in _cases_below(1e4, normal_scale=True):
    jacobian = _jacobian(case)
    size = jacobian.shape[0]
    perms = REFERENCE[f"torchjd/GradVac/perms/{case}"]
    weights, _ = update(_gramian32(jacobian), jnp.zeros((size, size)), orders_of(perms))
    _assert_direction_close(weights, REFERENCE[f"torchjd/GradVac/vector/{case}"], jacobian, 1e-4)
  for sequence in SEQUENCES:
    size = REFERENCE[f"inputs/seq/{sequence}/J/0"].shape[0]
    targets = jnp.zeros((size, size))
    for step in range(5):
      jacobian = REFERENCE[f"inputs/seq/{sequence}/J/{step}"]
      perms = REFERENCE[f"torchjd_seq/GradVac/perms/{sequence}/{step}"]
      weights, targets = update(_gramian32(jacobian), targets, orders_of(perms))
      reference = REFERENCE[f"torchjd_seq/GradVac/vector/{sequence}/{step}"]
      _assert_direction_close(weights, reference, jacobian, 1e-4)


# ----------------------------------------------------------------------------------------------
# Stateful Gramian-space methods on the 5-step sequences (and first calls on J Jᵀ).


def test_sdmgrad_runs_in_the_gramians_precision_and_keeps_its_states_dtype():
  # The loss-scale classification (studies/invariance.py) trains in float64 from float32 method
  # states: the inner loop must run in float64 and the kept weights stay float32.
  with jax.enable_x64(True):
    sdmgrad = jax.jit(lambda a, w: tg.sdmgrad_weights(a, w, 0.3, 10.0, 0.5, 20))
    for case in _cases_below(1e4):
      jacobian = np.asarray(_jacobian(case), np.float64)
      size = jacobian.shape[0]
      start = jnp.full((size,), 1.0 / size, jnp.float32)
      step_weights, kept = sdmgrad(jnp.asarray(jacobian @ jacobian.T), start)
      assert step_weights.dtype == jnp.float64 and kept.dtype == jnp.float32
      np.testing.assert_allclose(
        step_weights, REFERENCE[f"torchjd/SDMGradWeighting/weights/{case}"], atol=2e-4
      )


def test_modo_and_sdmgrad_weights_match_torchjd_on_first_calls_and_sequences():
  # SDMGrad's weights are 20 heavy-ball steps of learning rate 10 on Â (‖Â‖ ~ 1), warm-started
  # across the sequence: float32 round-off is amplified by the iteration (3e-4 observed on the
  # sequences), hence 1e-3 there; MoDo's one projected step stays at float32 accuracy.
  modo = _jit(lambda a, w: tg.modo_weights(a, w, 0.1, 0.1))
  sdmgrad = _jit(lambda a, w: tg.sdmgrad_weights(a, w, 0.3, 10.0, 0.5, 20))

  def start(size):
    return jnp.full((size,), 1.0 / size, jnp.float32)

  for case in _cases_below(1e4):
    gramian = _gramian32(_jacobian(case))
    size = gramian.shape[0]
    np.testing.assert_allclose(
      modo(gramian, start(size)), REFERENCE[f"torchjd/MoDoWeighting/weights/{case}"], atol=2e-5
    )
    np.testing.assert_allclose(
      sdmgrad(gramian, start(size))[0],
      REFERENCE[f"torchjd/SDMGradWeighting/weights/{case}"],
      atol=2e-4,
    )
  for sequence in SEQUENCES:
    size = REFERENCE[f"inputs/seq/{sequence}/A/0"].shape[0]
    modo_state, sdmgrad_state = start(size), start(size)
    for step in range(5):
      cross = jnp.asarray(REFERENCE[f"inputs/seq/{sequence}/A/{step}"], jnp.float32)
      modo_state = modo(cross, modo_state)
      step_weights, sdmgrad_state = sdmgrad(cross, sdmgrad_state)
      key = f"{sequence}/{step}"
      np.testing.assert_allclose(
        modo_state, REFERENCE[f"torchjd_seq/MoDoWeighting/weights/{key}"], atol=2e-5
      )
      np.testing.assert_allclose(
        step_weights, REFERENCE[f"torchjd_seq/SDMGradWeighting/weights/{key}"], atol=1e-3
      )


def test_excess_mtl_matches_torchjd_sequences_after_the_stated_conversion():
  # TorchJD starts at 1/m and already moves on the first call (w_1 = softmax(e_1), e_1 unscaled);
  # mtl_jax (the authors' code and LibMTL) keeps α = 1 on the first call. From step 2 on both
  # move by exp(η e_k / e_1) (η = 1 here; TorchJD's +1e-7 on the baseline is negligible), so
  # mtl_jax's α_k / T = TorchJD's w_k ⊙ exp(-e_1), renormalised.
  update = _jit(lambda gradients, state: tg.excess_mtl_weights(gradients, state, 1.0))
  for sequence in SEQUENCES:
    size = REFERENCE[f"inputs/seq/{sequence}/J/0"].shape[0]
    first = REFERENCE[f"inputs/seq/{sequence}/J/0"]
    first_excess = np.sum(first**2 / np.sqrt(first**2 + 1e-7), axis=1)
    ones = jnp.ones((size,), jnp.float32)
    state = tg.ExcessMTLState(
      {"w": jnp.zeros_like(jnp.asarray(first, jnp.float32))}, ones, ones * 0, jnp.asarray(False)
    )
    for step in range(5):
      gradients = {"w": jnp.asarray(REFERENCE[f"inputs/seq/{sequence}/J/{step}"], jnp.float32)}
      weights, state = update(gradients, state)
      reference = REFERENCE[f"torchjd_seq/ExcessMTL/weights/{sequence}/{step}"]
      converted = reference * np.exp(-first_excess)
      np.testing.assert_allclose(weights / size, converted / converted.sum(), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Loss weightings on the 12 loss vectors: values and d value / d losses (the effective weights).


def _value_and_grad(method, losses, params=None):
  _, state = method.init(losses.shape[0])
  params = method.init(losses.shape[0])[0] if params is None else params

  def total(task_losses, params):
    return method.combine(task_losses, params, state, None, jnp.zeros((), jnp.int32))[0]

  return _jit(jax.value_and_grad(total, argnums=(0, 1)))(jnp.asarray(losses, jnp.float32), params)


@pytest.mark.parametrize("lcase", LOSS_CASES)
def test_gls_imtl_l_and_uw_match_torchjd_scalarizers(lcase):
  losses = REFERENCE[f"inputs/losses/{lcase}"]
  log_param = jnp.asarray(REFERENCE[f"inputs/log_param/{lcase}"], jnp.float32)
  value, (grad, _) = _value_and_grad(weighting.get("gls", method_options()), losses)
  np.testing.assert_allclose(
    value, REFERENCE[f"torchjd_scalar/GeometricMean/value/{lcase}"], rtol=1e-5
  )
  np.testing.assert_allclose(
    grad, REFERENCE[f"torchjd_scalar/GeometricMean/grad/{lcase}"], rtol=1e-4
  )
  imtl_l = weighting.get("imtl_l", method_options())
  for record, params in (("IMTLL_init", None), ("IMTLL_param", {"log_scale": log_param})):
    value, (grad, param_grad) = _value_and_grad(imtl_l, losses, params)
    prefix = f"torchjd_scalar/{record}"
    # Σ e^s L - s cancels to ~1e-3 on the small losses: absolute float32 accuracy there.
    np.testing.assert_allclose(value, REFERENCE[f"{prefix}/value/{lcase}"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, REFERENCE[f"{prefix}/grad/{lcase}"], rtol=1e-5)
    np.testing.assert_allclose(
      param_grad["log_scale"], REFERENCE[f"{prefix}/param_grad/{lcase}"], rtol=1e-5, atol=1e-5
    )
  # UW with LibMTL's initial log-variance -0.5 (configs/base.py's default).
  uw = weighting.get("uw", method_options(uw_initial_log_variance=-0.5))
  value, (grad, param_grad) = _value_and_grad(uw, losses)
  np.testing.assert_allclose(value, REFERENCE[f"torchjd_scalar/UW_m0.5/value/{lcase}"], rtol=1e-5)
  np.testing.assert_allclose(grad, REFERENCE[f"torchjd_scalar/UW_m0.5/grad/{lcase}"], rtol=1e-5)


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_smooth_tchebycheff_matches_torchjd_stch(mu):
  function = _jit(jax.value_and_grad(loss_based.smooth_tchebycheff), static_argnums=1)
  for lcase in LOSS_CASES:
    losses = REFERENCE[f"inputs/losses/{lcase}"]
    size = losses.shape[0]
    uniform = jnp.full((size,), 1.0 / size, jnp.float32)
    records = [(f"STCH_mu{mu:g}", uniform, jnp.zeros((size,), jnp.float32))]
    if mu == 0.1:
      pref = jnp.asarray(REFERENCE[f"inputs/pref/{lcase}"], jnp.float32)
      reference_point = jnp.asarray(REFERENCE[f"inputs/reference/{lcase}"], jnp.float32)
      records.append(("STCH_mu0.1_pref_ref", pref, reference_point))
    for record, preference, point in records:
      value, grad = function(jnp.asarray(losses, jnp.float32), mu, preference, point)
      expected = REFERENCE[f"torchjd_scalar/{record}/value/{lcase}"]
      np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5 * mu)
      np.testing.assert_allclose(
        grad, REFERENCE[f"torchjd_scalar/{record}/grad/{lcase}"], rtol=1e-4, atol=1e-6
      )


# Equal, spread (four decades), large and small losses, with two task counts (two compilations).
@pytest.mark.parametrize(
  "lcase", ["l_m2_a", "l_m2_small", "l_m3_equal", "l_m3_spread", "l_m3_large"]
)
def test_famo_and_dwa_match_torchjd_protocols(lcase):
  # FAMO: on each step the value and weights at the losses before the update, then the logits'
  # Adam step (coupled weight decay 1e-3) from the losses after it: z = softmax(logits) compared.
  famo = weighting.get("famo", method_options())
  _, state = famo.init(REFERENCE[f"inputs/losses/{lcase}"].shape[0])
  value_and_grad = _jit(
    jax.value_and_grad(lambda losses, state: famo.combine(losses, {}, state, None, 0)[0])
  )
  combine = _jit(lambda losses, state: famo.combine(losses, {}, state, None, 0)[1])
  after_update = _jit(famo.after_update)
  for step in range(4):
    before = jnp.asarray(REFERENCE[f"inputs/famo/{lcase}/before/{step}"], jnp.float32)
    value, grad = value_and_grad(before, state)
    key = f"{lcase}/{step}"
    np.testing.assert_allclose(grad, REFERENCE[f"torchjd_scalar/FAMO/grad/{key}"], rtol=1e-4)
    expected_value = REFERENCE[f"torchjd_scalar/FAMO/value/{key}"]
    np.testing.assert_allclose(value, expected_value, rtol=1e-4, atol=1e-5)
    state = combine(before, state)
    after = jnp.asarray(REFERENCE[f"inputs/famo/{lcase}/after/{step}"], jnp.float32)
    state = after_update(after, state)
    np.testing.assert_allclose(
      jax.nn.softmax(state.logits),
      REFERENCE[f"torchjd_scalar/FAMO/z_after_update/{key}"],
      rtol=1e-4,
    )
  # DWA (temperature 2, two steps per epoch): weights 1 for epochs 0 and 1, then from the ratio
  # of the last two epochs' mean losses.
  dwa = weighting.get("dwa", method_options(steps_per_epoch=2, dwa_temperature=2.0))
  _, state = dwa.init(REFERENCE[f"inputs/losses/{lcase}"].shape[0])
  for epoch in range(4):
    for part in range(2):
      losses = jnp.asarray(REFERENCE[f"inputs/dwa/{lcase}/e{epoch}b{part}"], jnp.float32)
      step = jnp.asarray(2 * epoch + part)
      grad = jax.grad(
        lambda losses, state=state, step=step: dwa.combine(losses, {}, state, None, step)[0]
      )(losses)
      state = dwa.combine(losses, {}, state, None, step)[1]
      expected = REFERENCE[f"torchjd_scalar/DWA/grad/{lcase}/e{epoch}b{part}"]
      np.testing.assert_allclose(grad, expected, rtol=1e-5)
