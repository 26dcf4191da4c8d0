"""Human-readable output of results: tables for the console and markdown reports, and figures."""

from __future__ import annotations

from typing import Mapping


def _arrow(higher_is_better: bool | None) -> str:
  if higher_is_better is None:
    return ""
  return "↑" if higher_is_better else "↓"


def results_table(results: Mapping) -> str:
  """A markdown table of one run's test (and validation) metrics, with their directions."""
  directions = results.get("directions", {})
  test, validation = results.get("test", {}), results.get("validation", {})
  lines = ["| metric | test | validation |", "|---|---|---|"]
  for key in test:
    lines.append(
      f"| {key} {_arrow(directions.get(key))} | {test[key]:.4f} | "
      f"{validation.get(key, float('nan')):.4f} |"
    )
  if "delta_m" in results:
    delta = results["delta_m"]
    lines.append(
      f"| Δm % ({delta['variant']}) ↓ | {delta['test']:.2f} | {delta['validation']:.2f} |"
    )
  selection = results.get("selection", {})
  if selection.get("criterion"):
    lines.append("")
    lines.append(
      f"Best step {results.get('best_step')} chosen on {selection['criterion']} = "
      f"{selection['score']:.4f}."
    )
  return "\n".join(lines)
