"""The main job: a small version of every study, written into one report.md.

Each study is a function `(config, workdir) -> StudyResult` in the registry `STUDIES`, which
runs them in order, each in its own subdirectory; a study that fails is reported as failed and
the others still run.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Callable, Mapping, Sequence

import ml_collections

from mtl_jax import config_validation
from mtl_jax import metric_writers
from mtl_jax.data import registry as data_registry
from mtl_jax.report import markdown
from mtl_jax.studies import conflicts as conflicts_study
from mtl_jax.studies import invariance
from mtl_jax.studies import label_scarcity
from mtl_jax.studies import optimizers
from mtl_jax.studies import robustness
from mtl_jax.studies import sample_alignment
from mtl_jax.studies import toy

Study = Callable[[ml_collections.ConfigDict, str], markdown.StudyResult]

TITLES = {
  "optimizers": "Optimizer choice vs MTL method",
  "invariance": "Adam's partial loss-scale invariance and the 2-D toy",
  "conflicts": "Gradient conflicts: inter-task vs inter-sample",
  "robustness": "Robustness of MTL vs STL features under corruptions",
  "sample_alignment": "Gradient alignment across samples (the fifth study)",
  "label_scarcity": "Label scarcity: MTL vs STL as one task's labels become scarce",
}


def invariance_study(config: ml_collections.ConfigDict, workdir: str) -> markdown.StudyResult:
  """SPEC sections 1 and 3: the exact invariance check, the App. A2 runs and the toy table."""
  os.makedirs(workdir, exist_ok=True)
  check = invariance.run_invariance_check(config.invariance)
  held = sum(row["ok"] for row in check["rows"])
  parts = [
    f"**Exact check (float64):** {held} of {len(check['rows'])} predictions held"
    f"{'' if check['all_ok'] else ' — some FAILED, see the table'}.",
    check["markdown"],
  ]
  app = invariance.run_app_a2(config.invariance, workdir, progress=metric_writers.status)
  parts.append(
    "**App. A2 runs** (final-epoch mean loss per head and setting): "
    + "; ".join(
      f"{run}: "
      + ", ".join(
        f"{setting} " + "/".join(f"{value:.3g}" for value in values)
        for setting, values in settings.items()
      )
      for run, settings in app["summary"].items()
    )
  )
  toy_results = toy.run_toy(config.toy, workdir)
  converged = {
    key: sum(value is not None for value in row) for key, row in toy_results["table"].items()
  }
  parts.append(
    "**2-D toy** (iterations to the minimum of the mean loss; tolerance: distance "
    f"< {config.toy.distance_tolerance:g} or mean-loss gap < {config.toy.loss_gap_tolerance:g}; "
    f"{toy_results['num_runs']} runs in {toy_results['dtype']}, with their variants in "
    f"{toy_results['run_seconds']:.1f} s after compilation). "
    "Learning rates at which every start converged: "
    + ", ".join(
      f"{key} {count}/{len(config.toy.learning_rates)}" for key, count in converged.items()
    )
    + f". {toy_results['reproducible_cells']} of {toy_results['cells']} cells are reproducible "
    "numbers (unmarked below); the others (*) change by more than "
    f"{100 * float(config.toy.reproducible_spread):g}% when a start moves by "
    f"{config.toy.perturbation:g} or the precision changes, so only their pattern across learning "
    "rates is meaningful."
  )
  parts.append(toy_results["markdown"])
  figures = list(app["figures"]) + ([toy_results["figure"]] if toy_results.get("figure") else [])
  return markdown.StudyResult(TITLES["invariance"], "\n\n".join(parts), figures)


def robustness_study(config: ml_collections.ConfigDict, workdir: str) -> markdown.StudyResult:
  """SPEC section 5: frozen-encoder head fine-tuning under corruptions, δ per task, linear
  probes."""
  results = robustness.run_robustness(config, workdir)
  text = robustness.report_markdown(results).split("\n", 1)[1].strip()
  figure = os.path.join(workdir, robustness.FIGURE_FILE)
  figures = [figure] if os.path.exists(figure) else []
  return markdown.StudyResult(TITLES["robustness"], text, figures)


# The last dataset loaded by `shared_dataset`, keyed by its config's JSON.
_SHARED: dict[str, object] = {}


def shared_dataset(config: ml_collections.ConfigDict):
  """The dataset of `config.dataset`, loaded once: the optimizer and sample-alignment studies
  train on one dataset object, so the second reuses the first's compiled steps
  (`train.lane_programs` keys them by dataset)."""
  key = config.dataset.to_json()
  if key not in _SHARED:
    _SHARED.clear()
    _SHARED[key] = data_registry.load_dataset(config.dataset)
  return _SHARED[key]


def optimizer_study(config: ml_collections.ConfigDict, workdir: str) -> markdown.StudyResult:
  """The optimizer × method sweep with STL baselines, Δm tables and Pareto counts."""
  result = optimizers.run_sweep(config, workdir, shared_dataset(config))
  grid = config.sweep
  parts = [
    f"Coarse grid: methods {', '.join(grid.methods)} × optimizers {', '.join(grid.optimizers)} × "
    f"lr {', '.join(f'{rate:g}' for rate in grid.lr_grid)} × seeds "
    f"{', '.join(str(seed) for seed in grid.seeds)}; STL baselines (Adam) per task over lr "
    f"{', '.join(f'{rate:g}' for rate in grid.stl_lr_grid)}. Each grid is then refined around its "
    f"best lr (× and ÷ {grid.refine_factor:.3g}, up to {grid.refine_budget} extra rates, extended "
    "beyond the grid when the best is on its edge) before the lr is chosen: per (method, "
    "optimizer) on mean validation Δm, per STL task on mean validation loss. Test values are mean "
    "± std over seeds; every finding carries its interval and verdict.",
  ]
  if result.notes:
    parts.append("\n".join(f"- Note: {note}" for note in result.notes))
  chosen = ", ".join(
    f"{task} {choice.learning_rate:g}" for task, choice in result.stl_choices.items()
  )
  parts.append(f"STL lr chosen on validation loss: {chosen}.")
  findings = optimizers.findings_lines(result, config)
  parts.append("**Findings (from the numbers below):**\n\n" + "\n".join(findings))
  parts.append(model_rows_section(result, config))
  delta_markdown, _ = optimizers.delta_m_table(result.selections)
  metric_markdown, _ = optimizers.metric_table(result.selections, result.directions)
  parts += [
    "### Δm (%) at the best lr",
    delta_markdown,
    "### Test metrics at the best lr",
    metric_markdown,
    "### Pareto analysis (one point per seed at the best lr)",
    optimizers.pareto_table(result.pareto_counts),
    f"Tables as CSV: `{os.path.join(workdir, 'delta_m.csv')}`, "
    f"`{os.path.join(workdir, 'metrics.csv')}`; run index: `{os.path.join(workdir, 'sweep.csv')}`.",
  ]
  figures = [
    result.files[name]
    for name in ("lr_curves.png", "parallel_coordinates.png")
    if name in result.files
  ]
  return markdown.StudyResult(TITLES["optimizers"], "\n\n".join(parts), figures)


def model_rows_section(result: optimizers.SweepResult, config: ml_collections.ConfigDict) -> str:
  """Every model of a sweep (each STL baseline and each (method, optimizer) at its chosen lr,
  mean test metrics over seeds) against the trivial predictors."""
  rows = [(f"STL {task}", values) for task, values in result.stl_test.items()]
  for selection in result.selections:
    if selection.learning_rate is not None:
      mean = {key: selection.mean_std(key)[0] for key in result.directions}
      rows.append((f"{selection.method} / {selection.optimizer}", mean))
  return markdown.trivial_section(
    rows, result.trivial, result.directions, float(config.findings.trivial_margin_percent)
  )


def conflicts_study_result(config: ml_collections.ConfigDict, workdir: str) -> markdown.StudyResult:
  """SPEC section 4: gradient conflicts between tasks and between samples, probed in training."""
  results = conflicts_study.run_conflicts(config, workdir)
  return markdown.StudyResult(
    TITLES["conflicts"], results["markdown"], list(results.get("figures", []))
  )


def sample_alignment_study(config: ml_collections.ConfigDict, workdir: str) -> markdown.StudyResult:
  """PCGrad, UPGrad, MGDA and CAGrad at levels task, sample and sample_task against EW, with the
  optimizer study's STL baselines (its finished runs are reused when it ran in this job)."""
  stl_workdir = os.path.join(os.path.dirname(workdir), "optimizers")
  result = sample_alignment.run_study(config, workdir, stl_workdir, shared_dataset(config))
  figures = [result.sweep.files["lr_curves.png"]] if "lr_curves.png" in result.sweep.files else []
  return markdown.StudyResult(
    TITLES["sample_alignment"], sample_alignment.report_markdown(result, config), figures
  )


STUDIES: dict[str, Study] = {
  "optimizers": optimizer_study,
  "invariance": invariance_study,
  "conflicts": conflicts_study_result,
  "robustness": robustness_study,
  "sample_alignment": sample_alignment_study,
}


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  studies: Sequence[str] | None = None,
  registry: Mapping[str, Study] | None = None,
  label_scarcity_workdir: str | None = None,
) -> str:
  """Runs the studies in order (each in `workdir/<study>`) and writes `workdir/report.md`.

  A study that raises is reported as failed in its section; the others still run, and the
  first error is re-raised after the report is written.

  Args:
    config: the reproduce config (configs/reproduce.py).
    workdir: the job directory.
    studies: names to run, default all of the registry in order.
    registry: study name -> function, default STUDIES.
    label_scarcity_workdir: where the label-scarcity study (run separately) writes; the report
      quotes its command and, once it has run, its findings. None leaves the section out.

  Returns:
    The report path.
  """
  registry = dict(registry or STUDIES)
  names = list(studies or registry)
  unknown = [name for name in names if name not in registry]
  if unknown:
    raise config_validation.ConfigError(
      f"--studies: Unknown studies {unknown}; valid: {', '.join(registry)}."
    )
  config_validation.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  sections, timings, first_error = [], [], None
  start = time.perf_counter()
  for index, name in enumerate(names):
    metric_writers.status(
      f"[reproduce] study {index + 1}/{len(names)}: {name} "
      f"(elapsed {metric_writers.format_duration(time.perf_counter() - start)})"
    )
    study_start = time.perf_counter()
    try:
      section = registry[name](config, os.path.join(workdir, name))
    except Exception as error:
      # One broken study must not cost the measurements of the others.
      first_error = first_error or error
      section = markdown.StudyResult(
        name,
        f"**Failed:** `{type(error).__name__}: {error}`\n\n```\n{traceback.format_exc(limit=5)}```",
        available=False,
      )
    seconds = time.perf_counter() - study_start
    timings.append((name, seconds, section.available))
    sections.append(section)
    metric_writers.status(f"[reproduce] {name} done in {metric_writers.format_duration(seconds)}")
  total = time.perf_counter() - start
  if label_scarcity_workdir is not None:
    text, figures = label_scarcity.report_section(label_scarcity_workdir)
    sections.append(markdown.StudyResult(TITLES["label_scarcity"], text, figures))
  preamble = (
    'Small-scale reproduction of the four studies of "Examining Common Paradigms in Multi-Task '
    'Learning", and a fifth (gradient alignment across samples), on the embedded scenes data '
    f"({config.dataset.height}x{config.dataset.width}, model {config.model.encoder}, "
    f"{config.training.num_epochs} epochs). Every statement below is computed from this job's "
    "runs; at this size the numbers are noisy and need not match the paper.\n\n"
    "| study | status | time |\n|---|---|---|\n"
    + "\n".join(
      f"| {name} | {'ran' if ok else 'not run'} | {metric_writers.format_duration(seconds)} |"
      for name, seconds, ok in timings
    )
    + f"\n\nTotal time: {metric_writers.format_duration(total)}."
  )
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as file:
    file.write(markdown.assemble("Reproduction report", preamble, sections, workdir))
  metric_writers.status(
    f"[reproduce] report written to {path} (total {metric_writers.format_duration(total)})"
  )
  if first_error is not None:
    raise first_error
  return path
