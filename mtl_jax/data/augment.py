"""Training augmentation in NumPy, vectorised over the batch: random scale-and-crop, horizontal
flip.

Both transforms move every per-pixel entry of a batch the same way, so the image, the
segmentation, the depth and the normals stay aligned. As in MTAN/LibMTL: scale-and-crop picks
a scale s per example from a small set, crops a random window of size (H/s, W/s) and resizes it
back to (H, W) (bilinear for the image, nearest-neighbour for labels, depth and normals, so
that no invalid pixel is blended into a valid one), and divides the depth by s (the object now
looks s times closer). The horizontal flip mirrors everything and negates the normals' x
component.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mtl_jax.data import pipeline

# Per-pixel keys of the batch contract, besides the image.
_NEAREST_KEYS = ("segmentation", "depth", "normals")


def _bilinear(
  images: np.ndarray,
  rows: np.ndarray,
  columns: np.ndarray,
  top: np.ndarray,
  left: np.ndarray,
  crop_height: np.ndarray,
  crop_width: np.ndarray,
) -> np.ndarray:
  """Samples images [B,H,W,C] at fractional rows [B,H'] x columns [B,W'] inside each crop."""
  batch_index = np.arange(images.shape[0])[:, None, None]
  row_low = np.clip(np.floor(rows), top[:, None], (top + crop_height - 1)[:, None]).astype(np.int64)
  column_low = np.clip(np.floor(columns), left[:, None], (left + crop_width - 1)[:, None]).astype(
    np.int64
  )
  row_high = np.minimum(row_low + 1, (top + crop_height - 1)[:, None])
  column_high = np.minimum(column_low + 1, (left + crop_width - 1)[:, None])
  row_weight = np.clip(rows - row_low, 0.0, 1.0)[:, :, None, None].astype(np.float32)
  column_weight = np.clip(columns - column_low, 0.0, 1.0)[:, None, :, None].astype(np.float32)

  def gather(row_index, column_index):
    return images[batch_index, row_index[:, :, None], column_index[:, None, :]]

  upper = (
    gather(row_low, column_low) * (1 - column_weight) + gather(row_low, column_high) * column_weight
  )
  lower = (
    gather(row_high, column_low) * (1 - column_weight)
    + gather(row_high, column_high) * column_weight
  )
  return (upper * (1 - row_weight) + lower * row_weight).astype(images.dtype)


def random_scale_crop(
  batch: pipeline.Batch, rng: np.random.Generator, scales: Sequence[float] = (1.0, 1.2, 1.5)
) -> pipeline.Batch:
  """Per example: zoom in by a random scale from `scales` at a random position; depth / scale.

  Args:
    batch: a batch dict with 'image' [B,H,W,3] and any of 'segmentation', 'depth', 'normals'.
    rng: NumPy generator (the training loop passes one derived from (seed, step)).
    scales: the zoom factors to choose from (each >= 1).

  Returns:
    A new batch of the same shapes and dtypes; other keys are passed through.
  """
  if min(scales) < 1.0:
    raise ValueError(
      f"Scale-and-crop scales must be >= 1 (a crop inside the image), got {tuple(scales)}."
    )
  images = batch["image"]
  size, height, width = images.shape[:3]
  scale = np.asarray(scales, np.float64)[rng.integers(0, len(scales), size=size)]
  crop_height = np.maximum(1, np.round(height / scale).astype(np.int64))
  crop_width = np.maximum(1, np.round(width / scale).astype(np.int64))
  top = np.floor(rng.random(size) * (height - crop_height + 1)).astype(np.int64)
  left = np.floor(rng.random(size) * (width - crop_width + 1)).astype(np.int64)
  # Output pixel centres mapped into the crop (half-pixel convention, as align_corners=False).
  row_fraction = (np.arange(height) + 0.5) / height
  column_fraction = (np.arange(width) + 0.5) / width
  rows = top[:, None] + row_fraction[None] * crop_height[:, None] - 0.5
  columns = left[:, None] + column_fraction[None] * crop_width[:, None] - 0.5
  output = dict(batch)
  output["image"] = _bilinear(images, rows, columns, top, left, crop_height, crop_width)
  nearest_rows = top[:, None] + np.minimum(
    np.floor(row_fraction[None] * crop_height[:, None]).astype(np.int64), crop_height[:, None] - 1
  )
  nearest_columns = left[:, None] + np.minimum(
    np.floor(column_fraction[None] * crop_width[:, None]).astype(np.int64), crop_width[:, None] - 1
  )
  batch_index = np.arange(size)[:, None, None]
  for key in _NEAREST_KEYS:
    if key in batch:
      output[key] = batch[key][batch_index, nearest_rows[:, :, None], nearest_columns[:, None, :]]
  if "depth" in output:
    # Zero (invalid) stays zero.
    output["depth"] = (output["depth"] / scale[:, None, None]).astype(batch["depth"].dtype)
  return output


def random_horizontal_flip(
  batch: pipeline.Batch, rng: np.random.Generator, probability: float = 0.5
) -> pipeline.Batch:
  """Mirrors each example left-right with the given probability; negates the normals' x
  component."""
  flip = rng.random(batch["image"].shape[0]) < probability
  output = dict(batch)
  for key in ("image",) + _NEAREST_KEYS:
    if key in batch:
      values = batch[key]
      output[key] = np.where(
        flip.reshape((-1,) + (1,) * (values.ndim - 1)), values[:, :, ::-1], values
      )
  if "normals" in output:
    sign = np.where(flip, -1.0, 1.0).astype(output["normals"].dtype)[:, None, None]
    normals = output["normals"].copy()
    normals[..., 0] *= sign
    output["normals"] = normals
  return output


def make_augment(scales: Sequence[float] = (1.0, 1.2, 1.5), flip: bool = False) -> pipeline.Augment:
  """The training augmentation `(batch, rng) -> batch`: scale-and-crop, then (optionally) a flip."""
  scales = tuple(float(scale) for scale in scales)

  def augment(batch: pipeline.Batch, rng: np.random.Generator) -> pipeline.Batch:
    if scales and scales != (1.0,):
      batch = random_scale_crop(batch, rng, scales)
    if flip:
      batch = random_horizontal_flip(batch, rng)
    return batch

  return augment
