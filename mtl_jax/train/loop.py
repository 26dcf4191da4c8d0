"""The one training loop: single runs and grouped runs, resumable, evaluated, checkpointed.

A step is a pure function of (state, batch) compiled once; the loop around it is ordinary
Python: data, the finite guard, logging, evaluation and best-state selection, checkpoints,
preemption and the conflict probe. How many runs advance together, and how, is a lane strategy
(`lanes.SingleLane` for one run; `lanes.group_lanes` for a group of runs differing in seed and
learning rate: stacked states, or a list of them on CPU), so a single run and a sweep's group
share every line below.

A single run keeps Orbax checkpoints (the latest, to resume exactly: the data order is a
function of seed and step, and the RNG, optimizer and weighting state are in the checkpoint;
and the best on validation). A group keeps its best states in memory and writes nothing until it
ends; an interrupted group restarts from step 0, and its finished runs are never retrained.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import ml_collections

from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import parallel
from mtl_jax.data import registry as data_registry
from mtl_jax.train import lanes as lanes_lib
from mtl_jax.train import preemption as preemption_lib
from mtl_jax.train import results as results_lib
from mtl_jax.train import session as session_lib
from mtl_jax.train import workdir_lock
from mtl_jax.train.state import build_experiment
from mtl_jax.train.state import build_group_experiment


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  dataset: data_registry.Dataset | None = None,
  preemption: preemption_lib.PreemptionGuard | None = None,
) -> dict:
  """Trains a model from config, keeping the best validation state, and writes test results.

  Re-running with the same workdir resumes from the latest checkpoint; a finished run only
  re-reads its results. The workdir is locked while the run trains (`workdir_lock`). On
  SIGTERM/SIGINT the current step finishes, a checkpoint of it is written, and
  `preemption.Preempted` is raised (see mtl_jax/train/preemption.py).

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
    gramian.check.FastPathMismatchError: per-sample Gramians computed on the fast path (a Gramian
      method at level 'sample' / 'sample_task', the conflict probe) disagree with the reference.
    config_validation.ConfigError: a bad config, or a workdir written by a different config.
    checkpoint.CheckpointError: checkpoints exist but none is intact.
    checkpoint.CheckpointWriteError: a checkpoint could not be written (full disk, read-only).
    workdir_lock.WorkdirInUseError: another process is training in workdir.
  """
  finished = results_lib.finished_results(config, workdir)
  if finished is not None:
    return finished
  with workdir_lock.hold([workdir]), _guard(preemption) as guard:
    experiment = build_experiment(config, dataset)
    mesh = parallel.make_mesh(config) if jax.device_count() > 1 else None
    lanes = lanes_lib.SingleLane(experiment, mesh)
    session = session_lib.Session.single(experiment, lanes, workdir, mesh)
    return train_lanes(session, guard)[0]


def train_group(
  configs: Sequence[ml_collections.ConfigDict],
  workdirs: Sequence[str],
  dataset: data_registry.Dataset | None = None,
  label: str = "",
  lane_mode: str = "auto",
) -> list[dict | None]:
  """Trains K runs as one compiled program and writes each run's results.json (or failed.json).

  Args:
    configs: K run configs that agree on everything but seed, optimizer.learning_rate,
      delta_m.baseline and optimizer.name (see `state.group_key`).
    workdirs: K run directories.
    dataset: an already loaded dataset to reuse.
    label: a prefix for progress lines.
    lane_mode: 'auto', 'vmap', 'map' or 'loop' (see `lanes.default_lane_mode`).

  Returns:
    Per run, the results dict, or None for a run that produced a non-finite loss (its
    failed.json names the step), in the order of `configs`.

  Raises:
    ValueError: configs that cannot share one program, or mismatched lengths.
    workdir_lock.WorkdirInUseError: another process is training in one of the workdirs.
  """
  session_lib.check_group(configs, workdirs)
  with workdir_lock.hold(workdirs), _guard(None) as guard:
    experiment = build_group_experiment(configs, dataset)
    lanes = lanes_lib.group_lanes(experiment, configs, lane_mode)
    session = session_lib.Session.group(experiment, lanes, configs, workdirs, label)
    return train_lanes(session, guard)


@contextlib.contextmanager
def _guard(preemption: preemption_lib.PreemptionGuard | None):
  """The guard to obey: the given one, the innermost active one, or a new one for this call."""
  guard = preemption or preemption_lib.active_guard()
  if guard is not None:
    yield guard
    return
  with preemption_lib.PreemptionGuard() as guard:
    yield guard


def train_lanes(
  session: "session_lib.Session", guard: preemption_lib.PreemptionGuard
) -> list[dict | None]:
  """The loop: every step of every lane, then each run's results (None for a failed run)."""
  total = session.experiment.total_steps
  try:
    for step in range(session.start_step, total):
      if not session.any_active():
        break
      batch = session.lanes.batch(step)
      if guard.should_stop(step):
        session.stop_for_preemption(step, guard.signal_name)
      session.before_step(step)
      new_states, step_metrics = session.lanes.step(session.states, batch)
      session.accept(step, new_states, step_metrics)
      done = step + 1
      session.end_of_step(done)
      if done % session.eval_every == 0 or done == total:
        session.evaluate(done)
      elif session.checkpoint_every and done % session.checkpoint_every == 0:
        session.store.save(done, session.states, session.runs)
    return session.finish()
  except checkpoint_lib.CheckpointWriteError:
    session.close()  # Flushes the logs; the failed save is reported once, by this error.
    raise
  finally:
    # The data pipeline's reader thread or worker processes stop however the loop ends.
    session.lanes.close()
