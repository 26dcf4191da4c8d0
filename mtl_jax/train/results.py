"""What a finished run leaves in its workdir: results.json (or failed.json), and their reuse on a
rerun."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import config_validation
from mtl_jax import metrics as metrics_lib
from mtl_jax import metric_writers
from mtl_jax import parallel
from mtl_jax import tasks as tasks_lib
from mtl_jax.train.state import Experiment
from mtl_jax.train.state import config_fingerprint

RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"


def write_json(path: str, value: Any) -> None:
  """Writes JSON atomically: a reader sees the old file or the whole new one, never a part.

  Written once, by the writing process (`parallel.is_writer`); every process calls this and waits
  until the file is there (`parallel.barrier`), so any of them may read it next (a sweep checks
  which runs are finished).
  """
  if parallel.is_writer():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
      json.dump(value, file, indent=2)
    os.replace(temporary, path)
  parallel.barrier(f"wrote {path}")


def load_baselines(config: ml_collections.ConfigDict) -> tuple[dict | None, dict | None]:
  """The STL baselines' (validation, test) metrics named by config.delta_m.baseline, or Nones."""
  paths = list(config.delta_m.baseline)
  if not paths:
    return None, None
  validation = metrics_lib.load_baseline(paths, split="validation")
  return validation, metrics_lib.load_baseline(paths, split="test")


def raise_on_mismatch(
  what: str, saved: Mapping[str, Any] | None, current: Mapping[str, Any]
) -> None:
  """Raises a ConfigError naming every key where a saved fingerprint differs from the config's."""
  mismatches = checkpoint_lib.fingerprint_mismatches(saved, current)
  if mismatches:
    raise config_validation.ConfigError(
      f"{what} was written by a different config ({'; '.join(mismatches)}); use another "
      "--workdir or the original config."
    )


def finished_results(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The results of a finished run of this config in workdir, or None when there is none yet.

  Raises:
    config_validation.ConfigError: workdir holds the results of a different config.
  """
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as file:
    results = json.load(file)
  fingerprint = config_fingerprint(config)
  if results.get("fingerprint") == fingerprint:
    metric_writers.status(f"{workdir}: finished run found, reusing {RESULTS_FILE}.")
    return results
  raise_on_mismatch(path, results.get("fingerprint"), fingerprint)
  return None


def run_results(
  experiment: Experiment,
  config: ml_collections.ConfigDict,
  progress: Mapping[str, Any],
  validation: Mapping[str, float],
  test: Mapping[str, float],
  baselines: tuple[dict | None, dict | None],
) -> dict[str, Any]:
  """The results dict of one run: its best step's validation and test metrics, and Δm."""
  directions = tasks_lib.flat_directions(experiment.tasks)
  results = {
    "fingerprint": config_fingerprint(config),
    "tasks": experiment.task_names,
    "directions": directions,
    "best_step": progress.get("best_step"),
    "selection": {"criterion": progress.get("criterion"), "score": progress.get("best_score")},
    "skipped_steps": progress.get("skipped_steps", 0),
    "validation": dict(validation),
    "test": dict(test),
    "config": json.loads(config.to_json_best_effort()),
  }
  baseline_validation, baseline_test = baselines
  if baseline_test and len(experiment.tasks) > 1:
    variant = config.delta_m.variant
    results["delta_m"] = {
      "test": metrics_lib.delta_m(test, baseline_test, directions, variant=variant),
      "validation": metrics_lib.delta_m(
        validation, baseline_validation, directions, variant=variant
      ),
      "variant": variant,
    }
  return results


def write_failure(workdir: str, config: ml_collections.ConfigDict, error: str) -> None:
  """Records a diverged run (a result of a sweep, not a crash) as failed.json."""
  write_json(
    os.path.join(workdir, FAILED_FILE), {"fingerprint": config_fingerprint(config), "error": error}
  )
