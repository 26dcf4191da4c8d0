"""Training augmentation: random scale-and-crop and horizontal flip, drawn per example on the host
and applied in NumPy here or on the device (`augment_device`).

Both transforms move every per-pixel entry of a batch the same way, so the image, the
segmentation, the depth and the normals stay aligned. As in MTAN/LibMTL: scale-and-crop picks
a scale s per example from a small set, crops a random window of size (H/s, W/s) and resizes it
back to (H, W) (bilinear for the image, nearest-neighbour for labels, depth and normals, so
that no invalid pixel is blended into a valid one), and divides the depth by s (the object now
looks s times closer). The horizontal flip mirrors everything and negates the normals' x
component.

An `Augmentation` separates the random choices from the pixel work: `draw` takes a batch's
choices from a NumPy generator as a small integer array (scale index, crop top, crop left,
flip), and `apply` carries them out. The training pipeline draws on the host from (seed, step)
and applies either here or inside the jitted step, so both placements train on the same crops.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mtl_jax.data import pipeline

# Per-pixel keys of the batch contract, besides the image.
NEAREST_KEYS = ("segmentation", "depth", "normals")
# Columns of a draws array [B, 4].
SCALE_INDEX, TOP, LEFT, FLIP = range(4)
# The batch key under which draws travel to a step that applies them on the device.
DRAWS_KEY = "augmentation_draws"
# Where the pixel work runs (config.data.augment_on): inside the jitted step, or in NumPy.
PLACEMENTS = ("device", "host")


def crop_sizes(scales: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(crop heights, crop widths) of a zoom by each scale: round(H / s), round(W / s), at least 1."""
  scales = np.asarray(scales, np.float64)
  crop_height = np.maximum(1, np.round(height / scales).astype(np.int64))
  crop_width = np.maximum(1, np.round(width / scales).astype(np.int64))
  return crop_height, crop_width


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


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
  """The scales as floats, or a ValueError when one would crop outside the image."""
  scales = tuple(float(scale) for scale in scales)
  if scales and min(scales) < 1.0:
    raise ValueError(
      f"Scale-and-crop scales must be >= 1 (a crop inside the image), got {tuple(scales)}."
    )
  return scales


def draw_scale_crop(
  rng: np.random.Generator, size: int, height: int, width: int, scales: Sequence[float]
) -> np.ndarray:
  """[B, 3] int64: per example the index of its scale, its crop's top row and left column."""
  index = rng.integers(0, len(scales), size=size)
  crop_height, crop_width = crop_sizes(np.asarray(scales, np.float64)[index], height, width)
  top = np.floor(rng.random(size) * (height - crop_height + 1)).astype(np.int64)
  left = np.floor(rng.random(size) * (width - crop_width + 1)).astype(np.int64)
  return np.stack([index, top, left], axis=1)


def scale_crop(batch: pipeline.Batch, scales: Sequence[float], draws: np.ndarray) -> pipeline.Batch:
  """Scale-and-crop with given choices: draws [B, >=3] of (scale index, top, left) per example."""
  images = batch["image"]
  size, height, width = images.shape[:3]
  scale = np.asarray(scales, np.float64)[draws[:, SCALE_INDEX]]
  crop_height, crop_width = crop_sizes(scale, height, width)
  top, left = draws[:, TOP].astype(np.int64), draws[:, LEFT].astype(np.int64)
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
  for key in NEAREST_KEYS:
    if key in batch:
      output[key] = batch[key][batch_index, nearest_rows[:, :, None], nearest_columns[:, None, :]]
  if "depth" in output:
    # Zero (invalid) stays zero.
    output["depth"] = (output["depth"] / scale[:, None, None]).astype(batch["depth"].dtype)
  return output


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
  scales = check_scales(scales)
  size, height, width = batch["image"].shape[:3]
  return scale_crop(batch, scales, draw_scale_crop(rng, size, height, width, scales))


def flip(batch: pipeline.Batch, flipped: np.ndarray) -> pipeline.Batch:
  """Mirrors the examples where `flipped` [B] is true left-right; negates their normals' x."""
  flipped = np.asarray(flipped, bool)
  output = dict(batch)
  for key in ("image",) + NEAREST_KEYS:
    if key in batch:
      values = batch[key]
      output[key] = np.where(
        flipped.reshape((-1,) + (1,) * (values.ndim - 1)), values[:, :, ::-1], values
      )
  if "normals" in output:
    sign = np.where(flipped, -1.0, 1.0).astype(output["normals"].dtype)[:, None, None]
    normals = output["normals"].copy()
    normals[..., 0] *= sign
    output["normals"] = normals
  return output


def random_horizontal_flip(
  batch: pipeline.Batch, rng: np.random.Generator, probability: float = 0.5
) -> pipeline.Batch:
  """Mirrors each example left-right with the given probability; negates the normals' x
  component."""
  return flip(batch, rng.random(batch["image"].shape[0]) < probability)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """A dataset's training augmentation: scale-and-crop over `scales`, then (optionally) a flip.

  Called as `augmentation(batch, rng)` it draws and applies in one go (the NumPy path).
  """

  scales: tuple[float, ...] = (1.0, 1.2, 1.5)
  flip: bool = False

  def __post_init__(self):
    object.__setattr__(self, "scales", check_scales(self.scales))

  @property
  def crops(self) -> bool:
    """Whether scale-and-crop runs (not for no scales or the scale 1 alone)."""
    return bool(self.scales) and self.scales != (1.0,)

  def draw(self, rng: np.random.Generator, size: int, height: int, width: int) -> np.ndarray:
    """[B, 4] int32 random choices: scale index, crop top, crop left, flip (0 or 1).

    The generator is consumed exactly as `random_scale_crop` then `random_horizontal_flip`
    consume it; without a crop the first three columns are 0.
    """
    draws = np.zeros((size, 4), np.int32)
    if self.crops:
      draws[:, :3] = draw_scale_crop(rng, size, height, width, self.scales)
    if self.flip:
      draws[:, FLIP] = rng.random(size) < 0.5
    return draws

  def apply(self, batch: pipeline.Batch, draws: np.ndarray) -> pipeline.Batch:
    """The augmented batch for given choices (integer images become float32 in [0, 1] first)."""
    batch = pipeline.unit_float_images(batch)
    if self.crops:
      batch = scale_crop(batch, self.scales, draws)
    if self.flip:
      batch = flip(batch, draws[:, FLIP] != 0)
    return batch

  def __call__(self, batch: pipeline.Batch, rng: np.random.Generator) -> pipeline.Batch:
    size, height, width = batch["image"].shape[:3]
    return self.apply(batch, self.draw(rng, size, height, width))


def make_augment(scales: Sequence[float] = (1.0, 1.2, 1.5), flip: bool = False) -> Augmentation:
  """The training augmentation `(batch, rng) -> batch`: scale-and-crop, then (optionally) a flip."""
  return Augmentation(tuple(scales), flip)
