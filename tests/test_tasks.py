"""Tests of mtl_jax.tasks: losses, metric statistics and metrics on hand-computed cases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax.tasks import BinaryAttribute, Classification, Depth, Normals, Segmentation


# Eager dispatch compiles every small op separately; one jitted call per task is much faster.
def _stats(task, prediction, batch, example_mask=None):
  return jax.jit(task.metric_statistics)(prediction, batch, example_mask)


def _loss(task, prediction, batch):
  return jax.jit(task.loss)(prediction, batch)


def _all_stats(tasks, predictions, batch, example_mask=None):
  return jax.jit(tasks_lib.all_metric_statistics, static_argnums=0)(
    tuple(tasks), predictions, batch, example_mask
  )


def _to_numpy(statistics):
  return {key: np.asarray(value) for key, value in statistics.items()}


def _sum_statistics(first, second):
  return {key: np.asarray(first[key]) + np.asarray(second[key]) for key in first}


def _half(batch, part):
  return {key: value[part] for key, value in batch.items()}


def _one_hot_logits(labels, num_classes):
  """Logits whose argmax is `labels`."""
  return jax.nn.one_hot(jnp.asarray(labels), num_classes) * 5.0


# ----------------------------------------------------------------------------- segmentation


def test_segmentation_metrics_missing_class_and_ignore():
  # 4 classes; class 3 appears neither in target nor prediction, so it is left out of mIoU.
  target = np.array([[[0, 0, 1, 1], [2, 2, -1, -1]]], np.int32)  # [1, 2, 4]
  predicted = np.array([[[0, 1, 1, 1], [2, 0, 3, 2]]], np.int32)
  task = Segmentation(num_classes=4)
  stats = _to_numpy(_stats(task, _one_hot_logits(predicted, 4), {"segmentation": target}))
  expected_confusion = np.zeros((4, 4), int)
  expected_confusion[0, 0] = 1
  expected_confusion[0, 1] = 1
  expected_confusion[1, 1] = 2
  expected_confusion[2, 2] = 1
  expected_confusion[2, 0] = 1
  np.testing.assert_array_equal(stats["confusion"], expected_confusion)
  metrics = task.metrics(stats)
  # IoU: class 0: TP 1, union = 2 (true) + 2 (pred) - 1 = 3; class 1: 2 / 3; class 2: 1 / 2.
  # Class 3 is only predicted on an ignored pixel, so its union is 0 and it is skipped.
  assert metrics["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
  assert metrics["pixel_accuracy"] == pytest.approx(4 / 6)
  assert task.metric_directions == {"miou": True, "pixel_accuracy": True}


def test_segmentation_miou_skips_only_empty_union():
  # Class 1 is predicted but never true: union > 0 and IoU 0, so it does count.
  target = np.array([[[0, 0]]], np.int32)
  predicted = np.array([[[0, 1]]], np.int32)
  task = Segmentation(num_classes=3)
  metrics = task.metrics(
    _to_numpy(_stats(task, _one_hot_logits(predicted, 3), {"segmentation": target}))
  )
  assert metrics["miou"] == pytest.approx((1 / 2 + 0.0) / 2)


def test_segmentation_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
  target = rng.integers(0, 4, size=(3, 2, 3)).astype(np.int32)
  target[0, 0, :] = -1
  target[2] = -1  # no valid pixel at all
  task = Segmentation(num_classes=4)
  loss = np.asarray(_loss(task, jnp.asarray(logits), {"segmentation": target}))
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = []
  for b in range(3):
    values = [
      -log_probs[b, i, j, target[b, i, j]]
      for i in range(2)
      for j in range(3)
      if target[b, i, j] >= 0
    ]
    expected.append(np.mean(values) if values else 0.0)
  assert loss.shape == (3,)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_segmentation_out_of_range_label_is_ignored():
  task = Segmentation(num_classes=2)
  target = np.array([[[0, 255]]], np.int32)
  stats = _to_numpy(_stats(task, _one_hot_logits([[[0, 1]]], 2), {"segmentation": target}))
  assert stats["confusion"].sum() == 1


def test_segmentation_requires_num_classes():
  with pytest.raises(TypeError):
    Segmentation()
  assert Segmentation("seg", 5).output_channels == 5


# ----------------------------------------------------------------------------- depth


def test_depth_metrics_with_invalid_pixels():
  target = np.array([[[2.0, 0.0], [4.0, 1.0]], [[0.0, 0.0], [0.5, 0.0]]], np.float32)
  prediction = np.array([[[3.0, 9.0], [4.0, 0.5]], [[7.0, 7.0], [1.0, 7.0]]], np.float32)
  batch = {"depth": target}
  task = Depth()
  stats = _to_numpy(_stats(task, jnp.asarray(prediction)[..., None], batch))
  # valid: (2 -> 3), (4 -> 4), (1 -> 0.5), (0.5 -> 1): |e| = 1, 0, 0.5, 0.5; |e|/t = .5, 0, .5, 1.
  assert int(stats["pixel_count"]) == 4
  metrics = task.metrics(stats)
  assert metrics["abs_err"] == pytest.approx(2.0 / 4)
  assert metrics["rel_err"] == pytest.approx(2.0 / 4)
  loss = np.asarray(_loss(task, jnp.asarray(prediction)[..., None], batch))
  np.testing.assert_allclose(loss, [1.5 / 3, 0.5], rtol=1e-6)
  assert task.metric_directions == {"abs_err": False, "rel_err": False}


# ----------------------------------------------------------------------------- normals


def _rotated(angle_degrees):
  """A unit vector at `angle_degrees` from +z, in the x-z plane."""
  angle = math.radians(angle_degrees)
  return [math.sin(angle), 0.0, math.cos(angle)]


def test_normals_known_angles():
  z = [0.0, 0.0, 1.0]
  # Pixels: 0 deg, 90 deg, 180 deg, 20 deg, 10 deg, invalid target; predictions not normalised.
  prediction = np.array(
    [
      [
        [
          [0, 0, 5.0],
          [3.0, 0, 0],
          [0, 0, -2.0],
          [2 * v for v in _rotated(20)],
          _rotated(10),
          [1.0, 1.0, 1.0],
        ]
      ]
    ],
    np.float32,
  )
  target = np.array([[[z, z, z, z, z, [0.0, 0.0, 0.0]]]], np.float32)
  task = Normals()
  angles, valid = task.angles_degrees(jnp.asarray(prediction), {"normals": target})
  np.testing.assert_allclose(np.asarray(angles)[0, 0, :5], [0, 90, 180, 20, 10], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(valid)[0, 0], [True] * 5 + [False])
  metrics = task.metrics(_to_numpy(_stats(task, jnp.asarray(prediction), {"normals": target})))
  assert metrics["mean_angle"] == pytest.approx((0 + 90 + 180 + 20 + 10) / 5, abs=1e-3)
  assert metrics["median_angle"] == pytest.approx(20.0, abs=tasks_lib.NORMALS_BIN_WIDTH_DEGREES)
  assert metrics["within_11.25"] == pytest.approx(2 / 5)
  assert metrics["within_22.5"] == pytest.approx(3 / 5)
  assert metrics["within_30"] == pytest.approx(3 / 5)
  loss = np.asarray(_loss(task, jnp.asarray(prediction), {"normals": target}))
  cosines = [1.0, 0.0, -1.0, math.cos(math.radians(20)), math.cos(math.radians(10))]
  expected = np.mean([1 - c for c in cosines])
  np.testing.assert_allclose(loss, [expected], rtol=1e-5)
  assert task.metric_directions["median_angle"] is False
  assert task.metric_directions["within_30"] is True


def test_normals_loss_gradient_is_analytic_and_zero_for_a_zero_prediction():
  """d/dv (1 - v.t / |v|) = -(t - (v.t) v / |v|^2) / |v| per valid pixel, over the valid count.

  A ReLU head outputs exactly 0 at a pixel whose hidden features are all 0; such a pixel has no
  direction and must give no gradient (a clamped norm gave it 1/eps, 1e6 here).
  """
  rng = np.random.default_rng(3)
  prediction = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
  target = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
  prediction[0, 1, 2] = 0.0
  prediction[1, 0, 0] = 1e-8  # below the direction threshold too
  target[1, 2, 3] = 0.0  # an invalid pixel
  batch = {"normals": target}
  grad = jax.jit(jax.grad(lambda p: jnp.sum(Normals().loss(p, batch))))(jnp.asarray(prediction))
  grad = np.asarray(grad, np.float64)

  v, t = prediction.astype(np.float64), target.astype(np.float64)
  norm_v = np.linalg.norm(v, axis=-1, keepdims=True)
  norm_t = np.linalg.norm(t, axis=-1, keepdims=True)
  valid = norm_t[..., 0] > 0
  has_direction = norm_v[..., 0] > 1e-6
  unit_t = t / np.where(norm_t > 0, norm_t, 1.0)
  safe_v = np.where(norm_v > 1e-6, norm_v, 1.0)
  cosine_term = np.sum(v * unit_t, axis=-1, keepdims=True) * v / safe_v**2
  expected = -(unit_t - cosine_term) / safe_v
  expected *= (valid & has_direction)[..., None]
  expected /= valid.reshape(2, -1).sum(axis=1)[:, None, None, None]
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
  assert np.all(grad[0, 1, 2] == 0.0) and np.all(grad[1, 0, 0] == 0.0)


def test_normals_median_matches_numpy_within_one_bin():
  rng = np.random.default_rng(1)
  for shape in [(2, 7, 9), (3, 8, 8)]:  # odd and even valid-pixel counts
    prediction = rng.normal(size=shape + (3,)).astype(np.float32)
    # Targets near the predictions so the angles spread over [0, ~60] degrees.
    target = (prediction + 0.6 * rng.normal(size=shape + (3,))).astype(np.float32)
    target[0, 0, :3] = 0.0  # a few invalid pixels
    task = Normals()
    batch = {"normals": target}
    metrics = task.metrics(_to_numpy(_stats(task, jnp.asarray(prediction), batch)))
    p = prediction / np.linalg.norm(prediction, axis=-1, keepdims=True)
    t_norm = np.linalg.norm(target, axis=-1, keepdims=True)
    valid = t_norm[..., 0] > 0
    t = target / np.where(t_norm > 0, t_norm, 1)
    angles = np.degrees(np.arccos(np.clip((p * t).sum(-1), -1, 1)))[valid]
    assert metrics["median_angle"] == pytest.approx(
      np.median(angles), abs=tasks_lib.NORMALS_BIN_WIDTH_DEGREES
    )
    assert metrics["mean_angle"] == pytest.approx(np.mean(angles), abs=1e-3)
    for threshold in (11.25, 22.5, 30):
      assert metrics[f"within_{threshold:g}"] == pytest.approx(np.mean(angles < threshold))


def test_histogram_median_even_count_averages_middle_samples():
  histogram = np.zeros(tasks_lib.NORMALS_HISTOGRAM_BINS, int)
  histogram[10] = 1
  histogram[30] = 1
  width = tasks_lib.NORMALS_BIN_WIDTH_DEGREES
  assert tasks_lib._histogram_median(histogram) == pytest.approx(20.5 * width)
  assert math.isnan(tasks_lib._histogram_median(np.zeros_like(histogram)))


# ----------------------------------------------------------------------------- global tasks


def test_binary_attribute_bce_stable_and_accuracy():
  task = BinaryAttribute("smiling", 1)
  logits = jnp.array([[100.0], [-100.0], [100.0], [-100.0], [0.0]])
  attributes = np.array([[0, 1], [0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
  batch = {"attributes": attributes}
  loss = np.asarray(_loss(task, logits, batch))
  np.testing.assert_allclose(loss, [0.0, 0.0, 100.0, 100.0, math.log(2)], atol=1e-5)
  grad = np.asarray(jax.grad(lambda x: _loss(task, x, batch).sum())(logits))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[:, 0], [0.0, 0.0, 1.0, -1.0, -0.5], atol=1e-6)
  metrics = task.metrics(_to_numpy(_stats(task, logits, batch)))
  # Predictions (logit > 0) 1, 0, 1, 0, 0 vs targets 1, 0, 0, 1, 1: two of five correct.
  assert metrics["accuracy"] == pytest.approx(2 / 5)
  assert task.output_channels == 1 and not task.dense


def test_classification_loss_and_accuracy():
  task = Classification("digit", 3)
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0]], np.float32)
  label = np.array([0, 1, 2], np.int32)
  loss = np.asarray(_loss(task, jnp.asarray(logits), {"label": label}))
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(loss, -log_probs[np.arange(3), label], rtol=1e-6)
  metrics = task.metrics(_to_numpy(_stats(task, jnp.asarray(logits), {"label": label})))
  assert metrics["accuracy"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- shared properties


def _random_setup(batch_size=4, height=3, width=5, seed=0):
  rng = np.random.default_rng(seed)
  segmentation = rng.integers(-1, 3, size=(batch_size, height, width)).astype(np.int32)
  depth = rng.uniform(0.5, 5, size=(batch_size, height, width)).astype(np.float32)
  depth[rng.uniform(size=depth.shape) < 0.3] = 0.0
  normals = rng.normal(size=(batch_size, height, width, 3)).astype(np.float32)
  normals[rng.uniform(size=depth.shape) < 0.3] = 0.0
  # Sample 1 has no valid pixel in any dense task.
  segmentation[1] = -1
  depth[1] = 0.0
  normals[1] = 0.0
  batch = {
    "segmentation": segmentation,
    "depth": depth,
    "normals": normals,
    "attributes": rng.integers(0, 2, size=(batch_size, 4)).astype(np.float32),
    "label": rng.integers(0, 5, size=(batch_size,)).astype(np.int32),
  }
  tasks = [
    Segmentation(num_classes=3),
    Depth(),
    Normals(),
    BinaryAttribute("attr2", 2),
    Classification("label", 5),
  ]
  predictions = {
    task.name: jnp.asarray(
      rng.normal(
        size=((batch_size, height, width) if task.dense else (batch_size,))
        + (task.output_channels,)
      ).astype(np.float32)
    )
    for task in tasks
  }
  # A zero normals prediction must not produce NaN either.
  predictions["normals"] = predictions["normals"].at[0, 0, 0].set(0.0)
  return tasks, predictions, batch


def test_statistics_are_additive():
  tasks, predictions, batch = _random_setup(batch_size=4)
  first, second = slice(0, 2), slice(2, 4)
  whole = _all_stats(tasks, predictions, batch)
  halves = [
    _all_stats(tasks, {k: v[part] for k, v in predictions.items()}, _half(batch, part))
    for part in (first, second)
  ]
  for task in tasks:
    summed = _sum_statistics(halves[0][task.name], halves[1][task.name])
    for key, value in whole[task.name].items():
      np.testing.assert_allclose(summed[key], np.asarray(value), rtol=1e-5, err_msg=key)
    assert task.metrics(_to_numpy(whole[task.name])).keys() == task.metric_directions.keys()


def test_example_mask_excludes_padding():
  tasks, predictions, batch = _random_setup(batch_size=4)
  real = slice(0, 3)
  mask = np.array([True, True, True, False])
  masked = _all_stats(tasks, predictions, batch, mask)
  float_masked = _all_stats(tasks, predictions, batch, mask.astype(np.float32))
  reference = _all_stats(tasks, {k: v[real] for k, v in predictions.items()}, _half(batch, real))
  for task in tasks:
    for key, value in reference[task.name].items():
      np.testing.assert_allclose(np.asarray(masked[task.name][key]), np.asarray(value), rtol=1e-5)
      np.testing.assert_allclose(
        np.asarray(float_masked[task.name][key]), np.asarray(value), rtol=1e-5
      )


def test_losses_shape_per_sample_and_no_nan_gradients():
  tasks, predictions, batch = _random_setup(batch_size=4)
  losses_of = jax.jit(tasks_lib.losses_matrix, static_argnums=0)
  losses = np.asarray(losses_of(tuple(tasks), predictions, batch))
  assert losses.shape == (4, len(tasks))
  # Per-sample: a sample's loss does not depend on the rest of the batch, so the batch mean is
  # the mean of the single-sample losses.
  singles = np.concatenate(
    [
      np.asarray(
        losses_of(
          tuple(tasks),
          {k: v[i : i + 1] for k, v in predictions.items()},
          _half(batch, slice(i, i + 1)),
        )
      )
      for i in range(4)
    ]
  )
  np.testing.assert_allclose(singles, losses, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.mean(axis=0), singles.mean(axis=0), rtol=1e-5)
  for index, task in enumerate(tasks):
    if task.dense:
      assert losses[1, index] == 0.0  # no valid pixel

  def total(predictions):
    return jnp.sum(jnp.mean(tasks_lib.losses_matrix(tasks, predictions, batch), axis=0))

  value, grads = jax.jit(jax.value_and_grad(total))(predictions)
  assert np.isfinite(float(value))
  for name, grad in grads.items():
    assert np.all(np.isfinite(np.asarray(grad))), name
    if name in ("segmentation", "depth", "normals"):
      assert np.all(np.asarray(grad)[1] == 0.0), name


def test_jit_and_vmap():
  tasks, predictions, batch = _random_setup(batch_size=2)
  stacked_predictions = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), predictions)
  stacked_batch = {key: np.stack([value, value]) for key, value in batch.items()}
  losses = jax.jit(jax.vmap(lambda p, b: tasks_lib.losses_matrix(tasks, p, b)))(
    stacked_predictions, stacked_batch
  )
  assert losses.shape == (2, 2, len(tasks))
  np.testing.assert_allclose(
    np.asarray(losses[0]),
    np.asarray(
      jax.jit(tasks_lib.losses_matrix, static_argnums=0)(tuple(tasks), predictions, batch)
    ),
    rtol=1e-5,
  )
  statistics = jax.jit(
    jax.vmap(lambda p, b: tasks_lib.all_metric_statistics(tasks, p, b, jnp.ones(2)))
  )(stacked_predictions, stacked_batch)
  assert statistics["segmentation"]["confusion"].shape == (2, 3, 3)


def test_flat_helpers_and_compute_metrics():
  tasks, predictions, batch = _random_setup(batch_size=4)
  names = tasks_lib.flat_metric_names(tasks)
  assert names[:2] == ["segmentation/miou", "segmentation/pixel_accuracy"]
  assert "normals/within_11.25" in names
  directions = tasks_lib.flat_directions(tasks)
  assert list(directions) == names
  assert directions["depth/abs_err"] is False and directions["label/accuracy"] is True

  total = None
  for part in (slice(0, 2), slice(2, 4)):
    part_predictions = {name: value[part] for name, value in predictions.items()}
    total = tasks_lib.add_statistics(total, _all_stats(tasks, part_predictions, _half(batch, part)))
  metrics = tasks_lib.compute_metrics(tasks, total)
  whole = tasks_lib.compute_metrics(
    tasks, {k: _to_numpy(v) for k, v in _all_stats(tasks, predictions, batch).items()}
  )
  assert list(metrics) == names
  for key in names:
    assert metrics[key] == pytest.approx(whole[key], rel=1e-5), key
  assert set(tasks_lib.TASK_KINDS) == {
    "segmentation",
    "depth",
    "normals",
    "binary_attribute",
    "classification",
  }


def test_tasks_are_hashable_static_arguments():
  task = Segmentation(num_classes=3)
  assert hash(task) == hash(Segmentation("segmentation", 3))
  with pytest.raises(AttributeError):
    task.num_classes = 4  # frozen
