"""The label-scarcity study: does sharing help a task whose labels become scarce?

One task of the scenes (config.label_scarcity.task) keeps its label on a fraction f of the
training examples (`config.dataset.label_fraction` on that task only, `data/labels.py`); the
other tasks keep all of theirs. For every f and seed, MTL runs of each method train all tasks,
and the STL baselines train each task alone: the scarce task at the same f, the others (fully
labelled, so independent of f) once per seed. Δm compares an MTL run with the STL runs of its
own seed (paired): over all tasks, and over the scarce task's metrics alone. A finding is the
interval over seeds of the scarce task's Δm: 'holds' when it lies below 0 (sharing helps the
scarce task), 'reversed' above 0, 'inconclusive' when it contains 0.

Runs resume: a finished run directory is read, not trained again.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mtl_jax import config_validation  # noqa: E402
from mtl_jax import metric_writers  # noqa: E402
from mtl_jax import metrics as metrics_lib  # noqa: E402
from mtl_jax import statistics  # noqa: E402
from mtl_jax.data import registry as data_registry  # noqa: E402
from mtl_jax.train import loop  # noqa: E402

STL = "stl"


@dataclasses.dataclass
class ScarcityResult:
  """Test metrics of every run and what the findings need.

  Attributes:
    task: the scarce task.
    fractions, methods, seeds: the grid.
    mtl: (method, fraction, seed) -> test metrics of the MTL run.
    stl: (task, fraction, seed) -> test metrics of that task's STL run (fraction 1.0 for the
      fully labelled tasks).
    directions: 'task/metric' -> higher is better, of all tasks.
    settings: how intervals are computed (config.findings).
  """

  task: str
  fractions: tuple[float, ...]
  methods: tuple[str, ...]
  seeds: tuple[int, ...]
  mtl: dict[tuple[str, float, int], dict[str, float]]
  stl: dict[tuple[str, float, int], dict[str, float]]
  directions: dict[str, bool]
  settings: statistics.Settings


def run_config(
  config: ml_collections.ConfigDict, tasks: Sequence[str], method: str, fraction: float, seed: int
) -> ml_collections.ConfigDict:
  """The training config of one run: `tasks`, `method` ('stl': EW on one task), the scarce
  task's label fraction."""
  run = copy.deepcopy(config)
  with run.unlocked():
    run.seed = int(seed)
    run.tasks = tuple(tasks)
    run.method.name = "ew" if method == STL else method  # one task: the plain loss
    scarce = config.label_scarcity.task
    run.dataset.label_fraction = float(fraction) if scarce in tasks else 1.0
    run.dataset.label_fraction_tasks = (scarce,) if scarce in tasks else ()
  return run


def _train(config, tasks, method, fraction, seed, workdir, dataset) -> dict[str, Any]:
  name = "-".join(tasks) if method == STL else method
  path = os.path.join(workdir, name, f"fraction_{fraction:g}", f"seed_{seed}")
  metric_writers.status(f"[label_scarcity] {name} fraction {fraction:g} seed {seed}")
  return loop.train_and_evaluate(run_config(config, tasks, method, fraction, seed), path, dataset)


def run_study(config: ml_collections.ConfigDict, workdir: str, dataset=None) -> ScarcityResult:
  """Trains (or reads) every run of the study in `workdir` and returns their test metrics."""
  options = config.label_scarcity
  dataset = dataset or data_registry.load_dataset(config.dataset)
  scarce, tasks = str(options.task), tuple(config.tasks)
  if scarce not in tasks:
    raise config_validation.ConfigError(
      f"config.label_scarcity.task: {scarce!r} is not one of config.tasks {tasks}."
    )
  fractions = tuple(float(value) for value in options.fractions)
  methods, seeds = tuple(options.methods), tuple(int(seed) for seed in options.seeds)
  mtl, stl, directions = {}, {}, {}
  for seed in seeds:
    for task in tasks:
      for fraction in fractions if task == scarce else (1.0,):
        results = _train(config, (task,), STL, fraction, seed, workdir, dataset)
        stl[task, fraction, seed] = results["test"]
        directions.update(results["directions"])
    for method in methods:
      for fraction in fractions:
        results = _train(config, tasks, method, fraction, seed, workdir, dataset)
        mtl[method, fraction, seed] = results["test"]
  settings = statistics.Settings.from_config(config.findings)
  return ScarcityResult(scarce, fractions, methods, seeds, mtl, stl, directions, settings)


def baseline(result: ScarcityResult, fraction: float, seed: int) -> dict[str, float]:
  """The STL metrics an MTL run of (fraction, seed) is compared with: every task's own run."""
  values = {}
  for (task, task_fraction, task_seed), metrics in result.stl.items():
    wanted = fraction if task == result.task else 1.0
    if task_seed == seed and task_fraction == wanted:
      values.update({key: value for key, value in metrics.items() if key in result.directions})
  return values


def delta_m(result: ScarcityResult, method: str, fraction: float, only_scarce: bool) -> list[float]:
  """Per seed: Δm (%) of the MTL run against its seed's STL runs, over all tasks or only the
  scarce task's metrics (lower is better)."""
  directions = result.directions
  if only_scarce:
    directions = {
      key: higher for key, higher in directions.items() if metrics_lib.task_of(key) == result.task
    }
  return [
    metrics_lib.delta_m(
      result.mtl[method, fraction, seed], baseline(result, fraction, seed), directions
    )
    for seed in result.seeds
  ]


def finding_lines(result: ScarcityResult) -> tuple[list[str], list[str]]:
  """One line per (method, fraction): the scarce task's Δm and all tasks' Δm with intervals and
  the verdict on 'sharing helps the scarce task' (Δm < 0); and the verdicts."""
  lines, verdicts = [], []
  for method in result.methods:
    for fraction in result.fractions:
      scarce = result.settings.interval(delta_m(result, method, fraction, True))
      overall = result.settings.interval(delta_m(result, method, fraction, False))
      lines.append(
        f"- {method}, {result.task} labels {fraction:g}: Δm of {result.task} "
        f"{statistics.described(scarce, expected_sign=-1)}; Δm of all tasks {overall.text()}."
      )
      verdicts.append(statistics.verdict(scarce, expected_sign=-1))
  return lines, verdicts


def figure(result: ScarcityResult, path: str) -> str:
  """The scarce task's Δm (mean and interval over seeds) against its label fraction, per
  method; writes a PNG and returns its path."""
  fig, axis = plt.subplots(figsize=(6, 4))
  for offset, method in enumerate(result.methods):
    found = [
      result.settings.interval(delta_m(result, method, fraction, True))
      for fraction in result.fractions
    ]
    estimates = np.array([interval.estimate for interval in found])
    errors = np.array(
      [[interval.estimate - interval.low, interval.high - interval.estimate] for interval in found]
    ).T
    positions = np.array(result.fractions) * (1.0 + 0.04 * (offset - 1))
    axis.errorbar(
      positions, estimates, yerr=np.nan_to_num(errors), marker="o", capsize=3, label=method
    )
  axis.axhline(0.0, color="black", linewidth=0.8)
  axis.set_xscale("log")
  axis.set_xlabel(f"fraction of training examples with a {result.task} label")
  axis.set_ylabel(f"Δm of {result.task} vs STL (%, lower is better)")
  axis.set_title("MTL vs STL as one task's labels become scarce")
  axis.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def report_markdown(result: ScarcityResult, figure_path: str | None = None) -> str:
  """The study's section: what ran, the findings with intervals and verdicts, the figure."""
  lines, verdicts = finding_lines(result)
  counts = {name: verdicts.count(name) for name in statistics.VERDICTS}
  parts = [
    f"The {result.task} labels of the training split are kept on a fraction "
    f"{', '.join(f'{value:g}' for value in result.fractions)} of the examples (the same examples "
    f"at every epoch; smaller fractions are subsets of larger ones); the other tasks keep all "
    f"labels. Methods {', '.join(result.methods)} against STL, seeds "
    f"{', '.join(str(seed) for seed in result.seeds)}; Δm is paired with the STL runs of the "
    f"same seed and fraction (< 0: MTL is better). Verdicts read the claim 'sharing helps "
    f"{result.task}' off the interval over seeds.",
    f"**Findings** ({counts['holds']} holds, {counts['reversed']} reversed, "
    f"{counts['inconclusive']} inconclusive):\n\n" + "\n".join(lines),
  ]
  if figure_path:
    parts.append(
      f"![Δm of {result.task} against its label fraction]({os.path.basename(figure_path)})"
    )
  return "\n\n".join(parts)


def summarise(result: ScarcityResult, workdir: str) -> tuple[str, str]:
  """Writes the figure and summary.md into `workdir`; returns (markdown, figure path)."""
  path = figure(result, os.path.join(workdir, "label_scarcity.png"))
  text = report_markdown(result, path)
  with open(os.path.join(workdir, "summary.md"), "w") as file:
    file.write("# MTL as labels become scarce\n\n" + text + "\n")
  return text, path


# How to run the study (outside the main job, for its budget): the main report quotes it.
COMMAND = (
  "python experiments/label_scarcity.py --config=configs/label_scarcity.py --workdir={workdir}"
)


def report_section(workdir: str) -> tuple[str, list[str]]:
  """The main job's report section on this study, which runs separately: the command, and the
  study's findings (intervals and verdicts) and figure when `workdir` holds its summary.

  Returns:
    (markdown, figure paths).
  """
  command = COMMAND.format(workdir=workdir)
  text = (
    "This study runs outside the main job (it would not fit the job's time budget):\n\n"
    f"```\n{command}\n```"
  )
  summary = os.path.join(workdir, "summary.md")
  if not os.path.isfile(summary):
    return f"{text}\n\nNo results yet: `{summary}` does not exist.", []
  with open(summary) as file:
    lines = file.read().splitlines()
  # The summary's own title and figure link (relative to its directory) are the report's to set.
  body = [line for line in lines if not line.startswith(("# ", "!["))]
  figure = os.path.join(workdir, "label_scarcity.png")
  figures = [os.path.abspath(figure)] if os.path.isfile(figure) else []
  return f"{text}\n\nResults from `{summary}`:\n\n" + "\n".join(body).strip(), figures
