"""Batching: deterministic training order as a function of (seed, step), padded evaluation batches.

The training batch at step s depends only on the seed and s (epoch e = s // steps_per_epoch
is a fresh permutation drawn from (seed, e)), so a run resumed from a checkpoint at step s
sees exactly the batches an uninterrupted run would have seen. With several processes, process
p of n reads the p-th of n equal slices of each step's global batch (`process_rows`), so the
global batch is the same for any process count. `train_batch` is the plain NumPy reference;
training reads through the grain pipeline of `loader`, which returns the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class Source(Protocol):
  """Random-access examples: len() and a batch of rows by index.

  A source may also offer `raw_batch(indices)`: the same batch with the image left as stored
  (uint8 in [0, 255]), for pipelines that convert it on the device (`read_batch`).
  """

  def __len__(self) -> int: ...

  def batch(self, indices: np.ndarray) -> Batch: ...


@dataclasses.dataclass
class ArraySource:
  """In-memory arrays sharing a leading example axis."""

  arrays: Mapping[str, np.ndarray]

  def __post_init__(self):
    sizes = {key: len(value) for key, value in self.arrays.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"Arrays disagree on the number of examples: {sizes}.")

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def batch(self, indices: np.ndarray) -> Batch:
    return {key: value[indices] for key, value in self.arrays.items()}


def unit_float_images(batch: Batch) -> Batch:
  """The batch with an integer 'image' (0..255) as float32 in [0, 1]; float images unchanged."""
  image = batch.get("image")
  if image is None or not np.issubdtype(np.asarray(image).dtype, np.integer):
    return batch
  return {**batch, "image": np.asarray(image).astype(np.float32) / 255.0}


def read_batch(source: Source, indices: np.ndarray, raw_images: bool = False) -> Batch:
  """`source.raw_batch(indices)` when `raw_images` and the source offers it, else `batch`."""
  raw = getattr(source, "raw_batch", None) if raw_images else None
  return raw(indices) if raw is not None else source.batch(indices)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder of each epoch's permutation is dropped)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if num_examples < batch_size:
    raise ValueError(
      f"The training split has {num_examples} examples, fewer than one batch of {batch_size}."
    )
  return num_examples // batch_size


def train_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The example indices of the training batch at a given step."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * batch_size : (position + 1) * batch_size]


def process_rows(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """Process p's share of a global batch's rows: the p-th of `process_count` equal slices."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count}).")
  if len(rows) % process_count:
    raise ValueError(
      f"A global batch of {len(rows)} cannot be split evenly over {process_count} processes."
    )
  local = len(rows) // process_count
  return rows[process_index * local : (process_index + 1) * local]


def augmentation_rng(seed: int, step: int) -> np.random.Generator:
  """The generator of a step's augmentation draws (over the whole global batch)."""
  return np.random.default_rng([seed, step, 1])


Augment = Callable[[Batch, np.random.Generator], Batch]


def train_batch(
  source: Source, batch_size: int, seed: int, step: int, augment: Augment | None = None
) -> Batch:
  """The training batch of a step: a pure function of (seed, step), augmentation included."""
  batch = source.batch(train_indices(len(source), batch_size, seed, step))
  if augment is not None:
    batch = augment(batch, augmentation_rng(seed, step))
  return batch


def train_batches(
  source: Source,
  batch_size: int,
  seed: int,
  start_step: int,
  num_steps: int,
  augment: Augment | None = None,
) -> Iterator[tuple[int, Batch]]:
  """Yields (step, batch) for steps start_step .. num_steps - 1."""
  for step in range(start_step, num_steps):
    yield step, train_batch(source, batch_size, seed, step, augment)


def eval_batches(source: Source, batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
  """Yields (batch, mask) covering the split once, in order; the last batch is padded.

  Padding repeats the last example, so every batch has the same shape (one compilation); the
  mask marks the real examples.
  """
  total = len(source)
  for start in range(0, total, batch_size):
    indices = np.arange(start, start + batch_size)
    mask = indices < total
    yield source.batch(np.minimum(indices, total - 1)), mask
