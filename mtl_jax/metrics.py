"""Run-level comparison metrics: Δm against single-task baselines, and Pareto dominance.

Δm (SPEC section 2): Δm = (1/K) Σ_k (−1)^{l_k} (M_m,k − M_b,k) / M_b,k × 100, with l_k = 1
when higher is better, so lower Δm is better and an MTL model equal to its STL baselines scores 0.
The 'flat' variant averages over all K metrics (the paper's); 'per_task' first averages within
each task, then over tasks (LibMTL's).

Pareto helpers work on points whose every objective is lower-better (see `oriented`); they back
SPEC's "PO (full)" count (`pareto_mask` over all runs) and "PO w.r.t. the other optimizer" count
(`non_dominated_by`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

DELTA_M_VARIANTS = ("flat", "per_task")

RESULTS_FILENAME = "results.json"


def _task_of(key: str) -> str:
  """The task part of a 'task/metric' key (metric names never contain '/')."""
  task, _, _ = key.rpartition("/")
  return task or key


def delta_m(
  metrics: Mapping[str, float],
  baseline: Mapping[str, float],
  directions: Mapping[str, bool],
  variant: str = "flat",
) -> float:
  """Δm (%) of a model's metrics relative to a baseline; lower is better.

  The metrics used are those of `directions` that `metrics` or `baseline` has; each of them must
  be in both. Keys of `metrics` or `baseline` without a direction (e.g. a logged loss) and keys of
  `directions` in neither are ignored.

  Args:
    metrics: 'task/metric' -> value of the evaluated (MTL) model.
    baseline: 'task/metric' -> value of the baseline (STL) models, e.g. from `load_baseline`.
    directions: 'task/metric' -> True if higher is better, e.g. `tasks.flat_directions(tasks)`.
    variant: 'flat' (mean over all metrics) or 'per_task' (mean within each task, then over
      tasks).

  Returns:
    Δm in percent.

  Raises:
    ValueError: unknown variant; a used metric absent from `metrics` or from `baseline`; a
      baseline value of 0; no metric in common.
  """
  if variant not in DELTA_M_VARIANTS:
    raise ValueError(f"unknown Δm variant {variant!r}; valid variants: {DELTA_M_VARIANTS}")
  keys = [key for key in directions if key in metrics or key in baseline]
  missing_in_baseline = [key for key in keys if key not in baseline]
  if missing_in_baseline:
    raise ValueError(
      f"baseline lacks metrics {missing_in_baseline} needed for Δm (baseline has "
      f"{sorted(baseline)}); is an STL run of every task included?"
    )
  missing_in_metrics = [key for key in keys if key not in metrics]
  if missing_in_metrics:
    raise ValueError(f"metrics lack {missing_in_metrics}, which the baseline has")
  if not keys:
    raise ValueError(
      f"no metric in common between metrics {sorted(metrics)}, baseline {sorted(baseline)} "
      f"and directions {sorted(directions)}"
    )
  zero = [key for key in keys if float(baseline[key]) == 0.0]
  if zero:
    raise ValueError(f"baseline value is 0 for {zero}: the relative change is undefined")

  relative: dict[str, float] = {}
  for key in keys:
    sign = -1.0 if directions[key] else 1.0
    base = float(baseline[key])
    relative[key] = sign * (float(metrics[key]) - base) / base * 100.0

  if variant == "flat":
    return float(np.mean(list(relative.values())))
  per_task: dict[str, list[float]] = {}
  for key, value in relative.items():
    per_task.setdefault(_task_of(key), []).append(value)
  return float(np.mean([np.mean(values) for values in per_task.values()]))


def relative_improvement(
  metrics: Mapping[str, float], baseline: Mapping[str, float], directions: Mapping[str, bool]
) -> dict[str, float]:
  """Per metric, the relative improvement (%) over a baseline: positive when better.

  (−1)^{l} (M − B) / |B| × 100 with l = 1 when lower is better: one metric's term of −Δm. Used
  to check that a model beats its trivial predictor. NaN where the relative change is undefined
  (a baseline value of 0, or a value missing or not finite).

  Args:
    metrics: 'task/metric' -> value of the model.
    baseline: 'task/metric' -> value of the baseline (e.g. the trivial predictor).
    directions: 'task/metric' -> True if higher is better; exactly these metrics are used.

  Returns:
    'task/metric' -> improvement in percent, in the order of `directions`.
  """
  result = {}
  for key, higher_is_better in directions.items():
    base, value = float(baseline.get(key, math.nan)), float(metrics.get(key, math.nan))
    if base == 0.0 or not (math.isfinite(base) and math.isfinite(value)):
      result[key] = math.nan
      continue
    sign = 1.0 if higher_is_better else -1.0
    result[key] = sign * (value - base) / abs(base) * 100.0
  return result


def task_of(key: str) -> str:
  """The task part of a flat 'task/metric' key."""
  return _task_of(key)


def _read_split(path: str, split: str) -> dict[str, float]:
  """The `split` entry of one results file (or of a run directory's results.json)."""
  file_path = os.path.join(path, RESULTS_FILENAME) if os.path.isdir(path) else path
  if not os.path.isfile(file_path):
    raise FileNotFoundError(
      f"baseline {path!r}: no results file at {file_path!r}; a baseline path should be an STL "
      f"run's workdir (containing {RESULTS_FILENAME}) or a {RESULTS_FILENAME} file"
    )
  with open(file_path) as f:
    results = json.load(f)
  if not isinstance(results, dict) or split not in results:
    available = sorted(results) if isinstance(results, dict) else type(results).__name__
    raise ValueError(f"baseline {file_path!r} has no {split!r} entry (has {available})")
  return {str(key): float(value) for key, value in results[split].items()}


def load_baseline(paths: Sequence[str | os.PathLike], split: str = "test") -> dict[str, float]:
  """Merges the results of several STL runs into one baseline.

  Args:
    paths: each a results JSON file or a run directory containing `results.json`; the file holds
      {"test": {"task/metric": value, ...}, "validation": {...}, ...}. A single path is accepted.
    split: which entry of each file to read.

  Returns:
    'task/metric' -> value, the union over all runs.

  Raises:
    FileNotFoundError: a path is neither a results file nor a directory holding one.
    ValueError: a file lacks `split`, or two runs give different values for the same key.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  merged: dict[str, float] = {}
  source: dict[str, str] = {}
  for path in paths:
    path = os.fspath(path)
    for key, value in _read_split(path, split).items():
      if key in merged and not (
        merged[key] == value or (math.isnan(merged[key]) and math.isnan(value))
      ):
        raise ValueError(
          f"baseline metric {key!r} conflicts: {merged[key]} in {source[key]!r} vs {value} in "
          f"{path!r}"
        )
      merged[key] = value
      source.setdefault(key, path)
  return merged


def oriented(points: np.ndarray, higher_is_better: Sequence[bool]) -> np.ndarray:
  """Points with every objective turned lower-better.

  Args:
    points: [N, K] objective values.
    higher_is_better: K flags; those columns are negated.

  Returns:
    float64 [N, K], a new array.
  """
  points = np.array(points, dtype=np.float64, ndmin=2)
  flags = np.asarray(higher_is_better, dtype=bool)
  if flags.shape != (points.shape[1],):
    raise ValueError(f"{flags.size} direction flags for {points.shape[1]} objectives")
  return np.where(flags, -points, points)


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether a dominates b (lower-better): a ≤ b everywhere and a < b somewhere.

  Args:
    a: [K] objectives.
    b: [K] objectives.

  Returns:
    True if a dominates b.
  """
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  return bool(np.all(a <= b) and np.any(a < b))


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
  points = np.asarray(points, dtype=np.float64)
  if points.ndim != 2:
    raise ValueError(f"{name} must be [N, K], got shape {points.shape}")
  # NaN compares false both ways, so a NaN run would sit on every front; make the caller decide.
  if np.isnan(points).any():
    raise ValueError(f"{name} contains NaN; drop those runs or replace NaN by +inf (worst)")
  return points


def _dominated_by_any(candidates: np.ndarray, others: np.ndarray) -> np.ndarray:
  """Mask over candidates: dominated by at least one row of `others`."""
  if candidates.shape[0] == 0 or others.shape[0] == 0:
    return np.zeros((candidates.shape[0],), dtype=bool)
  # [N_others, N_candidates, K]; run counts are in the hundreds, so O(N² K) memory is fine.
  less_equal = np.all(others[:, None, :] <= candidates[None, :, :], axis=-1)
  less = np.any(others[:, None, :] < candidates[None, :, :], axis=-1)
  return np.any(less_equal & less, axis=0)


def pareto_mask(points: np.ndarray) -> np.ndarray:
  """The Pareto front of lower-better points.

  Args:
    points: [N, K] lower-better objectives (see `oriented`); NaN is rejected.

  Returns:
    bool [N]: True where no other point dominates the point. Duplicate points do not dominate
    each other, so all copies of a front point are on the front.
  """
  points = _check_points(points, "points")
  return ~_dominated_by_any(points, points)


def non_dominated_by(points_a: np.ndarray, points_b: np.ndarray) -> np.ndarray:
  """Points of a that no point of b dominates (SPEC's "PO w.r.t. the other optimizer").

  Args:
    points_a: [N_a, K] lower-better objectives.
    points_b: [N_b, K] lower-better objectives.

  Returns:
    bool [N_a].
  """
  points_a = _check_points(points_a, "points_a")
  points_b = _check_points(points_b, "points_b")
  if points_a.shape[0] and points_b.shape[0] and points_a.shape[1] != points_b.shape[1]:
    raise ValueError(f"objective counts differ: {points_a.shape[1]} vs {points_b.shape[1]}")
  return ~_dominated_by_any(points_a, points_b)
