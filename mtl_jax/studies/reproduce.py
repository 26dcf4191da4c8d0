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
from mtl_jax.report import markdown
from mtl_jax.studies import conflicts as conflicts_study
from mtl_jax.studies import invariance
from mtl_jax.studies import optimizers
from mtl_jax.studies import robustness
from mtl_jax.studies import toy

Study = Callable[[ml_collections.ConfigDict, str], markdown.StudyResult]

TITLES = {
  "optimizers": "Optimizer choice vs MTL method",
  "invariance": "Adam's partial loss-scale invariance and the 2-D toy",
  "conflicts": "Gradient conflicts: inter-task vs inter-sample",
  "robustness": "Robustness of MTL vs STL features under corruptions",
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
  findings = []
  for run, delta in results["delta"].items():
    per_task = delta["per_task"]
    better = [task for task, value in per_task.items() if value < 0]
    findings.append(
      f"- {run}: mean δ {delta['mean']:+.4f} "
      f"({'MTL features degraded less' if delta['mean'] < 0 else 'MTL features degraded more'} "
      f"than STL on average); δ < 0 on {len(better)} of {len(per_task)} "
      f"tasks{' (' + ', '.join(better) + ')' if better else ''}."
    )
  body = robustness.report_markdown(results).split("\n", 1)[1].strip()
  text = "**Findings (from the numbers below):**\n\n" + "\n".join(findings) + "\n\n" + body
  figure = os.path.join(workdir, robustness.FIGURE_FILE)
  figures = [figure] if os.path.exists(figure) else []
  return markdown.StudyResult(TITLES["robustness"], text, figures)


def optimizer_study(config: ml_collections.ConfigDict, workdir: str) -> markdown.StudyResult:
  """The optimizer × method sweep with STL baselines, Δm tables and Pareto counts."""
  result = optimizers.run_sweep(config, workdir)
  grid = config.sweep
  parts = [
    f"Grid: methods {', '.join(grid.methods)} × optimizers {', '.join(grid.optimizers)} × lr "
    f"{', '.join(f'{rate:g}' for rate in grid.lr_grid)} × seeds "
    f"{', '.join(str(seed) for seed in grid.seeds)}; STL baselines (Adam) per task over lr "
    f"{', '.join(f'{rate:g}' for rate in grid.stl_lr_grid)}. Best lr per (method, optimizer) on "
    "mean validation Δm; test values are mean ± std over seeds.",
  ]
  if result.notes:
    parts.append("\n".join(f"- Note: {note}" for note in result.notes))
  chosen = ", ".join(
    f"{task} {choice.learning_rate:g}" for task, choice in result.stl_choices.items()
  )
  parts.append(f"STL lr chosen on validation loss: {chosen}.")
  findings = markdown.optimizer_findings(result.selections, result.pareto_counts)
  if findings:
    parts.append("**Findings (from the numbers below):**\n\n" + "\n".join(findings))
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
  figures = (
    [result.files["parallel_coordinates.png"]] if "parallel_coordinates.png" in result.files else []
  )
  return markdown.StudyResult(TITLES["optimizers"], "\n\n".join(parts), figures)


def conflicts_study_result(config: ml_collections.ConfigDict, workdir: str) -> markdown.StudyResult:
  """SPEC section 4: gradient conflicts between tasks and between samples, probed in training."""
  results = conflicts_study.run_conflicts(config, workdir)
  return markdown.StudyResult(
    TITLES["conflicts"], results["markdown"], list(results.get("figures", []))
  )


STUDIES: dict[str, Study] = {
  "optimizers": optimizer_study,
  "invariance": invariance_study,
  "conflicts": conflicts_study_result,
  "robustness": robustness_study,
}


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  studies: Sequence[str] | None = None,
  registry: Mapping[str, Study] | None = None,
) -> str:
  """Runs the studies in order (each in `workdir/<study>`) and writes `workdir/report.md`.

  A study that raises is reported as failed in its section; the others still run, and the
  first error is re-raised after the report is written.

  Args:
    config: the reproduce config (configs/reproduce.py).
    workdir: the job directory.
    studies: names to run, default all of the registry in order.
    registry: study name -> function, default STUDIES.

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
  preamble = (
    'Small-scale reproduction of the four studies of "Examining Common Paradigms in Multi-Task '
    'Learning" on the embedded scenes data '
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
