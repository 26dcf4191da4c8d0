"""Figures for reports (matplotlib, headless): parallel coordinates of runs' metrics, learning-rate
curves."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402


def parallel_coordinates(
  values: Sequence[Sequence[float]],
  names: Sequence[str],
  higher_is_better: Sequence[bool],
  groups: Sequence[str],
  path: str,
  front: Sequence[bool] | None = None,
  title: str = "Test metrics of each run at its best lr",
) -> str:
  """Draws one line per run across one normalised axis per metric, coloured by group.

  Every axis is min-max normalised over the runs and oriented so that up is better (the axis
  label gives the raw range and the direction), so a line near the top everywhere is a good run.

  Args:
    values: [N, K] metric values.
    names: K metric names.
    higher_is_better: K flags.
    groups: N group labels (e.g. the optimizer); one colour each.
    path: the PNG to write.
    front: N flags; runs on the Pareto front are drawn solid, others dashed.
    title: the figure title.

  Returns:
    path.
  """
  values = np.asarray(values, dtype=np.float64)
  low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
  span = np.where(high > low, high - low, 1.0)
  scaled = (values - low) / span
  flags = np.asarray(higher_is_better, dtype=bool)
  # Up is better on every axis.
  scaled = np.where(flags, scaled, 1.0 - scaled)
  labels = list(dict.fromkeys(groups))
  colours = plt.get_cmap("tab10")
  figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4.0))
  positions = np.arange(len(names))
  for index, row in enumerate(scaled):
    colour = colours(labels.index(groups[index]) % 10)
    solid = front is None or front[index]
    axis.plot(
      positions,
      row,
      color=colour,
      alpha=0.8,
      linewidth=1.4 if solid else 0.9,
      linestyle="-" if solid else "--",
    )
  for position in positions:
    axis.axvline(position, color="0.7", linewidth=0.8)
  axis.set_xticks(positions)
  axis.set_xticklabels(
    [
      f"{name} {'↑' if flag else '↓'}\n[{lo:.3g}, {hi:.3g}]"
      for name, flag, lo, hi in zip(names, flags, low, high)
    ],
    fontsize=7,
    rotation=20,
  )
  axis.set_ylabel("normalised (up = better)")
  axis.set_ylim(-0.05, 1.05)
  handles = [
    plt.Line2D([], [], color=colours(index % 10), label=label) for index, label in enumerate(labels)
  ]
  if front is not None:
    handles.append(plt.Line2D([], [], color="0.3", linestyle="--", label="not Pareto-optimal"))
  axis.legend(handles=handles, fontsize=8, loc="lower left")
  axis.set_title(title, fontsize=10)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def lr_curves(
  mtl: Mapping[tuple[str, str], Mapping[float, float]],
  stl: Mapping[tuple[str, str], Mapping[float, float]],
  path: str,
) -> str:
  """Selection score against learning rate: one panel per optimizer (mean validation Δm of each
  method over seeds), and one for the STL baselines (mean validation loss of each task).

  The chosen lr of each curve is ringed; a diverged lr (+inf) is left out of its curve and
  marked with an x on the panel's bottom edge.

  Args:
    mtl: (method, optimizer) -> lr -> mean validation Δm.
    stl: (task, optimizer) -> lr -> mean validation loss.
    path: the PNG to write.

  Returns:
    path.
  """
  optimizers = list(dict.fromkeys(optimizer for _, optimizer in mtl))
  panels = [(f"{optimizer}: validation Δm (%) ↓", optimizer, mtl) for optimizer in optimizers]
  if stl:
    panels.append(("STL baselines: validation loss ↓", None, stl))
  figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
  colours = plt.get_cmap("tab10")
  for axis, (title, optimizer, curves) in zip(axes[0], panels):
    items = [
      (name, scores)
      for (name, other), scores in curves.items()
      if optimizer is None or other == optimizer
    ]
    for index, (name, scores) in enumerate(items):
      rates = sorted(scores)
      finite = [rate for rate in rates if np.isfinite(scores[rate])]
      colour = colours(index % 10)
      axis.plot(finite, [scores[rate] for rate in finite], "o-", color=colour, label=name, ms=3)
      if finite:
        best = min(finite, key=scores.get)
        axis.plot([best], [scores[best]], "o", ms=9, mfc="none", mec=colour)
      diverged = [rate for rate in rates if not np.isfinite(scores[rate])]
      if diverged:
        axis.plot(
          diverged, [0.0] * len(diverged), "x", color=colour, transform=axis.get_xaxis_transform()
        )
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, ncol=2)
  figure.suptitle("Learning-rate curves (ring: chosen lr; x at the bottom: diverged)", fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path
