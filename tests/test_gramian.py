"""Tests for mtl_jax.gramian: fast path against vmap(grad), Gramian properties, reductions, BN
modes."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from mtl_jax import gramian
from mtl_jax import models
from mtl_jax import tasks as tasks_lib
from mtl_jax import train as train_lib
from mtl_jax.gramian import blocks
from mtl_jax.gramian import capture
from mtl_jax.gramian import task_rows

BATCH = 4
RELATIVE_TOLERANCE = 1e-5
TASKS = (
  tasks_lib.BinaryAttribute(name="smiling", index=0),
  tasks_lib.Classification(name="digit", num_classes=3),
  tasks_lib.BinaryAttribute(name="glasses", index=1),
)


@functools.lru_cache(maxsize=None)
def setup(encoder: str, norm: str, seed: int = 0):
  """(model, variables, batch) for a tiny encoder; random inputs drawn from `seed`."""
  config = ml_collections.ConfigDict(
    dict(
      encoder=encoder,
      norm=norm,
      hidden=(16, 12),
      features=(4, 6),
      width_multiplier=0.0625,
      head_hidden=(5,),
    )
  )
  specs = {task.name: models.HeadSpec(task.output_channels, dense=False) for task in TASKS}
  model = models.build_model(config, specs)
  size = 32 if encoder == "segnet" else 8
  variables = models.init_model(model, jax.random.PRNGKey(seed), (1, size, size, 3))
  keys = jax.random.split(jax.random.PRNGKey(seed + 100), 4)
  batch = {
    "image": jax.random.normal(keys[0], (BATCH, size, size, 3)),
    "attributes": (jax.random.uniform(keys[1], (BATCH, 2)) > 0.5).astype(jnp.float32),
    "label": jax.random.randint(keys[2], (BATCH,), 0, 3),
  }
  if norm == "batch":
    # Running statistics that differ from the batch's, so 'eval' is a distinct definition.
    variables["batch_stats"] = jax.tree_util.tree_map(
      lambda leaf: leaf + 0.3 * jax.random.uniform(keys[3], leaf.shape), variables["batch_stats"]
    )
  return model, variables, batch


# Each case compiles a few programs; on 2 shared CPU cores the full grid (SegNet alone takes
# minutes) exceeds this file's time budget, so the default run covers every norm kind and both
# conv strategies once, and MTL_JAX_SLOW_TESTS=1 runs the whole encoder x norm grid.
_SLOW = pytest.mark.skipif(
  os.environ.get("MTL_JAX_SLOW_TESTS") != "1", reason="slow: set MTL_JAX_SLOW_TESTS=1"
)
CASES = [
  ("mlp", "layer"),
  ("mlp", "none"),
  ("mlp", "batch"),
  ("small_cnn", "group"),
  pytest.param("mlp", "group", marks=_SLOW),
  pytest.param("small_cnn", "layer", marks=_SLOW),
  pytest.param("small_cnn", "none", marks=_SLOW),
  pytest.param("small_cnn", "batch", marks=_SLOW),
  pytest.param("segnet", "group", marks=_SLOW),
]


def full_gramian(model, params, batch_stats, batch, tasks, path="fast", batch_norm="error"):
  """The [B, T, B, T] per-sample Gramian through the engine's one entry."""
  result = gramian.compute(
    model, params, batch_stats, batch, tasks, gramian.FULL, path=path, batch_norm=batch_norm
  )
  return result.gramian


def flatten_rows(tree, leading):
  return jnp.concatenate(
    [leaf.reshape(*leaf.shape[:leading], -1) for leaf in jax.tree_util.tree_leaves(tree)], axis=-1
  )


def reductions(full):
  return {
    "task": gramian.at_level(full, "task"),
    "sample": gramian.at_level(full, "sample"),
    "sample_task": gramian.at_level(full, "sample_task"),
    "sample_of_task_1": gramian.sample_gramian(full, task=1),
    "row_norms": gramian.row_norms(full),
  }


@pytest.mark.parametrize("encoder,norm", CASES)
def test_fast_matches_reference_and_direct_gradients(encoder, norm):
  model, variables, batch = setup(encoder, norm, seed=len(encoder) + len(norm))
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  mode = "eval" if norm == "batch" else "error"
  train = norm != "batch"
  # The SegNet case checks only fast against reference: its extra programs cost minutes to compile.
  direct = encoder != "segnet"

  @jax.jit
  def everything(params, batch):
    fast = full_gramian(model, params, batch_stats, batch, TASKS, "fast", mode)
    # The reference Gramian is rows rowsᵀ of these vmap(grad) rows (checked separately below).
    rows = gramian.per_sample_gradients(
      model, params, batch_stats, batch, TASKS, range(BATCH), range(len(TASKS)), mode
    )
    if not direct:
      return fast, rows, None, None
    reduced = reductions(fast)
    if encoder == "mlp" and norm == "layer":
      # The engine's own reference path (the same Jacobian, contracted on device).
      reference = full_gramian(model, params, batch_stats, batch, TASKS, "reference", mode)
      fast = jnp.stack([fast, reference])

    def mean_losses(encoder_params):
      full = {**params, "encoder": encoder_params}
      losses = gramian.per_sample_losses(model, full, batch_stats, batch, TASKS, train=train)
      return jnp.mean(losses, axis=0)

    task_gradients = flatten_rows(jax.jacrev(mean_losses)(params["encoder"]), 1)
    return fast, rows, task_gradients, reduced

  fast, rows, task_gradients, reduced = jax.device_get(everything(params, batch))
  if fast.ndim == 5:
    fast, reference_on_device = fast
    assert relative_error(reference_on_device, fast) < RELATIVE_TOLERANCE
  rows = np.asarray(rows, np.float64)
  reference = np.einsum("itp,jsp->itjs", rows, rows)
  assert fast.shape == (BATCH, len(TASKS), BATCH, len(TASKS))
  assert fast.dtype == np.float32
  assert relative_error(fast, reference) < RELATIVE_TOLERANCE

  matrix = np.asarray(fast, np.float64).reshape(BATCH * len(TASKS), -1)
  scale = np.abs(matrix).max()
  np.testing.assert_allclose(matrix, matrix.T, rtol=0, atol=1e-6 * scale)
  assert np.linalg.eigvalsh((matrix + matrix.T) / 2).min() > -1e-5 * scale
  if not direct:
    return

  # The mean of per-sample gradients is each task's batch gradient.
  np.testing.assert_allclose(
    rows.mean(axis=0), task_gradients, rtol=1e-4, atol=1e-6 * np.abs(rows).max()
  )
  # Reductions against inner products of directly computed gradients (per-sample levels' rows
  # are divided by B: every level's rows sum to the batch-mean objective).
  summed = rows.sum(axis=1) / BATCH
  flat = rows.reshape(BATCH * len(TASKS), -1) / BATCH
  expected = {
    "task": task_gradients @ task_gradients.T,
    "sample": summed @ summed.T,
    "sample_task": flat @ flat.T,
    "sample_of_task_1": rows[:, 1] @ rows[:, 1].T,
    "row_norms": np.linalg.norm(rows, axis=-1),
  }
  for name, value in expected.items():
    np.testing.assert_allclose(reduced[name], value, rtol=1e-4, atol=1e-6 * scale, err_msg=name)


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("path", gramian.PATHS)
def test_weighted_gradient_matches_autodiff_with_row_weights(path):
  model, variables, batch = setup("small_cnn", "group", seed=3)
  params = variables["params"]
  row_weights = jax.random.uniform(jax.random.PRNGKey(7), (BATCH, len(TASKS)))

  @jax.jit
  def run(params, batch):
    result = gramian.compute(model, params, {}, batch, TASKS, gramian.FULL, path=path)

    def weighted_loss(params):
      return jnp.sum(row_weights * gramian.per_sample_losses(model, params, {}, batch, TASKS))

    def mean_loss(params):
      return jnp.sum(jnp.mean(gramian.per_sample_losses(model, params, {}, batch, TASKS), axis=0))

    return (
      result.gradient(row_weights),
      jax.grad(weighted_loss)(params),
      jax.grad(mean_loss)(params),
    )

  actual, weighted, plain = run(params, batch)
  # The encoder descends the weighted rows; every head gets its own task's plain gradient.
  expected = {"encoder": weighted["encoder"], "heads": plain["heads"]}
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for leaf, expected_leaf in zip(
    jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)
  ):
    np.testing.assert_allclose(leaf, expected_leaf, rtol=1e-4, atol=1e-6)


def test_batch_norm_modes():
  model, variables, batch = setup("mlp", "batch", seed=5)
  params, batch_stats = variables["params"], variables["batch_stats"]
  for path in gramian.PATHS:
    with pytest.raises(ValueError, match="batch normalisation"):
      full_gramian(model, params, batch_stats, batch, TASKS, path)
  with pytest.raises(ValueError, match="only available on the 'reference' path"):
    full_gramian(model, params, batch_stats, batch, TASKS, "fast", "batch_statistics")
  with pytest.raises(ValueError, match="valid choices"):
    full_gramian(model, params, batch_stats, batch, TASKS, "fast", "train")

  @jax.jit
  def run(params, batch):
    coupled = full_gramian(
      model, params, batch_stats, batch, TASKS, "reference", "batch_statistics"
    )
    rows = gramian.per_sample_gradients(
      model, params, batch_stats, batch, TASKS, range(BATCH), range(3), "batch_statistics"
    )
    task_level = gramian.compute(model, params, batch_stats, batch, TASKS, "task")
    return coupled, rows, (task_level.gramian, task_level.task_losses)

  coupled, rows, (task_level, task_losses) = run(params, batch)
  # Rows of the training-mode Jacobian still average to the batch-mean task gradients.
  scale = float(jnp.abs(task_level).max())
  np.testing.assert_allclose(
    gramian.task_gramian(coupled), task_level, rtol=1e-4, atol=1e-6 * scale
  )
  flat = rows.reshape(BATCH * 3, -1)
  np.testing.assert_allclose(
    coupled.reshape(BATCH * 3, BATCH * 3), flat @ flat.T, rtol=1e-4, atol=1e-6 * scale
  )
  expected_losses = jnp.mean(
    gramian.per_sample_losses(model, params, batch_stats, batch, TASKS, train=True), axis=0
  )
  np.testing.assert_allclose(task_losses, expected_losses, rtol=1e-6)


@pytest.mark.parametrize("positions", [1, 5])
def test_ghost_and_materialised_layer_gramians_agree(positions):
  keys = jax.random.split(jax.random.PRNGKey(positions), 2)
  inputs = jax.random.normal(keys[0], (3, positions, 7))
  output_gradients = jax.random.normal(keys[1], (2, 3, positions, 4))
  info = capture.LayerInfo("dense", use_bias=True)

  @jax.jit
  def both(inputs, gradients):
    rows = blocks.layer_rows(info, inputs, gradients)
    materialised = blocks.gram(rows.reshape(6, -1)).reshape(3, 2, 3, 2)
    return blocks.ghost_contribution(info, inputs, gradients), materialised, rows

  ghost, materialised, rows = both(inputs, output_gradients)
  inputs, output_gradients = (
    np.asarray(inputs, np.float64),
    np.asarray(output_gradients, np.float64),
  )
  per_row = np.einsum("bpk,tbpn->btkn", inputs, output_gradients)
  bias = output_gradients.sum(axis=2).transpose(1, 0, 2)
  expected = np.concatenate([per_row.reshape(3, 2, -1), bias], axis=-1)
  expected = np.einsum("btp,csp->btcs", expected, expected)
  assert relative_error(ghost, expected) < RELATIVE_TOLERANCE
  assert relative_error(materialised, expected) < RELATIVE_TOLERANCE
  # The rows unpack to the layer's parameter gradients (kernel [K, N], then bias).
  unpacked = blocks.unpack_layer(info, rows[1, 0], {"kernel": np.zeros((7, 4))})
  np.testing.assert_allclose(unpacked["kernel"], per_row[1, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(unpacked["bias"], bias[1, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "size,strides,dilation", [((7, 8), (2, 2), (1, 1)), ((6, 5), (1, 2), (2, 1))]
)
def test_conv_patches_and_rows_are_the_convolution_kernel_gradients(size, strides, dilation):
  info = capture.LayerInfo("conv", True, (3, 3), strides, dilation)
  keys = jax.random.split(jax.random.PRNGKey(sum(size)), 3)
  inputs = jax.random.normal(keys[0], (2, *size, 3))

  def convolve(kernel, inputs):
    return jax.lax.conv_general_dilated(
      inputs,
      kernel,
      strides,
      "SAME",
      rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  kernel = jax.random.normal(keys[1], (3, 3, 3, 4))
  output_gradients = jax.random.normal(keys[2], (1, *convolve(kernel, inputs).shape))

  @jax.jit
  def run(inputs, output_gradients):
    rows = blocks.layer_rows(info, inputs, output_gradients)
    per_sample = [
      jax.vjp(lambda k, i=i: convolve(k, inputs[i : i + 1]), kernel)[1](
        output_gradients[0, i : i + 1]
      )[0]
      for i in range(2)
    ]
    return rows, jnp.stack(per_sample)

  rows, expected = run(inputs, output_gradients)
  for sample in range(2):
    unpacked = blocks.unpack_layer(info, rows[sample, 0], {"kernel": kernel})
    np.testing.assert_allclose(unpacked["kernel"], expected[sample], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
      unpacked["bias"], output_gradients[0, sample].sum(axis=(0, 1)), rtol=1e-5, atol=1e-5
    )


def test_layer_strategy_prefers_ghost_for_few_positions():
  assert gramian.layer_strategy(128, 3, 1, 3072, 256) == "ghost"
  assert gramian.layer_strategy(128, 3, 1024, 27, 16) == "materialise"


def test_reductions_on_a_known_gramian():
  rows = np.random.default_rng(0).normal(size=(3, 2, 5))
  full = np.einsum("itp,jsp->itjs", rows, rows).astype(np.float32)
  reduced = jax.jit(reductions)(full)
  mean = rows.mean(axis=0)
  np.testing.assert_allclose(reduced["task"], mean @ mean.T, rtol=1e-5)
  summed = rows.sum(1) / 3
  np.testing.assert_allclose(reduced["sample"], summed @ summed.T, rtol=1e-5)
  np.testing.assert_allclose(reduced["row_norms"], np.linalg.norm(rows, axis=-1), rtol=1e-5)
  with pytest.raises(ValueError, match="valid levels: task, sample, sample_task, full"):
    gramian.at_level(full, "pixel")


def _eager_task_gradients(experiment, state, batch):
  """([T, P] encoder gradients, [T] head gradient trees) of the batch-mean task losses, eager
  jax.grad per task."""

  def task_loss(params, index):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
      predictions, _ = experiment.model.apply(
        variables, batch["image"], train=True, mutable=["batch_stats"]
      )
    else:
      predictions = experiment.model.apply(variables, batch["image"], train=True)
    return jnp.mean(tasks_lib.losses_matrix(experiment.tasks, predictions, batch)[:, index])

  rows, heads = [], []
  for index, task in enumerate(experiment.tasks):
    gradient = jax.grad(task_loss)(state.params, index)
    rows.append(
      np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(gradient["encoder"])])
    )
    heads.append(gradient["heads"][task.name])
  return np.stack(rows), heads


def _test_experiment(norm):
  config = test_config.get_config()
  config.model.norm = norm
  experiment = train_lib.build_experiment(config)
  return experiment, train_lib.init_state(experiment, 0)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_jitted_task_gradients_equal_eager_per_task_gradients(norm):
  # Pins the XLA CPU trap documented in gramian.stacked_vjp: jit(jacrev) of this model (three
  # dense conv heads on shared features) returned wrong gradients, even without any norm.
  experiment, state = _test_experiment(norm)
  batch = experiment.dataset.splits["train"].batch(np.arange(8))
  jacobian, heads = _eager_task_gradients(experiment, state, batch)

  @jax.jit
  def run(params):
    result = task_rows.task_gradients(
      experiment.model, params, state.batch_stats, batch, experiment.tasks
    )
    level = gramian.compute(
      experiment.model, params, state.batch_stats, batch, experiment.tasks, "task"
    )
    return flatten_rows(result.encoder, 1), result.heads, level.gramian

  rows, head_gradients, task_gramian = run(state.params)
  scale = np.max(np.abs(jacobian))
  np.testing.assert_allclose(np.asarray(rows), jacobian, rtol=1e-4, atol=1e-5 * scale)
  expected = jacobian @ jacobian.T
  np.testing.assert_allclose(
    np.asarray(task_gramian), expected, rtol=1e-4, atol=1e-6 * np.max(np.abs(expected))
  )
  for task, head in zip(experiment.tasks, heads):
    for got, want in zip(
      jax.tree_util.tree_leaves(head_gradients[task.name]), jax.tree_util.tree_leaves(head)
    ):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_jitted_reference_rows_and_fast_gramian_equal_an_eager_per_sample_loop():
  # The reference path vmaps jacrev over samples and the fast path captures T pullbacks; XLA:CPU
  # miscompiled this model's jit(jacrev) over the batch (docs/xla_cpu_faults.md), so both are
  # pinned to plain eager per-sample gradients.
  experiment, state = _test_experiment("group")
  batch = experiment.dataset.splits["train"].batch(np.arange(2))
  tasks = experiment.tasks
  rows, fast = jax.jit(
    lambda params: (
      gramian.per_sample_gradients(
        experiment.model, params, {}, batch, tasks, range(2), range(len(tasks))
      ),
      full_gramian(experiment.model, params, {}, batch, tasks, "fast"),
    )
  )(state.params)
  eager = np.zeros(rows.shape)

  def loss(encoder, sample, index):
    single = jax.tree_util.tree_map(lambda leaf: leaf[sample : sample + 1], batch)
    full = {**state.params, "encoder": encoder}
    return gramian.per_sample_losses(experiment.model, full, {}, single, tasks)[0, index]

  for sample in range(2):
    for index in range(len(tasks)):
      expected = np.concatenate(
        [
          np.ravel(leaf)
          for leaf in jax.tree_util.tree_leaves(
            jax.grad(loss)(state.params["encoder"], sample, index)
          )
        ]
      )
      np.testing.assert_allclose(
        np.asarray(rows[sample, index]), expected, rtol=1e-4, atol=1e-5 * np.max(np.abs(expected))
      )
      eager[sample, index] = expected
  expected_gramian = np.einsum("itp,jsp->itjs", eager, eager)
  assert relative_error(fast, expected_gramian) < RELATIVE_TOLERANCE


def test_task_gradients_with_batch_norm_in_the_heads():
  # DeepLab's ASPP heads carry batch norm: task_gradients (and so every Gramian step) must read
  # and update their statistics like the full model's training-mode apply.
  experiment, _ = _test_experiment("batch")
  heads = {
    task.name: models.ASPPHead(
      experiment.model.heads[task.name].out_channels,
      channels=4,
      rates=(2,),
      upsample=1,
      norm="batch",
    )
    for task in experiment.tasks[:2]
  }
  model = models.MultiTaskModel(
    encoder=models.SmallCNN(features=(4,), norm="batch", dense_output=True), heads=heads
  )
  tasks = experiment.tasks[:2]
  # An 8x8 crop of two samples: small programs (this test compiles a dozen conv layers).
  batch = jax.tree_util.tree_map(
    lambda leaf: leaf[:, :8, :8] if leaf.ndim >= 3 else leaf,
    experiment.dataset.splits["train"].batch(np.arange(2)),
  )
  # Random variables of the right shapes from numpy: compiling this model's init took 4 s.
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["image"], train=False))
  generator = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
    lambda leaf: generator.normal(0.0, 0.3, leaf.shape).astype(np.float32), shapes["params"]
  )
  batch_stats = jax.tree_util.tree_map(
    lambda leaf: generator.uniform(0.5, 1.5, leaf.shape).astype(np.float32), shapes["batch_stats"]
  )

  def loss(params, index):
    predictions, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      batch["image"],
      train=True,
      mutable=["batch_stats"],
    )
    return jnp.mean(tasks_lib.losses_matrix(tasks, predictions, batch)[:, index]), updates[
      "batch_stats"
    ]

  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def run(params):
    result = task_rows.task_gradients(model, params, batch_stats, batch, tasks)
    expected = [jax.grad(loss, has_aux=True)(params, index) for index in range(len(tasks))]
    return result, expected

  result, expected = run(params)
  for index, task in enumerate(tasks):
    gradients, updated = expected[index]
    mine = {
      "encoder": jax.tree_util.tree_map(lambda leaf, index=index: leaf[index], result.encoder),
      "heads": result.heads[task.name],
    }
    theirs = {"encoder": gradients["encoder"], "heads": gradients["heads"][task.name]}
    for got, want in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(theirs)):
      np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * (np.max(np.abs(want)) + 1e-6)
      )
  for got, want in zip(
    jax.tree_util.tree_leaves(result.batch_stats), jax.tree_util.tree_leaves(updated)
  ):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert jax.tree_util.tree_structure(result.batch_stats) == jax.tree_util.tree_structure(
    batch_stats
  )
