"""The sample-alignment study: its grid, findings with intervals, Pareto counts per level, step
costs, the probe's conflicts, its config keys, and a tiny end-to-end run."""

import os
import subprocess
import sys

import pytest
from scipy import stats as scipy_stats

from configs import sample_alignment as sample_alignment_config
from configs import test as test_config
from configs.sections import sample_alignment as sections
from mtl_jax import config_validation
from mtl_jax import statistics
from mtl_jax.studies import optimizers
from mtl_jax.studies import sample_alignment

SETTINGS = statistics.Settings(0.95, "t", 200, 0)
DIRECTIONS = {"a/acc": True, "b/err": False}


def _selection(label, optimizer, delta_m, acc=0.5):
  return optimizers.Selection(
    label,
    optimizer,
    0.01,
    {0.01: 0.0},
    seeds=[0, 1, 2],
    test=[{"a/acc": acc, "b/err": 0.5}] * 3,
    test_delta_m=list(delta_m),
  )


def _result(selections, costs=None, probe=()):
  sweep = optimizers.SweepResult("", {}, {}, selections, DIRECTIONS, [], [], {}, {})
  return sample_alignment.AlignmentResult(sweep, dict(costs or {}), list(probe), SETTINGS)


def test_grid_has_every_method_at_every_level_beside_ew():
  config = sample_alignment_config.get_config()
  specs = sample_alignment.grid(config)
  options = config.sample_alignment
  labels = {spec.label for spec in specs}
  assert labels == {"ew"} | {
    method if level == "task" else f"{method}@{level}"
    for method in ("pcgrad", "upgrad", "mgda", "cagrad")
    for level in ("task", "sample", "sample_task")
  }
  per_label = len(options.optimizers) * len(options.lr_grid) * len(options.seeds)
  assert len(specs) == 13 * per_label
  assert sample_alignment.level_of("mgda@sample_task") == "sample_task"
  assert sample_alignment.level_of("mgda") == "task"


def test_delta_m_findings_pair_seeds_against_task_level_and_ew():
  selections = [
    _selection("ew", "adam", [4.0, 5.0, 6.0]),
    _selection("pcgrad", "adam", [3.0, 4.0, 5.0]),
    # Better than pcgrad at level task by 1.0, 1.1, 0.9: holds; vs EW by 2.0, 2.1, 1.9.
    _selection("pcgrad@sample", "adam", [2.0, 2.9, 4.1]),
    # 1, −1, 0.5 vs task: inconclusive.
    _selection("pcgrad@sample_task", "adam", [2.0, 5.0, 4.5]),
  ]
  lines = sample_alignment.delta_m_lines(_result(selections))
  assert lines[0].startswith("- What the numbers show: of 2 ")
  assert "better in 1, worse in 0 and inconclusive in 1" in lines[0]
  sample_line = next(line for line in lines if line.startswith("- pcgrad@sample / adam"))
  expected = scipy_stats.ttest_1samp([1.0, 1.1, 0.9], 0.0).confidence_interval(0.95)
  assert f"vs pcgrad at level task: +1.00 [{expected.low:+.2f}, {expected.high:+.2f}]" in (
    sample_line
  )
  assert "**holds**" in sample_line
  assert "**inconclusive**" in next(line for line in lines if "@sample_task / adam" in line)
  # All inconclusive: the summary says so.
  flat = [
    _selection("ew", "adam", [0.0] * 3),
    _selection("mgda", "adam", [0.0, 0.0, 0.0]),
    _selection("mgda@sample", "adam", [1.0, -1.0, 0.2]),
  ]
  assert "**no effect**" in sample_alignment.delta_m_lines(_result(flat))[0]


def test_pareto_counts_per_level_and_cost_table():
  selections = [
    _selection("ew", "adam", [0.0] * 3, acc=0.5),
    _selection("upgrad@sample", "adam", [0.0] * 3, acc=0.9),
  ]
  counts, spread = sample_alignment.level_pareto(_result(selections))
  assert counts["task"] == {"runs": 3, "po_full": 0, "po_other": 0}
  assert counts["sample"] == {"runs": 3, "po_full": 3, "po_other": 3}
  assert (spread["sample"]["po_full"].low, spread["sample"]["po_full"].high) == (3, 3)
  table = sample_alignment.cost_table({"ew": 0.002, "upgrad@sample": 0.005})
  assert "| upgrad | sample | 5.00 | 2.50 |" in table
  assert "| ew | task | 2.00 | 1.00 |" in table


def test_probe_lines_have_intervals_over_epochs():
  def record(task_rate, sample_rate):
    def entry(rate):
      return {"cosine": {"conflict_rate": rate, "mean": 0.1}}

    return {"inter_task": entry(task_rate), "inter_sample": entry(sample_rate)}

  records = [record(0.2, 0.4), record(0.3, 0.5), record(0.25, 0.45)]
  lines = sample_alignment.probe_lines(records, SETTINGS)
  assert "cosine conflict rate over 3 epochs" in lines[0]
  assert "inter-sample − inter-task +0.200 [+0.200, +0.200] (95% t, n=3): **holds**" in lines[0]
  assert "**inconclusive**" in lines[1]  # Equal mean cosines: a zero-width interval at 0.
  assert sample_alignment.probe_lines([], SETTINGS)[0].startswith("- No probe records")


def test_bad_sample_alignment_keys_are_named():
  config = sections.add(test_config.get_config())
  config.sample_alignment.levels = ("task", "full")
  config.sample_alignment.lr_grid = (0.1, -1.0)
  config.sample_alignment.timing_repeats = 0
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate_config(config)
  message = str(error.value)
  for key in ("levels", "lr_grid", "timing_repeats"):
    assert f"config.sample_alignment.{key}" in message


def test_tiny_end_to_end_study(tmp_path):
  # An MLP on two scene attributes: the study's plumbing, at a fraction of a CNN's compile time.
  config = sections.add(test_config.get_config())
  config.tasks = ("has_sphere", "has_box")
  config.model.encoder, config.model.hidden = "mlp", (16,)
  config.training.num_epochs = 1
  config.training.checkpoint_every_steps = 0
  config.sweep.stl_lr_grid = (0.005,)
  config.sweep.refine_budget = 0
  options = config.sample_alignment
  # One per-sample level only (the comparison with level task is tested on numbers above).
  options.methods, options.levels, options.optimizers = ("upgrad",), ("sample",), ("adam",)
  options.lr_grid, options.seeds, options.refine_budget = (0.01,), (0, 1), 0
  options.timing_repeats, options.probe_every_steps = 2, 2
  config.lock()
  result = sample_alignment.run_study(config, str(tmp_path))
  labels = [(selection.method, selection.learning_rate) for selection in result.sweep.selections]
  assert labels == [("ew", 0.01), ("upgrad@sample", 0.01)]
  assert set(result.costs) == {"ew", "upgrad@sample"}
  assert all(seconds > 0 for seconds in result.costs.values())
  assert len(result.probe) == 1 and "inter_sample" in result.probe[0]
  text = sample_alignment.report_markdown(result, config)
  for expected in (
    "- upgrad@sample / adam: test Δm",
    "vs EW:",
    "(95% t, n=2)",
    "| upgrad | sample |",
    "cosine conflict rate over 1 epochs",
    "**Models that learn.**",
  ):
    assert expected in text, expected


def test_experiment_names_a_bad_key_and_exits_2(tmp_path):
  command = [
    sys.executable,
    "experiments/sample_alignment.py",
    f"--workdir={tmp_path}",
    "--config.sample_alignment.levels=('task','full')",
  ]
  done = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines()[-1].startswith("error: config.sample_alignment.levels")
  assert "Traceback" not in done.stderr
  assert not os.listdir(tmp_path)
