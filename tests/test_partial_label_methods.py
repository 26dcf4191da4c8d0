"""Partial labels inside the stateful methods: per-task records (DWA, STCH) and references (STCH's
nadir, GradNorm's L(0)) advance only on the steps whose batch labels the task, and nothing
changes when every label is present."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from mtl_jax import weighting
from mtl_jax.weighting import jacobian_based
from mtl_jax.weighting import loss_based
from mtl_jax.weighting import present as present_lib
from tests.options import method_options

STEPS_PER_EPOCH = 2
# Three tasks over eight steps (four epochs): task 1 misses an epoch's first step and the whole of
# epoch 2; task 2 misses one step of each of the first two epochs.
PRESENT = np.array(
  [
    [1, 1, 1],
    [1, 1, 0],
    [1, 0, 1],
    [1, 1, 0],
    [1, 0, 1],
    [1, 0, 1],
    [1, 1, 1],
    [1, 1, 1],
  ],
  bool,
)
LOSSES = np.random.default_rng(0).uniform(0.5, 2.0, size=PRESENT.shape).astype(np.float32)


def _combine_fn(method):
  """The jitted `present.combine` (a mask) and plain `combine` (none) of a loss weighting."""

  def masked(losses, state, step, present):
    total, state, aux = present_lib.combine(method, present, losses, {}, state, None, step)
    return total, state, aux["weights"]

  def plain(losses, state, step):
    total, state, aux = method.combine(losses, {}, state, None, step)
    return total, state, aux["weights"]

  return jax.jit(masked), jax.jit(plain)


# ---------------------------------------------------------------------- DWA: per-task epoch means


def _dwa_with_one_counter(losses, state, step, temperature):
  """DWA as it was with one step counter for all tasks (the reference for full batches)."""
  total_sum, count, last, before_last, epochs_done = state
  new_epoch = (step % STEPS_PER_EPOCH == 0) & (count > 0)
  closed_mean = total_sum / jnp.maximum(count, 1.0)
  last, before_last = (
    jnp.where(new_epoch, closed_mean, last),
    jnp.where(new_epoch, last, before_last),
  )
  epochs_done = epochs_done + new_epoch.astype(jnp.int32)
  total_sum, count = jnp.where(new_epoch, 0.0, total_sum), jnp.where(new_epoch, 0.0, count)
  ratios = last / jnp.where(before_last > 0, before_last, 1.0)
  size = losses.shape[0]
  softmax_weights = size * jax.nn.softmax(ratios / temperature)
  weights = jnp.where(epochs_done >= 2, softmax_weights, jnp.ones((size,)))
  state = (total_sum + losses, count + 1.0, last, before_last, epochs_done)
  return jnp.sum(losses * weights), state, weights


def _dwa(temperature=2.0):
  options = method_options(steps_per_epoch=STEPS_PER_EPOCH, dwa_temperature=temperature)
  return weighting.get("dwa", options)


def test_dwa_with_every_label_present_is_bitwise_the_one_counter_dwa():
  method = _dwa()
  masked, plain = _combine_fn(method)
  reference = jax.jit(_dwa_with_one_counter, static_argnums=3)
  _, state = method.init(3)
  masked_state, zeros = state, jnp.zeros((3,), jnp.float32)
  old_state = (zeros, jnp.zeros(()), zeros, zeros, jnp.zeros((), jnp.int32))
  everything = jnp.ones((3,), bool)
  for step in range(4 * STEPS_PER_EPOCH):
    losses = jnp.asarray(LOSSES[step])
    total, state, weights = plain(losses, state, step)
    masked_total, masked_state, masked_weights = masked(losses, masked_state, step, everything)
    old_total, old_state, old_weights = reference(losses, old_state, step, 2.0)
    for got in ((total, weights), (masked_total, masked_weights)):
      np.testing.assert_array_equal(got[0], old_total)
      np.testing.assert_array_equal(got[1], old_weights)
  assert not np.allclose(weights, 1.0)  # the softmax branch was reached


def _dwa_reference(temperature=2.0):
  """DWA's weights per step from each task's own epoch means (numpy, float64)."""
  size = PRESENT.shape[1]
  weights = np.zeros(PRESENT.shape)
  for step, present in enumerate(PRESENT):
    epoch = step // STEPS_PER_EPOCH
    closed = []  # per present task: the means of its epochs before this one, oldest first
    for task in np.flatnonzero(present):
      seen = [s for s in range(step) if PRESENT[s, task]]
      epochs = sorted({s // STEPS_PER_EPOCH for s in seen if s // STEPS_PER_EPOCH < epoch})
      closed.append(
        [np.mean([LOSSES[s, task] for s in seen if s // STEPS_PER_EPOCH == e]) for e in epochs]
      )
    if all(len(means) >= 2 for means in closed):
      ratios = np.array([means[-1] / means[-2] for means in closed]) / temperature
      weights[step, present] = present.sum() * np.exp(ratios) / np.exp(ratios).sum()
    else:
      weights[step, present] = 1.0
    assert size == 3
  return weights


def test_dwa_averages_each_task_over_the_steps_that_label_it():
  method = _dwa()
  masked, _ = _combine_fn(method)
  _, state = method.init(3)
  expected = _dwa_reference()
  for step in range(len(PRESENT)):
    total, state, weights = masked(jnp.asarray(LOSSES[step]), state, step, PRESENT[step])
    np.testing.assert_allclose(weights, expected[step], rtol=1e-6, err_msg=f"step {step}")
    want_total = np.sum(expected[step] * LOSSES[step] * PRESENT[step])
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
  assert not np.allclose(expected[-1][PRESENT[-1]], 1.0)  # the softmax branch was reached
  # Task 1 closed epochs 0, 1 and 3 only (it had no step in epoch 2).
  np.testing.assert_array_equal(state.epochs_done, [3, 2, 3])


# -------------------------------------------------------------------------- STCH: per-task nadir


def _stch(warmup_epochs=1):
  options = method_options(
    steps_per_epoch=STEPS_PER_EPOCH, stch_warmup_epochs=warmup_epochs, stch_mu=0.5
  )
  return weighting.get("stch", options)


def _stch_with_one_counter(losses, state, step, warmup_epochs, mu):
  """STCH as it was with one counter and one 'nadir set' flag (the reference for full batches)."""
  loss_sum, count, nadir, nadir_set = state
  epoch = step // STEPS_PER_EPOCH
  accumulate = epoch == warmup_epochs
  loss_sum = loss_sum + jnp.where(accumulate, losses, 0.0)
  count = count + accumulate.astype(count.dtype)
  after = epoch > warmup_epochs
  nadir = jnp.where(after & ~nadir_set, loss_sum / jnp.maximum(count, 1.0), nadir)
  log_losses = jnp.log(losses / nadir + 1e-20)
  smooth = losses.shape[0] * loss_based.smooth_tchebycheff(log_losses, mu, 1.0, 0.0)
  total = jnp.where(after, smooth, jnp.sum(jnp.log(losses + 1e-20)))
  softmax = jax.nn.softmax(log_losses / mu)
  size = losses.shape[0]
  weights = jnp.where(after, size * softmax / (losses + 1e-20 * nadir), 1.0 / (losses + 1e-20))
  return total, (loss_sum, count, nadir, nadir_set | after), weights


def test_stch_with_every_label_present_is_bitwise_the_one_counter_stch():
  method = _stch()
  masked, plain = _combine_fn(method)
  reference = jax.jit(_stch_with_one_counter, static_argnums=(3, 4))
  _, state = method.init(3)
  masked_state = state
  old_state = (jnp.zeros((3,)), jnp.zeros(()), jnp.ones((3,)), jnp.zeros((), bool))
  everything = jnp.ones((3,), bool)
  for step in range(4 * STEPS_PER_EPOCH):
    losses = jnp.asarray(LOSSES[step])
    total, state, weights = plain(losses, state, step)
    masked_total, masked_state, masked_weights = masked(losses, masked_state, step, everything)
    old_total, old_state, old_weights = reference(losses, old_state, step, 1, 0.5)
    for got in ((total, weights), (masked_total, masked_weights)):
      np.testing.assert_array_equal(got[0], old_total)
      np.testing.assert_array_equal(got[1], old_weights)
  np.testing.assert_array_equal(state.nadir, old_state[2])


def test_stch_sets_each_nadir_from_the_steps_that_label_the_task():
  # Warm-up epoch 1 (steps 2, 3): task 0 labelled twice, task 1 once (step 3), task 2 once (2).
  # Task 1 is absent at step 4, the first step after warm-up: it takes its nadir at step 6.
  method = _stch()
  masked, _ = _combine_fn(method)
  _, state = method.init(3)
  nadirs = {}
  for step in range(len(PRESENT)):
    _, state, weights = masked(jnp.asarray(LOSSES[step]), state, step, PRESENT[step])
    if step == 4:
      nadirs[4] = np.asarray(state.nadir).copy()
      assert not bool(state.nadir_set[1])
    assert np.all(np.isfinite(weights)) and np.all(np.asarray(weights)[~PRESENT[step]] == 0)
  want = [LOSSES[2:4, 0].mean(), LOSSES[3, 1], LOSSES[2, 2]]
  np.testing.assert_allclose(state.nadir, want, rtol=1e-6)
  assert nadirs[4][1] == 1.0  # not yet set when absent at the first step after warm-up


def test_stch_takes_the_loss_of_its_first_step_as_nadir_for_a_task_unlabelled_in_warm_up():
  method = _stch(warmup_epochs=2)  # epoch 2 (steps 4, 5) never labels task 1
  masked, _ = _combine_fn(method)
  _, state = method.init(3)
  for step in range(len(PRESENT)):
    _, state, weights = masked(jnp.asarray(LOSSES[step]), state, step, PRESENT[step])
    assert np.all(np.isfinite(weights))
  want = [LOSSES[4:6, 0].mean(), LOSSES[6, 1], LOSSES[4:6, 2].mean()]
  np.testing.assert_allclose(state.nadir, want, rtol=1e-6)


# ------------------------------------------------------------------------ GradNorm: per-task L(0)


def _gradnorm_loss(gramian, losses, initial, logits, alpha):
  """GradNorm's objective for the logits (numpy float64), from the paper's formula."""
  weights = len(losses) * np.exp(logits) / np.exp(logits).sum()
  weighted_norms = weights * np.sqrt(np.diag(gramian))
  ratios = losses / initial
  target = weighted_norms.mean() * (ratios / ratios.mean()) ** alpha
  return np.abs(weighted_norms - target).sum()


@pytest.mark.parametrize("masked", [False, True])
def test_gradnorm_takes_each_tasks_initial_loss_at_its_first_labelled_step(masked):
  method = weighting.get("gradnorm", method_options(gradnorm_alpha=1.5))
  params, state = method.init(3)
  params = {"logits": jnp.asarray([0.1, -0.2, 0.3])}
  vectors = np.random.default_rng(1).normal(size=(3, 5))
  gramian = vectors @ vectors.T
  presence = PRESENT[[2, 1, 0]] if masked else np.ones((3, 3), bool)

  def weigh(gramian, losses, state, step, present):
    _, state, aux = present_lib.weigh(
      method, "task", present, gramian, losses, params, state, None, step
    )
    return state, aux["weighting_loss"]

  weigh = jax.jit(weigh)
  first = {}
  for step, present in enumerate(presence):
    losses = LOSSES[step] * present
    rows = np.flatnonzero(present)
    for task in rows:
      first.setdefault(task, LOSSES[step, task])
    masked_gramian = gramian * np.outer(present, present)
    state, loss = weigh(
      jnp.asarray(masked_gramian, jnp.float32), jnp.asarray(losses), state, step, present
    )
    initial = np.array([first[task] for task in rows], np.float64)
    want = _gradnorm_loss(
      gramian[np.ix_(rows, rows)],
      LOSSES[step, rows],
      initial,
      np.asarray(params["logits"])[rows],
      1.5,
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=f"step {step}")
  np.testing.assert_array_equal(state.initial_losses, [first[task] for task in range(3)])


# --------------------------------------------- Auto-Lambda and the Jacobian methods: present only

KEPT = np.array([0, 2])  # task 1 is absent: zero loss, zero gradient
ABSENT = np.array([True, False, True])


def _options():
  config = test_config.get_config()
  return weighting.method_options(config, 1)


def _assert_tree_close(got, want, **tolerances):
  for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(got_leaf, want_leaf, **tolerances)


def _rows(tree, rows):
  return jax.tree_util.tree_map(lambda leaf: leaf[rows], tree)


def _state_rows(state, rows):
  """The per-task leaves of a method's state ([T, ...]) at `rows`; shared leaves as they are."""
  return jax.tree_util.tree_map(lambda leaf: leaf[rows] if jnp.ndim(leaf) else leaf, state)


def _unchanged_row(state, before, row):
  for leaf, old in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(before)):
    if jnp.ndim(old):
      np.testing.assert_array_equal(leaf[row], old[row])


# Two steps with every task labelled (so that the state holds history of task 1), then three with
# task 1 unlabelled, compared with the smaller problem started from the state's other rows.
LABELLED_STEPS, ABSENT_STEPS = 2, 3


def test_auto_lambda_updates_the_weights_of_the_present_tasks_as_the_smaller_problem():
  method = weighting.get("auto_lambda", _options())
  directions = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)), jnp.float32)
  params = {"w": jnp.linspace(-1.0, 1.0, 5)}

  def losses_of(offset, labelled):
    def losses(params):  # an unlabelled task's loss is a constant 0
      return (directions @ params["w"] - offset) ** 2 * jnp.asarray(labelled, jnp.float32)

    return losses

  def update(state, step, labelled):
    train, meta = losses_of(0.5, labelled), losses_of(-0.3, labelled)
    return present_lib.bilevel(method, jnp.asarray(labelled), train, meta, params, state, step)

  def small_update(state, step):
    def train(p):
      return losses_of(0.5, ABSENT)(p)[KEPT]

    return method.bilevel(train, losses_of(-0.3, ABSENT), params, state, step)

  update, small_update = jax.jit(update), jax.jit(small_update)
  _, state = method.init(3)
  for step in range(LABELLED_STEPS):
    state = update(state, step, np.ones(3, bool))
  before, small_state = state, _state_rows(state, KEPT)
  for step in range(LABELLED_STEPS, LABELLED_STEPS + ABSENT_STEPS):
    state, small_state = update(state, step, ABSENT), small_update(small_state, step)
  _assert_tree_close(_state_rows(state, KEPT), small_state, rtol=1e-6)
  _unchanged_row(state, before, 1)  # λ_1 and its moments: Adam's momentum would move them
  assert float(before.optimizer[0].mu[1]) != 0.0
  assert not np.allclose(state.weights[KEPT], before.weights[KEPT])


TASK_GRADIENT_METHODS = ["db_mtl", "moco", "excess_mtl", "sdmgrad", "modo"]


@pytest.mark.parametrize("name", TASK_GRADIENT_METHODS)
def test_task_gradient_methods_see_the_present_tasks_as_the_smaller_problem(name):
  method = weighting.get(name, _options())
  # Encoder leaves whose axes equal the task count (3): only the task axis is per task.
  encoder = {"bias": jnp.zeros((3,)), "kernel": jnp.zeros((3, 3))}
  rng = np.random.default_rng(3)

  def parts_of(labelled):
    parts = []
    for _ in range(method.batch_parts):
      losses = rng.uniform(0.5, 2.0, size=3) * labelled
      gradients = {
        key: rng.normal(size=(3, *leaf.shape)) * labelled.reshape((3,) + (1,) * leaf.ndim)
        for key, leaf in encoder.items()
      }
      gradients = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, jnp.float32), gradients)
      parts.append(weighting.TaskGradients(jnp.asarray(losses, jnp.float32), gradients))
    return tuple(parts)

  key = jax.random.PRNGKey(0)
  combine = jax.jit(
    lambda parts, state, step, labelled: present_lib.task_gradients_combine(
      method, labelled, parts, {}, state, key, step
    )
  )
  small_combine = jax.jit(lambda parts, state, step: method.combine(parts, {}, state, key, step))
  _, state = method.init(3, encoder)
  for step in range(LABELLED_STEPS):
    state = combine(parts_of(np.ones(3, bool)), state, step, np.ones(3, bool))[2]
  # The smaller problem starts from the present tasks' rows of the state.
  before, small_state = state, _state_rows(state, KEPT)
  for step in range(LABELLED_STEPS, LABELLED_STEPS + ABSENT_STEPS):
    parts = parts_of(ABSENT)
    direction, scales, state, aux = combine(parts, state, step, ABSENT)
    small = small_combine(_rows(parts, KEPT), small_state, step)
    small_direction, small_scales, small_state, small_aux = small
    _assert_tree_close(direction, small_direction, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scales[KEPT], small_scales, rtol=1e-5)
    assert float(scales[1]) == 0.0 and float(aux["weights"][1]) == 0.0
    np.testing.assert_allclose(aux["weights"][KEPT], small_aux["weights"], rtol=1e-5, atol=1e-7)
  _assert_tree_close(_state_rows(state, KEPT), small_state, rtol=1e-5, atol=1e-7)
  _unchanged_row(state, before, 1)


def test_graddrop_ignores_a_zero_row_as_if_the_task_did_not_exist():
  method = weighting.get("graddrop", _options())
  rng = np.random.default_rng(4)
  gradients = rng.normal(size=(3, 4, 5)).astype(np.float32) * ABSENT.reshape(3, 1, 1)
  features = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  key = jax.random.PRNGKey(1)
  full, _, _ = method.combine(jnp.asarray(gradients), features, {}, (), key, 0)
  small, _, _ = method.combine(jnp.asarray(gradients[KEPT]), features, {}, (), key, 0)
  np.testing.assert_allclose(full, small, rtol=1e-6, atol=1e-7)


def test_adatask_leaves_an_absent_tasks_moments_and_update_out():
  base = optax.adam(0.1)
  transform = jacobian_based.per_task_transform(base, 3)
  params = {"w": jnp.ones((4,))}
  rng = np.random.default_rng(5)
  state = transform.init(params)
  for _ in range(2):  # the second step also exercises the momentum of earlier steps
    gradients = rng.normal(size=(3, 4)).astype(np.float32) * ABSENT[:, None]
    updates, new_state = jax.jit(transform.update)(
      {"w": jnp.asarray(gradients)}, state, params, task_present=jnp.asarray(ABSENT)
    )
    want = 0.0
    for task in KEPT:  # each present task's own Adam, one task at a time
      one_state = jax.tree_util.tree_map(lambda leaf, task=task: leaf[task], state)
      one_update, _ = base.update({"w": jnp.asarray(gradients[task])}, one_state, params)
      want = want + one_update["w"]
    np.testing.assert_allclose(updates["w"], want, rtol=1e-6)
    for old, new in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new_state)):
      np.testing.assert_array_equal(new[1], old[1])
    state = new_state
