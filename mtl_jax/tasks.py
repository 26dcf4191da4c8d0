"""Task definitions: each task's per-sample loss, its evaluation metrics and their directions.

A `Task` turns a model head's prediction and a batch into

* `loss`: one loss value per sample, shape [B] (the MTL weightings and the Gramian engine need
  per-sample losses; the batch loss is their mean);
* `metric_statistics`: sums over the batch that are additive across batches (counts, sums,
  confusion matrices, histograms), so that a dataset-level metric can be computed exactly by
  summing the statistics of all evaluation batches on the host;
* `metrics`: the dataset-level metrics from those summed statistics (plain numpy).

Batch contract (dict of arrays): 'image' float32 [B,H,W,3]; 'segmentation' int32 [B,H,W]
(-1 = ignore); 'depth' float32 [B,H,W] (0 = invalid pixel); 'normals' float32 [B,H,W,3]
(all-zero vector = invalid pixel); 'attributes' float32 [B,A] in {0,1}; 'label' int32 [B];
optionally 'label_mask' bool [B,T] (`LABEL_MASK_KEY`): False where example i has no label for the
run's task t (partial labels). Without it every example is labelled for every task.
Predictions: per-pixel tasks [B,H,W,C], global tasks [B,C], float32.

Partial labels: a task's batch loss is the mean of its per-sample losses over its labelled
examples only (`task_mean_losses`); with none it is 0, and so is its gradient (never NaN).

Every jnp function here is pure, jit-able and vmap-able; tasks are frozen (hashable) dataclasses
so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Batch = Mapping[str, jax.Array]
Statistics = Mapping[str, np.ndarray]

# Normals: the median angle is read off a histogram, because a median cannot be accumulated
# exactly across batches. 3600 bins of 0.05 degree over [0, 180]; the median returned is the
# centre of the bin holding the median sample, so it is within 0.025 degree (half a bin) of the
# exact dataset median of the angles.
NORMALS_HISTOGRAM_BINS = 3600
NORMALS_BIN_WIDTH_DEGREES = 180.0 / NORMALS_HISTOGRAM_BINS
NORMALS_THRESHOLDS_DEGREES = (11.25, 22.5, 30.0)

# Guards a division by a squared norm; far below any real prediction's squared norm.
_NORM_SQ_EPS = 1e-12

# The batch key of the per-(example, task) label mask, bool [B, T] in the run's task order.
LABEL_MASK_KEY = "label_mask"


def _as_example_mask(example_mask: jax.Array | None, batch_size: int) -> jax.Array:
  """A bool [B] mask; None means every sample is real."""
  if example_mask is None:
    return jnp.ones((batch_size,), dtype=bool)
  return jnp.asarray(example_mask) > 0


def _masked_mean_per_sample(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Per-sample mean of `values` [B, ...] over the valid entries; 0 where there are none.

  Multiplying by the mask (not `jnp.where`) and dividing by max(count, 1) keeps both the value
  and the gradient finite for a sample without any valid entry, as long as `values` is finite.
  """
  axes = tuple(range(1, values.ndim))
  valid = valid.astype(values.dtype)
  total = jnp.sum(values * valid, axis=axes)
  count = jnp.sum(valid, axis=axes)
  return total / jnp.maximum(count, 1.0)


def _ratio(numerator: Any, denominator: Any) -> float:
  """numerator / denominator as a Python float; NaN when the denominator is 0 (no data)."""
  denominator = float(np.asarray(denominator, dtype=np.float64))
  if denominator == 0:
    return math.nan
  return float(np.asarray(numerator, dtype=np.float64)) / denominator


def at_least_float32(x: jax.Array) -> jax.Array:
  """Predictions as float32 (from a bfloat16 or float32 model), or as float64 in float64 runs
  (jax.enable_x64): the dtype heads hand to the losses and metrics."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _normalise(vectors: jax.Array) -> jax.Array:
  """Unit vectors along the last axis; a (near-)zero vector maps to zero with zero gradient.

  A zero vector has no direction, so it must not steer training: a clamped norm alone
  (v / max(|v|, eps)) gives it the gradient 1/eps, and a ReLU head whose hidden features are all
  zero at a pixel outputs exactly its bias, 0 at initialisation. The 0/1 factor zeroes value and
  gradient there; through the clamp, the rest of the gradient is finite (a factor of the form
  1/sqrt(0) would give NaN even multiplied by 0). It costs about what the clamp alone did
  (BENCHMARKS.md, "Normals loss").
  """
  squared_norm = jnp.sum(vectors * vectors, axis=-1, keepdims=True)
  has_direction = (squared_norm > _NORM_SQ_EPS).astype(vectors.dtype)
  return vectors * (jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_SQ_EPS)) * has_direction)


@dataclasses.dataclass(frozen=True)
class Task:
  """Base class of all tasks: the loss, metrics and metric directions of one model head.

  Attributes:
    name: the task's name; it keys the model's predictions and the flat metric names
      ('name/metric').
    output_channels: channels of the head's output.
    dense: True for per-pixel tasks (predictions [B,H,W,C]), False for global ones ([B,C]).
  """

  name: str

  dense: ClassVar[bool] = False

  @property
  def output_channels(self) -> int:
    raise NotImplementedError

  @property
  def metric_directions(self) -> Mapping[str, bool]:
    """Metric name -> True if higher is better, in the order the metrics are reported."""
    raise NotImplementedError

  def loss(self, prediction: jax.Array, batch: Batch) -> jax.Array:
    """Per-sample loss.

    Args:
      prediction: the head's output, [B,H,W,C] or [B,C].
      batch: the batch dict (see the module docstring).

    Returns:
      float32 [B]: one loss per sample; the batch loss is its mean.
    """
    raise NotImplementedError

  def metric_statistics(
    self, prediction: jax.Array, batch: Batch, example_mask: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """Sums over the batch from which `metrics` computes dataset-level metrics.

    Args:
      prediction: the head's output.
      batch: the batch dict.
      example_mask: [B] bool or 0/1 float; False/0 marks padding samples that must not count.
        None means all samples are real.

    Returns:
      name -> array; summing these elementwise over batches gives the statistics of the union.
    """
    raise NotImplementedError

  def metrics(self, statistics: Statistics) -> dict[str, float]:
    """Dataset-level metrics from summed statistics (host side).

    Args:
      statistics: the elementwise sum over batches of `metric_statistics` outputs.

    Returns:
      metric name -> value, with the keys of `metric_directions`. NaN where there was no data.
    """
    raise NotImplementedError


@dataclasses.dataclass(frozen=True, init=False)
class Segmentation(Task):
  """Semantic segmentation: pixel-wise cross-entropy; mIoU and pixel accuracy.

  Target pixels equal to `ignore_index`, or outside [0, num_classes), are ignored (the latter so
  that a stray label such as 255 cannot corrupt the confusion matrix inside a jitted function,
  where raising is impossible).
  """

  num_classes: int
  target_key: str
  ignore_index: int

  dense: ClassVar[bool] = True

  def __init__(
    self,
    name: str = "segmentation",
    num_classes: int | None = None,
    target_key: str = "segmentation",
    ignore_index: int = -1,
  ) -> None:
    # A hand-written __init__ because the spec orders `name` (defaulted) before the required
    # `num_classes`, which a generated dataclass __init__ cannot express.
    if num_classes is None:
      raise TypeError("Segmentation needs num_classes")
    if num_classes < 1:
      raise ValueError(f"Segmentation num_classes must be >= 1, got {num_classes}")
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "num_classes", int(num_classes))
    object.__setattr__(self, "target_key", target_key)
    object.__setattr__(self, "ignore_index", int(ignore_index))

  @property
  def output_channels(self) -> int:
    return self.num_classes

  @property
  def metric_directions(self) -> Mapping[str, bool]:
    return {"miou": True, "pixel_accuracy": True}

  def _targets(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(labels clipped into range, valid mask), both [B,H,W]."""
    target = jnp.asarray(batch[self.target_key]).astype(jnp.int32)
    valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
    return jnp.where(valid, target, 0), valid

  def loss(self, prediction: jax.Array, batch: Batch) -> jax.Array:
    """Per-sample mean over valid pixels of the pixel cross-entropy; 0 without valid pixels."""
    target, valid = self._targets(batch)
    log_probs = jax.nn.log_softmax(at_least_float32(prediction), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
    return _masked_mean_per_sample(nll, valid)

  def metric_statistics(
    self, prediction: jax.Array, batch: Batch, example_mask: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """{'confusion': int32 [C, C]}, rows = true class, columns = predicted class."""
    target, valid = self._targets(batch)
    valid = valid & _as_example_mask(example_mask, target.shape[0])[:, None, None]
    predicted = jnp.argmax(prediction, axis=-1).astype(jnp.int32)
    cells = (target * self.num_classes + predicted).reshape(-1)
    confusion = jnp.zeros((self.num_classes * self.num_classes,), jnp.int32)
    confusion = confusion.at[cells].add(valid.reshape(-1).astype(jnp.int32))
    return {"confusion": confusion.reshape(self.num_classes, self.num_classes)}

  def metrics(self, statistics: Statistics) -> dict[str, float]:
    """mIoU over classes with a non-empty union (present in target or prediction), pixel acc."""
    confusion = np.asarray(statistics["confusion"], dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    present = union > 0
    miou = float(np.mean(true_positive[present] / union[present])) if present.any() else math.nan
    return {"miou": miou, "pixel_accuracy": _ratio(true_positive.sum(), confusion.sum())}


@dataclasses.dataclass(frozen=True)
class Depth(Task):
  """Depth (or disparity) regression: L1 over valid pixels (target > 0); abs and rel error."""

  name: str = "depth"
  target_key: str = "depth"

  dense: ClassVar[bool] = True

  @property
  def output_channels(self) -> int:
    return 1

  @property
  def metric_directions(self) -> Mapping[str, bool]:
    return {"abs_err": False, "rel_err": False}

  def _errors(self, prediction: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(|pred - target|, target, valid), each [B,H,W]."""
    target = jnp.asarray(batch[self.target_key]).astype(jnp.float32)
    abs_error = jnp.abs(at_least_float32(prediction[..., 0]) - target)
    return abs_error, target, target > 0

  def loss(self, prediction: jax.Array, batch: Batch) -> jax.Array:
    """Per-sample mean over valid pixels of |pred - target|; 0 without valid pixels."""
    abs_error, _, valid = self._errors(prediction, batch)
    return _masked_mean_per_sample(abs_error, valid)

  def metric_statistics(
    self, prediction: jax.Array, batch: Batch, example_mask: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """Sums of |e| and |e|/target over valid pixels, and the valid-pixel count."""
    abs_error, target, valid = self._errors(prediction, batch)
    valid = valid & _as_example_mask(example_mask, target.shape[0])[:, None, None]
    weight = valid.astype(jnp.float32)
    # The where keeps the unused branch finite (target 0 on invalid pixels).
    rel_error = abs_error / jnp.where(valid, target, 1.0)
    return {
      "abs_error_sum": jnp.sum(abs_error * weight),
      "rel_error_sum": jnp.sum(rel_error * weight),
      "pixel_count": jnp.sum(valid.astype(jnp.int32)),
    }

  def metrics(self, statistics: Statistics) -> dict[str, float]:
    """Means over all valid pixels of the dataset (not a mean of per-image means)."""
    count = statistics["pixel_count"]
    return {
      "abs_err": _ratio(statistics["abs_error_sum"], count),
      "rel_err": _ratio(statistics["rel_error_sum"], count),
    }


@dataclasses.dataclass(frozen=True)
class Normals(Task):
  """Surface normals: 1 - cos between normalised maps; angle-error statistics in degrees.

  The median angle is taken from a histogram of 0.05-degree bins (see
  `NORMALS_HISTOGRAM_BINS`): it is exact to within half a bin, 0.025 degree.
  """

  name: str = "normals"
  target_key: str = "normals"

  dense: ClassVar[bool] = True

  @property
  def output_channels(self) -> int:
    return 3

  @property
  def metric_directions(self) -> Mapping[str, bool]:
    return {
      "mean_angle": False,
      "median_angle": False,
      "within_11.25": True,
      "within_22.5": True,
      "within_30": True,
    }

  def _unit_maps(
    self, prediction: jax.Array, batch: Batch
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(unit prediction, unit target, valid [B,H,W])."""
    target = jnp.asarray(batch[self.target_key]).astype(jnp.float32)
    valid = jnp.any(target != 0, axis=-1)
    # The target is normalised too, so slightly denormalised ground truth does not bias the loss.
    return _normalise(at_least_float32(prediction)), _normalise(target), valid

  def loss(self, prediction: jax.Array, batch: Batch) -> jax.Array:
    """Per-sample mean over valid pixels of 1 - cos(pred, target); 0 without valid pixels."""
    unit_prediction, unit_target, valid = self._unit_maps(prediction, batch)
    cosine = jnp.sum(unit_prediction * unit_target, axis=-1)
    return _masked_mean_per_sample(1.0 - cosine, valid)

  def angles_degrees(self, prediction: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-pixel angle error in degrees and the valid mask, both [B,H,W].

    atan2(|p x t|, p . t) rather than arccos(p . t): arccos loses precision near 0 degree in
    float32 (about 0.02 degree), atan2 does not. A zero prediction counts as 90 degrees.
    """
    unit_prediction, unit_target, valid = self._unit_maps(prediction, batch)
    cross = jnp.cross(unit_prediction, unit_target)
    sine = jnp.sqrt(jnp.sum(cross * cross, axis=-1))
    cosine = jnp.sum(unit_prediction * unit_target, axis=-1)
    return jnp.degrees(jnp.arctan2(sine, cosine)), valid

  def metric_statistics(
    self, prediction: jax.Array, batch: Batch, example_mask: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """Angle sum, pixel count, counts under each threshold and an angle histogram."""
    angle, valid = self.angles_degrees(prediction, batch)
    valid = valid & _as_example_mask(example_mask, angle.shape[0])[:, None, None]
    weight = valid.astype(jnp.int32)
    bins = jnp.clip(
      jnp.floor(angle / NORMALS_BIN_WIDTH_DEGREES).astype(jnp.int32),
      0,
      NORMALS_HISTOGRAM_BINS - 1,
    )
    histogram = (
      jnp.zeros((NORMALS_HISTOGRAM_BINS,), jnp.int32).at[bins.reshape(-1)].add(weight.reshape(-1))
    )
    statistics = {
      "angle_sum": jnp.sum(angle * valid.astype(jnp.float32)),
      "pixel_count": jnp.sum(weight),
      "angle_histogram": histogram,
    }
    for threshold in NORMALS_THRESHOLDS_DEGREES:
      statistics[f"count_within_{threshold:g}"] = jnp.sum(weight * (angle < threshold))
    return statistics

  def metrics(self, statistics: Statistics) -> dict[str, float]:
    """Mean, histogram median (degrees) and fractions of valid pixels under each threshold."""
    count = statistics["pixel_count"]
    result = {
      "mean_angle": _ratio(statistics["angle_sum"], count),
      "median_angle": _histogram_median(np.asarray(statistics["angle_histogram"])),
    }
    for threshold in NORMALS_THRESHOLDS_DEGREES:
      result[f"within_{threshold:g}"] = _ratio(statistics[f"count_within_{threshold:g}"], count)
    return result


def _histogram_median(histogram: np.ndarray) -> float:
  """Median of the samples binned in `histogram` (0.05-degree bins from 0), from bin centres.

  Like np.median, an even count averages the two middle samples; each is replaced by its bin
  centre, so the result is within half a bin of the exact median.
  """
  histogram = np.asarray(histogram, dtype=np.int64)
  total = int(histogram.sum())
  if total == 0:
    return math.nan
  cumulative = np.cumsum(histogram)
  # 0-based ranks of the middle sample(s); searchsorted(side='right') finds the bin holding rank r.
  ranks = np.array([(total - 1) // 2, total // 2])
  bins = np.searchsorted(cumulative, ranks, side="right")
  centres = (bins + 0.5) * NORMALS_BIN_WIDTH_DEGREES
  return float(np.mean(centres))


@dataclasses.dataclass(frozen=True)
class BinaryAttribute(Task):
  """One binary attribute (CelebA-style, one task per attribute): BCE with logits; accuracy.

  Attributes:
    index: column of `batch[target_key]` ([B, A] in {0, 1}) this task predicts.
  """

  index: int
  target_key: str = "attributes"

  @property
  def output_channels(self) -> int:
    return 1

  @property
  def metric_directions(self) -> Mapping[str, bool]:
    return {"accuracy": True}

  def _target(self, batch: Batch) -> jax.Array:
    return jnp.asarray(batch[self.target_key])[:, self.index].astype(jnp.float32)

  def loss(self, prediction: jax.Array, batch: Batch) -> jax.Array:
    """Per-sample binary cross-entropy with logits, stable for large |logit|."""
    logit = at_least_float32(prediction[:, 0])
    target = self._target(batch)
    # log(1 + e^x) - x y, with logaddexp avoiding overflow of e^x and log(0) for e^-x.
    return jnp.logaddexp(0.0, logit) - logit * target

  def metric_statistics(
    self, prediction: jax.Array, batch: Batch, example_mask: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """Correct predictions (logit > 0 means 1) and sample count, padding excluded."""
    target = self._target(batch) > 0.5
    mask = _as_example_mask(example_mask, target.shape[0])
    correct = (prediction[:, 0] > 0) == target
    return {
      "correct": jnp.sum((correct & mask).astype(jnp.int32)),
      "count": jnp.sum(mask.astype(jnp.int32)),
    }

  def metrics(self, statistics: Statistics) -> dict[str, float]:
    return {"accuracy": _ratio(statistics["correct"], statistics["count"])}


@dataclasses.dataclass(frozen=True)
class Classification(Task):
  """Multi-class classification from logits [B, C]: cross-entropy; accuracy."""

  num_classes: int
  target_key: str = "label"

  @property
  def output_channels(self) -> int:
    return self.num_classes

  @property
  def metric_directions(self) -> Mapping[str, bool]:
    return {"accuracy": True}

  def loss(self, prediction: jax.Array, batch: Batch) -> jax.Array:
    """Per-sample cross-entropy of the integer label."""
    label = jnp.asarray(batch[self.target_key]).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(at_least_float32(prediction), axis=-1)
    return -jnp.take_along_axis(log_probs, label[:, None], axis=-1)[:, 0]

  def metric_statistics(
    self, prediction: jax.Array, batch: Batch, example_mask: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """Correct top-1 predictions and sample count, padding excluded."""
    label = jnp.asarray(batch[self.target_key]).astype(jnp.int32)
    mask = _as_example_mask(example_mask, label.shape[0])
    correct = jnp.argmax(prediction, axis=-1) == label
    return {
      "correct": jnp.sum((correct & mask).astype(jnp.int32)),
      "count": jnp.sum(mask.astype(jnp.int32)),
    }

  def metrics(self, statistics: Statistics) -> dict[str, float]:
    return {"accuracy": _ratio(statistics["correct"], statistics["count"])}


TASK_KINDS: dict[str, type[Task]] = {
  "segmentation": Segmentation,
  "depth": Depth,
  "normals": Normals,
  "binary_attribute": BinaryAttribute,
  "classification": Classification,
}


def flat_metric_names(tasks: Sequence[Task]) -> list[str]:
  """'task/metric' names of all tasks' metrics, in task order then metric order.

  Args:
    tasks: the tasks.

  Returns:
    The flat metric names.
  """
  return [f"{task.name}/{metric}" for task in tasks for metric in task.metric_directions]


def flat_directions(tasks: Sequence[Task]) -> dict[str, bool]:
  """'task/metric' -> True if higher is better, for all tasks' metrics.

  Args:
    tasks: the tasks.

  Returns:
    The directions, keyed and ordered like `flat_metric_names`.
  """
  return {
    f"{task.name}/{metric}": higher
    for task in tasks
    for metric, higher in task.metric_directions.items()
  }


def losses_matrix(
  tasks: Sequence[Task], predictions: Mapping[str, jax.Array], batch: Batch
) -> jax.Array:
  """Per-sample losses of every task.

  Args:
    tasks: the tasks, in the column order wanted.
    predictions: task name -> that task's head output.
    batch: the batch dict.

  Returns:
    float32 [B, T]: column t holds tasks[t]'s per-sample losses.
  """
  return jnp.stack([task.loss(predictions[task.name], batch) for task in tasks], axis=1)


def all_metric_statistics(
  tasks: Sequence[Task],
  predictions: Mapping[str, jax.Array],
  batch: Batch,
  example_mask: jax.Array | None = None,
) -> dict[str, dict[str, jax.Array]]:
  """Every task's `metric_statistics` for one batch.

  Args:
    tasks: the tasks.
    predictions: task name -> head output.
    batch: the batch dict.
    example_mask: [B] marks real (non-padding) samples; None means all are real.

  Returns:
    task name -> statistic name -> array (sum over the batch).
  """
  return {
    task.name: task.metric_statistics(predictions[task.name], batch, example_mask) for task in tasks
  }


def add_statistics(
  total: Mapping[str, Mapping[str, np.ndarray]] | None,
  statistics: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, np.ndarray]]:
  """Accumulates one batch's statistics into a running total on the host.

  Counts are summed in int64 and sums in float64, so long evaluations neither overflow nor
  lose precision.

  Args:
    total: the running total, or None for the first batch.
    statistics: one batch's `all_metric_statistics` output (device or numpy arrays).

  Returns:
    The new total (a fresh dict; `total` is not modified).
  """
  result: dict[str, dict[str, np.ndarray]] = {}
  for task_name, task_statistics in statistics.items():
    result[task_name] = {}
    for key, value in task_statistics.items():
      value = np.asarray(value)
      value = value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float64)
      if total is not None:
        value = value + total[task_name][key]
      result[task_name][key] = value
  return result


def compute_metrics(
  tasks: Sequence[Task], statistics: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, float]:
  """Dataset-level metrics of all tasks from their summed statistics.

  Args:
    tasks: the tasks.
    statistics: task name -> summed statistics of that task.

  Returns:
    'task/metric' -> value, ordered like `flat_metric_names`.
  """
  result: dict[str, float] = {}
  for task in tasks:
    for metric, value in task.metrics(statistics[task.name]).items():
      result[f"{task.name}/{metric}"] = value
  return result


def label_mask(batch: Batch) -> jax.Array | None:
  """The batch's bool [B, T] label mask, or None when every example is labelled for every task."""
  mask = batch.get(LABEL_MASK_KEY)
  return None if mask is None else jnp.asarray(mask) > 0


def label_scales(batch: Batch) -> jax.Array | None:
  """[B, T] coefficients c_it = m_it / max(n_t, 1) with n_t task t's labelled examples, so that
  Σ_i c_it L_it is task t's batch loss; None without a label mask (then c_it = 1 / B)."""
  mask = label_mask(batch)
  if mask is None:
    return None
  weights = mask.astype(jnp.float32)
  return weights / jnp.maximum(jnp.sum(weights, axis=0), 1.0)


def task_mean_losses(losses: jax.Array, batch: Batch) -> jax.Array:
  """[T] batch losses from per-sample losses [B, T]: each task's mean over its labelled examples.

  Without a label mask this is the plain mean over the batch. With one, unlabelled entries are
  replaced by 0 (`where`, so even a non-finite loss of an unlabelled example stays out of the
  value and the gradient) and each column is divided by max(labelled count, 1): a task without
  a labelled example has loss 0 and gradient 0.
  """
  mask = label_mask(batch)
  if mask is None:
    return jnp.mean(losses, axis=0)
  total = jnp.sum(jnp.where(mask, losses, 0.0), axis=0)
  return total / jnp.maximum(jnp.sum(mask.astype(losses.dtype), axis=0), 1.0)


def task_mean_loss(losses: jax.Array, batch: Batch, index: int) -> jax.Array:
  """Task `index`'s batch loss from its per-sample losses [B] (see `task_mean_losses`)."""
  mask = label_mask(batch)
  if mask is None:
    return jnp.mean(losses)
  labelled = mask[:, index]
  total = jnp.sum(jnp.where(labelled, losses, 0.0))
  return total / jnp.maximum(jnp.sum(labelled.astype(losses.dtype)), 1.0)


def task_present(batch: Batch, num_tasks: int) -> jax.Array | None:
  """bool [T]: whether each task has a labelled example in the batch; None without a mask."""
  mask = label_mask(batch)
  if mask is None:
    return None
  if mask.shape[-1] != num_tasks:
    raise ValueError(
      f"batch['{LABEL_MASK_KEY}'] has {mask.shape[-1]} task columns, the run has {num_tasks}."
    )
  return jnp.any(mask, axis=0)
