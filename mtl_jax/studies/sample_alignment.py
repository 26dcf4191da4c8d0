"""The sample-alignment study: do gradient-alignment methods help when they also act across
samples?

PCGrad, UPGrad, MGDA and CAGrad are trained at the Gramian levels 'task' (one gradient per task),
'sample' (one per sample, of the summed task losses) and 'sample_task' (one per sample and task),
with each optimizer of the study and every seed, next to EW and against the STL baselines of the
optimizer study (`optimizers.run_sweep` trains, refines and selects; finished runs are reused).
The study then states, each with its interval over seeds and its verdict:

* test Δm per (method, level, optimizer), and the paired per-seed differences against the same
  method at level 'task' and against EW;
* Pareto counts per level (every run at its chosen lr is a point), with their bootstrap spread;
* the step cost of each (method, level) ÷ EW's, measured on one batch (medians of interleaved
  rounds of the compiled steps);
* the conflict statistics a probe saw in one EW run (inter-task and inter-sample cosines, with
  intervals over epochs).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from mtl_jax import config_validation
from mtl_jax import conflicts as conflicts_lib
from mtl_jax import metric_writers
from mtl_jax import statistics
from mtl_jax import train
from mtl_jax.data import registry as data_registry
from mtl_jax.report import markdown
from mtl_jax.studies import optimizers

LEVELS = ("task", "sample", "sample_task")
REFERENCE = "ew"


def sweep_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its `sweep` section set from `config.sample_alignment` (optimizers, lr grid,
  seeds); the training keys and the STL grid are left as they are, so STL baselines can be
  shared."""
  options = config.sample_alignment
  return config_validation.with_overrides(
    config,
    **{
      "sweep.methods": (REFERENCE,) + tuple(options.methods),
      "sweep.optimizers": tuple(options.optimizers),
      "sweep.lr_grid": tuple(options.lr_grid),
      "sweep.seeds": tuple(options.seeds),
    },
  )


def grid(config: ml_collections.ConfigDict) -> list[optimizers.RunSpec]:
  """The coarse grid: EW at level 'task', then every method at every level, per optimizer, lr
  and seed."""
  options = config.sample_alignment
  pairs = [(REFERENCE, "task")] + [
    (method, level) for method in options.methods for level in options.levels
  ]
  return [
    optimizers.RunSpec("mtl", method, optimizer, float(rate), int(seed), level)
    for method, level in pairs
    for optimizer in options.optimizers
    for rate in options.lr_grid
    for seed in options.seeds
  ]


def level_of(label: str) -> str:
  """The level of a method label ('pcgrad@sample' -> 'sample', 'pcgrad' -> 'task')."""
  return label.partition("@")[2] or "task"


def step_costs(
  config: ml_collections.ConfigDict, dataset, pairs: Sequence[tuple[str, str]], repeats: int
) -> dict[str, float]:
  """Median seconds of one compiled train step per (method, level), keyed by label.

  Each step is the one-run program the study's runs trained with (`train.lane_programs`: the
  sweep compiled it already), with the first optimizer, lr and seed of the study, on the first
  training batch of that seed. Rounds interleave the steps (one call of each per round), so load
  from other processes falls on all of them alike.
  """
  options = config.sample_alignment
  optimizer, rate, seed = options.optimizers[0], float(options.lr_grid[0]), int(options.seeds[0])
  calls = {}
  for method, level in pairs:
    spec = optimizers.RunSpec("mtl", method, optimizer, rate, seed, level)
    experiment = train.build_experiment(optimizers.run_config(config, spec), dataset)
    state = train.init_state(experiment, seed)
    batch = train.first_training_batch(experiment, seed)
    program = train.lane_programs(experiment).step
    # Compiles unless the sweep did.
    jax.block_until_ready(program(state, batch, np.float32(rate), np.int32(0)))
    calls[spec.label] = functools.partial(program, state, batch, np.float32(rate), np.int32(0))
  return train.interleaved_medians(calls, repeats)


def probe_run(config, workdir, dataset, result: optimizers.SweepResult) -> list[dict[str, Any]]:
  """One EW run (the first optimizer, its chosen lr, the first seed) with the conflict probe on;
  its per-epoch records."""
  options = config.sample_alignment
  optimizer = options.optimizers[0]
  chosen = next(
    selection.learning_rate
    for selection in result.selections
    if selection.method == REFERENCE and selection.optimizer == optimizer
  )
  run = config_validation.with_overrides(
    config,
    **{
      "method.name": REFERENCE,
      "optimizer.name": optimizer,
      "optimizer.learning_rate": float(chosen or options.lr_grid[0]),
      "seed": int(options.seeds[0]),
      "conflicts.probe_every_steps": int(options.probe_every_steps),
      "delta_m.baseline": (),
    },
  )
  run_dir = os.path.join(workdir, "probe")
  train.train_and_evaluate(run, run_dir, dataset)
  return conflicts_lib.read_records(run_dir)


def reuse_finished_runs(specs, workdir: str, source: str) -> int:
  """Copies each finished run of `specs` that `source` (e.g. the optimizer study's workdir, with
  the same config and STL baselines) already has into `workdir`; returns how many."""
  copied = 0
  for spec in specs:
    target, origin = os.path.join(workdir, spec.path), os.path.join(source, spec.path)
    if optimizers.run_status(target) == "pending" and optimizers.run_status(origin) == "finished":
      shutil.copytree(origin, target, dirs_exist_ok=True)
      copied += 1
  return copied


@dataclasses.dataclass
class AlignmentResult:
  """What the report needs: the sweep, the step costs (label -> seconds) and the probe records."""

  sweep: optimizers.SweepResult
  costs: dict[str, float]
  probe: list[dict[str, Any]]
  settings: statistics.Settings


def run_study(
  config: ml_collections.ConfigDict, workdir: str, stl_workdir: str | None = None, dataset=None
) -> AlignmentResult:
  """Runs (or resumes) the study in `workdir`; STL baselines live in `stl_workdir` (default
  workdir), e.g. the optimizer study's, whose finished runs of the same settings (EW and the
  methods at level task, at the same lr and seed) are copied rather than trained again."""
  dataset = dataset or data_registry.load_dataset(config.dataset)
  options = config.sample_alignment
  run_config = sweep_config(config)
  specs = grid(config)
  if stl_workdir and os.path.abspath(stl_workdir) != os.path.abspath(workdir):
    copied = reuse_finished_runs(specs, workdir, stl_workdir)
    metric_writers.status(f"[sample_alignment] reused {copied} finished runs of {stl_workdir}")
  sweep = optimizers.run_sweep(
    run_config, workdir, dataset, stl_workdir, specs, int(options.refine_budget)
  )
  pairs = [(REFERENCE, "task")] + [
    (method, level) for method in options.methods for level in options.levels
  ]
  metric_writers.status(f"[sample_alignment] timing {len(pairs)} train steps")
  costs = step_costs(run_config, dataset, pairs, int(options.timing_repeats))
  probe = probe_run(run_config, workdir, dataset, sweep) if options.probe_every_steps else []
  return AlignmentResult(sweep, costs, probe, statistics.Settings.from_config(config.findings))


# ------------------------------------------------------------------------------------- findings


def delta_m_lines(result: AlignmentResult) -> list[str]:
  """Per optimizer and method: test Δm per level with its interval over seeds, and the paired
  differences against the same method at level 'task' and against EW (> 0: the level helps)."""
  settings = result.settings
  by_label = {(s.method, s.optimizer): s for s in result.sweep.selections}
  lines, verdicts = [], []
  for (label, optimizer), selection in by_label.items():
    if selection.learning_rate is None:
      lines.append(f"- {label} / {optimizer}: diverged at every lr (**inconclusive**).")
      continue
    own = dict(zip(selection.seeds, selection.test_delta_m))
    parts = [
      f"test Δm {settings.interval(selection.test_delta_m).text()} at lr "
      f"{selection.learning_rate:g}"
    ]
    method = label.partition("@")[0]
    references = [("EW", by_label.get((REFERENCE, optimizer)))]
    if level_of(label) != "task":
      references.insert(0, (f"{method} at level task", by_label.get((method, optimizer))))
    for name, reference in references:
      if reference is None or reference.learning_rate is None or reference is selection:
        continue
      _, differences = statistics.paired_differences(
        own, dict(zip(reference.seeds, reference.test_delta_m))
      )
      found = settings.interval(differences)
      parts.append(f"vs {name}: {statistics.described(found)}")
      if name != "EW":
        verdicts.append(statistics.verdict(found))
    lines.append(f"- {label} / {optimizer}: " + "; ".join(parts) + ".")
  counts = {name: verdicts.count(name) for name in statistics.VERDICTS}
  summary = (
    f"- What the numbers show: of {len(verdicts)} (method, per-sample level, optimizer) "
    f"comparisons with the same method at level task, the per-sample level is better in "
    f"{counts['holds']}, worse in {counts['reversed']} and inconclusive in "
    f"{counts['inconclusive']}"
  )
  if verdicts and counts["inconclusive"] == len(verdicts):
    summary += ": **no effect** detectable at this size"
  return [summary + "."] + lines


def level_pareto(result: AlignmentResult) -> tuple[dict, dict]:
  """Pareto counts per level (EW counts as level 'task'): every run at its chosen lr is a
  point; (counts, bootstrap spread over seeds)."""
  relabelled = [
    dataclasses.replace(selection, optimizer=level_of(selection.method))
    for selection in result.sweep.selections
  ]
  _, counts = optimizers.pareto_analysis(relabelled, result.sweep.directions)
  spread = optimizers.pareto_bootstrap(relabelled, result.sweep.directions, result.settings)
  return counts, spread


def cost_table(costs: Mapping[str, float]) -> str:
  """Markdown: each label's step time and its ratio to EW's."""
  reference = costs[REFERENCE]
  lines = ["| method | level | step (ms) | ÷ EW |", "|---|---|---|---|"]
  for label, seconds in costs.items():
    lines.append(
      f"| {label.partition('@')[0]} | {level_of(label)} | {seconds * 1e3:.2f} | "
      f"{seconds / reference:.2f} |"
    )
  return "\n".join(lines)


def probe_lines(records: Sequence[Mapping[str, Any]], settings: statistics.Settings) -> list[str]:
  """The conflict statistics of the probe's epochs: mean cosine and conflict rate per pair type
  with intervals over epochs, and the paired per-epoch difference inter-sample − inter-task."""
  if not records:
    return ["- No probe records (sample_alignment.probe_every_steps = 0)."]
  lines = []
  for statistic in ("conflict_rate", "mean"):
    series = {
      pair: np.array([record[pair]["cosine"][statistic] for record in records], np.float64)
      for pair in conflicts_lib.ROW_PAIR_TYPES
    }
    cells = [
      f"{pair} {settings.interval(values[np.isfinite(values)]).text(3, signed=False)}"
      for pair, values in series.items()
    ]
    difference = series["inter_sample"] - series["inter_task"]
    found = settings.interval(difference[np.isfinite(difference)])
    lines.append(
      f"- cosine {statistic.replace('_', ' ')} over {len(records)} epochs: "
      + "; ".join(cells)
      + f"; inter-sample − inter-task {statistics.described(found, digits=3)}."
    )
  return lines


def report_markdown(result: AlignmentResult, config: ml_collections.ConfigDict) -> str:
  """The study's section: what ran, the findings with intervals, the tables."""
  options = config.sample_alignment
  counts, spread = level_pareto(result)
  rows = [(f"STL {task}", values) for task, values in result.sweep.stl_test.items()]
  rows += [
    (f"{s.method} / {s.optimizer}", {key: s.mean_std(key)[0] for key in result.sweep.directions})
    for s in result.sweep.selections
    if s.learning_rate is not None
  ]
  delta_markdown, _ = optimizers.delta_m_table(result.sweep.selections)
  parts = [
    f"Methods {', '.join(options.methods)} at levels {', '.join(options.levels)}, and EW; "
    f"optimizers {', '.join(options.optimizers)}; lr grid "
    f"{', '.join(f'{rate:g}' for rate in options.lr_grid)} (refined by up to "
    f"{options.refine_budget} rates); seeds {', '.join(str(seed) for seed in options.seeds)}. "
    "Δm against the STL baselines of the optimizer study. Per-sample levels use the model's "
    f"{config.model.norm} norm. Differences are paired by seed (> 0: the row is better).",
    "**Findings: Δm (%) with intervals over seeds**\n\n" + "\n".join(delta_m_lines(result)),
    "**Pareto counts per level** (all runs at their chosen lr; EW counts as level task):\n\n"
    + "\n".join(markdown.pareto_findings(counts, spread, list(counts), "level")),
    "**Step cost** (one compiled train step on one batch, "
    f"median of {options.timing_repeats} interleaved rounds, this machine):\n\n"
    + cost_table(result.costs),
    "**Conflicts the probe saw** (one EW run):\n\n"
    + "\n".join(probe_lines(result.probe, result.settings)),
    markdown.trivial_section(
      rows,
      result.sweep.trivial,
      result.sweep.directions,
      float(config.findings.trivial_margin_percent),
    ),
    "### Δm (%) at the chosen lr",
    delta_markdown,
  ]
  return "\n\n".join(parts)
