"""A few training steps of every gradient-weighting method, and the train step's weighting
plumbing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from mtl_jax import config_validation
from mtl_jax import gramian
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax import weighting
from mtl_jax.data import registry
from mtl_jax.train import gradient_steps

NEW_METHODS = (
  "imtl",
  "pcgrad",
  "cagrad",
  "aligned_mtl",
  "mgda",
  "nash_mtl",
  "upgrad",
  "gradvac",
  "graddrop",
  "adatask",
  "mtl_io",
  "dwa",
  "gradnorm",
  "famo",
)
BATCH = 4
# Test-only: cheaper XLA compilation (the steps here run twice; compile time dominates on CPU).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(function):
  return jax.jit(function, compiler_options=FAST_COMPILE)


def _config(argument="", **method):
  config = test_config.get_config(argument)
  config.unlock()
  config.training.batch_size = BATCH
  config.model.features = (4,)
  config.model.head_hidden_channels = 4
  config.tasks = ("depth", "normals")
  for key, value in method.items():
    config.method[key] = value
  return config.lock()


@pytest.fixture(scope="module")
def dataset():
  return registry.load_dataset(_config().dataset)


def _experiment(config, dataset):
  experiment = train.build_experiment(config, dataset)
  step = _jit(
    train.make_train_step(
      experiment.model,
      experiment.tasks,
      experiment.weighting,
      experiment.optimizer,
      level=config.method.level,
    )
  )
  return experiment, train.init_state(experiment, 0), step


def _options(**overrides):
  """config.method of the base config (every method's defaults) with overrides."""
  options = test_config.get_config().method
  options.unlock()
  options.update(overrides)
  return options


def _batch(experiment):
  return experiment.dataset.splits["train"].batch(np.arange(BATCH))


@pytest.mark.parametrize("name", NEW_METHODS)
def test_every_method_trains_a_few_steps(name, dataset):
  config = _config(f"method={name}" + (",optimizer=sgd,lr=0.01" if name == "mtl_io" else ""))
  experiment, state, step = _experiment(config, dataset)
  initial = state
  for _ in range(2):
    state, metrics = step(state, _batch(experiment))
  metrics = jax.device_get(metrics)
  assert int(state.step) == 2
  assert np.isfinite(metrics["loss"]) and np.all(np.isfinite(metrics["task_losses"]))
  assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
  for part in ("encoder", "heads"):
    moved = jax.tree_util.tree_map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params[part], initial.params[part]
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 0, f"{name} did not update the {part}"
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state.weighting_state))


def _fixed_weighting(weights):
  """A Gramian weighting that returns fixed weights, to test the train step's plumbing."""
  return weighting.GramianWeighting(
    "fixed",
    weighting.no_parameters,
    lambda gramian, losses, params, state, rng, step: (jnp.asarray(weights), state, {}),
  )


@pytest.mark.parametrize("level", ["task", "sample_task"])
def test_gramian_step_descends_the_weighted_rows_on_the_encoder_and_plain_losses_on_heads(
  level, dataset
):
  config = _config(level=level)
  experiment, state, _ = _experiment(config, dataset)
  tasks = experiment.tasks
  rows = weighting.num_rows(level, len(tasks), BATCH)
  weights = np.random.default_rng(0).uniform(0.2, 2.0, rows).astype(np.float32)
  sgd = optax.sgd(1.0)
  state = state.replace(opt_state=sgd.init(state.trainable))
  step = _jit(
    train.make_train_step(experiment.model, tasks, _fixed_weighting(weights), sgd, level=level)
  )
  batch = _batch(experiment)
  new_state, _ = step(state, batch)

  def losses(params):
    predictions = experiment.model.apply({"params": params}, batch["image"], train=True)
    return tasks_lib.losses_matrix(tasks, predictions, batch)  # [B, T]

  coefficients = np.broadcast_to(
    weights.reshape(1, -1) if level == "task" else weights.reshape(BATCH, -1), (BATCH, len(tasks))
  )
  encoder_gradient = _jit(jax.grad(lambda p: jnp.sum(losses(p) * coefficients) / BATCH))(
    state.params
  )["encoder"]
  head_gradient = _jit(jax.grad(lambda p: jnp.sum(jnp.mean(losses(p), axis=0))))(state.params)[
    "heads"
  ]
  for new, old, gradient in (
    (new_state.params["encoder"], state.params["encoder"], encoder_gradient),
    (new_state.params["heads"], state.params["heads"], head_gradient),
  ):
    for a, b, g in zip(*(jax.tree_util.tree_leaves(tree) for tree in (new, old, gradient))):
      np.testing.assert_allclose(np.asarray(b - a), np.asarray(g), rtol=2e-4, atol=1e-6)


def test_gramian_step_with_unit_weights_equals_the_ew_step(dataset):
  config = _config("method=ew", level="sample")
  experiment, state, _ = _experiment(config, dataset)
  # SGD, not Adam: Adam's first step is about lr·sign(g), which turns the round-off in a
  # gradient that is zero in exact arithmetic (a conv bias followed by group norm) into a full step.
  sgd = optax.sgd(1.0)
  state = state.replace(opt_state=sgd.init(state.trainable))
  ew_step = _jit(
    train.make_train_step(experiment.model, experiment.tasks, experiment.weighting, sgd)
  )
  step = _jit(
    train.make_train_step(
      experiment.model, experiment.tasks, _fixed_weighting(np.ones(BATCH)), sgd, level="sample"
    )
  )
  batch = _batch(experiment)
  expected, _ = ew_step(state, batch)
  actual, _ = step(state, batch)
  for a, b in zip(
    jax.tree_util.tree_leaves(actual.params), jax.tree_util.tree_leaves(expected.params)
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_gramian_rows_match_explicit_per_row_gradients(dataset):
  config = _config(level="sample_task")
  experiment, state, _ = _experiment(config, dataset)
  batch = _batch(experiment)
  rows = gramian.compute(
    experiment.model, state.params, state.batch_stats, batch, experiment.tasks, "sample_task"
  )
  gramian_, task_losses = rows.gramian, rows.task_losses

  # Independent of the implementation's per-sample vmap: one full-batch forward, jacrev of [B, T].
  def losses(encoder):
    params = {"encoder": encoder, "heads": state.params["heads"]}
    predictions = experiment.model.apply({"params": params}, batch["image"], train=True)
    return tasks_lib.losses_matrix(experiment.tasks, predictions, batch).reshape(-1) / BATCH

  # Eager on purpose: XLA:CPU miscompiled jit(jacrev(...)) of this full-batch function
  # (docs/xla_cpu_faults.md).
  jacobian = jax.jacrev(losses)(state.params["encoder"])
  rows = np.concatenate(
    [np.reshape(leaf, (BATCH * 2, -1)) for leaf in jax.tree_util.tree_leaves(jacobian)], axis=1
  )
  np.testing.assert_allclose(np.asarray(gramian_), rows @ rows.T, rtol=1e-4, atol=1e-7)
  assert task_losses.shape == (2,)


def test_sample_levels_with_batch_norm_raise_a_clear_error(dataset):
  config = _config("method=upgrad", level="sample")
  config.unlock()
  config.model.norm = "batch"
  # Refused by the config validation, before anything is built or traced.
  with pytest.raises(
    config_validation.ConfigError,
    match=r"config\.method\.level: 'sample' needs per-sample gradients.*batch norm.*'group', "
    "'layer' or 'none'",
  ):
    train.build_experiment(config.lock(), dataset)


@pytest.mark.parametrize(
  "argument,message",
  [
    (
      "method=adatask,optimizer=sgd",
      r"'adatask' needs config.optimizer.name in adam, adamw; got 'sgd'",
    ),
    ("method=mtl_io,optimizer=adam", r"'mtl_io' needs config.optimizer.name in sgd; got 'adam'"),
  ],
)
def test_per_task_optimizer_methods_reject_the_other_optimizer(argument, message, dataset):
  with pytest.raises(ValueError, match=message):
    train.build_experiment(_config(argument), dataset)


def test_jacobian_methods_and_gradnorm_reject_per_sample_levels(dataset):
  with pytest.raises(ValueError, match="GradNorm works on task gradients"):
    train.build_experiment(_config("method=gradnorm", level="sample"), dataset)
  with pytest.raises(
    config_validation.ConfigError,
    match="config.method.level: method 'graddrop' works on level",
  ):
    train.build_experiment(_config("method=graddrop", level="sample"), dataset)
  # The step refuses it too, for callers that build one without a config.
  experiment = train.build_experiment(_config("method=graddrop", level="task"), dataset)
  with pytest.raises(ValueError, match="'graddrop' works on task gradients"):
    train.make_train_step(
      experiment.model, experiment.tasks, experiment.weighting, experiment.optimizer, level="sample"
    )


def test_dwa_weights_follow_the_ratio_of_the_last_two_epoch_means():
  method = weighting.get("dwa", _options(steps_per_epoch=2, dwa_temperature=2.0))
  _, state = method.init(2)
  epoch_losses = [[4.0, 4.0], [2.0, 3.0], [1.0, 1.0]]
  weights = None
  for step in range(6):
    _, state, aux = method.combine(jnp.asarray(epoch_losses[step // 2]), {}, state, None, step)
    weights = aux["weights"]
    if step < 4:
      np.testing.assert_allclose(weights, [1.0, 1.0])
  ratios = np.array([2.0 / 4.0, 3.0 / 4.0])
  expected = 2 * np.exp(ratios / 2) / np.sum(np.exp(ratios / 2))
  np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_famo_shifts_weight_towards_the_task_whose_loss_decreased_less():
  method = weighting.get("famo", _options())
  _, state = method.init(2)
  for _ in range(5):
    _, state, _ = method.combine(jnp.asarray([1.0, 1.0]), {}, state, None, 0)
    state = method.after_update(jnp.asarray([0.5, 0.99]), state)
  probabilities = jax.nn.softmax(state.logits)
  assert probabilities[1] > probabilities[0]


def test_famo_state_keeps_its_dtype_and_values_under_float64_losses():
  # The loss-scale classification (studies/invariance.py) trains in float64 from float32 states.
  method = weighting.get("famo", _options())
  losses, after = [1.0, 2.0, 0.5], [0.7, 1.9, 0.45]

  def run():
    _, state = method.init(3)
    for _ in range(3):
      _, state, _ = method.combine(jnp.asarray(losses), {}, state, None, 0)
      state = method.after_update(jnp.asarray(after), state)
    return state

  float32_state = jax.jit(run)()
  with jax.enable_x64(True):
    float64_state = jax.jit(run)()
  for kept, reference in zip(float64_state, float32_state):
    assert kept.dtype == reference.dtype
    np.testing.assert_allclose(kept, reference, rtol=1e-5)


def test_gradnorm_weights_move_towards_the_slower_task(dataset):
  method = weighting.get("gradnorm", _options(gradnorm_alpha=1.5))
  params, state = method.init(2)
  gramian = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  _, state, _ = method.weigh(gramian, jnp.asarray([1.0, 1.0]), params, state, None, 0)

  def objective(params):
    return method.weigh(gramian, jnp.asarray([0.2, 1.0]), params, state, None, 1)[2][
      "weighting_loss"
    ]

  gradient = jax.grad(objective)(params)["logits"]
  # Task 1 trains slower (its loss ratio is higher), so descending raises its weight.
  assert gradient[1] < 0 < gradient[0]


def test_ew_step_is_untouched_by_the_method_dispatch(dataset):
  experiment, _, _ = _experiment(_config(), dataset)
  assert (
    isinstance(experiment.weighting, weighting.LossWeighting)
    and experiment.weighting.after_update is None
  )
  assert dataclasses.replace(experiment.weighting).name == "ew"


def test_per_task_encoder_gradients_equal_eager_per_task_gradients(dataset):
  # The Jacobian-based methods (AdaTask, GradDrop, MTL-IO) read these rows; see gramian.stacked_vjp.
  config = _config("method=adatask")
  experiment, state, _ = _experiment(config, dataset)
  batch = _batch(experiment)
  _, pullback, _, feature_gradients, _, _ = gradient_steps.per_task_feature_gradients(
    experiment.model, experiment.tasks, state, batch
  )
  (encoder_gradients,) = jax.jit(lambda cotangents: gramian.stacked_vjp(pullback, cotangents))(
    feature_gradients
  )

  def task_loss(encoder, index):
    params = {"encoder": encoder, "heads": state.params["heads"]}
    predictions = experiment.model.apply({"params": params}, batch["image"], train=True)
    return jnp.mean(tasks_lib.losses_matrix(experiment.tasks, predictions, batch)[:, index])

  for index in range(len(experiment.tasks)):
    expected = jax.grad(task_loss)(state.params["encoder"], index)
    for got, want in zip(
      jax.tree_util.tree_leaves(encoder_gradients), jax.tree_util.tree_leaves(expected)
    ):
      np.testing.assert_allclose(np.asarray(got[index]), np.asarray(want), rtol=1e-4, atol=1e-6)
