"""The one place that knows Orbax: latest and best checkpoints of a run's train state.

A run directory holds `checkpoints/` (the latest few, for resuming) and `best/` (the state
chosen on validation). Each checkpoint stores the train state (a pytree of arrays) and a
small JSON `progress` record (evaluation history, best score so far, config fingerprint), so
that a resumed run continues exactly where it stopped.

Integrity. Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/` and renames it to
`<step>/` only when every file is written (on object stores, which cannot rename, it writes
`commit_success.txt` last instead); `all_steps()` lists finalized steps only, so a partially
written checkpoint (a crash or SIGKILL mid-save) is never taken for a complete one. Files can
still be damaged after the commit (a full disk, a copy cut short, bit rot), and a truncated or
garbled array chunk does not always make Orbax fail. So every save also records a digest of the
state's bytes in the progress record, and `restore` recomputes it: a checkpoint that fails to
restore or whose digest differs is skipped with a warning, and the newest intact one is used.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from mtl_jax import metric_writers

LATEST = "checkpoints"
BEST = "best"
# The key under which the progress record carries the state digest (removed on restore).
DIGEST_KEY = "_state_digest"
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """No intact checkpoint could be restored; the message names the directory and each failure."""


def state_digest(state: Any) -> str | None:
  """A hex digest of a pytree's structure, shapes, dtypes and bytes (host-side; cost ~ one copy).

  Arrays replicated over several processes are read from this process's copy, so every process
  computes the same digest. Returns None when an array is split across processes (no single
  process sees every byte); Orbax's own checks are all that guard those.
  """
  digest = hashlib.blake2b(digest_size=16)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  if any(_split_across_processes(leaf) for leaf in leaves):
    return None
  digest.update(str(treedef).encode())
  leaves = [_local_copy(leaf) for leaf in leaves]
  for leaf in jax.device_get(leaves):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _split_across_processes(leaf: Any) -> bool:
  return (
    isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated
  )


def _local_copy(leaf: Any) -> Any:
  """A whole copy of a leaf held by this process (an array replicated over processes is not
  addressable as a whole, but each of its local shards is all of it)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return leaf.addressable_data(0)
  return leaf


def _manager(directory: str, max_to_keep: int, asynchronous: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=True,
    enable_async_checkpointing=asynchronous,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    os.path.abspath(directory), options=options, item_names=("state", "progress")
  )


def partial_checkpoints(directory: str) -> list[str]:
  """Names of the unfinished (temporary) step directories Orbax left in directory."""
  if not os.path.isdir(directory):
    return []
  return sorted(name for name in os.listdir(directory) if TMP_MARKER in name)


class Checkpointer:
  """Saves and restores the latest and the best train state of one run."""

  def __init__(self, workdir: str, max_to_keep: int = 2, asynchronous: bool = True):
    self.workdir = workdir
    # Partial saves from a killed run are reported before the manager's cleanup removes them.
    for name in partial_checkpoints(os.path.join(workdir, LATEST)) + partial_checkpoints(
      os.path.join(workdir, BEST)
    ):
      metric_writers.status(
        f"Ignoring partially written checkpoint {name} in {workdir} (the save never finished)."
      )
    self.latest = _manager(os.path.join(workdir, LATEST), max_to_keep, asynchronous)
    self.best = _manager(os.path.join(workdir, BEST), 1, asynchronous)

  def save(self, step: int, state: Any, progress: Mapping[str, Any], best: bool = False) -> None:
    """Saves state and progress at step, to the best slot when best is True."""
    manager = self.best if best else self.latest
    progress = {**progress, DIGEST_KEY: state_digest(state)}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
    )
    manager.save(step, args=args, force=True)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(
    self, target: Any, best: bool = False, check_progress: Callable[[dict], None] | None = None
  ) -> tuple[Any, dict] | None:
    """Restores the newest intact checkpoint onto target's structure, or None when there is none.

    A checkpoint that fails to restore (truncated, garbled or missing files) or whose content
    digest differs from the one recorded at save time is skipped with a warning line, and the
    next older one is tried.

    Args:
      target: a pytree with the structure (and shardings) of the saved state.
      best: restore from the best slot instead of the latest.
      check_progress: called with each candidate's progress record before its arrays are read;
        whatever it raises (e.g. a config mismatch) propagates, so a foreign checkpoint is
        refused by name rather than reported as damaged because its arrays do not fit target.

    Raises:
      CheckpointError: checkpoints exist but none is intact; names the directory and why each
        failed.
    """
    manager = self.best if best else self.latest
    manager.reload()
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      if check_progress is not None:
        try:
          saved_progress = manager.restore(
            step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
          ).progress
        except Exception:  # A damaged record is reported by the full restore below.
          saved_progress = None
        if saved_progress is not None:
          check_progress(dict(saved_progress))
      args = ocp.args.Composite(
        state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()
      )
      try:
        restored = manager.restore(step, args=args)
        progress = dict(restored.progress)
        expected = progress.pop(DIGEST_KEY, None)
        if expected is not None and expected != state_digest(restored.state):
          raise ValueError("the restored arrays do not match the digest recorded at save time")
      except Exception as error:  # Orbax and TensorStore raise many types for damaged files.
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        failures.append(f"step {step}: {reason}")
        metric_writers.status(
          f"Warning: checkpoint step {step} in {manager.directory} is damaged ({reason}); "
          "falling back to an older one."
        )
        logging.warning(
          "Checkpoint at step %d in %s could not be restored: %s", step, manager.directory, error
        )
        continue
      if failures:
        metric_writers.status(
          f"Restored checkpoint step {step} from {manager.directory} after skipping "
          f"{len(failures)} damaged one(s)."
        )
      return restored.state, progress
    if failures:
      raise CheckpointError(
        f"No intact checkpoint in {manager.directory}: every one failed to restore ("
        + "; ".join(failures)
        + "). Move the directory away to start over, or restore it from a backup."
      )
    return None

  def wait_until_finished(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def fingerprint_mismatches(
  saved: Mapping[str, Any] | None, current: Mapping[str, Any], prefix: str = ""
) -> list[str]:
  """Lists 'key: checkpoint X vs config Y' for every (nested, dotted) key where two fingerprints
  differ.

  Args:
    saved: the fingerprint recorded in a checkpoint (None when it has none).
    current: the fingerprint of the config being run.
    prefix: the dotted path of these dicts (used in recursion).
  """
  saved = saved or {}
  mismatches = []
  for key in sorted(set(saved) | set(current), key=str):
    name = f"{prefix}{key}"
    left, right = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(left, Mapping) and isinstance(right, Mapping):
      mismatches.extend(fingerprint_mismatches(left, right, name + "."))
    elif left != right:
      mismatches.append(f"{name}: checkpoint {left!r} vs config {right!r}")
  return mismatches
