"""Several runs of one model and method trained with one compiled program (vmapped, or looped on CPU).

Runs that share dataset, tasks, model, method and optimizer but differ in seed and/or learning
rate are stacked along a leading "run" axis: K initial states (one per seed), K batches per step
(each run's data order is a function of its own seed, as in `train.train_and_evaluate`) and K
learning rates. Because `optim.make_optimizer` applies the learning rate last and every update is
exactly proportional to it, each lane builds the same optimizer with the schedule
`lr_k * unit_schedule(step)` (step decay kept), so a lane computes what the sequential run
computes, up to float reordering by XLA. How the lanes run is the lane mode (`default_lane_mode`):
batched into every op ('vmap', for accelerators), or one after another through one compiled
single-run step ('loop', for CPU, where batched convolutions are slower than separate ones);
either way the group compiles once instead of once per run.

Each run writes the same `results.json` as `train.train_and_evaluate` (plus a `multirun` entry),
so sequential and vmapped runs are interchangeable in a sweep. Resume is at group granularity:
no checkpoint is written during a group; a finished run (results.json) or a run that diverged
(failed.json) is never retrained, and an interrupted group restarts from step 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_jax import metric_writers
from mtl_jax import metrics as metrics_lib
from mtl_jax import optim
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax.data import pipeline
from mtl_jax.data import registry as data_registry

FAILED_FILE = "failed.json"

# Keys that may differ between the runs of one group; everything else must agree.
_PER_RUN_KEYS = ("seed", "optimizer.learning_rate", "delta_m.baseline")


def group_key(config: ml_collections.ConfigDict) -> str:
  """A string equal for configs that can be trained together (all but seed, lr and baseline)."""
  settings = json.loads(config.to_json_best_effort())
  settings.pop("seed", None)
  settings.get("optimizer", {}).pop("learning_rate", None)
  settings.get("delta_m", {}).pop("baseline", None)
  settings.pop("sweep", None)
  return json.dumps(settings, sort_keys=True)


def _unit_optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  unit = ml_collections.ConfigDict(config.optimizer.to_dict())
  unit.learning_rate = 1.0
  return unit


LANE_MODES = ("vmap", "map", "loop")


def default_lane_mode(requested: str = "auto") -> str:
  """The lane mode for `requested` ('auto' or one of LANE_MODES).

  'auto' is 'loop' on CPU and 'vmap' on accelerators. Measured on 2 CPU cores (BENCHMARKS.md):
  a vmapped convolution whose kernel carries the run axis becomes a grouped convolution that
  XLA:CPU runs 2-3x slower than the K separate ones, and `lax.map` is slower still, so on CPU
  the group's gain is the single compilation, which 'loop' keeps at sequential step speed.
  """
  if requested == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  if requested not in LANE_MODES:
    raise ValueError(f"Unknown lane mode {requested!r}; valid: auto, {', '.join(LANE_MODES)}.")
  return requested


def make_multi_train_step(experiment: train.Experiment, shared_batch: bool, skip_non_finite: bool,
                          lane_mode: str = "vmap"):
  """The train step of K stacked runs: `(states [K], batch, learning_rates [K]) -> (states, metrics [K])`.

  Args:
    experiment: built from any config of the group (its optimizer is not used).
    shared_batch: True when all runs see the same batch (same seed); the batch then has no run
      axis, otherwise every array is [K, B, ...].
    skip_non_finite: on a non-finite loss or gradient, keep the lane's previous state (the data
      position and RNG still advance), as `training.on_non_finite='skip'` does sequentially.
    lane_mode: 'vmap' (runs batched into every op), 'map' (`lax.map` over runs inside the
      same compiled program) or 'loop' (one compiled single-run step applied to each lane in
      turn, in place); all compute the same per-run steps.

  Returns:
    The un-jitted step for 'vmap' and 'map'; for 'loop' a Python function that calls its own
    jitted, buffer-donating lane step K times (do not jit it again).
  """
  if lane_mode not in LANE_MODES:
    raise ValueError(f"Unknown lane_mode {lane_mode!r}; valid modes: {', '.join(LANE_MODES)}.")
  unit_config = _unit_optimizer_config(experiment.config)
  unit_schedule = optim.learning_rate_schedule(unit_config, experiment.steps_per_epoch)

  def lane_step(state, batch, learning_rate):
    # The optimizer is rebuilt per lane at trace time; only the scale of its schedule is traced.
    optimizer = optim.make_optimizer(
        unit_config, experiment.steps_per_epoch, learning_rate=lambda count: learning_rate * unit_schedule(count)
    )
    step = train.make_train_step(experiment.model, experiment.tasks, experiment.weighting, optimizer)
    new_state, step_metrics = step(state, batch)
    finite = (jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(step_metrics["grad_norm"])
              & jnp.all(jnp.isfinite(step_metrics["task_losses"])))
    if skip_non_finite:
      kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = kept.replace(step=state.step + 1, rng=new_state.rng)
    step_metrics["finite"] = finite
    return new_state, step_metrics

  if lane_mode == "vmap":
    return jax.vmap(lane_step, in_axes=(0, None if shared_batch else 0, 0))
  if lane_mode == "loop":
    return _looped(lane_step, shared_batch)

  def mapped_step(states, batch, learning_rates):
    if shared_batch:
      return jax.lax.map(lambda lane: lane_step(lane[0], batch, lane[1]), (states, learning_rates))
    return jax.lax.map(lambda lane: lane_step(*lane), (states, batch, learning_rates))

  return mapped_step


def _looped(lane_step, shared_batch: bool):
  """Steps the lanes of stacked states one after another with one compiled program.

  The lane index is an argument, so K runs share one compilation; the stacked states are
  donated and lane k is updated in place (`.at[k].set`), so no copy of all K states is made.
  """

  def one_lane(states, batch, learning_rates, index):
    state = jax.tree_util.tree_map(lambda leaf: leaf[index], states)
    lane_batch = batch if shared_batch else jax.tree_util.tree_map(lambda leaf: leaf[index], batch)
    new_state, step_metrics = lane_step(state, lane_batch, learning_rates[index])
    states = jax.tree_util.tree_map(lambda stacked, leaf: stacked.at[index].set(leaf), states, new_state)
    return states, step_metrics

  compiled = jax.jit(one_lane, donate_argnums=0)

  def step(states, batch, learning_rates):
    per_lane = []
    for index in range(int(np.shape(learning_rates)[0])):
      states, step_metrics = compiled(states, batch, learning_rates, np.int32(index))
      per_lane.append(step_metrics)
    return states, jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *per_lane)

  return step


def stack_states(states: Sequence[train.TrainState]) -> train.TrainState:
  """Stacks K states along a new leading axis."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


def unstack_state(states: train.TrainState, index: int) -> train.TrainState:
  """Run `index` of a stacked state."""
  return jax.tree_util.tree_map(lambda leaf: leaf[index], states)


class MultiEvaluator:
  """Evaluates K stacked states on a split (vmapped, or lane by lane for 'loop'); returns K flat metric dicts."""

  def __init__(self, experiment: train.Experiment, lane_mode: str = "vmap"):
    self.experiment = experiment
    eval_step = train.make_eval_step(experiment.model, experiment.tasks)
    if lane_mode == "loop":
      single = jax.jit(lambda params, batch_stats, batch, mask, index: eval_step(
          jax.tree_util.tree_map(lambda leaf: leaf[index], params),
          jax.tree_util.tree_map(lambda leaf: leaf[index], batch_stats), batch, mask))

      def lanes(params, batch_stats, batch, mask):
        runs = jax.tree_util.tree_leaves(params)[0].shape[0]
        per_lane = [single(params, batch_stats, batch, mask, np.int32(index)) for index in range(runs)]
        return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *per_lane)

      self._eval_step = lanes
    else:
      # Parameters carry the run axis; every run sees the same evaluation batch.
      self._eval_step = jax.jit(jax.vmap(eval_step, in_axes=(0, 0, None, None)))

  def __call__(self, states: train.TrainState, split: str) -> list[dict[str, float]]:
    totals = train.summed_statistics(self._eval_step, self.experiment, states, split)
    runs = int(np.shape(totals["_count"])[0])
    return [train.flat_metrics(self.experiment.tasks, jax.tree_util.tree_map(lambda leaf, index=index: leaf[index], totals))
            for index in range(runs)]


@dataclasses.dataclass
class _Lane:
  """Host-side bookkeeping of one run of a group."""

  config: ml_collections.ConfigDict
  workdir: str
  baseline_validation: dict | None
  baseline_test: dict | None
  best_score: float | None = None
  best_step: int | None = None
  criterion: str | None = None
  evals_since_best: int = 0
  stopped_early: bool = False
  failed: str | None = None
  skipped_steps: int = 0
  history: list = dataclasses.field(default_factory=list)

  @property
  def active(self) -> bool:
    return not self.stopped_early and self.failed is None


def _write_json(path: str, value: Any) -> None:
  temporary = path + ".tmp"
  with open(temporary, "w") as file:
    json.dump(value, file, indent=2)
  os.replace(temporary, path)


def _load_baselines(config):
  paths = list(config.delta_m.baseline)
  if not paths:
    return None, None
  return metrics_lib.load_baseline(paths, split="validation"), metrics_lib.load_baseline(paths, split="test")


def train_group(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    dataset: data_registry.Dataset | None = None,
    label: str = "",
    lane_mode: str = "auto",
) -> list[dict | None]:
  """Trains K runs as one vmapped program and writes each run's results.json (or failed.json).

  Args:
    configs: K run configs that agree on everything but seed, optimizer.learning_rate and
      delta_m.baseline.
    workdirs: K run directories.
    dataset: an already loaded dataset to reuse.
    label: a prefix for progress lines.
    lane_mode: 'auto', 'vmap', 'map' or 'loop' (see `make_multi_train_step`, `default_lane_mode`).

  Returns:
    Per run, the results dict, or None for a run that produced a non-finite loss (its
    failed.json names the step), in the order of `configs`.

  Raises:
    ValueError: configs that cannot share one program, or mismatched lengths.
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError(f"train_group needs as many workdirs as configs (got {len(configs)} and {len(workdirs)}).")
  keys = {group_key(config) for config in configs}
  if len(keys) > 1:
    raise ValueError(f"Configs of one group may differ only in {', '.join(_PER_RUN_KEYS)}; got {len(keys)} variants.")
  experiment = train.build_experiment(configs[0], dataset)
  training = configs[0].training
  skip_non_finite = training.get("on_non_finite", "stop") == "skip"
  seeds = [int(config.seed) for config in configs]
  shared_batch = len(set(seeds)) == 1
  learning_rates = jnp.asarray([float(config.optimizer.learning_rate) for config in configs], jnp.float32)
  lanes = []
  for config, workdir in zip(configs, workdirs):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as file:
      file.write(config.to_json_best_effort(indent=2))
    lanes.append(_Lane(config, workdir, *_load_baselines(config)))

  lane_mode = default_lane_mode(lane_mode)
  step_fn = make_multi_train_step(experiment, shared_batch, skip_non_finite, lane_mode)
  step_fn = step_fn if lane_mode == "loop" else jax.jit(step_fn)
  select = jax.jit(lambda mask, new, old: jax.tree_util.tree_map(
      lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old))
  evaluator = MultiEvaluator(experiment, lane_mode)
  states = stack_states([train.init_state(experiment, seed) for seed in seeds])
  # A copy: 'loop' donates `states` to each step, which would free buffers shared with it.
  best_states = jax.tree_util.tree_map(jnp.copy, states)
  writers = [metric_writers.MetricWriter(lane.workdir, console=False, tensorboard=False) for lane in lanes]

  source = experiment.dataset.splits["train"]
  batch_size = int(training.batch_size)
  per_epoch = experiment.steps_per_epoch
  total = experiment.total_steps
  eval_every = max(1, int(training.eval_every_epochs)) * per_epoch
  log_every = max(1, int(training.log_every_steps))
  patience = int(training.get("early_stopping_patience", 0))
  report = metric_writers.ProgressReport(total, 0, label)
  metric_writers.status(f"{label}training {len(lanes)} runs as one compiled program ({lane_mode}): {total} steps each "
                        f"(lr {', '.join(f'{float(rate):g}' for rate in learning_rates)}; seeds {seeds})")

  def batch_at(step: int):
    def one(seed):
      batch = source.batch(pipeline.train_indices(len(source), batch_size, seed, step))
      if experiment.dataset.augment is not None:
        batch = experiment.dataset.augment(batch, np.random.default_rng([seed, step, 1]))
      return batch
    if shared_batch:
      return one(seeds[0])
    batches = [one(seed) for seed in seeds]
    return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}

  sums: dict[str, np.ndarray] = {}
  count = 0
  for step in range(total):
    if not any(lane.active for lane in lanes):
      break
    states, step_metrics = step_fn(states, batch_at(step), learning_rates)
    step_metrics = jax.device_get(step_metrics)
    finite = np.asarray(step_metrics["finite"])
    for index, lane in enumerate(lanes):
      if finite[index] or lane.failed is not None:
        continue
      if skip_non_finite:
        lane.skipped_steps += 1
      else:
        losses = dict(zip(experiment.task_names, np.asarray(step_metrics["task_losses"][index]).tolist()))
        lane.failed = f"Non-finite loss or gradient at step {step} (task losses {losses})."
        metric_writers.status(f"{label}run {lane.workdir} stopped: {lane.failed}")
    for key in ("loss", "grad_norm", "task_losses"):
      sums[key] = sums.get(key, 0.0) + np.asarray(step_metrics[key])
    count += 1
    done = step + 1
    if done % log_every == 0 or done == total:
      for index, (lane, writer) in enumerate(zip(lanes, writers)):
        scalars = {"train/loss": sums["loss"][index] / count, "train/grad_norm": sums["grad_norm"][index] / count}
        for name, value in zip(experiment.task_names, sums["task_losses"][index] / count):
          scalars[f"train/{name}_loss"] = value
        writer.write_scalars(done, scalars)
      speed = report(done)
      metric_writers.status(report.line(done, speed) + f"  ({len(lanes)} runs)")
      sums, count = {}, 0
    if done % eval_every == 0 or done == total:
      improved = np.zeros(len(lanes), bool)
      for index, (lane, validation) in enumerate(zip(lanes, evaluator(states, "validation"))):
        if not lane.active:
          continue
        criterion, score = train.selection_score(experiment, validation, lane.baseline_validation)
        writers[index].write_scalars(done, {**{f"validation/{k}": v for k, v in validation.items()}, criterion: score})
        lane.history.append({"step": done, criterion: score})
        if lane.best_score is None or score < lane.best_score:
          lane.best_score, lane.best_step, lane.criterion, lane.evals_since_best = score, done, criterion, 0
          improved[index] = True
        else:
          lane.evals_since_best += 1
          if patience and lane.evals_since_best >= patience:
            lane.stopped_early = True
      best_states = select(jnp.asarray(improved), states, best_states)

  validations = evaluator(best_states, "validation")
  tests = evaluator(best_states, "test")
  outputs: list[dict | None] = []
  for index, lane in enumerate(lanes):
    writers[index].close()
    fingerprint = train.config_fingerprint(lane.config)
    if lane.failed is not None:
      _write_json(os.path.join(lane.workdir, FAILED_FILE), {"fingerprint": fingerprint, "error": lane.failed})
      outputs.append(None)
      continue
    results = {
        "fingerprint": fingerprint,
        "tasks": experiment.task_names,
        "directions": tasks_lib.flat_directions(experiment.tasks),
        "best_step": lane.best_step,
        "selection": {"criterion": lane.criterion, "score": lane.best_score},
        "skipped_steps": lane.skipped_steps,
        "validation": validations[index],
        "test": tests[index],
        "config": json.loads(lane.config.to_json_best_effort()),
        "multirun": {"group_size": len(lanes), "stopped_early": lane.stopped_early},
    }
    if lane.baseline_test and len(experiment.tasks) > 1:
      variant = lane.config.delta_m.variant
      directions = results["directions"]
      results["delta_m"] = {
          "test": metrics_lib.delta_m(results["test"], lane.baseline_test, directions, variant=variant),
          "validation": metrics_lib.delta_m(results["validation"], lane.baseline_validation, directions,
                                            variant=variant),
          "variant": variant,
      }
    _write_json(os.path.join(lane.workdir, train.RESULTS_FILE), results)
    outputs.append(results)
  return outputs
