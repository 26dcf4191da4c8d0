"""The one place that knows Orbax: latest and best checkpoints of a run's train state.

A run directory holds `checkpoints/` (the latest few, for resuming) and `best/` (the state
chosen on validation). Each checkpoint stores the train state (a pytree of arrays) and a
small JSON `progress` record (evaluation history, best score so far, config fingerprint), so
that a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import orbax.checkpoint as ocp

LATEST = "checkpoints"
BEST = "best"


def _manager(directory: str, max_to_keep: int, asynchronous: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=asynchronous,
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "progress"))


class Checkpointer:
  """Saves and restores the latest and the best train state of one run."""

  def __init__(self, workdir: str, max_to_keep: int = 2, asynchronous: bool = True):
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, LATEST), max_to_keep, asynchronous)
    self.best = _manager(os.path.join(workdir, BEST), 1, asynchronous)

  def save(self, step: int, state: Any, progress: dict, best: bool = False) -> None:
    """Saves state and progress at step, to the best slot when best is True."""
    manager = self.best if best else self.latest
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress))
    manager.save(step, args=args, force=True)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, target: Any, best: bool = False) -> tuple[Any, dict] | None:
    """Restores the newest intact checkpoint onto target's structure, or None when there is none.

    A checkpoint that fails to restore (truncated or corrupted files) is skipped with a
    warning and the next older one is tried.
    """
    manager = self.best if best else self.latest
    manager.reload()
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      args = ocp.args.Composite(state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore())
      try:
        restored = manager.restore(step, args=args)
      except Exception as error:  # Orbax raises many types for damaged files.
        failures.append(f"step {step}: {type(error).__name__}: {error}")
        logging.warning("Checkpoint at step %d in %s could not be restored (%s); trying an older one.",
                        step, manager.directory, error)
        continue
      if failures:
        logging.warning("Restored step %d after skipping damaged checkpoints: %s", step, failures)
      return restored.state, dict(restored.progress)
    if failures:
      raise RuntimeError(
          f"No intact checkpoint in {manager.directory}; every one failed to restore:\n  " + "\n  ".join(failures)
      )
    return None

  def wait_until_finished(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
