"""Evaluation: a state's metrics on a split, and the validation score that picks the best
checkpoint."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from mtl_jax import metrics as metrics_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax.data import pipeline
from mtl_jax.train.state import Experiment


def summed_statistics(
  eval_step: Callable, experiment: Experiment, params: Any, batch_stats: Any, split: str
) -> dict[str, Any]:
  """The eval step's metric statistics summed over every batch of a split (host numpy arrays).

  `params` and `batch_stats` may carry a leading run axis (several runs evaluated together);
  the sums then keep that axis.
  """
  totals = None
  batch_size = int(experiment.config.training.eval_batch_size)
  for batch, mask in pipeline.eval_batches(experiment.dataset.splits[split], batch_size):
    statistics = jax.device_get(eval_step(params, batch_stats, batch, mask))
    totals = statistics if totals is None else jax.tree_util.tree_map(np.add, totals, statistics)
  return totals


def flat_metrics(tasks: Sequence[tasks_lib.Task], totals: Mapping[str, Any]) -> dict[str, float]:
  """Flat 'task/metric' values plus 'task/loss' from one run's summed statistics: each task's
  loss is its mean over its labelled examples ('loss_count'; NaN when it had none)."""
  per_task = {name: stats for name, stats in totals.items() if name != "_count"}
  without_losses = {
    name: {key: value for key, value in stats.items() if key not in ("loss_sum", "loss_count")}
    for name, stats in per_task.items()
  }
  flat = tasks_lib.compute_metrics(tasks, without_losses)
  for name, stats in per_task.items():
    count = float(stats["loss_count"])
    flat[f"{name}/loss"] = float(stats["loss_sum"]) / count if count else float("nan")
  return flat


def per_run_metrics(
  tasks: Sequence[tasks_lib.Task], totals: Mapping[str, Any]
) -> list[dict[str, float]]:
  """`flat_metrics` of each run of statistics summed with a leading run axis."""
  runs = int(np.shape(totals["_count"])[0])
  return [
    flat_metrics(tasks, jax.tree_util.tree_map(lambda leaf, index=index: leaf[index], totals))
    for index in range(runs)
  ]


def selection_score(
  experiment: Experiment, validation: Mapping[str, float], baseline: Mapping[str, float] | None
) -> tuple[str, float]:
  """The validation score that picks the best checkpoint (lower is better).

  Multi-task runs with an STL baseline use Δm; otherwise (STL runs, or no baseline given) the
  sum of validation task losses.
  """
  if baseline and len(experiment.tasks) > 1:
    directions = tasks_lib.flat_directions(experiment.tasks)
    variant = experiment.config.delta_m.variant
    return "validation_delta_m", metrics_lib.delta_m(
      validation, baseline, directions, variant=variant
    )
  return "validation_loss", float(sum(validation[f"{name}/loss"] for name in experiment.task_names))


# ------------------------------------------------------------------------------ trivial predictors


def _target_sums(task: tasks_lib.Task, batch: Mapping[str, np.ndarray], mask: np.ndarray):
  """(sum, count) over the real examples of one batch of what the task's trivial predictor
  averages: class counts, depth, normal vectors, attribute or label counts."""
  target = np.asarray(batch[task.target_key])
  real = mask.astype(bool)
  if isinstance(task, tasks_lib.Segmentation):
    labels = target[real]
    valid = (labels >= 0) & (labels < task.num_classes) & (labels != task.ignore_index)
    return np.bincount(labels[valid], minlength=task.num_classes).astype(np.float64), 1.0
  if isinstance(task, tasks_lib.Depth):
    depth = target[real].astype(np.float64)
    return np.array([depth[depth > 0].sum()]), float((depth > 0).sum())
  if isinstance(task, tasks_lib.Normals):
    normals = target[real].reshape(-1, 3).astype(np.float64)
    valid = np.any(normals != 0, axis=-1)
    return normals[valid].sum(axis=0), float(valid.sum())
  if isinstance(task, tasks_lib.BinaryAttribute):
    positive = float((target[real][:, task.index] > 0.5).sum())
    return np.array([float(real.sum()) - positive, positive]), 1.0
  if isinstance(task, tasks_lib.Classification):
    return np.bincount(target[real], minlength=task.num_classes).astype(np.float64), 1.0
  raise ValueError(f"No trivial predictor for task {task.name!r} ({type(task).__name__}).")


def trivial_prediction(task: tasks_lib.Task, sums: np.ndarray, count: float) -> np.ndarray:
  """The constant prediction (one example's, without the batch axis) of a task's trivial
  predictor from the training sums of `_target_sums`: the majority class as a one-hot logit
  (segmentation, attributes, labels), the training-mean depth, the training-mean normal."""
  if isinstance(task, (tasks_lib.Segmentation, tasks_lib.Classification)):
    return np.eye(task.num_classes, dtype=np.float32)[int(np.argmax(sums))]
  if isinstance(task, tasks_lib.BinaryAttribute):
    return np.array([1.0 if sums[1] >= sums[0] else -1.0], np.float32)
  if isinstance(task, tasks_lib.Depth):
    return (sums / max(count, 1.0)).astype(np.float32)
  return (sums / max(np.linalg.norm(sums), 1e-12)).astype(np.float32)  # normals: the mean direction


def trivial_metrics(
  tasks: Sequence[tasks_lib.Task],
  train_source: pipeline.Source,
  eval_source: pipeline.Source,
  batch_size: int,
) -> dict[str, float]:
  """Flat 'task/metric' values on `eval_source` of each task's trivial predictor, fitted on
  `train_source`: what a model that ignores its input scores (the bar a model must clear)."""
  fitted = {}
  for index, task in enumerate(tasks):
    sums, count = 0.0, 0.0
    for batch, mask in pipeline.eval_batches(train_source, batch_size):
      if tasks_lib.LABEL_MASK_KEY in batch:  # fitted on the labelled examples only
        mask = mask & np.asarray(batch[tasks_lib.LABEL_MASK_KEY])[:, index]
      batch_sums, batch_count = _target_sums(task, batch, mask)
      sums, count = sums + batch_sums, count + batch_count
    fitted[task.name] = trivial_prediction(task, np.asarray(sums), count)
  totals = None
  for batch, mask in pipeline.eval_batches(eval_source, batch_size):
    size = len(mask)
    predictions = {}
    for task in tasks:
      shape = (size,) + (batch[task.target_key].shape[1:3] if task.dense else ())
      predictions[task.name] = np.broadcast_to(fitted[task.name], shape + fitted[task.name].shape)
    statistics = tasks_lib.all_metric_statistics(tasks, predictions, batch, mask)
    totals = tasks_lib.add_statistics(totals, statistics)
  return tasks_lib.compute_metrics(tasks, totals)
