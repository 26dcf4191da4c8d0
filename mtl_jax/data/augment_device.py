"""The training augmentation inside the jitted step: the host's draws applied on the device.

The pixel rules are those of `augment` (its NumPy twin), written as gathers, so an accelerator
does in microseconds what costs the host tens of milliseconds per batch. Where a crop's rows and
columns fall depends only on its scale, so the interpolation positions of every scale (lower
and upper neighbour, bilinear weight, nearest neighbour) are computed once in float64 NumPy, as
`augment.scale_crop` computes them, and only shifted by each example's crop corner here.

`prepare_batch` is what a train step does to its batch first: an integer image (uint8, as the
host read it) becomes float32 in [0, 1], and the draws the host put in the batch under
DRAWS_KEY are applied. A batch without draws and with a float image passes through unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import augment as augment_lib

# uint8 level v -> v / 255 in float32, exactly as `pipeline.unit_float_images` computes it.
_UNIT_LEVELS = np.arange(256, dtype=np.float32) / 255.0
# The batch key of the host's augmentation draws [B, 4] int32 (see `augment.Augmentation.draw`).
DRAWS_KEY = augment_lib.DRAWS_KEY


class AxisTables(NamedTuple):
  """Per scale [S, N] positions along one image axis of N pixels, relative to the crop's start.

  Attributes:
    low, high: the bilinear neighbours (int32).
    weight: the weight of `high` (float32).
    nearest: the nearest-neighbour source pixel (int32).
  """

  low: np.ndarray
  high: np.ndarray
  weight: np.ndarray
  nearest: np.ndarray


def axis_tables(crop_lengths: np.ndarray, size: int) -> AxisTables:
  """The sampling positions along an axis of `size` pixels for each crop length (float64)."""
  crop = np.asarray(crop_lengths, np.int64)[:, None]
  fraction = ((np.arange(size) + 0.5) / size)[None]
  positions = fraction * crop - 0.5
  low = np.clip(np.floor(positions), 0, crop - 1).astype(np.int64)
  high = np.minimum(low + 1, crop - 1)
  weight = np.clip(positions - low, 0.0, 1.0).astype(np.float32)
  nearest = np.minimum(np.floor(fraction * crop).astype(np.int64), crop - 1)
  return AxisTables(low.astype(np.int32), high.astype(np.int32), weight, nearest.astype(np.int32))


def _bilinear(image: jax.Array, rows: AxisTables, columns: AxisTables, top, left) -> jax.Array:
  """One example's crop [H, W, C] resized bilinearly (the NumPy twin's order of operations)."""
  column_weight = columns.weight[None, :, None]
  row_weight = rows.weight[:, None, None]

  def across_columns(picked_rows):
    return (
      picked_rows[:, left + columns.low] * (1 - column_weight)
      + picked_rows[:, left + columns.high] * column_weight
    )

  upper = across_columns(image[top + rows.low])
  lower = across_columns(image[top + rows.high])
  return upper * (1 - row_weight) + lower * row_weight


def _augment_example(
  example: Mapping[str, jax.Array],
  draws: jax.Array,
  augmentation: augment_lib.Augmentation,
  tables: tuple[AxisTables, AxisTables] | None,
) -> dict[str, jax.Array]:
  """One example's image and per-pixel maps after its scale-and-crop and flip draws."""
  output = dict(example)
  scale_index, top, left, flipped = draws[0], draws[1], draws[2], draws[3] != 0
  if tables is not None:
    # This example's row of every per-scale table.
    rows, columns = (
      AxisTables(*(jnp.asarray(table)[scale_index] for table in axis)) for axis in tables
    )
    output["image"] = _bilinear(example["image"], rows, columns, top, left)
    for key in augment_lib.NEAREST_KEYS:
      if key in example:
        output[key] = example[key][top + rows.nearest][:, left + columns.nearest]
    if "depth" in output:
      scale = jnp.asarray(augmentation.scales, jnp.float32)[scale_index]
      output["depth"] = (output["depth"] / scale).astype(example["depth"].dtype)
  if augmentation.flip:
    for key in ("image",) + augment_lib.NEAREST_KEYS:
      if key in output:
        output[key] = jnp.where(flipped, output[key][:, ::-1], output[key])
    if "normals" in output:
      sign = jnp.where(flipped, -1.0, 1.0).astype(output["normals"].dtype)
      output["normals"] = output["normals"].at[..., 0].multiply(sign)
  return output


def apply(
  batch: Mapping[str, jax.Array], draws: jax.Array, augmentation: augment_lib.Augmentation
) -> dict[str, jax.Array]:
  """`augmentation.apply(batch, draws)` in JAX (jit-able); the image must already be float.

  Args:
    batch: 'image' [B, H, W, C] float and any of 'segmentation', 'depth', 'normals'; other keys
      pass through.
    draws: [B, 4] integer choices from `augmentation.draw`.
    augmentation: the scales and whether to flip.
  """
  height, width = batch["image"].shape[1:3]
  tables = None
  if augmentation.crops:
    crop_heights, crop_widths = augment_lib.crop_sizes(
      np.asarray(augmentation.scales), height, width
    )
    tables = (axis_tables(crop_heights, height), axis_tables(crop_widths, width))
  per_pixel = {key: batch[key] for key in ("image",) + augment_lib.NEAREST_KEYS if key in batch}
  augmented = jax.vmap(lambda example, row: _augment_example(example, row, augmentation, tables))(
    per_pixel, jnp.asarray(draws, jnp.int32)
  )
  return {**batch, **augmented}


def prepare_batch(
  batch: Mapping[str, Any], augmentation: augment_lib.Augmentation | None
) -> dict[str, Any]:
  """The batch a step trains on: a float32 image in [0, 1], the host's draws applied (jit-able)."""
  batch = dict(batch)
  draws = batch.pop(DRAWS_KEY, None)
  image = batch["image"]
  if jnp.issubdtype(image.dtype, jnp.integer):
    # A table of NumPy's own quotients: XLA turns a division by a constant into a multiplication
    # by its reciprocal, which differs from the host's float32 division in the last bit.
    batch["image"] = jnp.asarray(_UNIT_LEVELS)[jnp.asarray(image).astype(jnp.int32)]
  if draws is None or augmentation is None:
    return batch
  return apply(batch, draws, augmentation)


def preparation(
  augmentation: augment_lib.Augmentation | None,
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
  """`batch -> prepare_batch(batch, augmentation)`, for a train step to call first."""

  def prepare(batch):
    return prepare_batch(batch, augmentation)

  return prepare
