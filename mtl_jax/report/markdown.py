"""Markdown assembly of study reports: sections with figures, and findings stated from measured
numbers."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Sequence

import numpy as np

from mtl_jax import metrics as metrics_lib
from mtl_jax import statistics


@dataclasses.dataclass
class StudyResult:
  """What one study contributes to a report.

  Attributes:
    title: the section heading.
    markdown: the section body (tables, findings).
    figures: image paths (absolute or relative to the report) shown below the body.
    available: False when the study could not run in this build (the body says why).
  """

  title: str
  markdown: str
  figures: list[str] = dataclasses.field(default_factory=list)
  available: bool = True


def assemble(title: str, preamble: str, sections: Sequence[StudyResult], report_dir: str) -> str:
  """The report text: title, preamble, then one section per study with its figures.

  Figure paths are written relative to `report_dir` so the report can be moved with its folder.
  """
  lines = [f"# {title}", "", preamble.strip(), ""]
  for section in sections:
    lines += [f"## {section.title}", "", section.markdown.strip(), ""]
    for figure in section.figures:
      relative = os.path.relpath(figure, report_dir) if os.path.isabs(figure) else figure
      lines += [f"![{os.path.basename(figure)}]({relative})", ""]
  return "\n".join(lines).rstrip() + "\n"


def optimizer_findings(
  selections,
  pareto_counts,
  settings: statistics.Settings,
  pareto_spread: Mapping | None = None,
  reference: str = "adam",
  other: str = "sgd",
) -> list[str]:
  """Findings comparing two optimizers, each with its 95% interval and verdict.

  Per method, the per-seed paired difference of test Δm (other − reference; positive: the
  reference is better) gets an interval over seeds; so does its mean over methods (per seed,
  the mean over the methods both optimizers finished). Pareto counts get their bootstrap spread
  over seeds (`pareto_spread`, from `optimizers.pareto_bootstrap`).

  Args:
    selections: `optimizers.Selection`s (method, optimizer, best lr, per-seed test Δm).
    pareto_counts: optimizer -> {'runs', 'po_full', 'po_other'} from `pareto_analysis`.
    settings: how intervals are computed (`config.findings`).
    pareto_spread: optimizer -> {'po_full', 'po_other'} -> Interval, plus 'difference'.
    reference: the optimizer the sentences are about.
    other: the optimizer it is compared with.

  Returns:
    Finding lines (markdown bullets); empty when either optimizer is absent.
  """
  by_pair = {(selection.method, selection.optimizer): selection for selection in selections}
  methods = list(dict.fromkeys(selection.method for selection in selections))
  lines, per_seed, verdicts = [], {}, []
  for method in methods:
    first, second = by_pair.get((method, reference)), by_pair.get((method, other))
    if first is None or second is None:
      continue
    if first.learning_rate is None or second.learning_rate is None:
      lines.append(
        f"  - {method}: {reference if first.learning_rate is None else other} diverged at every "
        "lr: no interval (**inconclusive**)."
      )
      verdicts.append(statistics.INCONCLUSIVE)
      continue
    seeds, differences = statistics.paired_differences(
      dict(zip(first.seeds, first.test_delta_m)), dict(zip(second.seeds, second.test_delta_m))
    )
    for seed, difference in zip(seeds, differences):
      per_seed.setdefault(seed, []).append(float(difference))
    found = settings.interval(differences)
    verdicts.append(statistics.verdict(found))
    lines.append(f"  - {method}: {statistics.described(found)}")
  if not lines:
    return []
  counts = {name: verdicts.count(name) for name in statistics.VERDICTS}
  findings = [
    f"- Claim: {reference} beats {other} on test Δm (lower is better). Per method, the paired "
    f"per-seed difference {other} − {reference} (points; > 0 favours {reference}) with its "
    f"{100 * settings.confidence:g}% interval over seeds: holds for {counts['holds']}, reversed "
    f"for {counts['reversed']}, inconclusive for {counts['inconclusive']} of {len(verdicts)} "
    "methods."
  ] + lines
  if per_seed:
    overall = settings.interval([float(np.mean(values)) for values in per_seed.values()])
    findings.append(
      f"- Mean over methods of {other} − {reference} (one value per seed): "
      f"{statistics.described(overall)}."
    )
  findings += pareto_findings(pareto_counts, pareto_spread or {}, (reference, other))
  return findings


def pareto_findings(
  pareto_counts, spread: Mapping, optimizers: Sequence[str], kind: str = "optimizer"
) -> list[str]:
  """Pareto counts per optimizer (or per `kind` of group, e.g. 'level') with their bootstrap
  interval over seeds, and the verdict on the first group's larger share of the full front."""
  findings = []
  for name in optimizers:
    if name not in pareto_counts:
      continue
    count, intervals = pareto_counts[name], spread.get(name, {})
    parts = []
    for key, label in (
      ("po_full", "on the full Pareto front"),
      ("po_other", f"not dominated by any run of another {kind}"),
    ):
      text = f"{label}: {count[key]}/{count['runs']}"
      if key in intervals and math.isfinite(intervals[key].low):
        text += f" [{intervals[key].low:g}, {intervals[key].high:g}]"
      parts.append(text)
    findings.append(f"- {name} runs " + "; ".join(parts) + ".")
  if "difference" in spread:
    first, second = spread["difference_of"]
    findings.append(
      f"- Share of runs on the full front, {first} − {second} (bootstrap over seeds): "
      f"{statistics.described(spread['difference'])}."
    )
  if findings:
    findings.append(
      "  (Pareto intervals: percentile bootstrap over seeds, every method resampled with the same "
      "seeds.)"
    )
  return findings


def grid_edge_findings(selections) -> list[str]:
  """A warning per optimizer whose best lr sits at an end of the lr grid for some methods.

  A best lr at the grid's edge means the optimum may lie outside the grid, so that optimizer's
  Δm is an upper bound and comparisons with it are provisional.
  """
  edges: dict[str, list[str]] = {}
  for selection in selections:
    rates = sorted(selection.validation_delta_m)
    if selection.learning_rate is None or len(rates) < 2:
      continue
    if selection.learning_rate in (rates[0], rates[-1]):
      side = "largest" if selection.learning_rate == rates[-1] else "smallest"
      edges.setdefault(selection.optimizer, []).append(f"{selection.method} ({side})")
  return [
    f"- Caution: for {optimizer} the best lr is at an end of the grid for {len(methods)} "
    f"method(s): {', '.join(methods)}; its optimum may lie outside the grid, so its Δm is an upper "
    "bound."
    for optimizer, methods in edges.items()
  ]


def grid_search_findings(searches: Mapping, what: str) -> list[str]:
  """Which lr grids were refined or extended before the lr was chosen, per optimizer.

  Args:
    searches: (name, optimizer) -> `optimizers.GridSearch`.
    what: what the names are ('method', 'STL task').
  """
  by_optimizer: dict[str, list[str]] = {}
  for (name, optimizer), search in searches.items():
    added = [f"+{rate:g}" for rate in search.refined] + [
      f"+{rate:g} (ext.)" for rate in search.extended
    ]
    best = search.best
    cell = f"{name} {', '.join(added) if added else 'not refined'} → lr {_rate(best)}"
    if search.at_edge:
      cell += " (**still at the grid's edge**: its optimum may lie outside)"
    by_optimizer.setdefault(optimizer, []).append(cell)
  return [
    f"- {optimizer}, per {what}, rates added to the coarse grid (ext.: beyond its ends, because "
    f"the best was on an edge) and the lr chosen: {'; '.join(cells)}."
    for optimizer, cells in by_optimizer.items()
  ]


def _rate(rate: float | None) -> str:
  return "— (diverged everywhere)" if rate is None else f"{rate:g}"


def learned_check(
  rows: Sequence[tuple[str, Mapping[str, float]]],
  trivial: Mapping[str, float],
  directions: Mapping[str, bool],
  margin_percent: float,
) -> tuple[str, list[str]]:
  """Every model row against its trivial predictor: the table and a flag per row that fails.

  A row learned a task when every metric of the task beats the trivial predictor's by at least
  `margin_percent` (relative, `metrics.relative_improvement`); the table shows each task's
  worst metric. A metric whose trivial value is 0 cannot be compared relatively and is left out.

  Args:
    rows: (row name, 'task/metric' -> test value) per model; a row covers the tasks it has.
    trivial: the trivial predictor's 'task/metric' values on the same split.
    directions: 'task/metric' -> higher is better, for every task of any row.
    margin_percent: the bar, in percent.

  Returns:
    (markdown, flags): the table and one line per row that does not clear the bar on a task.
  """
  tasks = list(dict.fromkeys(metrics_lib.task_of(key) for key in directions))
  lines = [
    "| model | "
    + " | ".join(f"{task}: worst metric vs trivial" for task in tasks)
    + " | learned |",
    "|---|" + "---|" * len(tasks) + "---|",
  ]
  flags = []
  for name, values in rows:
    own = {key: higher for key, higher in directions.items() if key in values}
    improvement = metrics_lib.relative_improvement(values, trivial, own)
    worst: dict[str, tuple[str, float]] = {}
    for key, value in improvement.items():
      task = metrics_lib.task_of(key)
      if math.isfinite(value) and (task not in worst or value < worst[task][1]):
        worst[task] = (key.rpartition("/")[2], value)
    failed = [task for task, (_, value) in worst.items() if value < margin_percent]
    cells = []
    for task in tasks:
      if task not in worst:
        cells.append("")
        continue
      metric, value = worst[task]
      cells.append(f"{metric} {value:+.1f}%" + (" **no**" if value < margin_percent else ""))
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {'**NO**' if failed else 'yes'} |")
    if failed:
      flags.append(
        f"**Flag:** {name} does not beat the trivial predictor by {margin_percent:g}% on "
        + ", ".join(f"{task} ({worst[task][0]} {worst[task][1]:+.1f}%)" for task in failed)
        + "."
      )
  return "\n".join(lines), flags


def trivial_section(
  rows: Sequence[tuple[str, Mapping[str, float]]],
  trivial: Mapping[str, float],
  directions: Mapping[str, bool],
  margin_percent: float,
  split: str = "test",
) -> str:
  """The markdown paragraph and table of `learned_check`, with the trivial predictor's values."""
  table, flags = learned_check(rows, trivial, directions, margin_percent)
  bar = ", ".join(f"{key} {trivial[key]:.4g}" for key in directions if key in trivial)
  verdict = (
    "\n\n".join(flags)
    if flags
    else f"Every model clears the bar (≥ {margin_percent:g}% better on every metric of every task)."
  )
  return (
    f"**Models that learn.** Each model is compared on the {split} split with the trivial "
    "predictor of each task (majority class for segmentation and attributes, the training-mean "
    "depth, the training-mean normal), which ignores its input: "
    f"{bar}. A model learned a task when every metric of the task is at least "
    f"{margin_percent:g}% better (relative) than the trivial predictor's; each cell gives the "
    "task's worst metric and its relative improvement (a metric whose trivial value is 0 is left "
    f"out).\n\n{table}\n\n{verdict}"
  )
