"""The loop's chores, one small method each: runs' bookkeeping, stores, the guard, logging,
evaluation.

A `Session` holds what the loop in `loop.py` needs between steps: the lanes and their states,
one `Run` per lane (its config, workdir, writer and progress record), where states are kept
(`CheckpointStore` for a single run, `MemoryStore` for a group), the conflict probe, and the
running sums that logging averages.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import conflicts as conflicts_lib
from mtl_jax import metric_writers
from mtl_jax import parallel
from mtl_jax import weighting as weighting_lib
from mtl_jax.gramian import check as gramian_check
from mtl_jax.train import evaluation
from mtl_jax.train import guards
from mtl_jax.train import preemption as preemption_lib
from mtl_jax.train import results as results_lib
from mtl_jax.train.state import Experiment
from mtl_jax.train.state import OPTIMIZER_KEY
from mtl_jax.train.state import PER_RUN_KEYS
from mtl_jax.train.state import config_fingerprint
from mtl_jax.train.state import group_key


def check_group(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]) -> None:
  """Raises a ValueError unless the configs can be trained as one group in these workdirs."""
  if len(configs) != len(workdirs) or not configs:
    raise ValueError(
      f"train_group needs as many workdirs as configs (got {len(configs)} and {len(workdirs)})."
    )
  keys = {group_key(config) for config in configs}
  if len(keys) > 1:
    raise ValueError(
      f"Configs of one group may differ only in {', '.join(PER_RUN_KEYS)} and (unless the "
      f"method brings its own optimizer) {OPTIMIZER_KEY}; got {len(keys)} variants."
    )
  if jax.process_count() > 1:
    raise ValueError(
      "train_group trains on one process's devices; with several processes train the runs one "
      "by one (train_and_evaluate), each split over every device."
    )
  if int(configs[0].conflicts.probe_every_steps) > 0:
    raise ValueError(
      "config.conflicts.probe_every_steps: the conflict probe runs in single runs only; "
      "train these runs one by one (sweep.group_runs=False) or set it to 0."
    )


def fast_path_check(experiment: Experiment, mesh=None) -> gramian_check.FastPathCheck | None:
  """The self-check of a run whose train step computes fast-path Gramians (a Gramian method at a
  per-sample level), or None (other methods, level 'task', or gramian.verify_every_steps = 0)."""
  every_steps = int(experiment.config.gramian.verify_every_steps)
  gramian_method = isinstance(experiment.weighting, weighting_lib.GramianWeighting)
  if not gramian_method or experiment.level == "task" or every_steps == gramian_check.NEVER:
    return None
  purpose = f"train step at level {experiment.level!r}"
  return gramian_check.FastPathCheck(
    experiment.model, experiment.tasks, every_steps, purpose=purpose, mesh=mesh
  )


def new_progress(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A run's progress record before its first evaluation (checkpointed with its state)."""
  return {
    "best_score": None,
    "best_step": None,
    "history": [],
    "evals_since_best": 0,
    "fingerprint": config_fingerprint(config),
    "skipped_steps": 0,
  }


@dataclasses.dataclass
class Run:
  """Host-side bookkeeping of one lane: where it writes and how its selection stands."""

  config: ml_collections.ConfigDict
  workdir: str
  writer: metric_writers.MetricWriter
  baselines: tuple[dict | None, dict | None]
  progress: dict[str, Any]
  failed: str | None = None

  @property
  def active(self) -> bool:
    return not self.progress.get("stopped_early", False) and self.failed is None

  @classmethod
  def open(cls, config: ml_collections.ConfigDict, workdir: str, tensorboard: bool) -> "Run":
    """Creates the workdir, records config.json (the writing process) and loads the run's Δm
    baselines."""
    if parallel.is_writer():
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "config.json"), "w") as file:
        file.write(config.to_json_best_effort(indent=2))
    writer = metric_writers.MetricWriter(workdir, console=False, tensorboard=tensorboard)
    return cls(config, workdir, writer, results_lib.load_baselines(config), new_progress(config))


class CheckpointStore:
  """A single run's Orbax checkpoints: the latest (to resume) and the best on validation."""

  # Set by `restore` when the best state the resumed progress names could not be recovered.
  best_lost = False

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
    asynchronous = bool(config.training.async_checkpoints)
    self.checkpointer = checkpoint_lib.Checkpointer(workdir, asynchronous=asynchronous)
    self.last_saved = self.checkpointer.latest_step()

  def restore(self, states: Any, runs: Sequence[Run]) -> Any | None:
    """The latest intact state (its progress into runs[0]), or None when nothing was saved."""
    fingerprint = runs[0].progress["fingerprint"]
    directory = os.path.join(self.workdir, checkpoint_lib.LATEST)

    def check(saved):
      what = f"The checkpoint in {directory}"
      results_lib.raise_on_mismatch(what, saved.get("fingerprint"), fingerprint)

    restored = self.checkpointer.restore(states, check_progress=check)
    progress = restored[1] if restored is not None else runs[0].progress
    resumed = (int(restored[0].step), restored[0]) if restored is not None else None
    self.best_lost = not self.checkpointer.settle_best(resumed, progress, states, check)
    if self.best_lost:
      metric_writers.status(
        f"Warning: the best checkpoint of step {progress['best_step']} in {self.workdir} is lost "
        f"(damaged or missing); best-state selection restarts from step {resumed[0]}."
      )
      progress.update(best_score=None, best_step=None, evals_since_best=0)
    if restored is None:
      return None
    states, runs[0].progress = restored[0], progress
    metric_writers.status(f"Resuming from step {resumed[0]} in {self.workdir}.")
    return states

  def save(self, step: int, states: Any, runs: Sequence[Run]) -> None:
    self.checkpointer.save(step, states, runs[0].progress)
    self.last_saved = step

  def save_best(self, step: int, states: Any, runs: Sequence[Run], improved: np.ndarray) -> None:
    if improved[0]:
      self.checkpointer.save(step, states, runs[0].progress, best=True)

  def best(self, states: Any) -> Any:
    self.checkpointer.wait_until_finished()
    restored = self.checkpointer.restore(states, best=True)
    return restored[0] if restored is not None else states

  def left_behind(self) -> str:
    """What a stopped run leaves: the last good checkpoint, named for the error message."""
    if self.last_saved is None:
      return "Training stopped; no checkpoint had been written yet."
    return (
      f"Training stopped; the last good checkpoint (step {self.last_saved}) in {self.workdir} "
      "is intact."
    )

  def close(self) -> None:
    self.checkpointer.wait_until_finished()
    self.checkpointer.close()


class MemoryStore:
  """A group's best states, kept in memory; nothing is written until the group ends."""

  last_saved = None
  best_lost = False

  def __init__(self, lanes):
    self.lanes = lanes
    self.best_states = None

  def restore(self, states: Any, runs: Sequence[Run]) -> None:
    del runs
    # No copy: the lanes' steps never donate their states.
    self.best_states = states
    return None

  def save(self, step: int, states: Any, runs: Sequence[Run]) -> None:
    del step, states, runs

  def save_best(self, step: int, states: Any, runs: Sequence[Run], improved: np.ndarray) -> None:
    del step, runs
    self.best_states = self.lanes.select(improved, states, self.best_states)

  def best(self, states: Any) -> Any:
    del states
    return self.best_states

  def left_behind(self) -> str:
    return "The group keeps nothing on disk before it ends."

  def close(self) -> None:
    pass


class Session:
  """Everything the loop keeps between steps; see the module docstring."""

  def __init__(
    self, experiment: Experiment, lanes, runs: list[Run], store, label: str, probe=None, mesh=None
  ):
    self.experiment = experiment
    self.lanes = lanes
    self.runs = runs
    self.store = store
    self.label = label
    self.conflict_probe = probe
    self.gramian_check = fast_path_check(experiment, mesh)
    training = experiment.config.training
    self.eval_every = max(1, int(training.eval_every_epochs)) * experiment.steps_per_epoch
    self.log_every = max(1, int(training.log_every_steps))
    self.checkpoint_every = int(training.checkpoint_every_steps)
    self.patience = int(training.early_stopping_patience)
    self.states = lanes.initial_states()
    restored = store.restore(self.states, runs)
    self.states = restored if restored is not None else self.states
    self.start_step = lanes.steps_done(self.states)
    if store.best_lost:
      # The resumed state is the selection's first candidate, so the best slot is never empty.
      self.evaluate(self.start_step, save_latest=False)
    self.report = metric_writers.ProgressReport(experiment.total_steps, self.start_step, label)
    self._sums: dict[str, np.ndarray] = {}
    self._counts = np.zeros(lanes.size)
    self._locator = None

  @classmethod
  def single(cls, experiment: Experiment, lanes, workdir: str, mesh=None) -> "Session":
    config = experiment.config
    run = Run.open(config, workdir, tensorboard=True)
    label = (
      f"[{config.method.name}/{config.optimizer.name} lr={config.optimizer.learning_rate:g} "
      f"seed={config.seed}] "
    )
    probe = conflicts_lib.make_probe(experiment, config, workdir, mesh)
    session = cls(experiment, lanes, [run], CheckpointStore(workdir, config), label, probe, mesh)
    split = "" if mesh is None else f", batch split over {parallel.data_size(mesh)} devices"
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    metric_writers.status(
      f"{label}training {experiment.model.encoder.__class__.__name__} on {config.dataset.name} "
      f"tasks {experiment.task_names}: {experiment.total_steps} steps "
      f"({config.training.num_epochs} epochs x {experiment.steps_per_epoch}), workdir {workdir}"
      f"{split}{processes}"
    )
    return session

  @classmethod
  def group(cls, experiment: Experiment, lanes, configs, workdirs, label: str) -> "Session":
    runs = [
      Run.open(config, workdir, tensorboard=False) for config, workdir in zip(configs, workdirs)
    ]
    session = cls(experiment, lanes, runs, MemoryStore(lanes), label)
    rates = ", ".join(f"{float(rate):g}" for rate in lanes.learning_rates)
    metric_writers.status(
      f"{label}training {len(runs)} runs as one compiled program ({lanes.mode}): "
      f"{experiment.total_steps} steps each (lr {rates}; seeds {lanes.seeds}"
      + (f"; optimizers {lanes.optimizers})" if experiment.optimizer_names else ")")
    )
    return session

  def any_active(self) -> bool:
    return any(run.active for run in self.runs)

  def stop_for_preemption(self, step: int, signal_name: str) -> None:
    """Saves exactly the state after `step` steps (single runs) and raises Preempted."""
    if self.store.last_saved != step:
      self.store.save(step, self.states, self.runs)
    self.close()
    total = self.experiment.total_steps
    if self.lanes.grouped:
      where = "the group restarts from step 0 when re-run"
    else:
      where = f"checkpoint saved in {os.path.join(self.runs[0].workdir, checkpoint_lib.LATEST)}"
    message = (
      f"{self.label}stopped by {signal_name} after {step} of {total} steps; {where}. "
      "Re-run the same command to resume."
    )
    metric_writers.status(message)
    raise preemption_lib.Preempted(message, step, self.runs[0].workdir, signal_name)

  def before_step(self, step: int) -> None:
    """The conflict probe and the fast Gramian path's self-check, on the pre-step parameters and
    the batch about to be trained on (the host's copy: on several hosts the global array is not
    addressable as a whole here; for a group, the first run's state and batch)."""
    probe_due = self.conflict_probe is not None and step % self.conflict_probe.every == 0
    check_due = self.gramian_check is not None and self.gramian_check.due(step)
    if not (probe_due or check_due):
      return
    host_batch = self.lanes.host_batch(step)
    try:
      if probe_due:
        self.conflict_probe.maybe_probe(step, self.states, host_batch)
      if check_due:
        state = self.lanes.run_state(self.states, 0)
        self.gramian_check.verify(step, state.params, state.batch_stats, host_batch)
    except gramian_check.FastPathMismatchError:
      self.close()
      raise

  def accept(self, step: int, new_states, step_metrics) -> None:
    """Takes the step's new states, or stops / marks lanes failed when a lane is not finite."""
    finite = guards.finite_lanes(step_metrics)
    if "finite" in step_metrics:  # Skipping: non-finite lanes kept their state in the step.
      self._count_skipped(step, finite)
    elif not finite.all():
      self._fail(step, finite, step_metrics)
    self.states = new_states
    self._add_to_sums(step_metrics, finite)

  def _count_skipped(self, step: int, finite: np.ndarray) -> None:
    for index in np.flatnonzero(~finite):
      run = self.runs[index]
      run.progress["skipped_steps"] = int(run.progress.get("skipped_steps", 0)) + 1
      logging.warning("Skipping step %d of %s: non-finite loss or gradient.", step, run.workdir)

  def _fail(self, step: int, finite: np.ndarray, step_metrics) -> None:
    """A single run raises NonFiniteLossError; a group marks the lanes failed and goes on."""
    task_names = self.experiment.task_names
    if not self.lanes.grouped:
      state = self.states

      def locate():
        self._locator = self._locator or guards.make_gradient_locator(self.experiment)
        return self._locator(state, self.lanes.host_batch(step))

      lane_metrics = {key: value[0] for key, value in step_metrics.items()}
      try:
        guards.check_finite(step, lane_metrics, task_names, self.store.left_behind(), locate)
      finally:
        self.close()
    for index in np.flatnonzero(~finite):
      run = self.runs[index]
      if run.failed is None:
        losses = dict(zip(task_names, np.asarray(step_metrics["task_losses"][index]).tolist()))
        run.failed = f"Non-finite loss or gradient at step {step} (task losses {losses})."
        metric_writers.status(f"{self.label}run {run.workdir} stopped: {run.failed}")

  def _add_to_sums(self, step_metrics, finite: np.ndarray) -> None:
    for key in ("loss", "grad_norm", "task_losses"):
      values = np.asarray(step_metrics[key], np.float64)
      mask = finite.reshape((-1,) + (1,) * (values.ndim - 1))
      self._sums[key] = self._sums.get(key, 0.0) + np.where(mask, values, 0.0)
    self._counts += finite

  def end_of_step(self, done: int) -> None:
    """Per-epoch conflict statistics and the periodic log line."""
    per_epoch = self.experiment.steps_per_epoch
    if self.conflict_probe is not None and done % per_epoch == 0:
      self.conflict_probe.end_epoch(done // per_epoch, done, self.runs[0].writer)
    if done % self.log_every == 0 or done == self.experiment.total_steps:
      self._log(done)

  def _log(self, done: int) -> None:
    counts = np.maximum(self._counts, 1.0)
    speed = self.report(done)
    for index, run in enumerate(self.runs):
      scalars = {
        "train/loss": self._sums["loss"][index] / counts[index],
        "train/grad_norm": self._sums["grad_norm"][index] / counts[index],
      }
      task_losses = self._sums["task_losses"][index] / counts[index]
      for name, value in zip(self.experiment.task_names, task_losses):
        scalars[f"train/{name}_loss"] = value
      if not self.lanes.grouped:
        scalars.update({f"progress/{key}": value for key, value in speed.items()})
      run.writer.write_scalars(done, scalars)
    if self.lanes.grouped:
      metric_writers.status(self.report.line(done, speed) + f"  ({len(self.runs)} runs)")
    else:
      loss = self._sums["loss"][0] / counts[0]
      metric_writers.status(self.report.line(done, speed) + f"  loss {loss:.4f}")
    self._sums, self._counts = {}, np.zeros(self.lanes.size)

  def evaluate(self, done: int, save_latest: bool = True) -> None:
    """Validation of every active lane: best-state selection, early stopping, the latest save."""
    improved = np.zeros(self.lanes.size, bool)
    for index, (run, validation) in enumerate(
      zip(self.runs, self.lanes.evaluate(self.states, "validation"))
    ):
      if run.active:
        improved[index] = self._record_validation(done, run, validation)
    self.store.save_best(done, self.states, self.runs, improved)
    if save_latest:
      self.store.save(done, self.states, self.runs)

  def _record_validation(self, done: int, run: Run, validation) -> bool:
    """Updates one run's selection record with a validation result; returns whether it improved."""
    criterion, score = evaluation.selection_score(self.experiment, validation, run.baselines[0])
    scalars = {
      **{f"validation/{key}": value for key, value in validation.items()},
      criterion: score,
    }
    run.writer.write_scalars(done, scalars)
    progress = run.progress
    improved = progress["best_score"] is None or score < progress["best_score"]
    progress["history"].append({"step": done, criterion: score})
    if improved:
      progress.update(best_score=score, best_step=done, evals_since_best=0, criterion=criterion)
    else:
      progress["evals_since_best"] += 1
    if not self.lanes.grouped:
      epoch = done // self.experiment.steps_per_epoch
      mark = "  (best)" if improved else ""
      metric_writers.status(f"{self.label}epoch {epoch}: {criterion} {score:.4f}{mark}")
    if self.patience and progress["evals_since_best"] >= self.patience:
      progress["stopped_early"] = True
      if not self.lanes.grouped:
        metric_writers.status(
          f"{self.label}early stopping at step {done}: no improvement in {self.patience} "
          "evaluations."
        )
    return improved

  def finish(self) -> list[dict | None]:
    """Each run's results of its best state, written to its workdir (failed.json for a failed
    run)."""
    best_states = self.store.best(self.states)
    validations = self.lanes.evaluate(best_states, "validation")
    tests = self.lanes.evaluate(best_states, "test")
    outputs: list[dict | None] = []
    total = self.experiment.total_steps
    for run, validation, test in zip(self.runs, validations, tests):
      if run.failed is not None:
        results_lib.write_failure(run.workdir, run.config, run.failed)
        outputs.append(None)
        continue
      results = results_lib.run_results(
        self.experiment, run.config, run.progress, validation, test, run.baselines
      )
      if self.lanes.grouped:
        results["multirun"] = {
          "group_size": len(self.runs),
          "stopped_early": bool(run.progress.get("stopped_early", False)),
        }
      run.writer.write_scalars(total, {f"test/{key}": value for key, value in test.items()})
      results_lib.write_json(os.path.join(run.workdir, results_lib.RESULTS_FILE), results)
      outputs.append(results)
    self.close()
    return outputs

  def close(self) -> None:
    """Waits for pending saves and closes every writer and checkpoint manager."""
    self.store.close()
    for run in self.runs:
      run.writer.close()
