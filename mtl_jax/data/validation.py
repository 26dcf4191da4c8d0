"""Host-side checks of a dataset's first batch per split: label keys, shapes and value ranges.

A label array of the wrong shape, or class ids outside the head's range, would not crash a
jitted step: segmentation silently ignores out-of-range pixels and broadcasting can hide a
shape slip, so results would be wrong without a sign. `check_dataset` looks at the first batch
of every split once per run (a few milliseconds) and raises a `DataError` naming the split, the
key, and what was expected and found.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import pipeline

# Examples read per split; enough to catch a wrong layout or a stray label id cheaply.
CHECK_EXAMPLES = 64


class DataError(ValueError):
  """A dataset's arrays do not have the keys, shapes or values its tasks need."""


def _range(array: np.ndarray) -> str:
  return f"[{array.min()}, {array.max()}]" if array.size else "(empty)"


def _segmentation_problem(task, key, target, size, spatial) -> str | None:
  expected = (size, *spatial) if spatial else None
  if target.shape != expected:
    return (
      f"{key!r} has shape {target.shape}; expected {expected} ([B, H, W] integer class ids, as "
      "the image)."
    )
  if not np.issubdtype(target.dtype, np.integer):
    return f"{key!r} has dtype {target.dtype}; expected integer class ids."
  valid = (target == task.ignore_index) | ((target >= 0) & (target < task.num_classes))
  if not np.all(valid):
    bad = np.unique(target[~valid])[:8].tolist()
    return (
      f"{key!r} has class ids {bad} outside [0, {task.num_classes}) (ignore index "
      f"{task.ignore_index}); found range {_range(target)}."
    )
  return None


def _depth_problem(task, key, target, size, spatial) -> str | None:
  del task
  expected = (size, *spatial) if spatial else None
  if target.shape != expected:
    return (
      f"{key!r} has shape {target.shape}; expected {expected} ([B, H, W] depth, 0 = invalid pixel)."
    )
  if not np.all(np.isfinite(target)) or np.any(target < 0):
    return f"{key!r} must be finite and >= 0 (0 = invalid pixel); found range {_range(target)}."
  return None


def _normals_problem(task, key, target, size, spatial) -> str | None:
  del task
  expected = (size, *spatial, 3) if spatial else None
  if target.shape != expected:
    return f"{key!r} has shape {target.shape}; expected {expected} ([B, H, W, 3] normal vectors)."
  if not np.all(np.isfinite(target)):
    return f"{key!r} has non-finite values."
  return None


def _attribute_problem(task, key, target, size, spatial) -> str | None:
  del spatial
  if target.ndim != 2 or target.shape[0] != size or target.shape[1] <= task.index:
    return (
      f"{key!r} has shape {target.shape}; expected [{size}, A] with A > {task.index} for task "
      f"{task.name!r}."
    )
  column = target[:, task.index]
  if not np.all((column == 0) | (column == 1)):
    return (
      f"{key!r} column {task.index} (task {task.name!r}) must be 0 or 1; found range "
      f"{_range(column)}."
    )
  return None


def _classification_problem(task, key, target, size, spatial) -> str | None:
  del spatial
  if target.shape != (size,):
    return f"{key!r} has shape {target.shape}; expected ({size},) integer labels."
  outside = np.any((target < 0) | (target >= task.num_classes))
  if not np.issubdtype(target.dtype, np.integer) or outside:
    return (
      f"{key!r} must hold integer labels in [0, {task.num_classes}); found dtype "
      f"{target.dtype}, range {_range(target)}."
    )
  return None


# The first type a task is an instance of decides its check.
_TARGET_CHECKS = (
  (tasks_lib.Segmentation, _segmentation_problem),
  (tasks_lib.Depth, _depth_problem),
  (tasks_lib.Normals, _normals_problem),
  (tasks_lib.BinaryAttribute, _attribute_problem),
  (tasks_lib.Classification, _classification_problem),
)


def _target_problem(task, key, target, size, spatial) -> str | None:
  """What is wrong with one task's target array, or None."""
  for task_type, problem in _TARGET_CHECKS:
    if isinstance(task, task_type):
      return problem(task, key, target, size, spatial)
  if target.shape[:1] != (size,):
    return f"{key!r} has {target.shape[:1]} examples in a batch of {size} images."
  return None


def _image_problem(batch: pipeline.Batch) -> str | None:
  if "image" not in batch:
    return f"no 'image' array; found keys {sorted(batch)}."
  image = np.asarray(batch["image"])
  if image.ndim not in (2, 4):
    return f"'image' has shape {image.shape}; expected [B, H, W, C] (or [B, D] for vectors)."
  if not np.issubdtype(image.dtype, np.floating) or not np.all(np.isfinite(image)):
    return (
      f"'image' must be finite floats; found dtype {image.dtype}"
      f"{'' if not np.issubdtype(image.dtype, np.floating) else ' with non-finite values'}."
    )
  return None


def check_batch(
  batch: pipeline.Batch, tasks: Sequence[tasks_lib.Task], split: str, dataset: str = ""
) -> None:
  """Raises a DataError unless batch holds what every task expects (see the tasks' batch contract).

  Args:
    batch: a batch dict of host arrays.
    tasks: the tasks that will read it.
    split: the split's name, for the message.
    dataset: the dataset's name, for the message.
  """
  where = f"dataset {dataset!r} split {split!r}" if dataset else f"split {split!r}"
  problem = _image_problem(batch)
  if problem is not None:
    raise DataError(f"{where}: {problem}")
  image = np.asarray(batch["image"])
  size = image.shape[0]
  spatial = tuple(image.shape[1:3]) if image.ndim == 4 else None
  for task in tasks:
    key = getattr(task, "target_key", None)
    if key is None:
      continue
    if key not in batch:
      problem = f"task {task.name!r} needs key {key!r}; found keys {sorted(batch)}."
    else:
      problem = _target_problem(task, key, np.asarray(batch[key]), size, spatial)
    if problem is not None:
      raise DataError(f"{where}: {problem}")


def check_dataset(
  dataset,
  tasks: Sequence[tasks_lib.Task],
  splits: Sequence[str] = ("train", "validation", "test"),
  examples: int = CHECK_EXAMPLES,
) -> None:
  """Checks the first `examples` examples of each split (see check_batch); raises a DataError naming
  the split.

  Args:
    dataset: a registry.Dataset.
    tasks: the tasks of the run.
    splits: the splits to check; a missing one is an error.
    examples: examples read per split.
  """
  for split in splits:
    if split not in dataset.splits:
      raise DataError(
        f"dataset {dataset.name!r} has no {split!r} split; found {sorted(dataset.splits)}."
      )
    source = dataset.splits[split]
    if len(source) == 0:
      raise DataError(f"dataset {dataset.name!r} split {split!r} is empty.")
    batch = source.batch(np.arange(min(len(source), examples)))
    check_batch(batch, tasks, split, dataset.name)
