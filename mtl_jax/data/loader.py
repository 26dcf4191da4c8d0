"""The training input pipeline on grain: each step's batch, read ahead by a thread or by worker
processes, and handed out in step order.

A step's batch is a pure function of (seed, step) (`StepReader`): the rows `pipeline.train_indices`
gives, this process's share of them, and the augmentation drawn from (seed, step), applied here
or left to the train step as draws. grain maps step numbers to batches with a `MapDataset`, so
each element is a whole batch: worker processes take steps round-robin and grain returns them in
step order, which makes the batches the same for any worker count. A resumed run rebuilds the
pipeline at its checkpointed step; no iterator state is saved (grain's own depends on the worker
count).

`BatchStream` options (config.data): `workers` = 0 reads in the training process, synchronously
when `prefetch` = 0 or in one background thread that keeps `prefetch` batches ready; `workers` =
n > 0 starts n spawned processes, each keeping max(prefetch, 1) batches ready.

grain 0.2.18 pitfalls handled here: `mp_prefetch` reads an absl flag, so flags are marked parsed
when no program parsed them (google/grain#1355); read options are always explicit (the defaults
buffer 500 elements, here 500 batches); workers run NumPy only and poll their parent, exiting
when it is gone (a trainer killed with SIGKILL would otherwise leave them running).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

from absl import flags
import grain
import numpy as np

from mtl_jax.data import augment as augment_lib
from mtl_jax.data import pipeline

# How often a worker checks that the training process is still alive, in seconds.
_PARENT_POLL_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class StepReader:
  """The batch of a step for this process; picklable, so grain's workers can run it.

  Attributes:
    source: the training split.
    batch_size: the global batch size.
    seeds: the runs' data seeds.
    augment: the dataset's augmentation (an `augment.Augmentation`, or any `(batch, rng) ->
      batch` callable, which always runs here), or None.
    on_device: leave the image's conversion and the augmentation's pixel work to the train step
      (`augment_device.prepare_batch`): the image stays as the source stores it (`raw_batch`)
      and the draws travel in the batch under `augment.DRAWS_KEY`.
    process_index, process_count: which share of every global batch this process reads.
    stacked: stack the runs' batches along a leading axis (one per seed); otherwise the batch is
      that of seeds[0].
  """

  source: Any
  batch_size: int
  seeds: tuple[int, ...]
  augment: Any = None
  on_device: bool = False
  process_index: int = 0
  process_count: int = 1
  stacked: bool = False

  def __call__(self, step: int) -> pipeline.Batch:
    step = int(step)
    if not self.stacked:
      return self.lane_batch(self.seeds[0], step)
    batches = [self.lane_batch(seed, step) for seed in self.seeds]
    return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}

  def lane_batch(self, seed: int, step: int, whole: bool = False) -> pipeline.Batch:
    """One run's batch of `step`: this process's share, or the whole global batch (`whole`)."""
    index, count = (0, 1) if whole else (self.process_index, self.process_count)
    rows = pipeline.train_indices(len(self.source), self.batch_size, seed, step)
    batch = pipeline.read_batch(
      self.source, pipeline.process_rows(rows, index, count), raw_images=self.on_device
    )
    if self.augment is None:
      return batch
    rng = pipeline.augmentation_rng(seed, step)
    if not isinstance(self.augment, augment_lib.Augmentation):
      return self.augment(pipeline.unit_float_images(batch), rng)
    # Drawn for the whole global batch, so a row's choices do not depend on the process count.
    height, width = batch["image"].shape[1:3]
    draws = self.augment.draw(rng, self.batch_size, height, width)
    draws = pipeline.process_rows(draws, index, count)
    if self.on_device:
      return {**batch, augment_lib.DRAWS_KEY: draws}
    return self.augment.apply(batch, draws)


def _allow_worker_processes() -> None:
  # grain 0.2.18's mp_prefetch reads an absl flag, which raises UnparsedFlagAccessError unless
  # some program parsed the flags (absl.app.run does; pytest and notebooks do not).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker set-up: NumPy only, and exit as soon as the training process is gone."""
  del worker_index, worker_count
  # The reader uses NumPy only; this keeps a worker from ever claiming an accelerator.
  os.environ["JAX_PLATFORMS"] = "cpu"
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(_PARENT_POLL_SECONDS)
    os._exit(0)

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def step_batches(reader: StepReader, start: int, stop: int, workers: int, prefetch: int):
  """The grain dataset of the batches of steps start .. stop - 1, in order (iterate it)."""
  if workers < 0 or prefetch < 0:
    raise ValueError(f"workers and prefetch must be >= 0, got {workers} and {prefetch}.")
  steps = grain.MapDataset.range(start, stop).map(reader)
  in_process = workers == 0 and prefetch > 0
  read_options = grain.ReadOptions(
    num_threads=1 if in_process else 0, prefetch_buffer_size=prefetch if in_process else 0
  )
  batches = steps.to_iter_dataset(read_options)
  if workers == 0:
    return batches
  _allow_worker_processes()
  options = grain.MultiprocessingOptions(
    num_workers=workers, per_worker_buffer_size=max(prefetch, 1)
  )
  return batches.mp_prefetch(options, worker_init_fn=_exit_with_parent)


class BatchStream:
  """The batches of a run's steps from a `StepReader`, read ahead as configured.

  `batch(step)` returns the batch of `step`; asked for any step other than the one after the
  last, the pipeline restarts there (a resumed run's first step).
  """

  def __init__(self, reader: StepReader, stop: int, workers: int, prefetch: int):
    self.reader, self.stop = reader, int(stop)
    self.workers, self.prefetch = int(workers), int(prefetch)
    self._iterator = None
    self._next_step: int | None = None

  def batch(self, step: int) -> pipeline.Batch:
    if self._iterator is None or step != self._next_step:
      self.close()
      self._iterator = iter(
        step_batches(self.reader, int(step), self.stop, self.workers, self.prefetch)
      )
    batch = next(self._iterator)
    self._next_step = int(step) + 1
    if self.workers:
      # Workers hand batches over in shared memory that grain frees once the array is dropped;
      # an array a device buffer may alias (XLA:CPU) or a host copy outlives must own its memory.
      batch = {key: np.array(value) for key, value in batch.items()}
    return batch

  def close(self) -> None:
    """Stops the reading thread or worker processes (and frees their shared memory)."""
    iterator, self._iterator, self._next_step = self._iterator, None, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()
