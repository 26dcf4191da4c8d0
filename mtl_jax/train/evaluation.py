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
  """Flat 'task/metric' values plus 'task/loss' from one run's summed statistics (with '_count')."""
  count = float(totals["_count"])
  per_task = {name: stats for name, stats in totals.items() if name != "_count"}
  without_losses = {
    name: {key: value for key, value in stats.items() if key != "loss_sum"}
    for name, stats in per_task.items()
  }
  flat = tasks_lib.compute_metrics(tasks, without_losses)
  for name, stats in per_task.items():
    flat[f"{name}/loss"] = float(stats["loss_sum"]) / count
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
