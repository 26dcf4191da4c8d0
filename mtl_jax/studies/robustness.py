"""Feature robustness under corruption (SPEC section 5): the δ metric, head fine-tuning, linear
probes.

The study, `run_robustness(config, workdir)`:
1. restores the best checkpoints of MTL and STL runs (or trains them first);
2. freezes each encoder (parameters and batch-norm statistics: it runs in eval mode) and
   fine-tunes only the heads on corrupted training data, every sample with its own random
   corruption and severity; all runs see exactly the same corrupted batches;
3. evaluates every fine-tuned model on the clean test set and on each corrupted copy of it
   (corruption × severity; each copy is made once and shared by all runs);
4. computes δ_t per task and the mean δ per MTL method against the STL models (`corruption_delta`);
5. fits a linear probe on frozen encoder features for a task no run was trained on.
It writes robustness.json, robustness.md and robustness_per_corruption.png to the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import config_validation
from mtl_jax import metric_writers
from mtl_jax import statistics
from mtl_jax import tasks as tasks_lib
from mtl_jax import train as train_lib
from mtl_jax.models import apply as apply_lib
from mtl_jax.data import corruptions as corruptions_lib
from mtl_jax.data import pipeline
from mtl_jax.data import registry as data_registry
from mtl_jax.report import markdown
from mtl_jax.train import evaluation

RESULTS_FILE = "robustness.json"
REPORT_FILE = "robustness.md"
FIGURE_FILE = "robustness_per_corruption.png"
CONFIG_FILE = "config.json"


# ------------------------------------------------------------------------------------- the δ metric


def condition_key(corruption: str, severity: int) -> str:
  """The key of one corrupted test set in result dicts: 'corruption/severity'."""
  return f"{corruption}/{int(severity)}"


def corruption_delta(
  mtl_clean: Mapping[str, float],
  mtl_corrupted: Mapping[str, Mapping[str, float]],
  stl_clean: Mapping[str, float],
  stl_corrupted: Mapping[str, Mapping[str, float]],
  directions: Mapping[str, bool],
) -> dict[str, Any]:
  """δ of SPEC section 5: how much more an MTL model degrades under corruption than STL models.

  Per metric k of task t, δ_k = mean over corrupted test sets (c, s) of
  (−1)^{p} [M^MTL_{c,s} / M^MTL_clean − M^STL_{c,s} / M^STL_clean], with p = 1 when higher is
  better; δ < 0 means the MTL model keeps more of its clean performance. A task with several
  metrics gets the mean of its metrics' δ (our reading: SPEC defines δ per metric value M_t), and
  `mean` is the mean over tasks.

  Args:
    mtl_clean: 'task/metric' -> value of the MTL model on the clean test set.
    mtl_corrupted: corrupted-set key (e.g. 'fog/3') -> 'task/metric' -> value, MTL model.
    stl_clean: the same as mtl_clean, for the STL models (merged over tasks).
    stl_corrupted: the same as mtl_corrupted, for the STL models; same corrupted-set keys.
    directions: 'task/metric' -> True if higher is better; exactly these metrics are used.

  Returns:
    {'per_metric': {key: δ}, 'per_task': {task: δ}, 'mean': float,
     'per_condition': {corrupted-set key: {key: signed relative difference}}}.

  Raises:
    ValueError: different corrupted sets for MTL and STL, a metric missing, or a clean value 0.
  """
  if set(mtl_corrupted) != set(stl_corrupted):
    raise ValueError(
      f"MTL and STL were evaluated on different corrupted sets: "
      f"only MTL {sorted(set(mtl_corrupted) - set(stl_corrupted))}, "
      f"only STL {sorted(set(stl_corrupted) - set(mtl_corrupted))}."
    )
  if not mtl_corrupted:
    raise ValueError("No corrupted test sets to compute δ over.")
  for label, clean, corrupted in (
    ("MTL", mtl_clean, mtl_corrupted),
    ("STL", stl_clean, stl_corrupted),
  ):
    missing = [key for key in directions if key not in clean]
    missing += sorted(
      {key for values in corrupted.values() for key in directions if key not in values}
    )
    if missing:
      raise ValueError(f"{label} results lack metric(s) {sorted(set(missing))} needed for δ.")
    zero = [key for key in directions if float(clean[key]) == 0.0]
    if zero:
      raise ValueError(f"{label} clean value is 0 for {zero}: relative degradation is undefined.")
  per_condition: dict[str, dict[str, float]] = {}
  for condition in sorted(mtl_corrupted):
    per_condition[condition] = {}
    for key, higher_is_better in directions.items():
      sign = -1.0 if higher_is_better else 1.0
      mtl_ratio = float(mtl_corrupted[condition][key]) / float(mtl_clean[key])
      stl_ratio = float(stl_corrupted[condition][key]) / float(stl_clean[key])
      per_condition[condition][key] = sign * (mtl_ratio - stl_ratio)
  per_metric = {
    key: float(np.mean([values[key] for values in per_condition.values()])) for key in directions
  }
  by_task: dict[str, list[float]] = {}
  for key, value in per_metric.items():
    by_task.setdefault(key.rpartition("/")[0] or key, []).append(value)
  per_task = {task: float(np.mean(values)) for task, values in by_task.items()}
  return {
    "per_metric": per_metric,
    "per_task": per_task,
    "mean": float(np.mean(list(per_task.values()))),
    "per_condition": per_condition,
  }


# ----------------------------------------------------------------------------------- restoring runs


@dataclasses.dataclass
class Run:
  """A restored run: where it came from, its rebuilt experiment and its best parameters."""

  name: str  # 'mtl_<method>' or 'stl_<task>'
  path: str
  config: ml_collections.ConfigDict
  experiment: train_lib.Experiment
  params: Any
  batch_stats: Any

  @property
  def task_names(self) -> list[str]:
    return self.experiment.task_names


def _differences(left: Any, right: Any, prefix: str = "") -> list[str]:
  """Dotted keys where two JSON-like trees differ (tuples and lists compare equal)."""
  if isinstance(left, Mapping) and isinstance(right, Mapping):
    keys = sorted(set(left) | set(right))
    return [
      difference
      for key in keys
      for difference in _differences(left.get(key), right.get(key), f"{prefix}{key}.")
    ]

  def normalise(value):
    return json.loads(json.dumps(value, default=str))

  return [] if normalise(left) == normalise(right) else [prefix.rstrip(".")]


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
  """The config a training run wrote (run_dir/config.json); clear errors when it is missing."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(
      f"Run directory {run_dir!r} does not exist (expected an experiments/train.py workdir)."
    )
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"Run directory {run_dir!r} has no {CONFIG_FILE}; is it an experiments/train.py workdir?"
    )
  with open(path) as file:
    return ml_collections.ConfigDict(json.load(file))


def check_run_config(
  run_dir: str,
  run_config: ml_collections.ConfigDict,
  study_config: ml_collections.ConfigDict,
  kind: str,
) -> None:
  """Raises a ValueError naming the run and every mismatched key when a run does not fit the study.

  The dataset settings must equal the study's; an 'mtl' run must have exactly the study's tasks
  and an 'stl' run exactly one of them.
  """
  problems = [
    f"dataset.{key}: run has {run_config.dataset.get(key)!r}, config has "
    f"{study_config.dataset.get(key)!r}"
    for key in _differences(run_config.dataset.to_dict(), study_config.dataset.to_dict())
  ]
  run_tasks, study_tasks = list(run_config.tasks), list(study_config.tasks)
  if kind == "mtl" and sorted(run_tasks) != sorted(study_tasks):
    problems.append(f"tasks: run has {run_tasks}, config has {study_tasks}")
  if kind == "stl" and (len(run_tasks) != 1 or run_tasks[0] not in study_tasks):
    problems.append(f"tasks: an STL run needs exactly one of {study_tasks}, run has {run_tasks}")
  if problems:
    raise ValueError(
      f"{kind.upper()} run {run_dir!r} does not match the robustness config:\n  "
      + "\n  ".join(problems)
    )


def restore_run(run_dir: str, dataset: data_registry.Dataset, name: str | None = None) -> Run:
  """Restores the best checkpoint of a run, rebuilt from the run's own config.json.

  Raises:
    FileNotFoundError: the directory, its config.json or its best checkpoint is missing.
    ValueError: config.json does not match the checkpoint (naming the mismatched keys).
  """
  run_config = load_run_config(run_dir)
  best_dir = os.path.join(run_dir, checkpoint_lib.BEST)
  if not os.path.isdir(best_dir) or not os.listdir(best_dir):
    raise FileNotFoundError(
      f"Run {run_dir!r} has no best checkpoint ({best_dir} is missing or empty); "
      "train it to completion with experiments/train.py first."
    )
  fingerprint = train_lib.config_fingerprint(run_config)
  results_path = os.path.join(run_dir, train_lib.RESULTS_FILE)
  if os.path.isfile(results_path):
    with open(results_path) as file:
      recorded = json.load(file).get("fingerprint")
    mismatched = _differences(recorded, fingerprint) if recorded is not None else []
    if mismatched:
      raise ValueError(
        f"{os.path.join(run_dir, CONFIG_FILE)} does not match the run's checkpoint "
        f"(recorded in {results_path}); mismatched keys: {', '.join(mismatched)}."
      )
  experiment = train_lib.build_experiment(run_config, dataset)
  target = train_lib.init_state(experiment, int(run_config.seed))
  checkpointer = checkpoint_lib.Checkpointer(run_dir, asynchronous=False)
  try:
    restored = checkpointer.restore(target, best=True)
  except Exception as error:  # Orbax raises many types for structure or shape mismatches.
    raise ValueError(
      f"The best checkpoint in {best_dir} does not fit the model built from "
      f"{os.path.join(run_dir, CONFIG_FILE)}: {error}"
    ) from error
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"Run {run_dir!r} has no restorable best checkpoint in {best_dir}.")
  state, progress = restored
  mismatched = _differences(progress.get("fingerprint"), fingerprint)
  if mismatched:
    raise ValueError(
      f"The best checkpoint in {best_dir} was written by a different config than "
      f"{os.path.join(run_dir, CONFIG_FILE)}; mismatched keys: {', '.join(mismatched)}."
    )
  if name is None:
    tasks = list(run_config.tasks)
    name = f"stl_{tasks[0]}" if len(tasks) == 1 else f"mtl_{run_config.method.name}"
  return Run(name, run_dir, run_config, experiment, state.params, state.batch_stats)


# ----------------------------------------------------------------------- fine-tuning and evaluation


def make_head_step(model, tasks: Sequence[tasks_lib.Task], optimizer: optax.GradientTransformation):
  """Returns the pure step
  `(heads, opt_state, encoder, batch_stats, batch) -> (heads, opt_state, losses)`.

  Only `heads` is differentiated; the encoder runs in eval mode, so neither its parameters nor
  its batch-norm statistics change. The loss is the unweighted sum of task losses: with the
  encoder frozen each head only sees its own loss, and [choice] we fine-tune every head with
  the same plain objective whatever weighting the run was trained with.
  """

  def loss_fn(heads, encoder, batch_stats, batch):
    predictions, _ = apply_lib.predict(
      model, {"encoder": encoder, "heads": heads}, batch_stats, batch["image"], train=False
    )
    losses = jnp.mean(tasks_lib.losses_matrix(tasks, predictions, batch), axis=0)
    return jnp.sum(losses), losses

  def step(heads, opt_state, encoder, batch_stats, batch):
    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      heads, encoder, batch_stats, batch
    )
    updates, opt_state = optimizer.update(grads, opt_state, heads)
    return optax.apply_updates(heads, updates), opt_state, losses

  return step


def finetune_heads(
  runs: Sequence[Run],
  dataset: data_registry.Dataset,
  settings: ml_collections.ConfigDict,
  names: Sequence[str],
  severities: Sequence[int],
  seed: int,
) -> dict[str, list[float]]:
  """Fine-tunes the heads of every run on the same randomly corrupted training batches, in place.

  Returns:
    run name -> mean training loss (summed over tasks) per epoch.
  """
  source = dataset.splits["train"]
  batch_size = int(runs[0].config.training.batch_size)
  per_epoch = pipeline.steps_per_epoch(len(source), batch_size)
  total = int(settings.finetune_epochs) * per_epoch
  optimizer = optax.adam(float(settings.finetune_learning_rate))
  steps = {
    run.name: jax.jit(make_head_step(run.experiment.model, run.experiment.tasks, optimizer))
    for run in runs
  }
  opt_states = {run.name: optimizer.init(run.params["heads"]) for run in runs}
  history: dict[str, list[float]] = {run.name: [] for run in runs}
  sums = {run.name: 0.0 for run in runs}
  report = metric_writers.ProgressReport(total, 0, "[robustness fine-tune] ")
  for step, batch in pipeline.train_batches(source, batch_size, seed, 0, total, dataset.augment):
    # One corruption draw per batch, shared by all runs: a paired comparison.
    images, _, _ = corruptions_lib.corrupt_batch_randomly(
      batch["image"], (seed, step), names, severities
    )
    batch = dict(batch, image=images)
    for run in runs:
      heads, opt_states[run.name], losses = steps[run.name](
        run.params["heads"], opt_states[run.name], run.params["encoder"], run.batch_stats, batch
      )
      run.params = dict(run.params, heads=heads)
      sums[run.name] += float(jnp.sum(losses))
    if (step + 1) % per_epoch == 0:
      for name in sums:
        history[name].append(sums[name] / per_epoch)
        sums[name] = 0.0
      losses_text = ", ".join(f"{name} {values[-1]:.4f}" for name, values in history.items())
      metric_writers.status(report.line(step + 1, report(step + 1)) + f"  loss {losses_text}")
  return history


class ArrayEvaluator:
  """Evaluates a run's (params, batch_stats) on in-memory arrays: flat 'task/metric' values."""

  def __init__(self, run: Run):
    self.run = run
    self._eval_step = jax.jit(train_lib.make_eval_step(run.experiment.model, run.experiment.tasks))

  def __call__(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    batch_size = int(self.run.config.training.eval_batch_size)
    totals = None
    for batch, mask in pipeline.eval_batches(pipeline.ArraySource(arrays), batch_size):
      statistics = jax.device_get(
        self._eval_step(self.run.params, self.run.batch_stats, batch, mask)
      )
      totals = statistics if totals is None else jax.tree_util.tree_map(np.add, totals, statistics)
    totals.pop("_count")
    return tasks_lib.compute_metrics(
      self.run.experiment.tasks,
      {
        name: {key: value for key, value in stats.items() if key != "loss_sum"}
        for name, stats in totals.items()
      },
    )


def corruption_conditions(names: Sequence[str], severities: Sequence[int]) -> list[tuple[str, int]]:
  """Every (corruption, severity) pair, corruptions in the standard order."""
  return [(name, int(severity)) for name in names for severity in severities]


def evaluate_under_corruption(
  runs: Sequence[Run], test: Mapping[str, np.ndarray], conditions, seed: int
) -> dict[str, dict[str, Any]]:
  """Clean and corrupted test metrics of every run; each corrupted test set is made once.

  Returns:
    run name -> {'clean': metrics, 'corrupted': {'corruption/severity': metrics}}.
  """
  evaluators = {run.name: ArrayEvaluator(run) for run in runs}
  results = {run.name: {"clean": evaluators[run.name](test), "corrupted": {}} for run in runs}
  start = time.perf_counter()
  for index, (name, severity) in enumerate(conditions):
    # The seed depends on the corruption's place in the full list, not in the configured
    # subset, so a corrupted test set is the same whichever other corruptions are evaluated.
    rng = (seed, corruptions_lib.CORRUPTIONS.index(name), severity, 1)
    corrupted = dict(test, image=corruptions_lib.corrupt(test["image"], name, severity, rng))
    for run in runs:
      results[run.name]["corrupted"][condition_key(name, severity)] = evaluators[run.name](
        corrupted
      )
    elapsed = time.perf_counter() - start
    remaining = elapsed / (index + 1) * (len(conditions) - index - 1)
    metric_writers.status(
      f"[robustness eval] {index + 1}/{len(conditions)} {name} severity {severity}"
      f"  ETA {metric_writers.format_duration(remaining)}"
    )
  return results


# ------------------------------------------------------------------------------------- linear probe


@functools.lru_cache(maxsize=None)
def _features_function(encoder):
  """A jitted (encoder params, encoder batch stats, images) -> pooled features, one per encoder."""

  def features(params, batch_stats, images):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    output = encoder.apply(variables, images, train=False)
    return jnp.mean(output, axis=(1, 2)) if output.ndim == 4 else output

  return jax.jit(features)


def encoder_features(run: Run, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Frozen encoder features (eval mode), global-average-pooled when per-pixel: [N, D]."""
  # Applying the encoder alone lets runs with the same encoder share one compiled function.
  features = _features_function(run.experiment.model.encoder)
  batch_stats = run.batch_stats.get("encoder", {}) if run.batch_stats else {}
  chunks = []
  for batch, mask in pipeline.eval_batches(pipeline.ArraySource({"image": images}), batch_size):
    chunks.append(np.asarray(features(run.params["encoder"], batch_stats, batch["image"]))[mask])
  return np.concatenate(chunks)


@functools.lru_cache(maxsize=None)
def _probe_step(task: tasks_lib.Task, learning_rate: float):
  """The jitted full-batch Adam step of a linear probe, shared by all encoders."""
  optimizer = optax.adam(learning_rate)

  def loss_fn(params, features, batch):
    return jnp.mean(task.loss(features @ params["kernel"] + params["bias"], batch))

  def step(params, opt_state, features, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, features, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, jax.jit(step)


def linear_probe(
  task: tasks_lib.Task,
  train_features: np.ndarray,
  train_batch: Mapping[str, np.ndarray],
  test_features: np.ndarray,
  test_batch: Mapping[str, np.ndarray],
  steps: int,
  learning_rate: float,
  seed: int = 0,
) -> dict[str, float]:
  """Fits a linear head for a global task on fixed features (full-batch Adam); returns test metrics.

  Features are standardised with the training mean and standard deviation first, so one
  learning rate suits every encoder.

  Args:
    task: a per-image task (its loss and metrics are used as they are).
    train_features, test_features: [N, D] features.
    train_batch, test_batch: the target arrays the task reads (e.g. {'attributes': [N, A]}).
    steps: full-batch optimisation steps.
    learning_rate: Adam's learning rate.
    seed: initialisation seed.

  Returns:
    The task's test metrics ('task/metric'), plus 'task/train_loss'.
  """
  if task.dense:
    raise ValueError(f"The linear probe needs a per-image task; {task.name!r} is per-pixel.")
  mean = train_features.mean(axis=0)
  scale = train_features.std(axis=0) + 1e-6
  train_x = jnp.asarray((train_features - mean) / scale)
  test_x = jnp.asarray((test_features - mean) / scale)
  params = {
    "kernel": jax.random.normal(jax.random.PRNGKey(seed), (train_x.shape[1], task.output_channels))
    * 0.01,
    "bias": jnp.zeros((task.output_channels,)),
  }
  optimizer, step = _probe_step(task, float(learning_rate))
  opt_state = optimizer.init(params)
  train_batch = {key: jnp.asarray(value) for key, value in train_batch.items()}
  loss = jnp.nan
  for _ in range(int(steps)):
    params, opt_state, loss = step(params, opt_state, train_x, train_batch)
  prediction = test_x @ params["kernel"] + params["bias"]
  statistics = jax.device_get(task.metric_statistics(prediction, test_batch))
  metrics = {f"{task.name}/{key}": value for key, value in task.metrics(statistics).items()}
  metrics[f"{task.name}/train_loss"] = float(loss)
  return metrics


def run_probes(
  runs: Sequence[Run],
  dataset: data_registry.Dataset,
  settings: ml_collections.ConfigDict,
  seed: int,
) -> dict[str, Any]:
  """Linear-probe test metrics of every run's (original, frozen) encoder on settings.probe_task."""
  probe_task_name = settings.probe_task
  if probe_task_name not in dataset.tasks:
    raise ValueError(
      f"robustness.probe_task {probe_task_name!r} is not a task of {dataset.name!r}; valid tasks: "
      f"{dataset.valid_task_names()}."
    )
  trained_on = sorted({name for run in runs for name in run.task_names})
  if probe_task_name in trained_on:
    raise ValueError(
      f"robustness.probe_task {probe_task_name!r} is one the runs were trained on ({trained_on}); "
      "the probe needs a held-out task."
    )
  task = dataset.tasks[probe_task_name]
  train_arrays = dataset.splits["train"].batch(np.arange(len(dataset.splits["train"])))
  test_arrays = dataset.splits["test"].batch(np.arange(len(dataset.splits["test"])))

  def targets(arrays):
    return {key: value for key, value in arrays.items() if key != "image"}

  results: dict[str, Any] = {"task": probe_task_name, "runs": {}}
  if isinstance(task, tasks_lib.BinaryAttribute):
    train_rate = float(np.mean(train_arrays[task.target_key][:, task.index] > 0.5))
    test_labels = test_arrays[task.target_key][:, task.index] > 0.5
    results["majority_accuracy"] = float(np.mean(test_labels == (train_rate >= 0.5)))
  for run in runs:
    batch_size = int(run.config.training.eval_batch_size)
    metrics = linear_probe(
      task,
      encoder_features(run, train_arrays["image"], batch_size),
      targets(train_arrays),
      encoder_features(run, test_arrays["image"], batch_size),
      targets(test_arrays),
      int(settings.probe_steps),
      float(settings.probe_learning_rate),
      seed,
    )
    results["runs"][run.name] = metrics
    metric_writers.status(
      f"[robustness probe] {run.name}: "
      + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
    )
  return results


# ---------------------------------------------------------------------------------------- the study


def prepare_runs(
  config: ml_collections.ConfigDict, workdir: str, dataset: data_registry.Dataset
) -> tuple[list[str], list[str]]:
  """Trains one STL run per task, then each prepare method's MTL run (Δm-selected against them).

  Runs go to <workdir>/runs/stl_<task> and <workdir>/runs/mtl_<method>; finished runs are reused.

  Returns:
    (MTL run directories, STL run directories).
  """
  stl_dirs = []
  for task in config.tasks:
    run_dir = os.path.join(workdir, "runs", f"stl_{task}")
    train_lib.train_and_evaluate(
      config_validation.with_overrides(config, tasks=(task,)), run_dir, dataset
    )
    stl_dirs.append(run_dir)
  mtl_dirs = []
  for method in config.robustness.prepare_methods:
    run_dir = os.path.join(workdir, "runs", f"mtl_{method}")
    run_config = config_validation.with_overrides(
      config, **{"method.name": method, "delta_m.baseline": tuple(stl_dirs)}
    )
    train_lib.train_and_evaluate(run_config, run_dir, dataset)
    mtl_dirs.append(run_dir)
  return mtl_dirs, stl_dirs


def _resolve_runs(config, workdir, dataset) -> tuple[list[str], list[str]]:
  settings = config.robustness
  mtl_dirs, stl_dirs = list(settings.mtl_runs), list(settings.stl_runs)
  if not mtl_dirs and not stl_dirs:
    metric_writers.status(
      f"[robustness] no run directories given: training STL and MTL models in {workdir}/runs."
    )
    return prepare_runs(config, workdir, dataset)
  if not mtl_dirs or not stl_dirs:
    raise ValueError(
      "Give both robustness.mtl_runs and robustness.stl_runs (or neither, to train them first); "
      f"got mtl_runs={mtl_dirs}, stl_runs={stl_dirs}."
    )
  return mtl_dirs, stl_dirs


def _load_runs(config, mtl_dirs, stl_dirs, dataset) -> tuple[list[Run], dict[str, Run]]:
  """Checks every run against the study config, then restores it; STL runs keyed by task."""
  for kind, dirs in (("mtl", mtl_dirs), ("stl", stl_dirs)):
    for run_dir in dirs:
      check_run_config(run_dir, load_run_config(run_dir), config, kind)
  mtl_runs = [restore_run(run_dir, dataset) for run_dir in mtl_dirs]
  names = [run.name for run in mtl_runs]
  for index, run in enumerate(mtl_runs):
    if names.count(run.name) > 1:  # Two runs of one method (e.g. two seeds or optimizers).
      run.name = f"{run.name}_{index}"
  stl_runs: dict[str, Run] = {}
  for run_dir in stl_dirs:
    run = restore_run(run_dir, dataset)
    task = run.task_names[0]
    if task in stl_runs:
      raise config_validation.ConfigError(
        f"config.robustness.stl_runs: Two STL runs for task {task!r}: {stl_runs[task].path!r} "
        f"and {run_dir!r}."
      )
    stl_runs[task] = run
  missing = [task for task in config.tasks if task not in stl_runs]
  if missing:
    raise config_validation.ConfigError(
      f"config.robustness.stl_runs: No STL run for task(s) {missing}; it must cover "
      f"{list(config.tasks)}."
    )
  return mtl_runs, stl_runs


def _deltas(mtl_runs, stl_by_task, evaluations) -> dict[str, Any]:
  """δ of every MTL run against the STL runs of its tasks (`corruption_delta`)."""
  stl_clean = {
    key: value
    for run in stl_by_task.values()
    for key, value in evaluations[run.name]["clean"].items()
  }
  conditions = evaluations[mtl_runs[0].name]["corrupted"] if mtl_runs else {}
  stl_corrupted = {
    condition: {
      key: value
      for run in stl_by_task.values()
      for key, value in evaluations[run.name]["corrupted"][condition].items()
    }
    for condition in conditions
  }
  deltas = {}
  for run in mtl_runs:
    directions = tasks_lib.flat_directions(run.experiment.tasks)
    deltas[run.name] = corruption_delta(
      evaluations[run.name]["clean"],
      evaluations[run.name]["corrupted"],
      stl_clean,
      stl_corrupted,
      directions,
    )
  return deltas


def delta_findings(deltas: Mapping[str, Any], settings: statistics.Settings) -> list[str]:
  """Per MTL run, its mean δ and per-task δ with an interval over the corrupted test sets, and
  the verdict on the claim 'MTL features degraded less' (δ < 0).

  The measurements are the corrupted sets (corruption × severity; several runs of a method are
  separate rows, one per seed): per set, the mean over a task's metrics of the signed relative
  difference, and for the mean δ the mean of that over tasks.
  """
  lines = []
  for name, delta in deltas.items():
    per_task: dict[str, list[float]] = {}
    overall = []
    for values in delta["per_condition"].values():
      by_task: dict[str, list[float]] = {}
      for key, value in values.items():
        by_task.setdefault(key.rpartition("/")[0] or key, []).append(float(value))
      for task, task_values in by_task.items():
        per_task.setdefault(task, []).append(float(np.mean(task_values)))
      overall.append(float(np.mean([np.mean(task_values) for task_values in by_task.values()])))
    tasks = "; ".join(
      f"{task} {statistics.described(settings.interval(values), -1, digits=4)}"
      for task, values in per_task.items()
    )
    lines.append(
      f"- {name}: claim 'MTL features degraded less than STL' (δ < 0); mean δ over "
      f"{len(overall)} corrupted sets {statistics.described(settings.interval(overall), -1, 4)}. "
      f"Per task: {tasks}."
    )
  return lines


def trivial_check(config, dataset, runs_results: Mapping[str, Any]) -> str:
  """The robustness runs' clean test metrics (after head fine-tuning) against the trivial
  predictors, as markdown (`report.markdown.trivial_section`)."""
  tasks = dataset.select_tasks(list(config.tasks))
  trivial = evaluation.trivial_metrics(
    tasks, dataset.splits["train"], dataset.splits["test"], int(config.training.eval_batch_size)
  )
  rows = [(name, run["clean"]) for name, run in runs_results.items()]
  return markdown.trivial_section(
    rows,
    trivial,
    tasks_lib.flat_directions(tasks),
    float(config.findings.trivial_margin_percent),
    split="clean test",
  )


def run_robustness(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the robustness study of SPEC section 5 and writes its results, tables and figure.

  Args:
    config: a configs/robustness.py config (training keys describe the runs to train when no
      run directories are given; `robustness.*` the study).
    workdir: output directory (and home of the prepared runs).

  Returns:
    The results dict written to <workdir>/robustness.json: per run clean and corrupted test
    metrics after fine-tuning, δ per MTL run, linear-probe metrics, settings.
  """
  config_validation.validate_config(config)
  settings = config.robustness
  names = tuple(settings.corruptions) or corruptions_lib.CORRUPTIONS
  severities = tuple(int(severity) for severity in settings.severities)
  for name in names:
    corruptions_lib.check_corruption(name)
  for severity in severities:
    corruptions_lib.check_corruption(names[0], severity)
  os.makedirs(workdir, exist_ok=True)
  dataset = data_registry.load_dataset(config.dataset)
  config_validation.validate_config(config, dataset)
  mtl_dirs, stl_dirs = _resolve_runs(config, workdir, dataset)
  mtl_runs, stl_by_task = _load_runs(config, mtl_dirs, stl_dirs, dataset)
  runs = mtl_runs + list(stl_by_task.values())
  metric_writers.status(
    "[robustness] runs: " + ", ".join(f"{run.name} ({run.path})" for run in runs)
  )
  seed = int(settings.corruption_seed)

  # The probe uses the encoders, which fine-tuning leaves untouched; run it first anyway.
  probe = run_probes(runs, dataset, settings, seed)
  history = finetune_heads(runs, dataset, settings, names, severities, seed)

  test_source = dataset.splits["test"]
  limit = int(settings.max_test_examples) or len(test_source)
  test = test_source.batch(np.arange(min(limit, len(test_source))))
  evaluations = evaluate_under_corruption(
    runs, test, corruption_conditions(names, severities), seed
  )

  deltas = _deltas(mtl_runs, stl_by_task, evaluations)
  settings_of_findings = statistics.Settings.from_config(config.findings)
  results = {
    "runs": {
      run.name: {
        "path": run.path,
        "tasks": run.task_names,
        "method": run.config.method.name,
        "finetune_loss": history[run.name],
        **evaluations[run.name],
      }
      for run in runs
    },
    "delta": deltas,
    "findings": delta_findings(deltas, settings_of_findings),
    "probe": probe,
    "corruptions": list(names),
    "severities": list(severities),
    "num_test_examples": int(len(test["image"])),
    "settings": settings.to_dict(),
  }
  results["learned"] = trivial_check(config, dataset, results["runs"])
  with open(os.path.join(workdir, RESULTS_FILE), "w") as file:
    json.dump(results, file, indent=2, default=str)
  with open(os.path.join(workdir, REPORT_FILE), "w") as file:
    file.write(report_markdown(results))
  per_corruption_figure(results, os.path.join(workdir, FIGURE_FILE))
  metric_writers.status(
    f"[robustness] wrote {RESULTS_FILE}, {REPORT_FILE} and {FIGURE_FILE} to {workdir}."
  )
  return results


# ------------------------------------------------------------------------------- tables and figures


def _format(value: float) -> str:
  return "nan" if value is None or not math.isfinite(value) else f"{value:+.4f}"


def report_markdown(results: Mapping[str, Any]) -> str:
  """Markdown tables: δ per task and method, clean vs mean corrupted metrics, probe results."""
  lines = [
    "# Robustness under corruption\n",
    f"{len(results['corruptions'])} corruptions x severities {results['severities']}, "
    f"{results['num_test_examples']} test images. δ < 0: MTL features degrade less than STL.\n",
  ]
  if results.get("findings"):
    lines += ["## Findings, each with its interval and verdict\n"] + list(results["findings"])
  if results.get("learned"):
    lines += ["", results["learned"], ""]
  lines.append("## δ per task (mean over a task's metrics) and mean δ\n")
  tasks = sorted({task for delta in results["delta"].values() for task in delta["per_task"]})
  lines.append("| run | " + " | ".join(f"δ {task}" for task in tasks) + " | mean δ |")
  lines.append("|---" * (len(tasks) + 2) + "|")
  for name, delta in results["delta"].items():
    lines.append(
      f"| {name} | "
      + " | ".join(_format(delta["per_task"].get(task)) for task in tasks)
      + f" | {_format(delta['mean'])} |"
    )
  lines += [
    "",
    "## Test metrics after head fine-tuning: clean and mean over corrupted sets\n",
    "| run | metric | clean | corrupted (mean) |",
    "|---|---|---|---|",
  ]
  for name, run in results["runs"].items():
    for key, clean in run["clean"].items():
      corrupted = np.mean([values[key] for values in run["corrupted"].values()])
      lines.append(f"| {name} | {key} | {clean:.4f} | {corrupted:.4f} |")
  probe = results["probe"]
  lines += ["", f"## Linear probe on the held-out task {probe['task']!r} (frozen encoders)\n"]
  if "majority_accuracy" in probe:
    lines.append(f"Majority-class test accuracy: {probe['majority_accuracy']:.4f}.\n")
  lines += ["| encoder | metric | test |", "|---|---|---|"]
  for name, metrics in probe["runs"].items():
    for key, value in metrics.items():
      lines.append(f"| {name} | {key} | {value:.4f} |")
  return "\n".join(lines) + "\n"


def per_corruption_figure(results: Mapping[str, Any], path: str) -> None:
  """One panel per task: δ per corruption (mean over severities), one bar group per MTL run."""
  import matplotlib  # noqa: PLC0415  (plotting is optional at import time)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = results["corruptions"]
  tasks = sorted({task for delta in results["delta"].values() for task in delta["per_task"]})
  figure, axes = plt.subplots(
    len(tasks),
    1,
    figsize=(max(6, 0.6 * len(names) + 2), 2.4 * len(tasks)),
    squeeze=False,
    sharex=True,
  )
  width = 0.8 / max(1, len(results["delta"]))
  for row, task in enumerate(tasks):
    axis = axes[row, 0]
    for offset, (run_name, delta) in enumerate(results["delta"].items()):
      values = []
      for name in names:
        per_severity = [
          np.mean([value for key, value in metrics.items() if key.rpartition("/")[0] == task])
          for condition, metrics in delta["per_condition"].items()
          if condition.rpartition("/")[0] == name
        ]
        values.append(np.mean(per_severity))
      axis.bar(np.arange(len(names)) + offset * width, values, width, label=run_name)
    axis.axhline(0, color="black", linewidth=0.6)
    axis.set_ylabel(f"δ {task}")
  axes[-1, 0].set_xticks(np.arange(len(names)) + 0.4 - width / 2)
  axes[-1, 0].set_xticklabels(names, rotation=60, ha="right", fontsize=8)
  axes[0, 0].legend(fontsize=8)
  axes[0, 0].set_title("δ per corruption (mean over severities); < 0: MTL degrades less")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def corruption_figure(image: np.ndarray, path: str, seed: int = 0) -> None:
  """Draws one image under every corruption (rows) and severity (columns, after the clean one).

  Args:
    image: float32 [H, W, 3] in [0, 1].
    path: where to write the PNG.
    seed: the corruption seed.
  """
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = corruptions_lib.CORRUPTIONS
  height, width = image.shape[:2]
  panel_width = 1.3
  figure, axes = plt.subplots(
    len(names), 6, figsize=(6 * panel_width + 1.2, len(names) * panel_width * height / width + 0.4)
  )
  for row, name in enumerate(names):
    for column in range(6):
      shown = (
        image if column == 0 else corruptions_lib.corrupt(image, name, column, (seed, row, column))
      )
      axis = axes[row, column]
      axis.imshow(shown, interpolation="nearest")
      axis.set_xticks([])
      axis.set_yticks([])
      if row == 0:
        axis.set_title("clean" if column == 0 else f"severity {column}", fontsize=8)
      if column == 0:
        axis.set_ylabel(name.replace("_", " "), fontsize=7, rotation=0, ha="right", va="center")
  figure.subplots_adjust(left=0.15, right=0.99, top=0.97, bottom=0.01, wspace=0.05, hspace=0.08)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)
