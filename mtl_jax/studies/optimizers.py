"""The optimizer × method study: grid expansion, resumable execution, lr selection, tables, Pareto
counts.

Protocol (SPEC section 2):
1. STL baselines: one single-task run per (task, STL lr, seed), always Adam. The best STL lr of
   a task is the one with the lowest validation loss averaged over seeds.
2. MTL runs for each (method, optimizer, lr, seed). **[choice]** The Δm baseline of an MTL run
   with seed s is the best-lr STL run of each task with the SAME seed s; when that run is
   missing (e.g. the STL grid has fewer seeds) the best-lr STL run of the first STL seed is used.
3. The best lr of each (method, optimizer) minimises validation Δm averaged over seeds (a run
   that diverged counts as +inf, so an lr wins only if all its seeds trained); test metrics and
   test Δm are reported as mean ± std (population std, ddof=0) over seeds at that lr.
4. Pareto analysis over the runs at their best lr (one point per seed), objectives = test
   metrics oriented lower-better: "PO full" (front of all runs) and "PO w.r.t. the other
   optimizers" (not dominated by any run of another optimizer).

Runs live in `workdir/stl/<task>-adam-lr<lr>-seed<s>` and
`workdir/mtl/<method>-<opt>-lr<lr>-seed<s>`; a run with results.json or failed.json is finished and
skipped when the sweep is re-run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from mtl_jax import config_validation
from mtl_jax import metric_writers
from mtl_jax import metrics as metrics_lib
from mtl_jax import optim
from mtl_jax import parallel
from mtl_jax import statistics
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax.train import evaluation
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import registry as data_registry
from mtl_jax.report import figures
from mtl_jax.report import markdown

STL_OPTIMIZER = "adam"

# Methods defined for one optimizer only (SPEC section 2): AdaTask keeps per-task Adam moments,
# MTL-IO is one SGD per task.
OPTIMIZER_RESTRICTIONS = {"adatask": ("adam",), "mtl_io": ("sgd",)}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the sweep.

  Attributes:
    kind: 'stl' or 'mtl'.
    name: the task (STL) or the method (MTL).
    optimizer: optimizer name.
    learning_rate: the base learning rate.
    seed: the run's seed (initialisation and data order).
    level: the rows of a Gramian method's Gramian ('task', 'sample', 'sample_task').
  """

  kind: str
  name: str
  optimizer: str
  learning_rate: float
  seed: int
  level: str = "task"

  @property
  def label(self) -> str:
    """The method (or task) as tables name it: 'pcgrad', or 'pcgrad@sample' at a finer level."""
    return self.name if self.level == "task" else f"{self.name}@{self.level}"

  @property
  def path(self) -> str:
    """The run's directory relative to the sweep workdir, named from its settings."""
    return f"{self.kind}/{self.label}-{self.optimizer}-lr{self.learning_rate:g}-seed{self.seed}"


def _floats(values: Iterable[Any], key: str) -> list[float]:
  result = [float(value) for value in values]
  if not result:
    raise ValueError(f"config.sweep.{key} is empty.")
  if any(not value > 0 for value in result):
    raise ValueError(f"config.sweep.{key} must hold positive learning rates, got {result}.")
  return result


def stl_grid(config: ml_collections.ConfigDict) -> list[RunSpec]:
  """STL baselines: every task of `config.tasks` × `sweep.stl_lr_grid` × `sweep.seeds`, with
  Adam."""
  rates = _floats(config.sweep.stl_lr_grid, "stl_lr_grid")
  return [
    RunSpec("stl", task, STL_OPTIMIZER, rate, int(seed))
    for task in config.tasks
    for rate in rates
    for seed in config.sweep.seeds
  ]


def mtl_grid(config: ml_collections.ConfigDict) -> tuple[list[RunSpec], list[str]]:
  """MTL runs: `sweep.methods` × `sweep.optimizers` × `sweep.lr_grid` × `sweep.seeds`.

  Methods not registered in this build, and (method, optimizer) pairs the method does not
  define, are left out with a note instead of failing the sweep.

  Returns:
    (runs, notes): the runs in grid order and one human-readable line per left-out item.

  Raises:
    ValueError: an unknown optimizer or lane mode (listing the valid ones) or an empty/invalid lr
      grid.
  """
  rates = _floats(config.sweep.lr_grid, "lr_grid")
  for name in config.sweep.optimizers:
    optim.check_optimizer_name(name)
  # Checked here so a bad value fails before any run trains, not at the first group.
  train.default_lane_mode(config.sweep.lane_mode)
  if not config.sweep.seeds:
    raise ValueError("config.sweep.seeds is empty.")
  known = set(weighting_lib.method_names())
  runs, notes = [], []
  for method in config.sweep.methods:
    if method not in known:
      notes.append(
        f"method {method!r} is not available in this build (known: {', '.join(sorted(known))}); "
        "skipped."
      )
      continue
    for optimizer in config.sweep.optimizers:
      allowed = OPTIMIZER_RESTRICTIONS.get(method)
      if allowed and optimizer not in allowed:
        notes.append(
          f"method {method!r} is defined for {', '.join(allowed)} only; {optimizer} skipped."
        )
        continue
      runs.extend(
        RunSpec("mtl", method, optimizer, rate, int(seed))
        for rate in rates
        for seed in config.sweep.seeds
      )
  return runs, notes


def run_config(
  config: ml_collections.ConfigDict, spec: RunSpec, baseline: Sequence[str] = ()
) -> ml_collections.ConfigDict:
  """The locked config of one run: the sweep config with the run's settings filled in."""
  run = ml_collections.ConfigDict(config.to_dict())
  run.seed = spec.seed
  run.optimizer.name = spec.optimizer
  run.optimizer.learning_rate = spec.learning_rate
  if spec.kind == "stl":
    run.tasks = (spec.name,)
    run.method.name = "ew"
    run.delta_m.baseline = ()
  else:
    run.method.name = spec.name
    run.method.level = spec.level
    run.delta_m.baseline = tuple(baseline)
  return run.lock()


def run_status(run_dir: str) -> str:
  """'finished' (results.json), 'failed' (failed.json: the run diverged) or 'pending'."""
  if os.path.exists(os.path.join(run_dir, train.RESULTS_FILE)):
    return "finished"
  if os.path.exists(os.path.join(run_dir, train.FAILED_FILE)):
    return "failed"
  return "pending"


def read_results(run_dir: str) -> dict | None:
  """The run's results dict, or None if it has none (pending or diverged)."""
  path = os.path.join(run_dir, train.RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as file:
    return json.load(file)


def _mean_or_inf(values: Sequence[float | None]) -> float:
  """Mean, +inf when a value is missing or not finite (a diverged run never wins)."""
  if not values or any(value is None or not math.isfinite(value) for value in values):
    return math.inf
  return float(np.mean(values))


@dataclasses.dataclass
class StlChoice:
  """The chosen STL lr of one task and the per-lr mean validation losses it was chosen from."""

  task: str
  learning_rate: float
  validation_loss: dict[float, float]


def choose_stl(
  workdir: str, specs: Sequence[RunSpec]
) -> tuple[dict[str, StlChoice], dict[int, list[str]]]:
  """Best STL lr per task by mean validation loss over seeds, and the Δm baseline of each seed.

  Args:
    workdir: the sweep directory.
    specs: the STL runs (finished ones are read; others count as diverged).

  Returns:
    (choices, baselines): task -> StlChoice; seed -> run directories of each task's best-lr STL
    run with that seed (falling back to the first seed that has one).

  Raises:
    ValueError: a task none of whose STL runs finished.
  """
  losses: dict[str, dict[float, list]] = {}
  for spec in specs:
    results = read_results(os.path.join(workdir, spec.path))
    value = None if results is None else results["validation"].get(f"{spec.name}/loss")
    losses.setdefault(spec.name, {}).setdefault(spec.learning_rate, []).append(value)
  choices = {}
  for task, per_rate in losses.items():
    means = {rate: _mean_or_inf(values) for rate, values in per_rate.items()}
    best = min(means, key=means.get)
    if not math.isfinite(means[best]):
      raise ValueError(
        f"No STL learning rate of task {task!r} finished on all seeds ({means}); "
        f"see the runs under {os.path.join(workdir, 'stl')}."
      )
    choices[task] = StlChoice(task, best, means)
  seeds = sorted({spec.seed for spec in specs})
  baselines = {}
  for seed in seeds:
    paths = []
    for task, choice in choices.items():
      candidates = [seed] + [other for other in seeds if other != seed]
      for candidate in candidates:
        run_dir = os.path.join(
          workdir, RunSpec("stl", task, STL_OPTIMIZER, choice.learning_rate, candidate).path
        )
        if run_status(run_dir) == "finished":
          paths.append(run_dir)
          break
    baselines[seed] = paths
  return choices, baselines


def baseline_for(baselines: Mapping[int, list[str]], seed: int) -> list[str]:
  """The baseline paths for an MTL seed: its own STL seed if present, else the first STL seed's."""
  return list(baselines.get(seed) or baselines[min(baselines)])


@dataclasses.dataclass
class GridSearch:
  """How the lr grid of one (method or STL task, optimizer) grew before its lr was chosen.

  Attributes:
    name, optimizer: the pair (name: a method label such as 'pcgrad@sample', or an STL task).
    coarse: the coarse grid's rates.
    refined: rates added inside the tried range, next to the best.
    extended: rates added beyond the tried range because the best sat on its edge.
    scores: lr -> the selection score, mean over seeds (+inf where a seed diverged or is missing).
  """

  name: str
  optimizer: str
  coarse: list[float]
  refined: list[float] = dataclasses.field(default_factory=list)
  extended: list[float] = dataclasses.field(default_factory=list)
  scores: dict[float, float] = dataclasses.field(default_factory=dict)

  @property
  def best(self) -> float | None:
    finite = {rate: score for rate, score in self.scores.items() if math.isfinite(score)}
    return min(finite, key=finite.get) if finite else None

  @property
  def at_edge(self) -> bool:
    """Whether the chosen lr is still the smallest or largest tried (its optimum may lie
    outside)."""
    best = self.best
    return (
      best is not None and len(self.scores) > 1 and best in (min(self.scores), max(self.scores))
    )


def next_rates(
  scores: Mapping[float, float], factor: float, budget_left: int
) -> list[tuple[float, str]]:
  """The learning rates to try next around the best: best x factor and best / factor, each
  where no tried rate lies within 0.1%.

  Args:
    scores: tried lr -> mean score over seeds, lower is better (+inf: diverged).
    factor: the refinement step (> 1), e.g. √10 for a grid a decade apart.
    budget_left: at most this many rates are returned.

  Returns:
    (rate, 'extended' beyond the tried range | 'refined' inside it), extensions first; empty
    when the budget is spent, nothing is new, or every tried rate diverged. Rates are rounded to
    4 significant digits (they name run directories).
  """
  finite = {rate: score for rate, score in scores.items() if math.isfinite(score)}
  if not finite or budget_left <= 0:
    return []
  best = min(finite, key=finite.get)
  low, high = min(scores), max(scores)
  candidates = []
  for rate in (best * factor, best / factor):
    rate = float(f"{rate:.4g}")
    if any(math.isclose(rate, tried, rel_tol=1e-3) for tried in scores):
      continue
    candidates.append((rate, "extended" if rate > high or rate < low else "refined"))
  candidates.sort(key=lambda candidate: candidate[1] != "extended")
  return candidates[:budget_left]


def _scores(workdir, specs, score_of) -> dict[tuple[str, str], dict[float, float]]:
  """(label, optimizer) -> lr -> mean score over the seeds of `specs` (+inf if one is missing)."""
  values: dict[tuple[str, str], dict[float, list]] = {}
  for spec in specs:
    results = read_results(os.path.join(workdir, spec.path))
    value = None if results is None else score_of(spec, results)
    values.setdefault((spec.label, spec.optimizer), {}).setdefault(spec.learning_rate, []).append(
      value
    )
  return {
    key: {rate: _mean_or_inf(runs) for rate, runs in per_rate.items()}
    for key, per_rate in values.items()
  }


def search_grid(
  config, workdir, coarse, dataset, progress, score_of, configure, budget: int, factor: float
) -> tuple[list[RunSpec], dict[tuple[str, str], GridSearch]]:
  """Trains the coarse grid, then refines (and extends) each pair's grid round after round.

  Args:
    config: the sweep config (`sweep.seeds`, `sweep.group_runs`, `sweep.lane_mode`).
    workdir: where the runs live.
    coarse: the coarse grid's runs.
    dataset: the loaded dataset.
    progress: the job's JobProgress (its total grows with the added runs).
    score_of: (spec, results) -> the selection score of a finished run, lower is better.
    configure: spec -> the run's config.
    budget: extra learning rates per (label, optimizer) at most.
    factor: the refinement step, > 1.

  Returns:
    (every run: coarse then added, (label, optimizer) -> GridSearch).
  """
  group_runs = grouped_runs(config)
  specs = list(coarse)
  searches: dict[tuple[str, str], GridSearch] = {}
  templates: dict[tuple[str, str], RunSpec] = {}
  for spec in coarse:
    key = (spec.label, spec.optimizer)
    templates.setdefault(key, spec)
    search = searches.setdefault(key, GridSearch(spec.label, spec.optimizer, []))
    if spec.learning_rate not in search.coarse:
      search.coarse.append(spec.learning_rate)
  pending = list(coarse)
  while pending:
    _train_runs(
      config, workdir, [(spec, configure(spec)) for spec in pending], dataset, progress, group_runs
    )
    pending = []
    for key, scores in _scores(workdir, specs, score_of).items():
      search = searches[key]
      search.scores = scores
      used = len(search.refined) + len(search.extended)
      for rate, kind in next_rates(scores, factor, budget - used):
        getattr(search, kind).append(rate)
        pending += [
          dataclasses.replace(templates[key], learning_rate=rate, seed=int(seed))
          for seed in config.sweep.seeds
        ]
    progress.total += len(pending)
    specs += pending
  return specs, searches


@dataclasses.dataclass
class Selection:
  """One (method, optimizer) at its best lr.

  Attributes:
    method, optimizer: the pair.
    learning_rate: the best lr (lowest mean validation Δm), or None if every lr diverged.
    validation_delta_m: lr -> mean validation Δm over seeds (+inf: some seed diverged).
    seeds: the seeds at the best lr.
    test: per seed, the test metrics at the best lr.
    test_delta_m: per seed, the test Δm at the best lr.
  """

  method: str
  optimizer: str
  learning_rate: float | None
  validation_delta_m: dict[float, float]
  seeds: list[int] = dataclasses.field(default_factory=list)
  test: list[dict[str, float]] = dataclasses.field(default_factory=list)
  test_delta_m: list[float] = dataclasses.field(default_factory=list)

  def mean_std(self, key: str) -> tuple[float, float]:
    """Mean and std over seeds of a test metric ('delta_m' for test Δm)."""
    values = self.test_delta_m if key == "delta_m" else [run[key] for run in self.test]
    if not values:
      return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values))


def select_best(records: Mapping[RunSpec, dict | None]) -> list[Selection]:
  """Best lr per (method, optimizer) on mean validation Δm; the test results at that lr.

  Args:
    records: MTL run -> its results dict (with 'delta_m'), or None if it diverged or is missing.

  Returns:
    One Selection per (method, optimizer), in the order first seen.

  Raises:
    ValueError: a finished run without Δm (it was trained without STL baselines).
  """
  groups: dict[tuple[str, str], dict[float, list[tuple[RunSpec, dict | None]]]] = {}
  for spec, results in records.items():
    if results is not None and "delta_m" not in results:
      raise ValueError(
        f"Run {spec.path} has no Δm: it was trained without STL baselines "
        "(config.delta_m.baseline)."
      )
    groups.setdefault((spec.label, spec.optimizer), {}).setdefault(spec.learning_rate, []).append(
      (spec, results)
    )
  selections = []
  for (method, optimizer), per_rate in groups.items():
    means = {
      rate: _mean_or_inf(
        [None if results is None else results["delta_m"]["validation"] for _, results in runs]
      )
      for rate, runs in per_rate.items()
    }
    best = min(means, key=means.get)
    if not math.isfinite(means[best]):
      selections.append(Selection(method, optimizer, None, means))
      continue
    runs = sorted(per_rate[best], key=lambda item: item[0].seed)
    selections.append(
      Selection(
        method,
        optimizer,
        best,
        means,
        seeds=[spec.seed for spec, _ in runs],
        test=[dict(results["test"]) for _, results in runs],
        test_delta_m=[float(results["delta_m"]["test"]) for _, results in runs],
      )
    )
  return selections


def _format_rate(rate: float | None) -> str:
  return "—" if rate is None else f"{rate:g}"


def _ordered(values: Iterable[str]) -> list[str]:
  return list(dict.fromkeys(values))


def delta_m_table(selections: Sequence[Selection]) -> tuple[str, str]:
  """SPEC's Δm table: rows methods, columns optimizers, cells "Δm ± std (best lr)".

  Returns:
    (markdown, csv); the CSV has one row per (method, optimizer) with the numbers unformatted.
  """
  methods = _ordered(selection.method for selection in selections)
  optimizers = _ordered(selection.optimizer for selection in selections)
  cells = {(selection.method, selection.optimizer): selection for selection in selections}
  lines = [
    "| Method | " + " | ".join(f"{name} Δm % ↓ (best lr)" for name in optimizers) + " |",
    "|---|" + "---|" * len(optimizers),
  ]
  for method in methods:
    row = []
    for optimizer in optimizers:
      selection = cells.get((method, optimizer))
      if selection is None:
        row.append("—")
      elif selection.learning_rate is None:
        row.append("diverged at every lr")
      else:
        mean, std = selection.mean_std("delta_m")
        row.append(f"{mean:.2f} ± {std:.2f} ({_format_rate(selection.learning_rate)})")
    lines.append(f"| {method} | " + " | ".join(row) + " |")
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(
    [
      "method",
      "optimizer",
      "best_lr",
      "test_delta_m_mean",
      "test_delta_m_std",
      "num_seeds",
      "validation_delta_m_mean",
    ]
  )
  for selection in selections:
    mean, std = selection.mean_std("delta_m")
    validation = (
      selection.validation_delta_m.get(selection.learning_rate, math.nan)
      if selection.learning_rate
      else math.nan
    )
    writer.writerow(
      [
        selection.method,
        selection.optimizer,
        selection.learning_rate if selection.learning_rate else "",
        mean,
        std,
        len(selection.seeds),
        validation,
      ]
    )
  return "\n".join(lines), buffer.getvalue()


def metric_table(
  selections: Sequence[Selection], directions: Mapping[str, bool]
) -> tuple[str, str]:
  """All test metrics (mean ± std over seeds) per (method, optimizer) at the best lr.

  Args:
    selections: from `select_best`.
    directions: 'task/metric' -> higher is better (the column order).

  Returns:
    (markdown, csv).
  """
  keys = list(directions)
  arrows = {key: "↑" if higher else "↓" for key, higher in directions.items()}
  lines = [
    "| Method | Optimizer | lr | "
    + " | ".join(f"{key} {arrows[key]}" for key in keys)
    + " | Δm % ↓ |",
    "|---|---|---|" + "---|" * (len(keys) + 1),
  ]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(
    ["method", "optimizer", "best_lr", "num_seeds"]
    + [f"{key}_{part}" for key in keys + ["delta_m"] for part in ("mean", "std")]
  )
  for selection in selections:
    stats = {key: selection.mean_std(key) for key in keys + ["delta_m"]}
    if selection.learning_rate is None:
      cells = ["—"] * (len(keys) + 1)
    else:
      cells = [f"{stats[key][0]:.4f} ± {stats[key][1]:.4f}" for key in keys]
      cells.append(f"{stats['delta_m'][0]:.2f} ± {stats['delta_m'][1]:.2f}")
    lines.append(
      f"| {selection.method} | {selection.optimizer} | {_format_rate(selection.learning_rate)} | "
      + " | ".join(cells)
      + " |"
    )
    writer.writerow(
      [selection.method, selection.optimizer, selection.learning_rate or "", len(selection.seeds)]
      + [value for key in keys + ["delta_m"] for value in stats[key]]
    )
  return "\n".join(lines), buffer.getvalue()


@dataclasses.dataclass
class ParetoPoint:
  """One run at its (method, optimizer)'s best lr."""

  method: str
  optimizer: str
  seed: int
  values: list[float]
  on_front: bool = False
  not_dominated_by_others: bool = False


def pareto_analysis(
  selections: Sequence[Selection], directions: Mapping[str, bool]
) -> tuple[list[ParetoPoint], dict[str, dict[str, int]]]:
  """SPEC's Pareto counts: "PO full" and "PO w.r.t. the other optimizer(s)", per optimizer.

  Args:
    selections: from `select_best`; each seed at the best lr is one point.
    directions: 'task/metric' -> higher is better; these metrics are the objectives.

  Returns:
    (points, counts): the points with their flags, and optimizer -> {'runs', 'po_full',
    'po_other'}; 'po_other' counts runs that no run of another optimizer dominates.
  """
  keys = list(directions)
  flags = [directions[key] for key in keys]
  points = [
    ParetoPoint(selection.method, selection.optimizer, seed, [float(test[key]) for key in keys])
    for selection in selections
    for seed, test in zip(selection.seeds, selection.test)
  ]
  counts = {
    optimizer: {"runs": 0, "po_full": 0, "po_other": 0}
    for optimizer in _ordered(selection.optimizer for selection in selections)
  }
  if not points:
    return points, counts
  # A NaN metric would sit on every front; it is a worst value instead.
  values = np.nan_to_num(
    metrics_lib.oriented(np.array([point.values for point in points]), flags), nan=np.inf
  )
  front = metrics_lib.pareto_mask(values)
  optimizer_of = np.array([point.optimizer for point in points])
  for optimizer in counts:
    mine = optimizer_of == optimizer
    others = values[~mine]
    free = (
      metrics_lib.non_dominated_by(values[mine], others)
      if others.shape[0]
      else np.ones(mine.sum(), bool)
    )
    for point, flag in zip([point for point, own in zip(points, mine) if own], free):
      point.not_dominated_by_others = bool(flag)
    counts[optimizer] = {
      "runs": int(mine.sum()),
      "po_full": int(front[mine].sum()),
      "po_other": int(free.sum()),
    }
  for point, flag in zip(points, front):
    point.on_front = bool(flag)
  return points, counts


def pareto_table(counts: Mapping[str, Mapping[str, int]]) -> str:
  """Markdown: per optimizer, runs on the full front and runs not dominated by other optimizers."""
  lines = ["| Optimizer | runs | PO full | PO w.r.t. the other optimizer(s) |", "|---|---|---|---|"]
  for optimizer, count in counts.items():
    lines.append(
      f"| {optimizer} | {count['runs']} | {count['po_full']}/{count['runs']} | "
      f"{count['po_other']}/{count['runs']} |"
    )
  return "\n".join(lines)


class JobProgress:
  """Counts finished runs of a job and estimates the time left from the runs trained so far."""

  def __init__(self, total_runs: int, label: str = "sweep"):
    self.total = total_runs
    self.done = 0
    self.trained = 0
    self.label = label
    self._start = time.perf_counter()

  def finish(self, runs: int, trained: bool) -> None:
    """Marks runs as finished; `trained` is False for runs skipped because they were done."""
    self.done += runs
    if trained:
      self.trained += runs

  def line(self) -> str:
    elapsed = time.perf_counter() - self._start
    left = self.total - self.done
    rate = elapsed / self.trained if self.trained else math.nan
    eta = metric_writers.format_duration(left * rate) if self.trained else "?"
    return (
      f"[{self.label}] {self.done}/{self.total} runs done "
      f"({100.0 * self.done / max(1, self.total):.0f}%), elapsed "
      f"{metric_writers.format_duration(elapsed)}, ETA {eta}"
    )


def _train_runs(config, workdir, items, dataset, progress: JobProgress, group_runs: bool) -> None:
  """Trains pending runs: grouped (one program per group) when allowed, else one by one; skips
  finished runs."""
  pending = []
  for spec, run in items:
    if run_status(os.path.join(workdir, spec.path)) != "pending":
      progress.finish(1, trained=False)
    else:
      pending.append((spec, run))
  if not pending:
    metric_writers.status(progress.line())
    return
  groups: dict[str, list] = {}
  for spec, run in pending:
    key = train.group_key(run) if group_runs else spec.path
    groups.setdefault(key, []).append((spec, run))
  for members in groups.values():
    names = ", ".join(spec.path for spec, _ in members)
    metric_writers.status(f"{progress.line()}; now: {names}")
    dirs = [os.path.join(workdir, spec.path) for spec, _ in members]
    if len(members) > 1:
      label = f"[{members[0][0].kind} group] "
      runs = [run for _, run in members]
      train.train_group(runs, dirs, dataset, label=label, lane_mode=config.sweep.lane_mode)
    else:
      spec, run = members[0]
      try:
        train.train_and_evaluate(run, dirs[0], dataset)
      except train.NonFiniteLossError as error:
        # A diverged run is a result of the sweep (e.g. SGD at a large lr), not a crash.
        train.write_failure(dirs[0], run, str(error))
        metric_writers.status(f"{spec.path} diverged: {error}")
    progress.finish(len(members), trained=True)
  metric_writers.status(progress.line())


@dataclasses.dataclass
class SweepResult:
  """Everything the tables, findings and the report need.

  Attributes:
    stl_workdir: where the STL baselines live (the sweep's workdir unless shared).
    stl_searches, mtl_searches: (task or method label, optimizer) -> how its lr grid grew.
    stl_test: task -> the test metrics of its STL model at the chosen lr, mean over seeds.
    trivial: the trivial predictors' test metrics ('task/metric').
    pareto_spread: optimizer -> {'po_full', 'po_other'} -> bootstrap interval over seeds of the
      count; plus 'difference' -> interval of the first two optimizers' PO-full share difference.
  """

  workdir: str
  stl_choices: dict[str, StlChoice]
  baselines: dict[int, list[str]]
  selections: list[Selection]
  directions: dict[str, bool]
  notes: list[str]
  points: list[ParetoPoint]
  pareto_counts: dict[str, dict[str, int]]
  files: dict[str, str]
  stl_workdir: str = ""
  stl_searches: dict = dataclasses.field(default_factory=dict)
  mtl_searches: dict = dataclasses.field(default_factory=dict)
  stl_test: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  trivial: dict[str, float] = dataclasses.field(default_factory=dict)
  pareto_spread: dict = dataclasses.field(default_factory=dict)


def _stl_score(spec: RunSpec, results: Mapping) -> float | None:
  return results["validation"].get(f"{spec.name}/loss")


def _mtl_score(spec: RunSpec, results: Mapping) -> float | None:
  del spec
  return results.get("delta_m", {}).get("validation")


def train_stl(config, stl_workdir, dataset, progress) -> tuple[list[RunSpec], dict, dict, dict]:
  """The STL baselines with their refined grids: (runs, searches, choices, seed -> baselines)."""
  specs, searches = search_grid(
    config,
    stl_workdir,
    stl_grid(config),
    dataset,
    progress,
    _stl_score,
    lambda spec: run_config(config, spec),
    int(config.sweep.refine_budget),
    float(config.sweep.refine_factor),
  )
  choices, baselines = choose_stl(stl_workdir, specs)
  for task, choice in choices.items():
    metric_writers.status(
      f"STL {task}: best lr {choice.learning_rate:g} (mean validation loss "
      f"{choice.validation_loss[choice.learning_rate]:.4f})"
    )
  return specs, searches, choices, baselines


def stl_test_metrics(stl_workdir, choices, seeds) -> dict[str, dict[str, float]]:
  """task -> its STL model's test metrics at the chosen lr, mean over the seeds that finished."""
  result = {}
  for task, choice in choices.items():
    runs = [
      read_results(
        os.path.join(
          stl_workdir, RunSpec("stl", task, STL_OPTIMIZER, choice.learning_rate, int(seed)).path
        )
      )
      for seed in seeds
    ]
    tests = [run["test"] for run in runs if run is not None]
    result[task] = {key: float(np.mean([test[key] for test in tests])) for key in tests[0]}
  return result


def _announce(config, workdir: str, coarse_runs: int) -> JobProgress:
  """The sweep's first status line, and its progress counter."""
  if bool(config.sweep.group_runs) and not grouped_runs(config):
    metric_writers.status(f"note: {jax.process_count()} processes: runs train one by one.")
  metric_writers.status(
    f"Sweep in {workdir}: {coarse_runs} coarse-grid runs, then up to "
    f"{config.sweep.refine_budget} refined learning rates per pair "
    f"({'grouped runs' if grouped_runs(config) else 'one by one'})."
  )
  return JobProgress(coarse_runs)


def grouped_runs(config: ml_collections.ConfigDict) -> bool:
  """Whether runs train in groups: `sweep.group_runs`, on one process only (a group is one
  program on one process's devices; one by one, each run's batch is split over every device of
  every process)."""
  return bool(config.sweep.group_runs) and jax.process_count() == 1


def validated_dataset(config: ml_collections.ConfigDict, dataset=None):
  """The dataset a study runs on (loaded unless given), once its config is known to be valid."""
  config_validation.validate_config(config)
  return dataset or data_registry.load_dataset(config.dataset)


def run_sweep(
  config: ml_collections.ConfigDict,
  workdir: str,
  dataset=None,
  stl_workdir: str | None = None,
  mtl_specs: Sequence[RunSpec] | None = None,
  mtl_refine_budget: int | None = None,
) -> SweepResult:
  """Runs (or resumes) the whole study and writes its index, tables and figures.

  Args:
    config: an experiment config with a `sweep` section (methods, optimizers, lr_grid,
      stl_lr_grid, seeds, group_runs, lane_mode, refine_budget, refine_factor) and `findings`.
    workdir: the sweep directory.
    dataset: an already loaded dataset to reuse (loaded from config.dataset otherwise).
    stl_workdir: where the STL baselines live (default workdir); another study's sweep directory
      shares its baselines (finished runs are reused).
    mtl_specs: the coarse MTL grid (default `mtl_grid(config)`).
    mtl_refine_budget: the MTL grids' refinement budget (default sweep.refine_budget, which
      the STL grids always use, so that a shared baseline is chosen alike).

  Returns:
    The SweepResult; files written under workdir: sweep.json/.csv, delta_m.md/.csv,
    metrics.md/.csv, pareto.md, parallel_coordinates.png, lr_curves.png.
  """
  dataset = validated_dataset(config, dataset)
  stl_workdir = stl_workdir or workdir
  notes = []
  if mtl_specs is None:
    mtl_specs, notes = mtl_grid(config)
  for note in notes:
    metric_writers.status(f"note: {note}")
  progress = _announce(config, workdir, len(stl_grid(config)) + len(mtl_specs))
  stl_specs, stl_searches, choices, baselines = train_stl(config, stl_workdir, dataset, progress)
  mtl_specs, mtl_searches = search_grid(
    config,
    workdir,
    mtl_specs,
    dataset,
    progress,
    _mtl_score,
    lambda spec: run_config(config, spec, baseline_for(baselines, spec.seed)),
    int(config.sweep.refine_budget if mtl_refine_budget is None else mtl_refine_budget),
    float(config.sweep.refine_factor),
  )
  records = {spec: read_results(os.path.join(workdir, spec.path)) for spec in mtl_specs}
  selections = select_best(records)
  tasks = dataset.select_tasks(list(config.tasks))
  directions = tasks_lib.flat_directions(tasks)
  points, counts = pareto_analysis(selections, directions)
  settings = statistics.Settings.from_config(config.findings)
  result = SweepResult(
    workdir,
    choices,
    baselines,
    selections,
    directions,
    notes,
    points,
    counts,
    {},
    stl_workdir=stl_workdir,
    stl_searches=stl_searches,
    mtl_searches=mtl_searches,
    stl_test=stl_test_metrics(stl_workdir, choices, config.sweep.seeds),
    trivial=evaluation.trivial_metrics(
      tasks, dataset.splits["train"], dataset.splits["test"], int(config.training.eval_batch_size)
    ),
    pareto_spread=pareto_bootstrap(selections, directions, settings),
  )
  runs = [(stl_workdir, spec) for spec in stl_specs] + [(workdir, spec) for spec in mtl_specs]
  result.files = write_outputs(workdir, runs, selections, directions, points, counts)
  result.files["lr_curves.png"] = os.path.join(workdir, "lr_curves.png")
  if parallel.is_writer():
    figures.lr_curves(
      {key: search.scores for key, search in mtl_searches.items()},
      {key: search.scores for key, search in stl_searches.items()},
      result.files["lr_curves.png"],
    )
  return result


def findings_lines(result: SweepResult, config: ml_collections.ConfigDict) -> list[str]:
  """The sweep's findings, each with its interval and verdict: Adam vs SGD per method (paired
  by seed) and over methods, Pareto counts with their bootstrap spread, and how each lr grid
  was refined or extended."""
  settings = statistics.Settings.from_config(config.findings)
  lines = markdown.optimizer_findings(
    result.selections, result.pareto_counts, settings, result.pareto_spread
  )
  lines += markdown.grid_search_findings(result.mtl_searches, "method")
  return lines + markdown.grid_search_findings(result.stl_searches, "STL task")


def pareto_bootstrap(selections, directions, settings: statistics.Settings) -> dict[str, Any]:
  """Bootstrap intervals over seeds of the Pareto counts, and of the first two optimizers'
  difference in PO-full share (a resample draws seed positions with replacement; every
  (method, optimizer) takes the same seeds, as the runs of one seed share data order and
  initialisation)."""
  chosen = [selection for selection in selections if selection.learning_rate is not None]
  if not chosen:
    return {}
  count = min(len(selection.seeds) for selection in chosen)
  draws: dict[str, dict[str, list[float]]] = {}
  shares: list[float] = []
  optimizers = _ordered(selection.optimizer for selection in chosen)
  for indices in statistics.resample_indices(count, settings.resamples, settings.seed):
    resampled = [
      dataclasses.replace(
        selection,
        seeds=[selection.seeds[index] for index in indices],
        test=[selection.test[index] for index in indices],
        test_delta_m=[selection.test_delta_m[index] for index in indices],
      )
      for selection in chosen
    ]
    _, counts = pareto_analysis(resampled, directions)
    for optimizer, values in counts.items():
      for key in ("po_full", "po_other"):
        draws.setdefault(optimizer, {}).setdefault(key, []).append(values[key])
    if len(optimizers) >= 2:
      first, second = (counts[name] for name in optimizers[:2])
      shares.append(first["po_full"] / first["runs"] - second["po_full"] / second["runs"])
  _, counts = pareto_analysis(chosen, directions)
  spread: dict[str, Any] = {
    optimizer: {
      key: statistics.percentile_interval(
        counts[optimizer][key], values, count, settings.confidence
      )
      for key, values in keys.items()
    }
    for optimizer, keys in draws.items()
  }
  if shares:
    first, second = (counts[name] for name in optimizers[:2])
    estimate = first["po_full"] / first["runs"] - second["po_full"] / second["runs"]
    spread["difference"] = statistics.percentile_interval(
      estimate, shares, count, settings.confidence
    )
    spread["difference_of"] = tuple(optimizers[:2])
  return spread


def write_outputs(workdir, runs, selections, directions, points, counts) -> dict[str, str]:
  """Writes the run index (sweep.json, sweep.csv), the tables and the parallel-coordinates
  figure (the writing process only, `parallel.is_writer`; every process returns the paths).

  Args:
    runs: (the directory the run lives under, its spec) per run.
  """
  index = []
  for base, spec in runs:
    run_dir = os.path.join(base, spec.path)
    results = read_results(run_dir)
    entry = {**dataclasses.asdict(spec), "path": spec.path, "status": run_status(run_dir)}
    if results is not None:
      entry["validation_delta_m"] = results.get("delta_m", {}).get("validation")
      entry["test_delta_m"] = results.get("delta_m", {}).get("test")
      entry["selection_score"] = results.get("selection", {}).get("score")
    index.append(entry)
  files = {}

  def write(name: str, text: str) -> None:
    files[name] = os.path.join(workdir, name)
    if parallel.is_writer():
      with open(files[name], "w") as file:
        file.write(text)

  write("sweep.json", json.dumps(index, indent=2))
  buffer = io.StringIO()
  fields = [
    "path",
    "kind",
    "name",
    "level",
    "optimizer",
    "learning_rate",
    "seed",
    "status",
    "validation_delta_m",
    "test_delta_m",
    "selection_score",
  ]
  writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
  writer.writeheader()
  writer.writerows(index)
  write("sweep.csv", buffer.getvalue())
  markdown, table_csv = delta_m_table(selections)
  write("delta_m.md", markdown + "\n")
  write("delta_m.csv", table_csv)
  markdown, table_csv = metric_table(selections, directions)
  write("metrics.md", markdown + "\n")
  write("metrics.csv", table_csv)
  write("pareto.md", pareto_table(counts) + "\n")
  if points:
    files["parallel_coordinates.png"] = os.path.join(workdir, "parallel_coordinates.png")
  if points and parallel.is_writer():
    figures.parallel_coordinates(
      [point.values for point in points],
      list(directions),
      list(directions.values()),
      [point.optimizer for point in points],
      files["parallel_coordinates.png"],
      front=[point.on_front for point in points],
    )
  return files
