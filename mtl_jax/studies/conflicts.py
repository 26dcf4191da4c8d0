"""The gradient-conflict study (SPEC section 4): train with the conflict probe, plot, and summarise.

`run_conflicts(config, workdir)` runs every setting in `config.conflicts.settings` ('dense':
the dense scenes tasks; 'attributes': the 12 scene attributes, a CelebA-like setting; 'config':
the config's own tasks). For each setting, `run_setting` trains one run per head architecture
named in `config.conflicts.architectures` (each overriding `config.model` with
`config.conflicts.heads[<architecture>]`) with the probe of `mtl_jax.conflicts` switched on,
then draws the per-epoch figures and writes `summary.md`, whose verdicts on the paper's findings
are computed from the measured numbers; the settings' summaries are joined in one summary.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from mtl_jax import config_validation
from mtl_jax import conflicts as conflicts_lib
from mtl_jax import metric_writers
from mtl_jax import statistics
from mtl_jax import train as train_lib
from mtl_jax.data import registry as data_registry

# Study settings: the tasks each one trains ('config' keeps the config's own tasks).
SETTINGS = {
  "dense": {"tasks": ("segmentation", "depth", "normals")},
  "attributes": {"tasks": ("attributes",)},
  "config": {},
}
SUMMARY_FILE = "summary.md"
RESULTS_FILE = "conflicts_study.json"
FIGURE_FILE = "conflicts.png"
AVERAGED_FIGURE_FILE = "conflicts_averaged.png"
PAIR_LABELS = {
  "inter_task": "inter-task",
  "inter_sample": "inter-sample",
  "inter_task_averaged": "inter-task (batch-mean task gradients)",
  "inter_sample_averaged": "inter-sample (all-task-average sample gradients)",
}
MEASURE_LABELS = {
  "cosine": "cosine similarity",
  "magnitude": "magnitude similarity",
  conflicts_lib.PARAMETER_RATIO: "conflicting-parameter ratio",
  "dot": "dot product",
}


def architecture_config(
  config: ml_collections.ConfigDict, architecture: str
) -> ml_collections.ConfigDict:
  """`config` with the model's head sizes taken from `config.conflicts.heads[architecture]`."""
  heads = config.conflicts.heads
  if architecture not in heads:
    raise ValueError(
      f"Unknown config.conflicts.architectures entry {architecture!r}; valid: "
      f"{', '.join(heads.keys())} (defined in config.conflicts.heads)."
    )
  return config_validation.with_overrides(
    config, **{f"model.{key}": value for key, value in heads[architecture].items()}
  )


# ------------------------------------------------------------------------------------- findings


def _series(
  records: Sequence[Mapping[str, Any]], pair_type: str, measure: str, statistic: str
) -> np.ndarray:
  return np.array(
    [
      record[pair_type][measure][statistic] if measure in record[pair_type] else np.nan
      for record in records
    ],
    np.float64,
  )


def _epoch_mean(records, pair_type, measure, statistic) -> float:
  values = _series(records, pair_type, measure, statistic)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float("nan")


def _epoch_interval(differences: np.ndarray, settings: statistics.Settings) -> statistics.Interval:
  """The interval over epochs of per-epoch differences (epochs without a value left out)."""
  return settings.interval(differences[np.isfinite(differences)])


def findings(
  runs: Mapping[str, Sequence[Mapping[str, Any]]], settings: statistics.Settings
) -> dict[str, Any]:
  """The paper's findings checked per architecture from per-epoch records.

  Args:
    runs: {architecture: conflicts.jsonl records, ordered by epoch}.

  Returns:
    {architecture: {'cosine_spread': ..., 'magnitude': ...}, 'heads': ... (when both
    'small_heads' and 'large_heads' ran)}. Spread is the 2.5-97.5 percentile band width of the
    cosine per epoch (std reported too); every comparison gives the epoch-averaged values,
    the verdict on those averages, and in how many epochs it held; 'interval' is the interval
    over epochs of the per-epoch difference (positive: the finding holds) and 'verdict' what it
    allows ('holds', 'reversed', 'inconclusive').
  """
  result: dict[str, Any] = {}
  for architecture, records in runs.items():
    if not records:
      continue
    widths = {
      pair: _series(records, pair, "cosine", "p97_5") - _series(records, pair, "cosine", "p2_5")
      for pair in conflicts_lib.ROW_PAIR_TYPES
    }
    magnitudes = {
      pair: _series(records, pair, "magnitude", "mean") for pair in conflicts_lib.ROW_PAIR_TYPES
    }
    spread_epochs = widths["inter_sample"] >= widths["inter_task"]
    magnitude_epochs = magnitudes["inter_task"] < magnitudes["inter_sample"]
    result[architecture] = {
      "epochs": len(records),
      "cosine_spread": {
        "inter_task_width": float(np.nanmean(widths["inter_task"])),
        "inter_sample_width": float(np.nanmean(widths["inter_sample"])),
        "inter_task_std": _epoch_mean(records, "inter_task", "cosine", "std"),
        "inter_sample_std": _epoch_mean(records, "inter_sample", "cosine", "std"),
        "epochs_holding": int(spread_epochs.sum()),
      },
      "magnitude": {
        "inter_task_mean": float(np.nanmean(magnitudes["inter_task"])),
        "inter_sample_mean": float(np.nanmean(magnitudes["inter_sample"])),
        "epochs_holding": int(magnitude_epochs.sum()),
      },
    }
    spread = result[architecture]["cosine_spread"]
    spread["holds"] = bool(spread["inter_sample_width"] >= spread["inter_task_width"])
    spread["interval"] = _epoch_interval(widths["inter_sample"] - widths["inter_task"], settings)
    magnitude = result[architecture]["magnitude"]
    magnitude["holds"] = bool(magnitude["inter_task_mean"] < magnitude["inter_sample_mean"])
    magnitude["interval"] = _epoch_interval(
      magnitudes["inter_sample"] - magnitudes["inter_task"], settings
    )
    for entry in (spread, magnitude):
      entry["verdict"] = statistics.verdict(entry["interval"])
  if "small_heads" in result and "large_heads" in result:
    heads = {}
    for pair in conflicts_lib.ROW_PAIR_TYPES:
      small = _epoch_mean(runs["small_heads"], pair, "cosine", "std")
      large = _epoch_mean(runs["large_heads"], pair, "cosine", "std")
      # Paired by epoch: the two architectures share the data order and the epoch count.
      small_series = _series(runs["small_heads"], pair, "cosine", "std")
      large_series = _series(runs["large_heads"], pair, "cosine", "std")
      epochs = min(small_series.size, large_series.size)
      interval = _epoch_interval(small_series[:epochs] - large_series[:epochs], settings)
      heads[pair] = {
        "small_heads_std": small,
        "large_heads_std": large,
        "holds": bool(large < small),
        "interval": interval,
        "verdict": statistics.verdict(interval),
      }
    result["heads"] = heads
  return result


# -------------------------------------------------------------------------------------- figures


def plot_conflicts(
  runs: Mapping[str, Sequence[Mapping[str, Any]]],
  path: str,
  title: str,
  pair_types: Sequence[str] = conflicts_lib.ROW_PAIR_TYPES,
  measures: Sequence[str] = ("cosine", "magnitude", conflicts_lib.PARAMETER_RATIO),
) -> str:
  """Per-epoch mean (line) and 2.5-97.5 percentile band per architecture; pair types side by side.

  Rows are measures (those with no data are left out), columns pair types, y shared per row.

  Returns:
    `path`.
  """
  import matplotlib  # noqa: PLC0415  (plotting is optional at import time)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

  present = [
    measure
    for measure in measures
    if any(
      measure in record.get(pair, {})
      for records in runs.values()
      for record in records
      for pair in pair_types
    )
  ]
  figure, axes = plt.subplots(
    len(present),
    len(pair_types),
    figsize=(4.2 * len(pair_types), 2.8 * len(present)),
    sharey="row",
    squeeze=False,
  )
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for row, measure in enumerate(present):
    for column, pair in enumerate(pair_types):
      axis = axes[row, column]
      for index, (architecture, records) in enumerate(runs.items()):
        if not records:
          continue
        epochs = [record["epoch"] for record in records]
        colour = colours[index % len(colours)]
        mean = _series(records, pair, measure, "mean")
        axis.plot(epochs, mean, marker="o", markersize=3, color=colour, label=architecture)
        axis.fill_between(
          epochs,
          _series(records, pair, measure, "p2_5"),
          _series(records, pair, measure, "p97_5"),
          color=colour,
          alpha=0.2,
          linewidth=0,
        )
      if measure == "cosine":
        axis.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
      if row == 0:
        axis.set_title(PAIR_LABELS[pair], fontsize=10)
      if column == 0:
        axis.set_ylabel(MEASURE_LABELS[measure], fontsize=9)
      if row == len(present) - 1:
        axis.set_xlabel("epoch")
      axis.xaxis.set_major_locator(MaxNLocator(integer=True))
      axis.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=8, loc="best")
  figure.suptitle(f"{title}: per-epoch mean, band = 2.5-97.5 percentiles over pairs", fontsize=10)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path


# -------------------------------------------------------------------------------------- summary


def per_sample_definition(config: ml_collections.ConfigDict) -> str:
  """Which per-sample gradient the run's Gramian holds, in words (SPEC asks to state it)."""
  norm = config.model.norm
  if norm != "batch":
    return (
      f"The encoder uses {norm} normalisation, so samples are independent: g_(i,t) is the exact "
      "gradient of the single-sample loss L_t(x_i) w.r.t. the shared encoder parameters."
    )
  mode = config.conflicts.batch_norm
  if mode == "eval":
    return (
      "The encoder uses batch normalisation; per-sample gradients are those of the model in "
      "evaluation mode (running statistics), where samples are independent."
    )
  if mode == "batch_statistics":
    return (
      "The encoder uses batch normalisation in training mode; g_(i,t) is row (i, t) of the "
      "Jacobian of the [B, T] loss matrix of the probed subsample (its batch statistics), "
      "including the dependence of the statistics on every sample; it is not a single-sample "
      "model's gradient."
    )
  return "Batch normalisation with batch_norm='error': the probe refuses to run."


def _format(value: float, digits: int = 3) -> str:
  return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _table(records: Sequence[Mapping[str, Any]]) -> list[str]:
  lines = [
    "| pairs | cos mean | cos std | cos p2.5 | cos p97.5 | conflict rate | cos>=0 mean "
    "| cos<0 mean | mag mean | mag std | dot mean | param. ratio | pairs/epoch | excluded |",
    "|---|" + "---:|" * 13,
  ]
  for pair in conflicts_lib.PAIR_TYPES:

    def mean(measure, statistic, pair=pair):
      return _format(_epoch_mean(records, pair, measure, statistic))

    pairs = np.mean([record[pair]["pairs"] for record in records])
    excluded = sum(record[pair]["excluded_zero_norm"] for record in records)
    lines.append(
      f"| {PAIR_LABELS[pair]} | {mean('cosine', 'mean')} | {mean('cosine', 'std')} | "
      f"{mean('cosine', 'p2_5')} | {mean('cosine', 'p97_5')} | {mean('cosine', 'conflict_rate')} | "
      f"{mean('cosine', 'positive_mean')} | {mean('cosine', 'negative_mean')} | "
      f"{mean('magnitude', 'mean')} | {mean('magnitude', 'std')} | "
      f"{_format(_epoch_mean(records, pair, 'dot', 'mean'), 4)} | "
      f"{mean(conflicts_lib.PARAMETER_RATIO, 'mean')} | {pairs:.0f} | {excluded} |"
    )
  return lines


def _verdict(entry: Mapping[str, Any], epochs: int | None = None) -> str:
  """The verdict from the interval over epochs, with the per-epoch difference's interval and
  the count of epochs in which the finding held."""
  held = f"; held in {entry['epochs_holding']}/{epochs} epochs" if epochs else ""
  return f"{statistics.described(entry['interval'], digits=3)}{held}"


def summary_markdown(
  config: ml_collections.ConfigDict,
  runs: Mapping[str, Sequence[Mapping[str, Any]]],
  found: Mapping[str, Any],
  figures: Sequence[str],
  title: str,
  level: int = 2,
  figure_folder: str | None = "",
) -> str:
  """The markdown summary of one setting: what was measured, tables, and the findings' verdicts.

  Args:
    config, runs, found, figures, title: the setting's config, records, `findings`, figure
      paths and name.
    level: the heading level of the setting's title (subsections one deeper).
    figure_folder: figure links are `<figure_folder>/<file name>` ('' = beside the summary);
      None leaves them out (a report that places the figures itself).
  """
  heading, subheading = "#" * level, "#" * (level + 1)
  options = config.conflicts
  first = next((records[0] for records in runs.values() if records), None)
  tasks = first["tasks"] if first else list(config.tasks)
  lines = [
    f"{heading} Gradient conflicts: {title}",
    "",
    f"Dataset `{config.dataset.name}` ({config.dataset.height}x{config.dataset.width}, "
    f"{config.dataset.num_train} training images), tasks {', '.join(config.tasks)}; encoder "
    f"`{config.model.encoder}` (norm `{config.model.norm}`), method {config.method.name} with "
    f"{config.optimizer.name} (lr {config.optimizer.learning_rate:g}), batch "
    f"{config.training.batch_size}, {config.training.num_epochs} epochs, seed {config.seed}.",
    "",
    f"Probe: every {options.probe_every_steps} steps, on the batch about to be trained on, before "
    f"the update; {options.max_samples or 'all'} random samples of the batch and the tasks "
    f"{', '.join(tasks)} (at most {options.max_tasks or 'all'}, a fixed random subset per run); "
    f"Gramian path `{options.path}`. Gradients are those of the shared encoder parameters only. "
    + per_sample_definition(config)
    + " Statistics pool all pairs of all probes of an epoch; the tables average the per-epoch "
    "statistics over epochs. Pairs with a zero-norm gradient (squared norm <= "
    f"{options.zero_tolerance:g} x the largest) are excluded from cosine and magnitude and "
    "counted; the conflicting-parameter ratio ignores coordinates where either gradient is zero "
    f"(|g_p| <= {options.sign_tolerance:g} x its largest coordinate; exactly-zero gradients such "
    "as a bias before a normalisation otherwise carry rounding noise of random sign).",
    "",
  ]
  for architecture, records in runs.items():
    heads = (
      dict(config.conflicts.heads[architecture]) if architecture in config.conflicts.heads else {}
    )
    lines += [
      f"{subheading} {architecture} ({', '.join(f'{k}={v}' for k, v in heads.items())})",
      "",
    ]
    if not records:
      lines += ["No probe records (was probe_every_steps > 0 and at least one epoch trained?).", ""]
      continue
    lines += _table(records) + [""]
  lines += [f"{subheading} Findings (from the numbers above)", ""]
  lines += _finding_lines(runs, found)
  if figure_folder is not None:
    lines += [""] + [
      f"![{os.path.basename(path)}]({os.path.join(figure_folder, os.path.basename(path))})"
      for path in figures
    ]
  lines.append("")
  return "\n".join(lines)


def _finding_lines(runs, found) -> list[str]:
  """One line per finding of `findings`, with its verdict and the numbers behind it."""
  lines = []
  for architecture in runs:
    if architecture not in found:
      continue
    spread, magnitude = found[architecture]["cosine_spread"], found[architecture]["magnitude"]
    epochs = found[architecture]["epochs"]
    lines.append(
      f"- {architecture}: inter-sample cosine spread > inter-task spread; per-epoch difference "
      f"of the 2.5-97.5 band widths (inter-sample − inter-task) {_verdict(spread, epochs)} "
      f"(widths {_format(spread['inter_sample_width'])} vs "
      f"{_format(spread['inter_task_width'])}; std {_format(spread['inter_sample_std'])} vs "
      f"{_format(spread['inter_task_std'])})."
    )
    lines.append(
      f"- {architecture}: inter-task magnitude similarity < inter-sample; per-epoch difference "
      f"(inter-sample − inter-task) {_verdict(magnitude, epochs)} (means "
      f"{_format(magnitude['inter_task_mean'])} vs {_format(magnitude['inter_sample_mean'])})."
    )
  if "heads" in found:
    for pair, entry in found["heads"].items():
      lines.append(
        f"- Larger heads shrink the {PAIR_LABELS[pair]} cosine spread; per-epoch difference of "
        f"the cosine std (small − large heads) {_verdict(entry)} (std "
        f"{_format(entry['large_heads_std'])} with large heads vs "
        f"{_format(entry['small_heads_std'])} with small heads)."
      )
  return lines


# ---------------------------------------------------------------------------------------- study


def setting_config(config: ml_collections.ConfigDict, setting: str) -> ml_collections.ConfigDict:
  """`config` with the tasks of a study setting (see SETTINGS) and the probe switched on.

  The study's runs probe every `config.conflicts.study_probe_every_steps` steps (ordinary runs
  keep `config.conflicts.probe_every_steps`, 0 = off, so one config can serve every study).
  """
  if setting not in SETTINGS:
    raise ValueError(
      f"Unknown config.conflicts.settings entry {setting!r}; valid: {', '.join(SETTINGS)}."
    )
  every = int(config.conflicts.study_probe_every_steps)
  if every <= 0:
    raise config_validation.ConfigError(
      f"config.conflicts.study_probe_every_steps: must be a positive integer, got {every}."
    )
  overrides = dict(SETTINGS[setting])
  overrides["conflicts.probe_every_steps"] = every
  # [choice] The study needs no per-epoch model selection: evaluate (and checkpoint) once, at the
  # end.
  overrides["training.eval_every_epochs"] = int(config.training.num_epochs)
  return config_validation.with_overrides(config, **overrides)


def run_setting(
  config: ml_collections.ConfigDict,
  workdir: str,
  dataset: data_registry.Dataset | None = None,
  title: str | None = None,
) -> dict[str, Any]:
  """One setting: trains each architecture with the probe, then writes figures, summary.md and JSON.

  Finished runs in `workdir/<architecture>` are reused (training resumes or re-reads results).

  Args:
    config: a config with the probe on (config.conflicts.probe_every_steps > 0), e.g. from
      `setting_config`.
    workdir: the setting's directory.
    dataset: an already loaded dataset to reuse.
    title: the setting's name in the summary (default: dataset and tasks).

  Returns:
    {'summary': markdown, 'figures': [paths], 'findings': ..., 'runs': {architecture: run dir},
    'records': {architecture: per-epoch records}, 'title': title}.
  """
  if int(config.conflicts.probe_every_steps) <= 0:
    raise ValueError(
      "config.conflicts.probe_every_steps must be positive for the conflict study "
      f"(got {config.conflicts.probe_every_steps})."
    )
  architectures = list(config.conflicts.architectures)
  if not architectures:
    raise ValueError(
      "config.conflicts.architectures is empty; name at least one of "
      f"{', '.join(config.conflicts.heads.keys())}."
    )
  configs = {
    architecture: architecture_config(config, architecture) for architecture in architectures
  }
  title = title or f"{config.dataset.name} ({', '.join(config.tasks)})"
  if dataset is None:
    dataset = data_registry.load_dataset(config.dataset)
  run_dirs, runs = {}, {}
  for architecture, run_config in configs.items():
    run_dirs[architecture] = os.path.join(workdir, architecture)
    metric_writers.status(
      f"Conflict study {title}: training {architecture} in {run_dirs[architecture]}"
    )
    train_lib.train_and_evaluate(run_config, run_dirs[architecture], dataset)
    runs[architecture] = conflicts_lib.read_records(run_dirs[architecture])
  figures = [
    plot_conflicts(runs, os.path.join(workdir, FIGURE_FILE), title),
    plot_conflicts(
      runs,
      os.path.join(workdir, AVERAGED_FIGURE_FILE),
      f"{title}, averaged gradients",
      pair_types=("inter_task_averaged", "inter_sample_averaged"),
      measures=("cosine", "magnitude"),
    ),
  ]
  found = findings(runs, statistics.Settings.from_config(config.findings))
  summary = summary_markdown(config, runs, found, figures, title)
  results = {
    "summary": summary,
    "figures": figures,
    "findings": found,
    "runs": run_dirs,
    "records": runs,
    "title": title,
    "config": config,
  }
  _write(workdir, results)
  return results


def run_conflicts(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The whole study: every setting in `config.conflicts.settings` in `workdir/<setting>`, one
  summary.

  Each setting takes `config` (dataset, model, training sizes) with its own tasks; a probe
  interval of 0 (the training default, probe off) means the paper's 5 here. Used by
  experiments/conflicts.py and by the reproduce job.

  Args:
    config: any experiment config (configs/conflicts*.py, configs/reproduce.py, ...).
    workdir: the study directory.

  Returns:
    {'markdown' (= 'summary'): the joint summary, also in workdir/summary.md, 'figures': [paths],
    'title', 'settings': {setting: `run_setting` result}}.
  """
  config_validation.validate_config(config)
  names = list(config.conflicts.settings)
  if not names:
    raise ValueError(
      f"config.conflicts.settings is empty; name at least one of {', '.join(SETTINGS)}."
    )
  configs = {name: setting_config(config, name) for name in names}
  settings, datasets = {}, {}
  for name, setting in configs.items():
    # Settings on the same data share one loaded (rendered) dataset.
    key = json.dumps(setting.dataset.to_dict(), sort_keys=True, default=str)
    if key not in datasets:
      datasets[key] = data_registry.load_dataset(setting.dataset)
    settings[name] = run_setting(setting, os.path.join(workdir, name), datasets[key], title=name)

  def render(level, linked):
    return "\n".join(
      summary_markdown(
        result["config"],
        result["records"],
        result["findings"],
        result["figures"],
        name,
        level,
        name if linked else None,
      )
      for name, result in settings.items()
    )

  summary = "# Gradient conflicts: inter-task vs inter-sample (SPEC section 4)\n\n" + render(
    2, True
  )
  figures = [path for result in settings.values() for path in result["figures"]]
  # 'markdown' is for a report that nests it under its own section heading and places the figures.
  results = {
    "summary": summary,
    "markdown": render(3, False),
    "figures": figures,
    "settings": settings,
    "title": "Gradient conflicts: inter-task vs inter-sample",
  }
  _write(workdir, results)
  return results


def _write(workdir: str, results: Mapping[str, Any]) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, SUMMARY_FILE), "w") as file:
    file.write(results["summary"])
  with open(os.path.join(workdir, RESULTS_FILE), "w") as file:
    json.dump(conflicts_lib.json_safe(_without_configs(results)), file, indent=1)


def _without_configs(value: Any) -> Any:
  """A results dict with ConfigDicts dropped (each run directory has its config.json) and
  intervals as dicts."""
  if isinstance(value, statistics.Interval):
    return dataclasses.asdict(value)
  if isinstance(value, Mapping) and not isinstance(value, ml_collections.ConfigDict):
    return {
      key: _without_configs(item)
      for key, item in value.items()
      if not isinstance(item, ml_collections.ConfigDict)
    }
  return value
