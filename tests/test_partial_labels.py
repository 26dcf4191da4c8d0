"""Partial labels: the label mask from the data, masked losses and gradients, every method on a
batch missing a task, metrics and conflict pairs of labelled examples only."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from mtl_jax import config_validation
from mtl_jax import conflicts
from mtl_jax import gramian
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax import weighting
from mtl_jax.data import labels
from mtl_jax.data import loader
from mtl_jax.data import pipeline
from mtl_jax.data import registry
from mtl_jax.models import apply as apply_lib
from mtl_jax.train import evaluation
from mtl_jax.weighting import present as present_lib

BATCH = 4
MASK = tasks_lib.LABEL_MASK_KEY
# Test-only: cheaper XLA compilation (compile time dominates these tiny steps on CPU).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(function):
  return jax.jit(function, compiler_options=FAST_COMPILE)


def _config(**overrides):
  config = test_config.get_config()
  config.unlock()
  config.dataset.height, config.dataset.width = 8, 16
  config.training.batch_size = BATCH
  config.model.features = (4,)
  config.model.head_hidden_channels = 4
  config.tasks = ("depth", "normals")
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config.lock()


@pytest.fixture(scope="module")
def dataset():
  return registry.load_dataset(_config().dataset)


@pytest.fixture(scope="module")
def experiment(dataset):
  return train.build_experiment(_config(), dataset)


@pytest.fixture(scope="module")
def batch(dataset):
  return pipeline.unit_float_images(dataset.splits["train"].batch(np.arange(BATCH)))


# ------------------------------------------------------------------------------------ the data


def test_hidden_labels_are_a_deterministic_nested_function_of_seed_task_and_index():
  small = labels.hidden_label_mask(200, "depth", 0.05, seed=3)
  large = labels.hidden_label_mask(200, "depth", 0.5, seed=3)
  assert small.sum() == 10 and large.sum() == 100
  assert np.all(large[small])  # a smaller fraction keeps a subset of a larger one's labels
  np.testing.assert_array_equal(small, labels.hidden_label_mask(200, "depth", 0.05, seed=3))
  assert not np.array_equal(large, labels.hidden_label_mask(200, "normals", 0.5, seed=3))
  assert not np.array_equal(large, labels.hidden_label_mask(200, "depth", 0.5, seed=4))
  assert labels.hidden_label_mask(5, "depth", 1e-3, seed=0).sum() == 1
  assert labels.hidden_label_mask(5, "depth", 1.0, seed=0).all()


def test_the_mask_travels_with_the_rows_through_the_pipeline(dataset):
  config = _config(**{"dataset.label_fraction": 0.5, "dataset.label_fraction_tasks": ("depth",)})
  masked = train.build_experiment(config, dataset).dataset
  source = masked.splits["train"]
  hidden = labels.hidden_label_mask(len(source), "depth", 0.5, config.dataset.seed)
  assert masked.splits["validation"] is dataset.splits["validation"]  # evaluation keeps labels
  per_epoch = pipeline.steps_per_epoch(len(source), BATCH)
  reader = loader.StepReader(source, BATCH, (7,), dataset.augment, on_device=True)
  stream = loader.BatchStream(reader, 3 * per_epoch, workers=0, prefetch=2)
  try:
    for step in (0, 1, per_epoch, 2 * per_epoch + 1):  # several epochs, one restart
      rows = pipeline.train_indices(len(source), BATCH, 7, step)
      mask = stream.batch(step)[MASK]
      np.testing.assert_array_equal(mask[:, 0], hidden[rows])
      assert mask[:, 1].all()  # normals keeps every label
  finally:
    stream.close()


def test_a_source_may_mark_its_own_missing_labels():
  arrays = {"image": np.zeros((4, 2, 2, 3), np.float32), "label_mask/depth": np.array([1, 0, 1, 1])}
  source = labels.MaskedSource(pipeline.ArraySource(arrays), ("depth", "normals"))
  batch = source.batch(np.array([1, 3]))
  np.testing.assert_array_equal(batch[MASK], [[False, True], [True, True]])
  assert "label_mask/depth" not in batch


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("dataset.label_fraction", 0.0, "config.dataset.label_fraction: must be in (0, 1]"),
    ("dataset.label_fraction", 1.5, "config.dataset.label_fraction: must be in (0, 1]"),
    ("dataset.label_fraction_tasks", ("segmentation",), "config.dataset.label_fraction_tasks:"),
    ("dataset.label_fractions", "depth=0.2,segmentation=0.5", "config.dataset.label_fractions:"),
    ("dataset.label_fractions", "depth=0", "config.dataset.label_fractions: the fraction of"),
    ("dataset.label_fractions", "depth:0.2", "config.dataset.label_fractions: expected 'task="),
    ("dataset.label_fractions", "depth=1,depth=0.5", "config.dataset.label_fractions: names"),
    ("dataset.label_fraction_splits", ("train", "dev"), "config.dataset.label_fraction_splits:"),
    ("dataset.label_fraction_splits", (), "config.dataset.label_fraction_splits: must not"),
  ],
)
def test_bad_label_fractions_are_named(dataset, key, value, message):
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate_config(_config(**{key: value}), dataset)
  assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_one_fraction_per_task_overrides_the_shared_fraction(dataset):
  config = _config(
    **{
      "dataset.label_fraction": 0.5,
      "dataset.label_fraction_tasks": ("depth",),
      "dataset.label_fractions": " normals=0.25 ",
    }
  )
  source = train.build_experiment(config, dataset).dataset.splits["train"]
  size, seed = len(source), config.dataset.seed
  want = np.stack(
    [
      labels.hidden_label_mask(size, "depth", 0.5, seed),
      labels.hidden_label_mask(size, "normals", 0.25, seed),
    ],
    axis=1,
  )
  np.testing.assert_array_equal(source.batch(np.arange(size))[MASK], want)
  assert want[:, 1].sum() == round(0.25 * size)
  config = _config(**{"dataset.label_fractions": "depth=0.5,normals=0.5"})
  both = train.build_experiment(config, dataset).dataset.splits["train"]
  np.testing.assert_array_equal(both.batch(np.arange(size))[MASK][:, 0], want[:, 0])


def test_the_fractions_hide_labels_of_the_splits_named(dataset):
  config = _config(
    **{"dataset.label_fraction": 0.5, "dataset.label_fraction_splits": ("train", "validation")}
  )
  masked = train.build_experiment(config, dataset).dataset
  assert masked.splits["test"] is dataset.splits["test"]
  validation = masked.splits["validation"]
  size = len(validation)
  mask = validation.batch(np.arange(size))[MASK]
  assert mask.sum(0).tolist() == [round(0.5 * size)] * 2
  # Its draws are not the training split's: the split's name is part of the stream.
  train_draws = labels.hidden_label_mask(size, "depth", 0.5, config.dataset.seed)
  np.testing.assert_array_equal(
    mask[:, 0], labels.hidden_label_mask(size, "depth", 0.5, config.dataset.seed, "validation")
  )
  assert not np.array_equal(mask[:, 0], train_draws)


def test_evaluation_on_a_split_with_hidden_labels_counts_labelled_examples_only(
  dataset, base_state
):
  config = _config(
    **{"dataset.label_fraction": 0.5, "dataset.label_fraction_splits": ("validation",)}
  )
  masked = train.build_experiment(config, dataset)
  eval_step = _jit(train.make_eval_step(masked.model, masked.tasks))
  totals = evaluation.summed_statistics(eval_step, masked, base_state.params, {}, "validation")
  got = evaluation.flat_metrics(masked.tasks, totals)
  plain = dataset.splits["validation"]
  batch = pipeline.unit_float_images(plain.batch(np.arange(len(plain))))
  for task in masked.tasks:
    kept = labels.hidden_label_mask(len(plain), task.name, 0.5, config.dataset.seed, "validation")
    alone = jax.device_get(eval_step(base_state.params, {}, batch, kept))
    want = evaluation.flat_metrics(masked.tasks, alone)
    assert int(totals[task.name]["loss_count"]) == kept.sum() < len(plain)
    for key, value in want.items():
      if key.startswith(task.name + "/"):
        np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- losses, gradients


def test_a_task_without_labels_has_zero_loss_and_gradient_even_with_non_finite_losses():
  losses = jnp.array([[1.0, jnp.nan], [3.0, jnp.inf], [5.0, 2.0]])
  mask = jnp.array([[True, False], [False, False], [True, False]])

  def total(losses):
    return jnp.sum(tasks_lib.task_mean_losses(losses, {MASK: mask}) * jnp.array([1.0, 2.0]))

  np.testing.assert_array_equal(tasks_lib.task_mean_losses(losses, {MASK: mask}), [3.0, 0.0])
  np.testing.assert_array_equal(jax.grad(total)(losses), [[0.5, 0], [0, 0], [0.5, 0]])


def _masked_objective(experiment, batch, scales):
  """Σ_{i,t} scales[i, t] L_t(x_i), written out with the model's own apply (the reference)."""

  def objective(params):
    predictions, _ = apply_lib.predict(experiment.model, params, {}, batch["image"], train=True)
    losses = jnp.stack(
      [task.loss(predictions[task.name], batch) for task in experiment.tasks], axis=1
    )
    return jnp.sum(losses * scales)

  return objective


def _reference_scales(mask):
  mask = np.asarray(mask, np.float64)
  return (mask / np.maximum(mask.sum(0), 1)).astype(np.float32)


_ROWS = {}


def _reference_rows(experiment, batch, params, mask_name):
  """[B, T, P] encoder gradients of c_it L_t(x_i), one eager jax.grad each (cached per mask)."""
  if mask_name not in _ROWS:
    scales = _reference_scales(MASKS[mask_name])
    rows = []
    for sample in range(BATCH):
      for task in range(len(experiment.tasks)):
        one = np.zeros_like(scales)
        one[sample, task] = scales[sample, task]
        grad = jax.grad(_masked_objective(experiment, batch, one))(params)["encoder"]
        rows.append(np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(grad)]))
    _ROWS[mask_name] = np.asarray(rows, np.float64).reshape(BATCH, len(experiment.tasks), -1)
  return _ROWS[mask_name]


# Both tasks partly labelled, and one sample without any label.
MASKS = {"some": np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool)}


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize(
  "level, path", [("task", "fast"), ("sample_task", "fast"), ("sample", "reference")]
)
def test_masked_gradients_and_gramian_match_the_labelled_pairs_loss(
  experiment, batch, mask_name, level, path
):
  mask = MASKS[mask_name]
  params = train.init_state(experiment, 0).params
  masked_batch = {**batch, MASK: mask}

  def library(params, masked_batch):
    rows = gramian.compute(
      experiment.model, params, {}, masked_batch, experiment.tasks, level, path=path
    )
    size = rows.gramian.shape[0]
    return rows.gramian, rows.task_losses, rows.gradient(jnp.ones((size,), jnp.float32))

  gram, task_losses, gradient = _jit(library)(params, masked_batch)
  scales = _reference_scales(mask)
  # The EW objective of the labelled pairs (each level's rows sum to it), by plain jax.grad.
  expected = jax.grad(_masked_objective(experiment, batch, scales))(params)
  for got, want in zip(jax.tree_util.tree_leaves(gradient), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  rows = _reference_rows(experiment, batch, params, mask_name)
  by_level = {
    "task": rows.sum(0),
    "sample": rows.sum(1),
    "sample_task": rows.reshape(-1, rows.shape[-1]),
  }
  want_gramian = by_level[level] @ by_level[level].T
  scale = np.abs(want_gramian).max()
  np.testing.assert_allclose(gram / scale, want_gramian / scale, atol=2e-5)
  losses = np.asarray(
    jax.vmap(lambda s: _masked_objective(experiment, batch, s)(params))(
      jnp.stack([scales * np.eye(2, dtype=np.float32)[t] for t in range(2)])
    )
  )
  np.testing.assert_allclose(task_losses, losses, rtol=1e-5)


# ------------------------------------------------------------------------------------- methods

_RUNS = {}


def _method_run(dataset, base_state, name, level="task"):
  """(initial state, jitted step) of a method from the shared initial model parameters; cached,
  so tests with batches of one shape share a compiled step."""
  if (name, level) in _RUNS:
    return _RUNS[name, level]
  overrides = {"method.name": name, "method.level": level}
  if name == "mtl_io":
    overrides["optimizer.name"] = "sgd"
  experiment = train.build_experiment(_config(**overrides), dataset)
  weighting_params, weighting_state = weighting.initial_state(
    experiment.weighting, level, len(experiment.tasks), BATCH, base_state.params
  )
  trainable = {"model": base_state.params, "weighting": weighting_params}
  state = base_state.replace(
    weighting_params=weighting_params,
    weighting_state=weighting_state,
    opt_state=experiment.optimizer.init(trainable),
  )
  step = train.make_train_step(
    experiment.model, experiment.tasks, experiment.weighting, experiment.optimizer, level
  )
  _RUNS[name, level] = state, _jit(step)
  return _RUNS[name, level]


@pytest.fixture(scope="module")
def base_state(experiment):
  return train.init_state(experiment, 0)


@pytest.mark.parametrize("name, level", [("ew", "task"), ("pcgrad", "task"), ("upgrad", "sample")])
def test_with_every_label_present_training_is_bitwise_unchanged(
  dataset, base_state, batch, name, level
):
  state, step = _method_run(dataset, base_state, name, level)
  all_ones = {**batch, MASK: np.ones((BATCH, 2), bool)}
  plain, masked = state, state
  for _ in range(2):
    plain, plain_metrics = step(plain, batch)
    masked, masked_metrics = step(masked, all_ones)
  for got, want in zip(jax.tree_util.tree_leaves(masked), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(masked_metrics["task_losses"], plain_metrics["task_losses"])


def test_label_fraction_one_adds_no_mask(dataset):
  assert train.build_experiment(_config(), dataset).dataset is dataset


# One method of every kind of train step: loss weighting, its after-update and bilevel
# extensions, Gramian weighting at the task and a per-sample level, and each Jacobian mode.
STEP_KINDS = [
  ("ew", "task"),
  ("famo", "task"),
  ("auto_lambda", "task"),
  ("pcgrad", "task"),
  ("upgrad", "sample"),
  ("graddrop", "task"),
  ("adatask", "task"),
  ("mtl_io", "task"),
  ("db_mtl", "task"),
]


SLOW = os.environ.get("MTL_JAX_SLOW_TESTS") == "1"
_SLOW_MARK = pytest.mark.skipif(not SLOW, reason="slow: set MTL_JAX_SLOW_TESTS=1")
# Every registered method's full step compiles on its own (1-3 s on 2 CPU cores): the default run
# takes one method per kind of step; MTL_JAX_SLOW_TESTS=1 runs every method (at level 'task').
EVERY_STEP = STEP_KINDS + [
  pytest.param(name, "task", marks=_SLOW_MARK)
  for name in weighting.method_names()
  if (name, "task") not in STEP_KINDS
]


@pytest.mark.parametrize("name, level", EVERY_STEP)
def test_every_kind_of_step_trains_on_a_batch_where_a_task_has_no_label(
  dataset, base_state, batch, name, level
):
  state, step = _method_run(dataset, base_state, name, level)
  absent = {**batch, MASK: np.array([[1, 0], [0, 0], [1, 0], [1, 0]], bool)}
  for _ in range(2):
    state, metrics = step(state, absent)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves((state, metrics)))
    assert float(metrics["task_losses"][1]) == 0.0
    if "task_weights" in metrics:
      assert float(metrics["task_weights"][1]) == 0.0


def test_mtl_io_takes_no_step_for_a_task_without_labels(dataset, base_state, batch):
  state, step = _method_run(dataset, base_state, "mtl_io")
  experiment = train.build_experiment(
    _config(**{"method.name": "mtl_io", "optimizer.name": "sgd"}), dataset
  )
  mask = np.array([[1, 0], [0, 0], [1, 0], [1, 0]], bool)
  absent = {**batch, MASK: mask}
  scales = _reference_scales(mask)
  initial, first = state, experiment.optimizer.transforms[0]
  trainable, opt_state = state.trainable, state.opt_state[0]
  for _ in range(2):  # the second step has momentum: an absent task's optimizer would move
    state, _ = step(state, absent)
    # The reference: task 0's own SGD step on its loss over its labelled examples, alone.
    grads = jax.grad(
      lambda trainable: _masked_objective(experiment, batch, scales * np.array([1.0, 0.0]))(
        trainable["model"]
      )
    )(trainable)
    updates, opt_state = first.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  for got, want in zip(*(jax.tree_util.tree_leaves(s) for s in (state.trainable, trainable))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for got, want in zip(*(jax.tree_util.tree_leaves(s.opt_state[1]) for s in (state, initial))):
    np.testing.assert_array_equal(got, want)


def _synthetic_problem(rng_seed=0):
  """Three tasks' losses and Gramian with task 1 absent (zero loss, zero gradient row)."""
  vectors = np.random.default_rng(rng_seed).normal(size=(3, 6)).astype(np.float32)
  vectors[1] = 0.0
  losses = jnp.array([0.7, 0.0, 1.3], jnp.float32)
  return losses, jnp.asarray(vectors), jnp.array([True, False, True])


def _check_matches_the_two_task_problem(full, small):
  weights = np.asarray(full)
  assert np.all(np.isfinite(weights)) and weights[1] == 0.0
  np.testing.assert_allclose(weights[[0, 2]], small, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", weighting.method_names())
def test_every_method_weighs_only_the_present_tasks(name):
  options = weighting.method_options(_config(**{"method.name": name}), 1)
  method = weighting.get(name, options)
  losses, vectors, present = _synthetic_problem()
  key, kept = jax.random.PRNGKey(0), np.array([0, 2])
  if isinstance(method, weighting.LossWeighting):
    params, state = method.init(3)

    def total(losses, params):
      value, new_state, aux = present_lib.combine(method, present, losses, params, state, key, 3)
      return value, (new_state, aux)

    (value, (_, aux)), grads = _jit(jax.value_and_grad(total, (0, 1), has_aux=True))(losses, params)
    small_params, small_state = method.init(2)
    combine = _jit(method.combine)
    small_value, _, small_aux = combine(losses[kept], small_params, small_state, key, 3)
    np.testing.assert_allclose(value, small_value, rtol=1e-6)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(grads))
    assert float(grads[0][1]) == 0.0
    if "weights" in aux:
      _check_matches_the_two_task_problem(aux["weights"], small_aux["weights"])
  elif isinstance(method, weighting.GramianWeighting):
    gram = vectors @ vectors.T
    params, state = method.init(3)
    weigh = _jit(
      lambda g: present_lib.weigh(method, "task", present, g, losses, params, state, key, 0)
    )
    weights, _, _ = weigh(gram)
    small_params, small_state = method.init(2)
    small, _, _ = _jit(method.weigh)(
      gram[kept][:, kept], losses[kept], small_params, small_state, key, 0
    )
    _check_matches_the_two_task_problem(weights, small)
  elif method.mode == "task_gradients":
    encoder = {"kernel": jnp.zeros((6,), jnp.float32)}
    params, state = method.init(3, encoder)
    parts = tuple(
      weighting.TaskGradients(losses, {"kernel": vectors}) for _ in range(method.batch_parts)
    )
    combine = _jit(
      lambda parts: present_lib.task_gradients_combine(
        method, present, parts, params, state, key, 0
      )
    )
    outputs = combine(parts)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(outputs))
    assert float(outputs[1][1]) == 0.0  # no head scale for the absent task
  elif method.mode == "features":
    params, state = method.init(3)
    gradients = vectors.reshape(3, 2, 3)
    outputs = method.combine(gradients, jnp.ones((2, 3)), params, state, key, 0)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(outputs))
  # The task-gradient methods are compared with the smaller problem in
  # tests/test_partial_label_methods.py, as are AdaTask's per-task moments; MTL-IO's step in
  # test_mtl_io_takes_no_step_for_a_task_without_labels.


# ------------------------------------------------------------------------- metrics and conflicts


def test_evaluation_ignores_unlabelled_examples(experiment, base_state, batch):
  eval_step = _jit(train.make_eval_step(experiment.model, experiment.tasks))
  mask = np.array([[1, 1], [0, 1], [1, 0], [0, 0]], bool)
  real = np.ones((BATCH,), bool)
  masked = jax.device_get(eval_step(base_state.params, {}, {**batch, MASK: mask}, real))
  for index, task in enumerate(experiment.tasks):
    alone = jax.device_get(eval_step(base_state.params, {}, batch, mask[:, index]))[task.name]
    for key, value in alone.items():
      np.testing.assert_allclose(masked[task.name][key], value, rtol=1e-6)
    assert masked[task.name]["loss_count"] == mask[:, index].sum()


def test_the_conflict_probe_pairs_labelled_rows_only():
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(3, 2, 5))
  full = np.einsum("itp,jsp->itjs", vectors, vectors).astype(np.float32)
  mask = np.array([[1, 0], [1, 1], [0, 1]], bool)
  measures = _jit(conflicts.conflict_measures)(full, label_mask=mask)
  flat = mask.reshape(-1)
  for pair_type, pairs in (
    ("inter_task", conflicts.inter_task_pairs(3, 2)),
    ("inter_sample", conflicts.inter_sample_pairs(3, 2)),
  ):
    np.testing.assert_array_equal(measures[pair_type].valid, flat[pairs[0]] & flat[pairs[1]])
  means = np.stack([vectors[mask[:, t], t].mean(0) for t in range(2)])
  want = means[0] @ means[1] / np.linalg.norm(means[0]) / np.linalg.norm(means[1])
  np.testing.assert_allclose(measures["inter_task_averaged"].cosine, [want], rtol=1e-5)
  accumulator = conflicts.ConflictAccumulator()
  accumulator.add(measures)
  summary = accumulator.summary()
  assert summary["inter_task"]["pairs"] == 1 and summary["inter_sample"]["pairs"] == 2
