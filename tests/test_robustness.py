"""Tests of the robustness study: the δ metric, head-only fine-tuning, the end-to-end run,
errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import test as test_config
from configs.sections import robustness as robustness_section
from mtl_jax import config_validation
from mtl_jax import statistics
from mtl_jax.studies import robustness
from mtl_jax.data import registry


def _config(**overrides):
  """A tiny study: an MLP on two scene attributes, 2 corruptions x 2 severities, short schedules."""
  config = robustness_section.add(test_config.get_config())
  config.unlock()
  config.tasks = ("has_sphere", "has_box")
  config.model.encoder = "mlp"
  config.model.hidden = (16,)
  config.training.num_epochs = 1
  config.training.checkpoint_every_steps = 0
  config.robustness.corruptions = ("gaussian_noise", "fog")
  config.robustness.severities = (1, 5)
  config.robustness.finetune_epochs = 1
  config.robustness.probe_steps = 30
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config.lock()


def test_delta_on_hand_made_numbers():
  directions = {"a/accuracy": True, "a/loss": False, "b/error": False}
  mtl_clean = {"a/accuracy": 0.8, "a/loss": 1.0, "b/error": 2.0}
  stl_clean = {"a/accuracy": 0.5, "a/loss": 2.0, "b/error": 1.0}
  mtl_corrupted = {
    "fog/1": {"a/accuracy": 0.4, "a/loss": 1.5, "b/error": 3.0},
    "fog/2": {"a/accuracy": 0.8, "a/loss": 1.0, "b/error": 2.0},
  }
  stl_corrupted = {
    "fog/1": {"a/accuracy": 0.45, "a/loss": 2.0, "b/error": 1.0},
    "fog/2": {"a/accuracy": 0.5, "a/loss": 3.0, "b/error": 1.5},
  }
  delta = robustness.corruption_delta(
    mtl_clean, mtl_corrupted, stl_clean, stl_corrupted, directions
  )
  # accuracy: -mean(0.5 - 0.9, 1 - 1) = +0.2 (MTL kept less accuracy); the lower-better metrics
  # degrade by 1.5x once for each model, so they cancel on average.
  assert delta["per_metric"] == pytest.approx({"a/accuracy": 0.2, "a/loss": 0.0, "b/error": 0.0})
  assert delta["per_task"] == pytest.approx({"a": 0.1, "b": 0.0})
  # Per corrupted set, δ is the mean over tasks of the mean over a task's metrics: fog/1:
  # a (0.4 + 0.5) / 2, b 0.5 -> 0.475; fog/2: a (0 − 0.5) / 2, b −0.5 -> −0.375.
  (line,) = robustness.delta_findings({"mtl": delta}, statistics.Settings(0.95, "t", 10, 0))
  expected = statistics.t_interval([0.475, -0.375], 0.95)
  assert f"mean δ over 2 corrupted sets {statistics.described(expected, -1, 4)}" in line
  assert "**inconclusive**" in line
  assert delta["mean"] == pytest.approx(0.05)
  assert delta["per_condition"]["fog/1"]["b/error"] == pytest.approx(0.5)
  # Identical models have δ = 0; swapping the roles flips the sign.
  same = robustness.corruption_delta(mtl_clean, mtl_corrupted, mtl_clean, mtl_corrupted, directions)
  assert same["mean"] == 0.0
  swapped = robustness.corruption_delta(
    stl_clean, stl_corrupted, mtl_clean, mtl_corrupted, directions
  )
  assert swapped["mean"] == pytest.approx(-0.05)
  with pytest.raises(ValueError, match="different corrupted sets"):
    robustness.corruption_delta(
      mtl_clean, mtl_corrupted, stl_clean, {"fog/1": stl_corrupted["fog/1"]}, directions
    )
  with pytest.raises(ValueError, match="clean value is 0"):
    robustness.corruption_delta(
      dict(mtl_clean, **{"b/error": 0.0}), mtl_corrupted, stl_clean, stl_corrupted, directions
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """The study run once end to end, training its own MTL and STL runs first."""
  workdir = str(tmp_path_factory.mktemp("robustness"))
  return workdir, robustness.run_robustness(_config(), workdir)


@pytest.fixture(scope="module")
def dataset():
  return registry.load_dataset(_config().dataset)


def test_end_to_end_study(study):
  workdir, results = study
  assert set(results["runs"]) == {"mtl_ew", "stl_has_sphere", "stl_has_box"}
  for run in results["runs"].values():
    assert set(run["corrupted"]) == {"gaussian_noise/1", "gaussian_noise/5", "fog/1", "fog/5"}
    assert all(np.isfinite(value) for value in run["clean"].values())
  delta = results["delta"]["mtl_ew"]
  assert set(delta["per_task"]) == {"has_sphere", "has_box"} and np.isfinite(delta["mean"])
  probe = results["probe"]
  assert probe["task"] == "has_red_object" and set(probe["runs"]) == set(results["runs"])
  assert all(0.0 <= metrics["has_red_object/accuracy"] <= 1.0 for metrics in probe["runs"].values())
  for name in (robustness.RESULTS_FILE, robustness.REPORT_FILE, robustness.FIGURE_FILE):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert (
    json.load(open(os.path.join(workdir, robustness.RESULTS_FILE)))["delta"]["mtl_ew"]["mean"]
    == delta["mean"]
  )
  report = open(os.path.join(workdir, robustness.REPORT_FILE)).read()
  assert "mean δ" in report
  assert "(95% t, n=4)" in results["findings"][0]
  assert "**Models that learn.**" in report and "| mtl_ew |" in report


def test_finetuning_changes_only_the_heads(study, dataset):
  workdir, _ = study
  run = robustness.restore_run(os.path.join(workdir, "runs", "mtl_ew"), dataset)
  before = jax.device_get(run.params)
  stats_before = jax.device_get(run.batch_stats)
  history = robustness.finetune_heads([run], dataset, _config().robustness, ("fog",), (3,), seed=1)
  assert len(history["mtl_ew"]) == 1 and np.isfinite(history["mtl_ew"][0])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, before["encoder"], jax.device_get(run.params["encoder"])
  )
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, stats_before, jax.device_get(run.batch_stats)
  )
  changed = jax.tree_util.tree_leaves(
    jax.tree_util.tree_map(
      lambda old, new: not np.array_equal(old, new),
      before["heads"],
      jax.device_get(run.params["heads"]),
    )
  )
  assert any(changed)


def _explicit(workdir, **overrides):
  runs = os.path.join(workdir, "runs")
  return _config(
    **{
      "robustness.mtl_runs": (os.path.join(runs, "mtl_ew"),),
      "robustness.stl_runs": (
        os.path.join(runs, "stl_has_sphere"),
        os.path.join(runs, "stl_has_box"),
      ),
      **overrides,
    }
  )


def test_missing_run_directory_or_checkpoint(study, dataset, tmp_path):
  workdir, _ = study
  missing = str(tmp_path / "no_such_run")
  config = _explicit(workdir, **{"robustness.mtl_runs": (missing,)})
  # Checked with the config, before the study starts.
  with pytest.raises(
    config_validation.ConfigError,
    match=r"config\.robustness\.mtl_runs: .*no_such_run.* do not exist",
  ):
    robustness.run_robustness(config, str(tmp_path / "out"))
  broken = str(tmp_path / "broken")
  shutil.copytree(os.path.join(workdir, "runs", "stl_has_box"), broken)
  shutil.rmtree(os.path.join(broken, "best"))
  with pytest.raises(FileNotFoundError, match="broken.*no best checkpoint"):
    robustness.restore_run(broken, dataset)
  os.remove(os.path.join(broken, "config.json"))
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    robustness.restore_run(broken, dataset)
  with pytest.raises(ValueError, match="both robustness.mtl_runs and robustness.stl_runs"):
    robustness.run_robustness(
      _explicit(workdir, **{"robustness.stl_runs": ()}), str(tmp_path / "out")
    )


def test_mismatched_runs_are_named(study, dataset, tmp_path):
  workdir, _ = study
  with pytest.raises(ValueError, match=r"mtl_ew.*\n.*tasks: run has \['has_sphere', 'has_box'\]"):
    robustness.run_robustness(
      _explicit(workdir, tasks=("has_sphere", "has_wall")), str(tmp_path / "out")
    )
  with pytest.raises(ValueError, match="dataset.height: run has 16, config has 8"):
    robustness.run_robustness(_explicit(workdir, **{"dataset.height": 8}), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="No STL run for task"):
    robustness.run_robustness(
      _explicit(
        workdir, **{"robustness.stl_runs": (os.path.join(workdir, "runs", "stl_has_sphere"),)}
      ),
      str(tmp_path / "out"),
    )
  with pytest.raises(ValueError, match="held-out task"):
    robustness.run_robustness(
      _explicit(workdir, **{"robustness.probe_task": "has_box"}), str(tmp_path / "out")
    )
  # A config.json edited after training no longer matches the checkpoint.
  edited = str(tmp_path / "edited")
  shutil.copytree(os.path.join(workdir, "runs", "stl_has_box"), edited)
  config_path = os.path.join(edited, "config.json")
  run_config = json.load(open(config_path))
  run_config["model"]["hidden"] = [32]
  json.dump(run_config, open(config_path, "w"))
  with pytest.raises(ValueError, match="mismatched keys: model.hidden"):
    robustness.restore_run(edited, dataset)
