"""Training: the train state, one jit-compiled train step, evaluation, and the resumable loop.

A step is a pure function of (state, batch): `batch -> model -> losses [B, T] -> weighting ->
optax update`. Everything a resumed run needs is in the state (parameters, optimizer and
weighting state, RNG, step; the data order is a function of seed and step) or in the small
JSON progress record saved beside it, so re-running the same command after any interruption
continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import config_validation
from mtl_jax import conflicts as conflicts_lib
from mtl_jax import gramian as gramian_lib
from mtl_jax import gramian_check
from mtl_jax import method_steps
from mtl_jax import metric_writers
from mtl_jax import metrics as metrics_lib
from mtl_jax import models as models_lib
from mtl_jax import optim
from mtl_jax import preemption as preemption_lib
from mtl_jax import sharding as sharding_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import pipeline
from mtl_jax.data import registry as data_registry
from mtl_jax.data import validation as data_validation

RESULTS_FILE = "results.json"


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; the message names the step and task."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  weighting_params: Any
  weighting_state: Any
  opt_state: Any
  rng: jax.Array

  @property
  def trainable(self) -> dict[str, Any]:
    """The pytree the optimizer updates: model parameters and weighting parameters."""
    return {"model": self.params, "weighting": self.weighting_params}


@dataclasses.dataclass
class Experiment:
  """The static pieces of a run, built once from the config."""

  config: ml_collections.ConfigDict
  dataset: data_registry.Dataset
  tasks: list[tasks_lib.Task]
  model: models_lib.MultiTaskModel
  weighting: weighting_lib.Weighting
  optimizer: optax.GradientTransformation
  steps_per_epoch: int
  total_steps: int
  # The compiled `seed -> initial state` program, built on first use by `init_state`.
  initializer: Callable[[jax.Array], "TrainState"] | None = None

  @property
  def task_names(self) -> list[str]:
    return [task.name for task in self.tasks]

  @property
  def input_shape(self) -> tuple[int, ...]:
    example = self.dataset.splits["train"].batch(np.arange(1))["image"]
    return tuple(example.shape[1:])


def build_experiment(config: ml_collections.ConfigDict, dataset: data_registry.Dataset | None = None) -> Experiment:
  """Builds dataset, tasks, model, weighting and optimizer from a config.

  Args:
    config: an experiment config (see configs/base.py).
    dataset: an already loaded dataset to reuse (sweeps load it once).

  Raises:
    config_validation.ConfigError: a bad config value (names the key and the valid choices).
    data_validation.DataError: the dataset's first batches do not fit the tasks.
    ValueError: for other inconsistent settings.
  """
  # --- reliability: validate the config, then the data, before building anything ---
  config_validation.validate_config(config, dataset)
  optim.check_optimizer_name(config.optimizer.name)
  # Fails fast on an unknown method name, before the dataset is loaded.
  weighting_lib.get_weighting(config.method.name, {**config.method.to_dict(), "steps_per_epoch": 1})
  if dataset is None:
    dataset = data_registry.load_dataset(config.dataset)
    config_validation.validate_config(config, dataset)
  tasks = dataset.select_tasks(list(config.tasks))
  data_validation.check_dataset(dataset, tasks)
  # --- end reliability ---
  head_specs = {task.name: models_lib.HeadSpec(output_channels=task.output_channels, dense=task.dense) for task in tasks}
  model = models_lib.build_model(config.model, head_specs)
  batch_size = int(config.training.batch_size)
  per_epoch = pipeline.steps_per_epoch(len(dataset.splits["train"]), batch_size)
  total_steps = int(config.training.num_epochs) * per_epoch
  if total_steps <= 0:
    raise ValueError(f"config.training.num_epochs must be positive, got {config.training.num_epochs}.")
  # --- gradient-weighting methods (branch `methods`): epoch-based methods (DWA) need the epoch
  # length; AdaTask and MTL-IO bring their own per-task optimizer.
  weighting = weighting_lib.get_weighting(config.method.name, {**config.method.to_dict(), "steps_per_epoch": per_epoch})
  if weighting.make_optimizer is not None:
    optimizer = weighting.make_optimizer(config.optimizer, per_epoch, [task.name for task in tasks])
  else:
    optimizer = optim.make_optimizer(config.optimizer, per_epoch)
  # --- end gradient-weighting methods.
  return Experiment(config, dataset, tasks, model, weighting, optimizer, per_epoch, total_steps)


def _random_init(experiment: Experiment, seed: jax.Array) -> TrainState:
  """The initial state as a pure function of the seed (compiled once per experiment).

  Parameters are drawn with an 'rbg' key: XLA compiles its generator about 5x faster than
  threefry's on a CPU (4 s vs 22 s for a small CNN here). Its bits are deterministic for a given
  seed and backend but may differ between CPU and accelerators. Training randomness (RLW draws,
  PCGrad orders, ...) keeps the state's threefry key.
  """
  train_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  init_rng = jax.random.key(seed, impl="rbg")
  variables = experiment.model.init(init_rng, jnp.zeros((1, *experiment.input_shape), jnp.float32), train=False)
  num_tasks = len(experiment.tasks)
  if experiment.weighting.kind == "gramian":
    # Gramian weightings size their parameters and state by the rows at config.method.level.
    num_tasks = weighting_lib.num_rows(experiment.config.method.get("level", "task"), num_tasks,
                                       int(experiment.config.training.batch_size))
  weighting_params, weighting_state = experiment.weighting.init(num_tasks)
  trainable = {"model": variables["params"], "weighting": weighting_params}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      weighting_params=weighting_params,
      weighting_state=weighting_state,
      opt_state=experiment.optimizer.init(trainable),
      rng=train_rng,
  )


def init_state(experiment: Experiment, seed: int) -> TrainState:
  """Initial train state: model and weighting parameters, optimizer state, RNG.

  The whole initialisation is one compiled program with the seed as an argument: run eagerly,
  every parameter shape and optimizer leaf compiles its own small kernel (tens of seconds on a
  CPU), and every seed of a sweep reuses the one program.
  """
  if experiment.initializer is None:
    experiment.initializer = jax.jit(functools.partial(_random_init, experiment))
  state = experiment.initializer(jnp.asarray(seed, jnp.uint32))
  pretrained = experiment.config.model.get("pretrained_backbone", "")
  if pretrained:
    # Pretrained encoder weights from a local file (random init otherwise); the optimizer
    # state is rebuilt for the loaded parameters.
    variables = models_lib.load_backbone({"params": state.params, "batch_stats": state.batch_stats}, pretrained)
    trainable = {"model": variables["params"], "weighting": state.weighting_params}
    state = state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                          opt_state=experiment.optimizer.init(trainable))
  return state


def apply_model(model, params, batch_stats, images, train: bool):
  """Runs the model; returns (predictions, new batch_stats)."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    if train:
      predictions, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
      return predictions, updates["batch_stats"]
  return model.apply(variables, images, train=train), batch_stats


def make_train_step(
    model: models_lib.MultiTaskModel,
    tasks: Sequence[tasks_lib.Task],
    weighting: weighting_lib.Weighting,
    optimizer: optax.GradientTransformation,
    level: str = "task",
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns the pure train step `(state, batch) -> (new state, metrics)`; jit it at the call site.

  The metrics hold the total loss, per-task batch-mean losses [T] and the global gradient norm,
  which the loop uses to stop on non-finite values before anything is saved. Gramian and
  Jacobian methods get their steps from `method_steps` (rows of the Gramian at `level`, see
  weighting.LEVELS); the loss-weighting step below is unchanged for them. With a `mesh` the
  step is meant for `sharding.shard_train_step` (Gramian methods then use the mesh's
  `shard_map` engine for per-sample rows); loss-weighting steps ignore it.
  """
  # --- gradient-weighting methods (branch `methods`).
  if weighting.kind != "loss":
    return method_steps.make_method_step(model, tasks, weighting, optimizer, level, mesh)
  if weighting.after_update is not None:
    loss_step = make_train_step(model, tasks, dataclasses.replace(weighting, after_update=None), optimizer)
    return method_steps.with_after_update(loss_step, model, tasks, weighting)
  # --- end gradient-weighting methods.

  def loss_fn(trainable, state: TrainState, batch, rng):
    predictions, batch_stats = apply_model(model, trainable["model"], state.batch_stats, batch["image"], train=True)
    task_losses = jnp.mean(tasks_lib.losses_matrix(tasks, predictions, batch), axis=0)
    total, weighting_state, aux = weighting.combine(
        task_losses, trainable["weighting"], state.weighting_state, rng, state.step
    )
    return total, (task_losses, batch_stats, weighting_state, aux)

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    gradient_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, (task_losses, batch_stats, weighting_state, aux)), grads = gradient_fn(
        state.trainable, state, batch, step_rng
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=trainable["model"],
        batch_stats=batch_stats,
        weighting_params=trainable["weighting"],
        weighting_state=weighting_state,
        opt_state=opt_state,
        rng=rng,
    )
    step_metrics = {"loss": total, "task_losses": task_losses, "grad_norm": optax.global_norm(grads)}
    if "weights" in aux:
      step_metrics["task_weights"] = aux["weights"]
    return new_state, step_metrics

  return train_step


def make_eval_step(model: models_lib.MultiTaskModel, tasks: Sequence[tasks_lib.Task]):
  """Returns `(params, batch_stats, batch, mask) -> statistics`, additive across batches."""

  def eval_step(params, batch_stats, batch, mask):
    predictions, _ = apply_model(model, params, batch_stats, batch["image"], train=False)
    losses = tasks_lib.losses_matrix(tasks, predictions, batch)
    weights = mask.astype(jnp.float32)
    statistics = {}
    for index, task in enumerate(tasks):
      task_statistics = dict(task.metric_statistics(predictions[task.name], batch, mask))
      task_statistics["loss_sum"] = jnp.sum(losses[:, index] * weights)
      statistics[task.name] = task_statistics
    statistics["_count"] = jnp.sum(weights)
    return statistics

  return eval_step


class Evaluator:
  """Evaluates a state on a split: flat 'task/metric' values plus 'task/loss'."""

  def __init__(self, experiment: Experiment):
    self.experiment = experiment
    self._eval_step = jax.jit(make_eval_step(experiment.model, experiment.tasks))

  def __call__(self, state: TrainState, split: str) -> dict[str, float]:
    return flat_metrics(self.experiment.tasks, summed_statistics(self._eval_step, self.experiment, state, split))


def summed_statistics(eval_step: Callable, experiment: Experiment, state: TrainState, split: str) -> dict[str, Any]:
  """The eval step's metric statistics summed over every batch of a split (host numpy arrays).

  `state` may carry a leading run axis (a vmapped eval step); the sums then keep that axis.
  """
  totals = None
  for batch, mask in pipeline.eval_batches(experiment.dataset.splits[split], int(experiment.config.training.eval_batch_size)):
    statistics = jax.device_get(eval_step(state.params, state.batch_stats, batch, mask))
    totals = statistics if totals is None else jax.tree_util.tree_map(np.add, totals, statistics)
  return totals


def flat_metrics(tasks: Sequence[tasks_lib.Task], totals: Mapping[str, Any]) -> dict[str, float]:
  """Flat 'task/metric' values plus 'task/loss' from one run's summed statistics (with '_count')."""
  count = float(totals["_count"])
  per_task = {name: stats for name, stats in totals.items() if name != "_count"}
  flat = tasks_lib.compute_metrics(
      tasks, {name: {key: value for key, value in stats.items() if key != "loss_sum"} for name, stats in per_task.items()})
  for name, stats in per_task.items():
    flat[f"{name}/loss"] = float(stats["loss_sum"]) / count
  return flat


def selection_score(
    experiment: Experiment, validation: Mapping[str, float], baseline: Mapping[str, float] | None
) -> tuple[str, float]:
  """The validation score that picks the best checkpoint (lower is better).

  Multi-task runs with an STL baseline use Δm; otherwise (STL runs, or no baseline given) the
  sum of validation task losses.
  """
  if baseline and len(experiment.tasks) > 1:
    directions = tasks_lib.flat_directions(experiment.tasks)
    value = metrics_lib.delta_m(validation, baseline, directions, variant=experiment.config.delta_m.variant)
    return "validation_delta_m", value
  return "validation_loss", float(sum(validation[f"{name}/loss"] for name in experiment.task_names))


def _load_baselines(config: ml_collections.ConfigDict) -> tuple[dict | None, dict | None]:
  paths = list(config.delta_m.baseline)
  if not paths:
    return None, None
  return metrics_lib.load_baseline(paths, split="validation"), metrics_lib.load_baseline(paths, split="test")


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _non_finite_paths(tree, limit: int = 6) -> str:
  """'a/b/kernel, c/bias (and N more)' for the leaves of a bool tree that are False."""
  bad = [_path_name(path) for path, finite in jax.tree_util.tree_flatten_with_path(tree)[0] if not bool(finite)]
  shown = ", ".join(bad[:limit])
  return shown + (f" (and {len(bad) - limit} more)" if len(bad) > limit else "")


def make_gradient_locator(experiment: Experiment) -> Callable[[TrainState, Mapping[str, np.ndarray]], str]:
  """Returns `(state, batch) -> description` of which parameters get non-finite gradients, and from which task.

  Only called after a step reported a non-finite gradient norm (the step itself computes one global
  norm, so the hot path pays nothing); it recomputes the gradient of each task's loss (a Jacobian
  over tasks) and of the weighted total, and names the parameter paths, e.g. 'encoder/Conv_0/kernel'.
  """
  model, tasks, weighting = experiment.model, experiment.tasks, experiment.weighting

  def task_losses_fn(params, state, batch):
    predictions, _ = apply_model(model, params, state.batch_stats, batch["image"], train=True)
    return jnp.mean(tasks_lib.losses_matrix(tasks, predictions, batch), axis=0)

  def total_fn(trainable, state, batch):
    _, step_rng = jax.random.split(state.rng)
    task_losses = task_losses_fn(trainable["model"], state, batch)
    total, _, _ = weighting.combine(task_losses, trainable["weighting"], state.weighting_state, step_rng, state.step)
    return total

  def finite_flags(state, batch):
    per_task = gramian_lib.jacobian_rows(lambda params: task_losses_fn(params, state, batch), state.params)
    per_task = jax.tree_util.tree_map(lambda g: jnp.all(jnp.isfinite(g), axis=tuple(range(1, g.ndim))), per_task)
    total = jax.grad(total_fn)(state.trainable, state, batch)
    return per_task, jax.tree_util.tree_map(lambda g: jnp.all(jnp.isfinite(g)), total)

  finite_flags = jax.jit(finite_flags)

  def locate(state, batch) -> str:
    per_task, total = jax.device_get(finite_flags(state, batch))
    parts = []
    for index, task in enumerate(tasks):
      paths = _non_finite_paths(jax.tree_util.tree_map(lambda flags: flags[index], per_task))
      if paths:
        parts.append(f"gradient of task {task.name!r} loss is non-finite in {paths}")
    if not parts:
      paths = _non_finite_paths(total)
      parts.append(f"every task's gradient is finite, but after weighting {weighting.name!r} non-finite in "
                   f"{paths or 'no parameter on recomputation (non-deterministic overflow?)'}")
    return "; ".join(parts)

  return locate


def _check_finite(step: int, step_metrics: Mapping[str, np.ndarray], task_names: Sequence[str], where: str,
                  locate_gradients: Callable[[], str] | None = None) -> None:
  task_losses = np.asarray(step_metrics["task_losses"])
  bad_tasks = [name for name, value in zip(task_names, task_losses) if not np.isfinite(value)]
  if bad_tasks:
    values = ", ".join(f"{name}={task_losses[task_names.index(name)]}" for name in bad_tasks)
    raise NonFiniteLossError(f"Non-finite loss at step {step} in task(s) {', '.join(bad_tasks)} ({values}). {where}")
  for key in ("loss", "grad_norm"):
    if not np.isfinite(np.asarray(step_metrics[key])):
      located = f" The {locate_gradients()}." if key == "grad_norm" and locate_gradients is not None else ""
      raise NonFiniteLossError(
          f"Non-finite {key} at step {step} (task losses finite: "
          f"{dict(zip(task_names, task_losses.tolist()))}).{located} {where}"
      )


def _verify_fast_path(check: gramian_check.FastPathCheck | None, step: int, state: TrainState, batch,
                      checkpointer: checkpoint_lib.Checkpointer, writer: metric_writers.MetricWriter) -> None:
  """The fast Gramian path's self-check when due; a mismatch stops training after pending saves finish."""
  if check is None or not check.due(step):
    return
  try:
    check.verify(step, state.params, state.batch_stats, batch)
  except gramian_check.FastPathMismatchError:
    checkpointer.wait_until_finished()
    writer.close()
    raise


def config_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings a checkpoint must agree with to be resumed (JSON-able).

  Everything that changes the trajectory of a run is in it (training length, logging and
  checkpoint cadence are not: a run may be extended or resumed with other cadences).
  """
  return json.loads(json.dumps({
      "seed": config.seed,
      "dataset": config.dataset.to_dict(),
      "tasks": list(config.tasks),
      "model": config.model.to_dict(),
      "method": config.method.to_dict(),
      "optimizer": config.optimizer.to_dict(),
      "batch_size": config.training.batch_size,
  }, default=str))


def _mismatch_error(what: str, saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
  """Raises a ConfigError naming every key where a saved fingerprint differs from the config's."""
  mismatches = checkpoint_lib.fingerprint_mismatches(saved, current)
  if mismatches:
    raise config_validation.ConfigError(
        f"{what} was written by a different config ({'; '.join(mismatches)}); use another --workdir "
        "or the original config.")


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: data_registry.Dataset | None = None,
    preemption: preemption_lib.PreemptionGuard | None = None,
) -> dict:
  """Trains a model from config, keeping the best validation state, and writes test results.

  Re-running with the same workdir resumes from the latest checkpoint; a finished run only
  re-reads its results. On SIGTERM/SIGINT the current step finishes, a checkpoint of it is
  written, and `preemption.Preempted` is raised (see mtl_jax/preemption.py).

  Args:
    config: an experiment config.
    workdir: the run directory (checkpoints, metrics.jsonl, tensorboard/, results.json).
    dataset: an already loaded dataset to reuse.
    preemption: the guard to obey (a sweep passes its own); by default the innermost active
      guard, or a new one installed for this call.

  Returns:
    The results dict also written to `workdir/results.json`.

  Raises:
    preemption.Preempted: stopped by a signal after checkpointing; rerun to resume.
    NonFiniteLossError: a non-finite loss or gradient with on_non_finite='stop'.
    gramian_check.FastPathMismatchError: per-sample Gramians computed on the fast path (a method's
      level 'sample'/'sample_task', the conflict probe) disagree with the reference path.
    config_validation.ConfigError: a bad config, or a workdir written by a different config.
    checkpoint.CheckpointError: checkpoints exist but none is intact.
  """
  with contextlib.ExitStack() as stack:
    guard = preemption or preemption_lib.active_guard()
    if guard is None:
      guard = stack.enter_context(preemption_lib.PreemptionGuard())
    return _train_and_evaluate(config, workdir, dataset, guard)


def _train_and_evaluate(config, workdir, dataset, guard: preemption_lib.PreemptionGuard) -> dict:
  """train_and_evaluate under a preemption guard."""
  results_path = os.path.join(workdir, RESULTS_FILE)
  if os.path.exists(results_path):
    with open(results_path) as file:
      results = json.load(file)
    if results.get("fingerprint") == config_fingerprint(config):
      metric_writers.status(f"{workdir}: finished run found, reusing {RESULTS_FILE}.")
      return results
    _mismatch_error(results_path, results.get("fingerprint"), config_fingerprint(config))
  experiment = build_experiment(config, dataset)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as file:
    file.write(config.to_json_best_effort(indent=2))
  baseline_validation, baseline_test = _load_baselines(config)
  training = config.training
  writer = metric_writers.MetricWriter(workdir, console=False)
  checkpointer = checkpoint_lib.Checkpointer(workdir, asynchronous=bool(training.get("async_checkpoints", True)))
  evaluator = Evaluator(experiment)
  state = init_state(experiment, int(config.seed))
  # --- sharding: data parallelism when there are several devices (one device: unchanged). ---
  mesh = sharding_lib.make_mesh(config) if jax.device_count() > 1 else None
  # One step function for one device and for the mesh: both train the same method at the same level.
  step_function = make_train_step(experiment.model, experiment.tasks, experiment.weighting, experiment.optimizer,
                                  level=config.method.get("level", "task"), mesh=mesh)
  if mesh is not None:
    train_step, state = sharding_lib.shard_training(config, mesh, step_function, state)
  else:
    train_step = jax.jit(step_function)
  # --- end sharding ---
  fingerprint = config_fingerprint(config)
  progress: dict[str, Any] = {"best_score": None, "best_step": None, "history": [], "evals_since_best": 0,
                              "fingerprint": fingerprint, "skipped_steps": 0}
  checkpoint_dir = os.path.join(workdir, checkpoint_lib.LATEST)
  restored = checkpointer.restore(
      state, check_progress=lambda saved: _mismatch_error(f"The checkpoint in {checkpoint_dir}",
                                                          saved.get("fingerprint"), fingerprint))
  if restored is not None:
    state, progress = restored
    metric_writers.status(f"Resuming from step {int(state.step)} in {workdir}.")

  task_names = experiment.task_names
  per_epoch = experiment.steps_per_epoch
  eval_every = max(1, int(training.eval_every_epochs)) * per_epoch
  log_every = max(1, int(training.log_every_steps))
  checkpoint_every = int(training.checkpoint_every_steps)
  patience = int(training.get("early_stopping_patience", 0))
  skip_non_finite = training.get("on_non_finite", "stop") == "skip"
  label = f"[{config.method.name}/{config.optimizer.name} lr={config.optimizer.learning_rate:g} seed={config.seed}] "
  report = metric_writers.ProgressReport(experiment.total_steps, int(state.step), label)
  metric_writers.status(
      f"{label}training {experiment.model.encoder.__class__.__name__} on {config.dataset.name} tasks {task_names}: "
      f"{experiment.total_steps} steps ({config.training.num_epochs} epochs x {per_epoch}), workdir {workdir}"
  )
  interval_sums: dict[str, np.ndarray] = {}
  interval_count = 0
  stopped_early = bool(progress.get("stopped_early", False))

  def save_latest(step: int):
    checkpointer.save(step, state, progress)

  start = int(state.step)
  batches = pipeline.train_batches(experiment.dataset.splits["train"], int(training.batch_size), int(config.seed),
                                   start, experiment.total_steps, experiment.dataset.augment)
  last_saved = checkpointer.latest_step()
  locator = None
  conflict_probe = conflicts_lib.make_probe(experiment, config, workdir, mesh)  # Gradient conflicts (SPEC §4).
  fast_path_check = gramian_check.for_training(experiment, config, mesh)  # Per-sample Gramians checked on device.
  for step, batch in batches:
    if stopped_early:
      break
    # --- reliability: preemption. `step` steps are done; save exactly this state and stop. ---
    if guard.should_stop(step):
      if last_saved != step:
        save_latest(step)
      checkpointer.wait_until_finished()
      writer.close()
      checkpointer.close()
      message = (f"{label}stopped by {guard.signal_name} after {step} of {experiment.total_steps} steps; "
                 f"checkpoint saved in {os.path.join(workdir, checkpoint_lib.LATEST)}. "
                 "Re-run the same command to resume.")
      metric_writers.status(message)
      raise preemption_lib.Preempted(message, step, workdir, guard.signal_name)
    # --- end reliability ---
    host_batch = batch
    if mesh is not None:  # sharding: this host's rows into one global batch split over 'data'.
      batch = sharding_lib.global_batch(batch, mesh)
    if conflict_probe is not None:  # Gradient conflicts: probes the pre-step parameters on this batch.
      # The host's copy: on several hosts the global array is not addressable as a whole here.
      conflict_probe.maybe_probe(step, state, host_batch)
    _verify_fast_path(fast_path_check, step, state, host_batch, checkpointer, writer)
    new_state, step_metrics = train_step(state, batch)
    step_metrics = jax.device_get(step_metrics)

    def locate_gradients(state=state, batch=batch):
      nonlocal locator
      locator = locator or make_gradient_locator(experiment)
      return locator(state, batch)

    try:
      _check_finite(step, step_metrics, task_names,
                    f"Training stopped; the last good checkpoint (step {last_saved}) in {workdir} is intact."
                    if last_saved is not None else "Training stopped; no checkpoint had been written yet.",
                    locate_gradients)
    except NonFiniteLossError as error:
      if not skip_non_finite:
        checkpointer.wait_until_finished()
        writer.close()
        raise
      logging.warning("Skipping step: %s", error)
      progress["skipped_steps"] = int(progress.get("skipped_steps", 0)) + 1
      # The step is dropped but the data position still advances.
      state = state.replace(step=state.step + 1, rng=new_state.rng)
      continue
    state = new_state
    for key in ("loss", "grad_norm"):
      interval_sums[key] = interval_sums.get(key, 0.0) + step_metrics[key]
    interval_sums["task_losses"] = interval_sums.get("task_losses", 0.0) + step_metrics["task_losses"]
    interval_count += 1
    done = step + 1
    if conflict_probe is not None and done % per_epoch == 0:  # Gradient conflicts: per-epoch statistics.
      conflict_probe.end_epoch(done // per_epoch, done, writer)
    if done % log_every == 0 or done == experiment.total_steps:
      scalars = {"train/loss": interval_sums["loss"] / interval_count,
                 "train/grad_norm": interval_sums["grad_norm"] / interval_count}
      for name, value in zip(task_names, interval_sums["task_losses"] / interval_count):
        scalars[f"train/{name}_loss"] = value
      speed = report(done)
      scalars.update({f"progress/{key}": value for key, value in speed.items()})
      writer.write_scalars(done, scalars)
      metric_writers.status(report.line(done, speed) + f"  loss {scalars['train/loss']:.4f}")
      interval_sums, interval_count = {}, 0
    if done % eval_every == 0 or done == experiment.total_steps:
      validation = evaluator(state, "validation")
      criterion, score = selection_score(experiment, validation, baseline_validation)
      writer.write_scalars(done, {**{f"validation/{k}": v for k, v in validation.items()}, criterion: score})
      improved = progress["best_score"] is None or score < progress["best_score"]
      progress["history"].append({"step": done, criterion: score})
      if improved:
        progress.update(best_score=score, best_step=done, evals_since_best=0, criterion=criterion)
        checkpointer.save(done, state, progress, best=True)
      else:
        progress["evals_since_best"] += 1
      metric_writers.status(f"{label}epoch {done // per_epoch}: {criterion} {score:.4f}"
                            f"{'  (best)' if improved else ''}")
      if patience and progress["evals_since_best"] >= patience:
        progress["stopped_early"] = stopped_early = True
        metric_writers.status(f"{label}early stopping at step {done}: no improvement in {patience} evaluations.")
      save_latest(done)
      last_saved = done
    elif checkpoint_every and done % checkpoint_every == 0:
      save_latest(done)
      last_saved = done

  checkpointer.wait_until_finished()
  best = checkpointer.restore(state, best=True)
  best_state = best[0] if best is not None else state
  results = {
      "fingerprint": fingerprint,
      "tasks": task_names,
      "directions": tasks_lib.flat_directions(experiment.tasks),
      "best_step": progress.get("best_step"),
      "selection": {"criterion": progress.get("criterion"), "score": progress.get("best_score")},
      "skipped_steps": progress.get("skipped_steps", 0),
      "validation": evaluator(best_state, "validation"),
      "test": evaluator(best_state, "test"),
      "config": json.loads(config.to_json_best_effort()),
  }
  if baseline_test and len(task_names) > 1:
    directions = results["directions"]
    variant = config.delta_m.variant
    results["delta_m"] = {
        "test": metrics_lib.delta_m(results["test"], baseline_test, directions, variant=variant),
        "validation": metrics_lib.delta_m(results["validation"], baseline_validation, directions, variant=variant),
        "variant": variant,
    }
  writer.write_scalars(experiment.total_steps, {f"test/{k}": v for k, v in results["test"].items()})
  writer.close()
  checkpointer.close()
  temporary = results_path + ".tmp"
  with open(temporary, "w") as file:
    json.dump(results, file, indent=2)
  os.replace(temporary, results_path)
  return results
