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

A damaged step is moved aside (renamed `<step>.damaged`, kept for inspection; Orbax no longer
lists it), so that a resumed run can write that step again. A save that cannot be written (a
full disk, a read-only directory) raises `CheckpointWriteError` naming the directory and the
step; older checkpoints are untouched, since Orbax renames a step into place only once it is
whole. Asynchronous saves report such a failure late (at the next save to the same directory or
at `wait_until_finished`); the error still names the step that failed.

The processes of one multi-host job share a run directory: only process 0 renames damaged steps.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mtl_jax import metric_writers

LATEST = "checkpoints"
BEST = "best"
# The key under which the progress record carries the state digest (removed on restore).
DIGEST_KEY = "_state_digest"
TMP_MARKER = ".orbax-checkpoint-tmp"
# The suffix of a damaged step's directory once it is moved aside.
DAMAGED_SUFFIX = ".damaged"
# Checkpoints kept per directory. The best directory keeps two so that the best state an older
# latest checkpoint refers to survives one newer best saved before a crash (`Checkpointer.settle`).
LATEST_TO_KEEP = 2
BEST_TO_KEEP = 2


class CheckpointError(RuntimeError):
  """No intact checkpoint could be restored; the message names the directory and each failure."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (full disk, read-only directory); names the directory and
  the step."""


def describe_error(error: BaseException) -> str:
  """'Type: first line' of an error (at most 300 characters); the OS error inside a TensorStore
  message is spelled out first."""
  text = str(error).strip()
  description = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]
  code = re.search(r"os_error_code='?(\d+)", text)
  if code and not isinstance(error, OSError):
    description = f"{os.strerror(int(code.group(1)))} ({description})"
  return description


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


def move_aside(directory: str, step: int) -> str | None:
  """Renames `directory/<step>` to `<step>.damaged` (`.damaged.1`, ... when taken); returns the
  new path, or None where nothing was moved (another process's job, or already gone)."""
  source = os.path.join(directory, str(step))
  if jax.process_index() != 0 or not os.path.isdir(source):
    return None
  target, attempt = source + DAMAGED_SUFFIX, 0
  while os.path.exists(target):
    attempt += 1
    target = f"{source}{DAMAGED_SUFFIX}.{attempt}"
  os.rename(source, target)
  return target


class Checkpointer:
  """Saves and restores the latest and the best train state of one run."""

  def __init__(self, workdir: str, max_to_keep: int = LATEST_TO_KEEP, asynchronous: bool = True):
    self.workdir = workdir
    self.asynchronous = asynchronous
    # Partial saves from a killed run are reported before the manager's cleanup removes them.
    for name in partial_checkpoints(os.path.join(workdir, LATEST)) + partial_checkpoints(
      os.path.join(workdir, BEST)
    ):
      metric_writers.status(
        f"Ignoring partially written checkpoint {name} in {workdir} (the save never finished)."
      )
    self.latest = _manager(os.path.join(workdir, LATEST), max_to_keep, asynchronous)
    self.best = _manager(os.path.join(workdir, BEST), BEST_TO_KEEP, asynchronous)
    # The step of each manager's save still being written in the background (asynchronous).
    self._pending: dict[int, int] = {}
    self._failed = False

  def save(self, step: int, state: Any, progress: Mapping[str, Any], best: bool = False) -> None:
    """Saves state and progress at step, to the best slot when best is True.

    A step already in the slot was written by an abandoned part of this run (it resumed from an
    older step and has now recomputed this one): it is replaced.

    Raises:
      CheckpointWriteError: this save, or the previous asynchronous one to the slot, failed.
    """
    manager = self.best if best else self.latest
    self._wait(manager)
    progress = {**progress, DIGEST_KEY: state_digest(state)}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
    )
    try:
      if step in manager.all_steps():
        manager.delete(step)
      manager.save(step, args=args, force=True)
    except Exception as error:  # Orbax and TensorStore raise many types for a failed write.
      raise self._write_error(manager, step, error) from error
    if self.asynchronous:
      self._pending[id(manager)] = step

  def _wait(self, manager: ocp.CheckpointManager) -> None:
    """Waits for the manager's background save; its failure becomes a CheckpointWriteError."""
    try:
      manager.wait_until_finished()
    except Exception as error:  # The background save's own error, whatever its type.
      step = self._pending.get(id(manager))
      raise self._write_error(manager, step, error) from error
    finally:
      self._pending.pop(id(manager), None)

  def _write_error(self, manager, step: int | None, error: Exception) -> CheckpointWriteError:
    """The error of a failed save, naming the directory, the step and the checkpoint a rerun
    resumes from (the newest finished one in the latest slot)."""
    self._failed = True
    logging.warning("Checkpoint step %s in %s failed: %r", step, manager.directory, error)
    latest = str(self.latest.directory)
    intact = [
      number
      for number in _finished_steps(latest)
      if not (manager is self.latest and number == step)
    ]
    kept = (
      f"the previous checkpoint (step {max(intact)} in {latest}) is intact"
      if intact
      else "no earlier checkpoint was written"
    )
    return CheckpointWriteError(
      f"could not write checkpoint step {step} in {manager.directory}: {describe_error(error)}; "
      f"{kept}. Free space or make the directory writable, then re-run the same command."
    )

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_steps(self) -> list[int]:
    self.best.reload()
    return sorted(self.best.all_steps())

  def restore(
    self, target: Any, best: bool = False, check_progress: Callable[[dict], None] | None = None
  ) -> tuple[Any, dict] | None:
    """Restores the newest intact checkpoint onto target's structure, or None when there is none.

    A checkpoint that fails to restore (truncated, garbled or missing files) or whose content
    digest differs from the one recorded at save time is moved aside (`<step>.damaged`) with a
    warning line, and the next older one is tried.

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
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
      if check_progress is not None:
        saved_progress = _read_progress(manager, step)
        if saved_progress is not None:
          check_progress(saved_progress)
      try:
        restored = _restore_step(manager, step, target)
      except Exception as error:  # Orbax and TensorStore raise many types for damaged files.
        failures.append(f"step {step}: {describe_error(error)}")
        self._set_aside(manager, step, error)
        continue
      if failures:
        metric_writers.status(
          f"Restored checkpoint step {step} from {manager.directory} after skipping "
          f"{len(failures)} damaged one(s)."
        )
      return restored
    if failures:
      raise CheckpointError(
        f"No intact checkpoint in {manager.directory}: every one failed to restore ("
        + "; ".join(failures)
        + f"). Each was moved aside to <step>{DAMAGED_SUFFIX}; re-run to start over from step 0, "
        "or restore the directory from a backup."
      )
    return None

  def _set_aside(self, manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    """Reports a damaged step and moves it aside, so a resumed run can write that step again."""
    moved = move_aside(str(manager.directory), step)
    where = f"moved to {moved}" if moved else "left in place"
    metric_writers.status(
      f"Warning: checkpoint step {step} in {manager.directory} is damaged "
      f"({describe_error(error)}); {where}; falling back to an older one."
    )
    logging.warning(
      "Checkpoint step %d in %s could not be restored: %s", step, manager.directory, error
    )
    manager.reload()

  def settle_best(
    self,
    resumed: tuple[int, Any] | None,
    progress: Mapping[str, Any],
    target: Any,
    check_progress: Callable[[dict], None] | None = None,
  ) -> bool:
    """Makes the best slot agree with a run about to resume; returns False when the best state
    its progress record names is lost (the slot is then emptied: the caller restarts the
    selection).

    Each best step is restored, newest first, until an intact one at or before the resumed step
    is found: damaged ones are moved aside like any other, and intact ones after the resumed step
    (saved by the abandoned part of the run, which the resumed run recomputes) are deleted. The
    one found must be `progress['best_step']`; when it is not but that step is the resumed one,
    the resumed state is saved as the best again.

    Args:
      resumed: (step, state) of the restored latest checkpoint; None for a run from scratch.
      progress: the run's progress record (its `best_step`).
      target: a pytree with the structure of the saved state.
      check_progress: as for `restore`.
    """
    resumed_step = resumed[0] if resumed is not None else None
    newest = self._newest_intact_best(resumed_step, target, check_progress)
    best_step = progress.get("best_step")
    if best_step is None or newest == int(best_step):
      return True
    if resumed is not None and int(best_step) == resumed_step:
      self.save(resumed_step, resumed[1], progress, best=True)
      self.wait_until_finished()
      metric_writers.status(f"Best checkpoint step {resumed_step} re-saved from the latest one.")
      return True
    for step in self.best_steps():
      self.best.delete(step)
    return False

  def _newest_intact_best(self, resumed_step: int | None, target, check_progress) -> int | None:
    """The newest intact best step at or before resumed_step (see `settle_best`), or None."""
    while True:
      try:
        restored = self.restore(target, best=True, check_progress=check_progress)
      except CheckpointError:  # Every one was damaged, and has been moved aside.
        restored = None
      steps = self.best_steps()
      if restored is None or not steps:
        return None
      if resumed_step is not None and steps[-1] <= resumed_step:
        return steps[-1]
      metric_writers.status(
        f"Deleting best checkpoint step {steps[-1]} in {self.best.directory}: it is newer than "
        f"the step training resumes from ({resumed_step or 0}) and will be recomputed."
      )
      self.best.delete(steps[-1])

  def wait_until_finished(self) -> None:
    """Waits for background saves; raises CheckpointWriteError naming a failed one."""
    self._wait(self.latest)
    self._wait(self.best)

  def close(self) -> None:
    """Finishes pending saves and releases the managers; after a failed save, a second report of
    the same failure is logged, not raised, so the first error is the one the caller sees."""
    try:
      self.wait_until_finished()
    except CheckpointWriteError:
      if not self._failed:
        raise
    finally:
      for manager in (self.latest, self.best):
        try:
          manager.close()
        except Exception as error:  # A failed background save is re-raised by close.
          if not self._failed:
            raise
          logging.warning("Closing %s after a failed save: %r", manager.directory, error)


def _finished_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return [int(name) for name in os.listdir(directory) if name.isdigit()]


def _read_progress(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """A step's progress record alone, or None when it cannot be read (reported with the arrays)."""
  try:
    args = ocp.args.Composite(progress=ocp.args.JsonRestore())
    return dict(manager.restore(step, args=args).progress)
  except Exception:  # A damaged record is reported by the full restore that follows.
    return None


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
  """(state, progress) of one step; raises when a file is damaged or the digest differs."""
  args = ocp.args.Composite(state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore())
  restored = manager.restore(step, args=args)
  progress = dict(restored.progress)
  expected = progress.pop(DIGEST_KEY, None)
  if expected is not None and expected != state_digest(restored.state):
    raise ValueError("the restored arrays do not match the digest recorded at save time")
  return jax.tree_util.tree_map(_placed_like, target, restored.state), progress


def _placed_like(target: Any, restored: Any) -> Any:
  """`restored` uncommitted where `target` is (an array on the default device that no sharding
  pinned): Orbax returns committed arrays, and a jitted program called with a committed argument
  compiles again, so a restored single-device state would recompile every step it meets."""
  movable = isinstance(restored, jax.Array) and not jax.dtypes.issubdtype(
    restored.dtype, jax.dtypes.extended
  )
  if movable and isinstance(target, jax.Array) and not target.committed:
    return jnp.asarray(np.asarray(restored))
  return restored


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
