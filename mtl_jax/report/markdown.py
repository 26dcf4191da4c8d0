"""Markdown assembly of study reports: sections with figures, and findings stated from measured
numbers."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence


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
  selections, pareto_counts, reference: str = "adam", other: str = "sgd"
) -> list[str]:
  """Sentences comparing two optimizers, computed from a sweep's selections and Pareto counts.

  Args:
    selections: `sweep.Selection`s (method, optimizer, best lr, per-seed test Δm).
    pareto_counts: optimizer -> {'runs', 'po_full', 'po_other'} from `sweep.pareto_analysis`.
    reference: the optimizer the sentences are about.
    other: the optimizer it is compared with.

  Returns:
    Finding lines (markdown bullets); empty when either optimizer is absent.
  """
  by_pair = {(selection.method, selection.optimizer): selection for selection in selections}
  methods = list(dict.fromkeys(selection.method for selection in selections))
  compared, wins, gaps = 0, 0, []
  for method in methods:
    first, second = by_pair.get((method, reference)), by_pair.get((method, other))
    if first is None or second is None:
      continue
    first_mean = first.mean_std("delta_m")[0] if first.learning_rate is not None else math.inf
    second_mean = second.mean_std("delta_m")[0] if second.learning_rate is not None else math.inf
    if math.isinf(first_mean) and math.isinf(second_mean):
      continue
    compared += 1
    if first_mean < second_mean:
      wins += 1
    if math.isfinite(first_mean) and math.isfinite(second_mean):
      gaps.append(second_mean - first_mean)
  findings = []
  if compared:
    line = (
      f"- {reference} beat {other} on test Δm (lower is better) for {wins} of {compared} methods"
    )
    if gaps:
      line += f"; mean Δm gap ({other} − {reference}) {sum(gaps) / len(gaps):+.2f} points"
    findings.append(line + ".")
  spread = {}
  for optimizer in (reference, other):
    values = [
      selection.mean_std("delta_m")[0]
      for selection in selections
      if selection.optimizer == optimizer and selection.learning_rate is not None
    ]
    if len(values) > 1:
      spread[optimizer] = max(values) - min(values)
  if spread:
    text = ", ".join(f"{name}: {value:.2f}" for name, value in spread.items())
    findings.append(f"- Spread of Δm across methods (max − min) per optimizer: {text} points.")
  counts = {name: pareto_counts[name] for name in (reference, other) if name in pareto_counts}
  for name, count in counts.items():
    findings.append(
      f"- {name} runs on the full Pareto front: {count['po_full']}/{count['runs']}; "
      f"not dominated by any run of the other optimizer(s): {count['po_other']}/{count['runs']}."
    )
  findings.extend(grid_edge_findings(selections))
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
