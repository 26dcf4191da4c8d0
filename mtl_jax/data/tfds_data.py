"""TFDS random-access sources without TensorFlow: opening prepared data, hold-outs, host shards,
resizing.

`tfds.data_source` reads array_record files example by example with NumPy decoding, so nothing
here imports TensorFlow. A `TfdsSource` wraps such a data source (or anything with `len()` and
`[i]`), restricted to some of its rows, and maps a list of raw examples to the project's batch
contract (see mtl_jax/tasks.py): 'image' float32 [B,H,W,3] in [0,1], 'segmentation' int32
[B,H,W] (-1 ignore), 'depth' float32 [B,H,W] (0 invalid), 'normals' float32 [B,H,W,3]
(zero = invalid), 'attributes' float32 [B,A]. `raw_batch` gives the same with the image still
uint8, for a training pipeline that converts it on the device (a quarter of the bytes to copy).

Multi-host: every process opens the whole training split; the training pipeline reads only the
process's share of each step's global batch (`pipeline.process_rows`), so
`config.training.batch_size` is the global batch and the batches do not depend on the process
count. Evaluation splits are read whole by every host, so metrics need no cross-host reduction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from mtl_jax.data import pipeline

Batch = dict[str, np.ndarray]
Transform = Callable[[Sequence[dict[str, Any]]], Batch]


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset's array_record files are not in the data directory; says how to prepare them."""


@dataclasses.dataclass
class TfdsSource:
  """Rows of a random-access data source, mapped to the batch contract by `transform`.

  Attributes:
    data_source: has `len()` and `[i]` -> dict of NumPy values (e.g. `tfds.data_source(...)`).
    rows: which rows of `data_source` this source exposes, in order (index i -> rows[i]).
    transform: list of raw examples -> batch dict of stacked NumPy arrays, the image uint8.
  """

  data_source: Any
  rows: np.ndarray
  transform: Transform

  def __post_init__(self):
    self._read_many_works = True
    self.rows = np.asarray(self.rows, dtype=np.int64)
    if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(self.data_source)):
      raise ValueError(f"Rows outside [0, {len(self.data_source)}) of the data source.")

  def __len__(self) -> int:
    return int(self.rows.size)

  def batch(self, indices: np.ndarray) -> Batch:
    return pipeline.unit_float_images(self.raw_batch(indices))

  def raw_batch(self, indices: np.ndarray) -> Batch:
    """The batch of `indices` with the image as uint8 (the transform's output as is)."""
    rows = self.rows[np.asarray(indices, dtype=np.int64)].tolist()
    return self.transform(self._read(rows))

  def _read(self, rows: list[int]) -> list[dict[str, Any]]:
    # ArrayRecord sources read a list of rows in one call, much faster than one by one; the
    # sources of tfds.testing.mock_data advertise __getitems__ but fail with a TypeError.
    read_many = getattr(self.data_source, "__getitems__", None)
    if read_many is not None and self._read_many_works:
      try:
        return list(read_many(rows))
      except TypeError:
        self._read_many_works = False
    return [self.data_source[row] for row in rows]


def open_data_source(name: str, split: str, data_dir: str, prepare_command: str) -> Any:
  """`tfds.data_source(name, split)` without any download; a missing dataset names the fix.

  Args:
    name: TFDS dataset name (with config, e.g. 'cityscapes_mtl/segmentation_depth_128x256').
    split: a TFDS split string.
    data_dir: TFDS data directory; '' for TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    prepare_command: the shell command that prepares the dataset, quoted in the error.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in array_record format under data_dir.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy; only the TFDS datasets need it)

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as error:  # TFDS raises several types here (not prepared, wrong format, ...).
    where = data_dir or "the default TFDS data directory ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    said = " ".join(str(error).split())[:300]
    raise DatasetNotPreparedError(
      f"TFDS dataset {name!r} (split {split!r}) is not prepared in array_record format in "
      f"{where} (config.dataset.data_dir); prepare it with: {prepare_command} (see README.md, "
      f"'Datasets'). TFDS said: {type(error).__name__}: {said}"
    ) from error


def holdout_rows(total: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits rows 0..total-1 into (kept, held out): a fixed random `size` rows are held out.

  The held-out rows depend only on (total, size, seed), so every run and every host agrees.
  Both results are sorted, which keeps reads in file order.
  """
  if not 0 < size < total:
    raise ValueError(
      f"config.dataset.validation_size must be in [1, {total - 1}] for a split of {total} "
      f"examples, got {size}."
    )
  order = np.random.default_rng(seed).permutation(total)
  return np.sort(order[size:]), np.sort(order[:size])


def nearest_indices(source_size: int, target_size: int) -> np.ndarray:
  """Source index of each target pixel for nearest-neighbour resizing (pixel centres aligned)."""
  positions = (np.arange(target_size) + 0.5) * source_size / target_size
  return np.minimum(np.floor(positions).astype(np.int64), source_size - 1)


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of [H, W, ...] to size (labels, depth, normals: no invalid mixing)."""
  height, width = array.shape[:2]
  if (height, width) == tuple(size):
    return array
  return array[nearest_indices(height, size[0])][:, nearest_indices(width, size[1])]


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of a uint8 RGB image [H, W, 3] with PIL."""
  if image.shape[:2] == tuple(size):
    return image
  resized = Image.fromarray(np.ascontiguousarray(image)).resize((size[1], size[0]), Image.BILINEAR)
  return np.asarray(resized)


def stack_images(examples: Sequence[dict[str, Any]], key: str, size: tuple[int, int]) -> np.ndarray:
  """uint8 [B, H, W, 3] from uint8 images, resized to size."""
  return np.stack([resize_image(np.asarray(example[key], np.uint8), size) for example in examples])


def dataset_size(config: Any) -> tuple[int, int]:
  """(height, width) requested by a dataset config."""
  return int(config.height), int(config.width)
