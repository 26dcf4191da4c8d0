"""Partial labels: which (example, task) pairs of a split carry a label, as a batch's label mask.

A run's batches carry `tasks.LABEL_MASK_KEY` (bool [B, T], the run's task order) when some
example lacks some task's label. Two sources combine (logical and):

* hidden labels: task t keeps its label on a fraction f_t of the examples of the splits named by
  `config.dataset.label_fraction_splits` (training only by default: validation and test keep
  every label). f_t is `config.dataset.label_fractions`' entry for t ("depth=0.2,normals=0.5")
  when it names t, else `config.dataset.label_fraction` for the tasks of
  `config.dataset.label_fraction_tasks` (every task when empty), else 1.
  Which examples is a pure function of (config.dataset.seed, task name, example index, and the
  split when it is not 'train'): each example draws one uniform number per task and the
  round(f·N) smallest keep their label. The same example therefore keeps the same labels across
  epochs, resumes, process and worker counts, and a smaller fraction's labelled set lies inside
  a larger one's.
* missing labels of the data itself: a source whose batches hold 'label_mask/<task>' (bool [B])
  marks the examples without that task's label, in any split. The bundled datasets have none:
  the scenes label every task of every example, and in the TFDS datasets (CelebA, Cityscapes,
  NYUv2) every example has every task; their sentinels mark invalid pixels, not missing labels
  (segmentation -1, depth 0, normals the zero vector: the per-pixel losses skip those pixels).

The mask is added when the rows are read (`MaskedSource`), so it travels through the grain
pipeline, the augmentation (which leaves non-pixel keys alone), the stacking of grouped runs and
the batch placement on a mesh like any other per-example array.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Sequence

import ml_collections
import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import pipeline
from mtl_jax.data.dataset import Dataset

# The prefix of a source's own per-task label flags, 'label_mask/<task name>' (bool [B]).
SOURCE_MASK_PREFIX = tasks_lib.LABEL_MASK_KEY + "/"

# The splits whose labels `config.dataset.label_fraction_splits` may hide.
SPLITS = ("train", "validation", "test")

# Separates the hidden-label draws from the other random streams of the dataset seed.
_LABEL_STREAM = 23


def hidden_label_mask(
  num_examples: int, task_name: str, fraction: float, seed: int, split: str = "train"
) -> np.ndarray:
  """bool [N]: which of a split's N examples keep `task_name`'s label at `fraction`.

  round(fraction · N) examples keep it (at least one when fraction > 0): those with the smallest
  of N uniform draws from (seed, task name, split), so smaller fractions keep subsets of larger
  ones. The training split's draws leave the split out of the stream (as before other splits
  could hide labels); every other split adds its name, so its draws are independent of them.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"config.dataset.label_fraction must be in (0, 1], got {fraction!r}.")
  if fraction == 1:
    return np.ones((num_examples,), bool)
  stream = [int(seed), _LABEL_STREAM, zlib.crc32(task_name.encode("utf-8"))]
  if split != "train":
    stream.append(zlib.crc32(split.encode("utf-8")))
  draws = np.random.default_rng(stream).random(num_examples)
  kept = max(1, int(round(fraction * num_examples)))
  mask = np.zeros((num_examples,), bool)
  mask[np.argsort(draws, kind="stable")[:kept]] = True
  return mask


@dataclasses.dataclass(frozen=True)
class MaskedSource:
  """A source whose batches gain the run's label mask (picklable, for grain's workers).

  Attributes:
    source: the split's source.
    task_names: the run's tasks, in column order.
    hidden: bool [N, T] labels kept by `label_fraction` (None: all kept).
  """

  source: Any
  task_names: tuple[str, ...]
  hidden: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.source)

  def _with_mask(self, batch: pipeline.Batch, indices: np.ndarray) -> pipeline.Batch:
    size = len(np.asarray(indices))
    mask = np.ones((size, len(self.task_names)), bool)
    if self.hidden is not None:
      mask &= self.hidden[np.asarray(indices)]
    batch = dict(batch)
    for column, name in enumerate(self.task_names):
      flags = batch.pop(SOURCE_MASK_PREFIX + name, None)
      if flags is not None:
        mask[:, column] &= np.asarray(flags).astype(bool).reshape(size)
    for key in [key for key in batch if key.startswith(SOURCE_MASK_PREFIX)]:
      del batch[key]  # flags of tasks this run does not train
    batch[tasks_lib.LABEL_MASK_KEY] = mask
    return batch

  def batch(self, indices: np.ndarray) -> pipeline.Batch:
    return self._with_mask(self.source.batch(indices), indices)

  def raw_batch(self, indices: np.ndarray) -> pipeline.Batch:
    return self._with_mask(pipeline.read_batch(self.source, indices, raw_images=True), indices)


def _has_source_flags(source: Any) -> bool:
  if len(source) == 0:
    return False
  return any(key.startswith(SOURCE_MASK_PREFIX) for key in source.batch(np.arange(1)))


def parse_label_fractions(text: str) -> dict[str, float]:
  """{task: fraction} from 'task=fraction,task=fraction' (`config.dataset.label_fractions`).

  Raises:
    ValueError: an entry that is not 'name=number', a fraction outside (0, 1], or a task named
      twice (the message says which; config validation prefixes the key).
  """
  fractions: dict[str, float] = {}
  for entry in [part.strip() for part in text.split(",") if part.strip()]:
    name, separator, number = (piece.strip() for piece in entry.partition("="))
    try:
      fraction = float(number) if separator and name else math.nan
    except ValueError:
      fraction = math.nan
    if math.isnan(fraction):
      raise ValueError(f"expected 'task=fraction' entries separated by commas, got {entry!r}.")
    if not 0 < fraction <= 1:
      raise ValueError(f"the fraction of {name!r} must be in (0, 1], got {number}.")
    if name in fractions:
      raise ValueError(f"names task {name!r} twice.")
    fractions[name] = fraction
  return fractions


def thinned_tasks(options: ml_collections.ConfigDict, task_names: Sequence[str]) -> list[str]:
  """The run's tasks whose labels `label_fraction` thins (all when the key is empty)."""
  chosen = tuple(options.label_fraction_tasks)
  return [name for name in task_names if not chosen or name in chosen]


def task_fractions(options: ml_collections.ConfigDict, task_names: Sequence[str]) -> list[float]:
  """Each task's label fraction: its `label_fractions` entry, else `label_fraction` for the
  tasks `thinned_tasks` names, else 1."""
  thinned = set(thinned_tasks(options, task_names))
  named = parse_label_fractions(options.label_fractions)
  fraction = float(options.label_fraction)
  return [named.get(name, fraction if name in thinned else 1.0) for name in task_names]


def with_label_masks(
  dataset: Dataset, tasks: Sequence[tasks_lib.Task], options: ml_collections.ConfigDict
) -> Dataset:
  """The dataset whose splits' batches carry the run's label mask, or `dataset` itself when
  every example has every label (then batches have no mask and nothing changes).

  Args:
    dataset: the loaded dataset.
    tasks: the run's tasks, in column order.
    options: config.dataset (label_fraction, label_fractions, label_fraction_tasks,
      label_fraction_splits, seed).
  """
  names = tuple(task.name for task in tasks)
  fractions = task_fractions(options, names)
  hiding = min(fractions) < 1
  splits: dict[str, Any] = dict(dataset.splits)
  changed = False
  for split, source in dataset.splits.items():
    hidden = None
    if hiding and split in tuple(options.label_fraction_splits):
      columns = [
        hidden_label_mask(len(source), name, fraction, options.seed, split)
        for name, fraction in zip(names, fractions)
      ]
      hidden = np.stack(columns, axis=1)
    if hidden is not None or _has_source_flags(source):
      splits[split] = MaskedSource(source, names, hidden)
      changed = True
  return dataclasses.replace(dataset, splits=splits) if changed else dataset
