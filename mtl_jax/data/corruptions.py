"""The 15 common image corruptions of Hendrycks & Dietterich (ImageNet-C / CIFAR-10-C), 5 severities
each.

Images are float32 in [0, 1], either one image [H, W, 3] or a batch [N, H, W, 3]; every
corruption returns the same shape and dtype, clipped to [0, 1]. Randomness comes only from the
numpy Generator (or integer seed) passed in, so a corruption is a pure function of
(images, name, severity, rng state).

Parameters. The published parameter tables target 224x224 (ImageNet-C) or 32x32 (CIFAR-10-C)
images. We start from the CIFAR-10-C table, which fits our tiny images, and scale every
parameter measured in pixels (blur radii and sigmas, displacements, zoom-blur does not need
it) by `s = min(H, W) / 32`: a 32x64 scenes image uses the CIFAR-10-C values as they are, a
16x32 image halves them and a 224x224 image multiplies them by 7, which lands close to the
ImageNet-C values. Parameters that are not lengths (noise strength, blend weights, JPEG
quality, zoom factors, the pixelation factor) are used unscaled.

Contrast, pixelate, zoom blur and motion blur follow the CIFAR-10-C recipe (tests/
test_corruptions.py checks each against an independent implementation of it at 32x32): contrast
blends every channel towards its own mean; pixelate resizes down and back up with PIL's BOX
filter (which averages going down and repeats pixels going up); zoom blur averages the image
with its zooms by 1.00, 1.01, ... (the unzoomed image counted twice), each a crop of the centre
resized with linear interpolation as in CIFAR-10-C's `clipped_zoom` (rows and columns each
cropped by their own length, so non-square images work); motion blur is ImageMagick's kernel.
Everything runs on float images rather than 8-bit ones, so no output is rounded to 1/255.

Deviations from the reference implementation, each chosen to avoid a dependency or a slow
per-pixel Python loop:
* frost: the original blends in one of six photographs of frost, which we cannot ship. We
  synthesise a frost texture instead (`frost_texture`): a plasma-fractal haze plus bright
  streaks made of sparse noise smeared along a few random directions, tinted ice-blue. Its
  statistics differ from the photographs (more regular, less contrast), so frost numbers are
  not comparable with published ImageNet-C/CIFAR-10-C frost numbers.
* glass blur: pixels are displaced by a random local offset (a gather) instead of the
  original's sequential pairwise swaps; the visual effect (local shuffling between two
  Gaussian blurs) is the same.
* motion blur: ImageMagick's motion blur is computed here (`line_blur`) rather than called, so
  no ImageMagick is needed; the result is the same up to ImageMagick's 8-bit rounding.
* elastic transform: a smooth random displacement field of a given RMS size (in pixels, scaled
  as above), without the original's extra random affine warp; RMS displacement grows with
  severity.
* snow: the snow layer is smeared with the same line kernel as motion blur.
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

import matplotlib.colors
import numpy as np
from PIL import Image
from scipy import ndimage

# The standard order of ImageNet-C: noise, blur, weather, digital.
CORRUPTIONS: tuple[str, ...] = (
  "gaussian_noise",
  "shot_noise",
  "impulse_noise",
  "defocus_blur",
  "glass_blur",
  "motion_blur",
  "zoom_blur",
  "snow",
  "frost",
  "fog",
  "brightness",
  "contrast",
  "elastic_transform",
  "pixelate",
  "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# The size at which the CIFAR-10-C pixel parameters below apply unscaled.
REFERENCE_SIZE = 32

RngLike = np.random.Generator | int | Sequence[int]


def as_generator(rng: RngLike) -> np.random.Generator:
  """A numpy Generator from a Generator, an int seed or a sequence of ints (e.g. (seed, index))."""
  if isinstance(rng, np.random.Generator):
    return rng
  return np.random.default_rng(rng)


def pixel_scale(height: int, width: int) -> float:
  """The factor applied to every parameter measured in pixels: min(H, W) / 32."""
  return min(height, width) / REFERENCE_SIZE


# ----------------------------------------------------------------------------- helpers


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """Blurs each image of [N, H, W, C] spatially (no mixing across images or channels)."""
  if sigma <= 0:
    return images
  return ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="reflect")


def line_blur(
  images: np.ndarray, radius: float, sigma: float, angles_degrees: np.ndarray
) -> np.ndarray:
  """ImageMagick's motion blur of image n of [N, H, W, C] at angles_degrees[n] (a one-sided ray).

  Output pixel (y, x) is Σ_t k_t · image[y + ⌈t sin θ - ½⌉, x + ⌈t cos θ - ½⌉] over the ray's
  2⌈radius⌉ + 1 pixels t = 0, 1, ..., with k_t ∝ exp(-t² / 2σ²) summing to 1; rows grow
  downwards, and positions outside the image take the nearest edge pixel (ImageMagick's default
  'edge' virtual pixels). Written as a sum of shifted copies, so its cost is linear in the ray
  length rather than quadratic.
  """
  count, height, width = images.shape[:3]
  steps = np.arange(2 * int(np.ceil(radius)) + 1)
  weights = np.exp(-(steps**2) / (2 * max(sigma, 1e-6) ** 2))
  weights /= weights.sum()
  angles = np.deg2rad(np.asarray(angles_degrees, np.float64))[:, None]
  row_offsets = np.ceil(steps[None, :] * np.sin(angles) - 0.5).astype(int)  # [N, K]
  col_offsets = np.ceil(steps[None, :] * np.cos(angles) - 0.5).astype(int)
  batch = np.arange(count)[:, None, None]
  rows = np.arange(height)[None, :, None]
  cols = np.arange(width)[None, None, :]
  output = np.zeros_like(images)
  for step, weight in enumerate(weights.astype(np.float32)):
    source_rows = np.clip(rows + row_offsets[:, step, None, None], 0, height - 1)
    source_cols = np.clip(cols + col_offsets[:, step, None, None], 0, width - 1)
    output += weight * images[batch, source_rows, source_cols]
  return output


def _linear_resample_axis(images: np.ndarray, coordinates: np.ndarray, axis: int) -> np.ndarray:
  """Linear interpolation of [N, H, W, C] at fractional positions along axis 1 or 2 (clamped)."""
  size = images.shape[axis]
  coordinates = np.clip(coordinates, 0, size - 1)
  lower = np.floor(coordinates).astype(int)
  upper = np.minimum(lower + 1, size - 1)
  fraction = (coordinates - lower).astype(np.float32)
  shape = [1, 1, 1, 1]
  shape[axis] = len(coordinates)
  fraction = fraction.reshape(shape)
  return (
    np.take(images, lower, axis=axis) * (1 - fraction)
    + np.take(images, upper, axis=axis) * fraction
  )


def _clipped_zoom_coordinates(size: int, factor: float) -> np.ndarray:
  """Source positions of CIFAR-10-C's clipped zoom along one axis of length `size`.

  The centre crop of ⌈size / factor⌉ pixels (starting at (size - crop) // 2) is resized to
  round(crop · factor) pixels by linear interpolation with the end pixels aligned (what
  scipy.ndimage.zoom does at order 1), and the middle `size` of those are kept.
  """
  crop = int(np.ceil(size / factor))
  start = (size - crop) // 2
  zoomed = int(round(crop * factor))
  trim = (zoomed - size) // 2
  step = (crop - 1) / (zoomed - 1) if zoomed > 1 else 0.0
  return start + (trim + np.arange(size)) * step


def _clipped_zoom(images: np.ndarray, factor: float) -> np.ndarray:
  """Zooms into the centre of each image of [N, H, W, C] by factor (>= 1), keeping the size."""
  height, width = images.shape[1:3]
  rows = _linear_resample_axis(images, _clipped_zoom_coordinates(height, factor), 1)
  return _linear_resample_axis(rows, _clipped_zoom_coordinates(width, factor), 2)


def plasma_fractal(rng: np.random.Generator, count: int, size: int, decay: float) -> np.ndarray:
  """Diamond-square plasma noise in [0, 1], shape [count, size, size]; size must be a power of 2.

  Each level halves the step and divides the random perturbation by `decay`, so a larger decay
  gives smoother clouds.
  """
  if size & (size - 1):
    raise ValueError(f"plasma_fractal needs a power-of-two size, got {size}.")
  field = np.zeros((count, size, size))
  step, wibble = size, 100.0

  def perturbed_mean(total: np.ndarray) -> np.ndarray:
    return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

  while step >= 2:
    half = step // 2
    # Square step: the centre of each square from its four corners (the field wraps around).
    corners = field[:, ::step, ::step]
    square = corners + np.roll(corners, -1, axis=1)
    square = square + np.roll(square, -1, axis=2)
    field[:, half::step, half::step] = perturbed_mean(square)
    # Diamond step: edge midpoints from the two adjacent corners and the two adjacent centres.
    centres = field[:, half::step, half::step]
    corners = field[:, ::step, ::step]
    field[:, ::step, half::step] = perturbed_mean(
      centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
    )
    field[:, half::step, ::step] = perturbed_mean(
      centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
    )
    step = half
    wibble /= decay
  field -= field.min(axis=(1, 2), keepdims=True)
  return field / np.maximum(field.max(axis=(1, 2), keepdims=True), 1e-12)


def _plasma_for(
  rng: np.random.Generator, count: int, height: int, width: int, decay: float
) -> np.ndarray:
  """Plasma noise cropped to [count, H, W] from the smallest power-of-two square covering it."""
  size = 1 << int(np.ceil(np.log2(max(height, width, 2))))
  return plasma_fractal(rng, count, size, decay)[:, :height, :width]


def frost_texture(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
  """A procedural frost overlay in [0, 1], [count, H, W, 3] (stands in for the frost photographs).

  A plasma haze plus crystalline streaks (sparse bright specks smeared along three random
  directions), tinted ice-blue.
  """
  scale = pixel_scale(height, width)
  haze = _plasma_for(rng, count, height, width, decay=1.8)
  streaks = np.zeros((count, height, width), np.float32)
  for _ in range(3):
    specks = (rng.random((count, height, width, 1)) < 0.06).astype(np.float32)
    streaks += line_blur(specks, 3.0 * scale, 2.0 * scale, rng.uniform(0, 360, count))[..., 0] * 3.0
  texture = np.clip(0.55 * haze + np.clip(streaks, 0, 1) * 0.6, 0, 1)
  tint = np.array([0.82, 0.92, 1.0], np.float32)
  return np.clip(texture[..., None] * tint + 0.1 * texture[..., None], 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- corruptions
# Each takes (images [N, H, W, 3] float32, severity index 0..4, rng) and returns float32.


def _gaussian_noise(images, level, rng):
  sigma = (0.04, 0.06, 0.08, 0.09, 0.10)[level]
  return images + rng.normal(size=images.shape).astype(np.float32) * sigma


def _shot_noise(images, level, rng):
  photons = (500, 250, 100, 75, 50)[level]
  return (rng.poisson(images * photons) / photons).astype(np.float32)


def _impulse_noise(images, level, rng):
  amount = (0.01, 0.02, 0.03, 0.05, 0.07)[level]
  hit = rng.random(images.shape) < amount
  salt = rng.random(images.shape) < 0.5
  return np.where(hit, salt.astype(np.float32), images)


def _defocus_blur(images, level, rng):
  del rng
  # CIFAR-10-C's (disk radius, alias sigma), except that the alias sigma of severities 4 and 5
  # stays at 0.6 (the original lowers it to 0.2 and 0.1, which made severity 4 milder than 3
  # once the radii are scaled below a pixel).
  radius, alias_sigma = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.6), (1.5, 0.6))[level]
  scale = pixel_scale(*images.shape[1:3])
  kernel = _defocus_kernel(radius * scale, alias_sigma * scale)
  return ndimage.convolve(images, kernel[None, :, :, None], mode="reflect")


def _defocus_kernel(radius: float, alias_sigma: float, supersampling: int = 8) -> np.ndarray:
  """A disk blurred by a Gaussian, integrated over each pixel (so sub-pixel sizes still count)."""
  half = int(np.ceil(radius + 3 * alias_sigma)) + 1
  fine = (np.arange((2 * half + 1) * supersampling) + 0.5) / supersampling - (half + 0.5)
  disk = (fine[:, None] ** 2 + fine[None, :] ** 2 <= radius**2).astype(np.float64)
  if not disk.any():
    disk[len(fine) // 2, len(fine) // 2] = 1.0
  disk = ndimage.gaussian_filter(disk, alias_sigma * supersampling, mode="constant")
  side = 2 * half + 1
  kernel = disk.reshape(side, supersampling, side, supersampling).sum(axis=(1, 3))
  return (kernel / kernel.sum()).astype(np.float32)


def _glass_blur(images, level, rng):
  # CIFAR-10-C's (sigma, max shift, iterations) made monotone: its severity 4 has a smaller sigma
  # than severity 3 and its severity 5 repeats severity 3's sigma.
  sigma, max_delta, iterations = (
    (0.05, 1, 1),
    (0.25, 1, 1),
    (0.4, 1, 1),
    (0.4, 1, 2),
    (0.5, 1, 3),
  )[level]
  count, height, width = images.shape[:3]
  scale = pixel_scale(height, width)
  delta = max(1, int(round(max_delta * scale)))
  blurred = _gaussian_blur(images, sigma * scale)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  batch = np.arange(count)[:, None, None]
  for _ in range(iterations):
    row_offsets = rng.integers(-delta, delta + 1, (count, height, width))
    col_offsets = rng.integers(-delta, delta + 1, (count, height, width))
    source_rows = np.clip(rows + row_offsets, 0, height - 1)
    source_cols = np.clip(cols + col_offsets, 0, width - 1)
    blurred = blurred[batch, source_rows, source_cols]
  return _gaussian_blur(blurred, sigma * scale)


def _motion_blur(images, level, rng):
  # CIFAR-10-C's (radius, sigma) of ImageMagick's motion blur.
  radius, sigma = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))[level]
  scale = pixel_scale(*images.shape[1:3])
  return line_blur(images, radius * scale, sigma * scale, rng.uniform(-45, 45, len(images)))


def _zoom_blur(images, level, rng):
  del rng
  largest = (1.06, 1.11, 1.16, 1.21, 1.26)[level]
  # From 1.00 as in CIFAR-10-C, so the unzoomed image weighs 2 / (len(factors) + 1).
  factors = np.arange(1, largest, 0.01)
  total = images.copy()
  for factor in factors:
    total += _clipped_zoom(images, float(factor))
  return total / (len(factors) + 1)


def _snow(images, level, rng):
  mean, spread, zoom, threshold, radius, sigma, keep = (
    (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
  )[level]
  count, height, width = images.shape[:3]
  scale = pixel_scale(height, width)
  flakes = rng.normal(mean, spread, (count, height, width, 1)).astype(np.float32)
  flakes = _clipped_zoom(flakes, zoom)
  flakes[flakes < threshold] = 0
  flakes = line_blur(flakes, radius * scale, sigma * scale, rng.uniform(-135, -45, count))
  gray = images @ np.array([0.299, 0.587, 0.114], np.float32)
  brightened = np.maximum(images, gray[..., None] * 1.5 + 0.5)
  images = keep * images + (1 - keep) * brightened
  return images + flakes + np.rot90(flakes, 2, axes=(1, 2))


def _frost(images, level, rng):
  # (image weight, frost weight): CIFAR-10-C's first two pairs, then a steadier progression,
  # because its (0.85, 0.4) and (0.75, 0.45) dim the image more than they add frost.
  image_weight, frost_weight = ((1.0, 0.2), (1.0, 0.3), (0.95, 0.4), (0.9, 0.5), (0.85, 0.6))[level]
  texture = frost_texture(rng, *images.shape[:3])
  return image_weight * images + frost_weight * texture


def _fog(images, level, rng):
  strength, decay = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[level]
  count, height, width = images.shape[:3]
  peak = images.max(axis=(1, 2, 3), keepdims=True)
  fog = _plasma_for(rng, count, height, width, decay)[..., None].astype(np.float32)
  return (images + strength * fog) * peak / (peak + strength)


def _brightness(images, level, rng):
  del rng
  shift = (0.05, 0.1, 0.15, 0.2, 0.3)[level]
  hsv = matplotlib.colors.rgb_to_hsv(np.clip(images, 0, 1))
  hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
  return matplotlib.colors.hsv_to_rgb(hsv).astype(np.float32)


def _contrast(images, level, rng):
  del rng
  factor = (0.75, 0.5, 0.4, 0.3, 0.15)[level]
  # One mean per image and channel, as CIFAR-10-C: colours keep their balance.
  means = images.mean(axis=(1, 2), keepdims=True)
  return (images - means) * factor + means


def _elastic_transform(images, level, rng):
  # Own parameterisation (see the module docstring): RMS displacement and smoothness, as
  # fractions of the shorter side.
  displacement, smoothness = (
    (0.01, 0.12),
    (0.0175, 0.1),
    (0.025, 0.09),
    (0.0325, 0.08),
    (0.04, 0.07),
  )[level]
  count, height, width = images.shape[:3]
  side = min(height, width)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  output = np.empty_like(images)
  for index in range(count):
    fields = []
    for _ in range(2):
      field = ndimage.gaussian_filter(
        rng.uniform(-1, 1, (height, width)), smoothness * side, mode="reflect"
      )
      field *= displacement * side / max(float(np.sqrt(np.mean(field**2))), 1e-12)
      fields.append(field)
    coordinates = [rows + fields[0], cols + fields[1]]
    for channel in range(images.shape[3]):
      output[index, :, :, channel] = ndimage.map_coordinates(
        images[index, :, :, channel], coordinates, order=1, mode="reflect"
      )
  return output


def box_resize_matrix(source: int, target: int) -> np.ndarray:
  """[target, source] weights of PIL's BOX resize along one axis (Image.resize(..., BOX)).

  Output pixel i has its centre at c = (i + ½)·scale in input coordinates (scale = source /
  target) and averages, with equal weights, the input pixels whose centres lie in
  (c - ½·max(scale, 1), c + ½·max(scale, 1)]. Going down that is a box average; going up it
  picks one pixel, so enlarged images come out blocky.
  """
  scale = source / target
  support = 0.5 * max(scale, 1.0)
  centres = (np.arange(target) + 0.5) * scale
  # PIL's window bounds: truncated like its C casts, then clamped to the image.
  low = np.maximum(np.trunc(centres - support + 0.5), 0)
  high = np.minimum(np.trunc(centres + support + 0.5), source)
  positions = np.arange(source)[None, :]
  offsets = (positions + 0.5 - centres[:, None]) / max(scale, 1.0)
  inside = (
    (positions >= low[:, None]) & (positions < high[:, None]) & (offsets > -0.5) & (offsets <= 0.5)
  )
  weights = inside.astype(np.float64)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _pixelate(images, level, rng):
  del rng
  factor = (0.95, 0.9, 0.85, 0.75, 0.65)[level]
  height, width = images.shape[1:3]
  small_height, small_width = max(1, int(height * factor)), max(1, int(width * factor))
  rows = box_resize_matrix(small_height, height) @ box_resize_matrix(height, small_height)
  cols = box_resize_matrix(small_width, width) @ box_resize_matrix(width, small_width)
  images = np.einsum("ah,nhwc->nawc", rows, images, optimize=True)
  return np.einsum("nawc,bw->nabc", images, cols, optimize=True)


def _jpeg_compression(images, level, rng):
  del rng
  quality = (80, 65, 58, 50, 40)[level]
  output = np.empty_like(images)
  for index, image in enumerate(images):
    buffer = io.BytesIO()
    Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
      buffer, "JPEG", quality=quality
    )
    buffer.seek(0)
    output[index] = np.asarray(Image.open(buffer), np.float32) / 255.0
  return output


_FUNCTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
  "gaussian_noise": _gaussian_noise,
  "shot_noise": _shot_noise,
  "impulse_noise": _impulse_noise,
  "defocus_blur": _defocus_blur,
  "glass_blur": _glass_blur,
  "motion_blur": _motion_blur,
  "zoom_blur": _zoom_blur,
  "snow": _snow,
  "frost": _frost,
  "fog": _fog,
  "brightness": _brightness,
  "contrast": _contrast,
  "elastic_transform": _elastic_transform,
  "pixelate": _pixelate,
  "jpeg_compression": _jpeg_compression,
}


def check_corruption(name: str, severity: int | None = None) -> None:
  """Raises a ValueError for an unknown corruption name (listing the valid ones) or bad severity."""
  if name not in _FUNCTIONS:
    raise ValueError(f"Unknown corruption {name!r}; valid corruptions: {', '.join(CORRUPTIONS)}.")
  if severity is not None and (
    isinstance(severity, bool) or int(severity) != severity or severity not in SEVERITIES
  ):
    raise ValueError(f"Corruption severity must be an integer from 1 to 5, got {severity!r}.")


def corrupt(images: np.ndarray, name: str, severity: int, rng: RngLike) -> np.ndarray:
  """Applies one corruption at one severity.

  Args:
    images: float32 [H, W, 3] or [N, H, W, 3], values in [0, 1].
    name: one of CORRUPTIONS.
    severity: 1 (mild) to 5 (strong).
    rng: a numpy Generator, or a seed (int or sequence of ints) for one.

  Returns:
    The corrupted images: same shape, float32, in [0, 1].
  """
  check_corruption(name, severity)
  images = np.asarray(images)
  if images.ndim not in (3, 4) or images.shape[-1] != 3:
    raise ValueError(f"corrupt expects images [H, W, 3] or [N, H, W, 3]; got shape {images.shape}.")
  single = images.ndim == 3
  batch = np.ascontiguousarray(images[None] if single else images, dtype=np.float32)
  output = _FUNCTIONS[name](batch, int(severity) - 1, as_generator(rng))
  output = np.clip(np.asarray(output, np.float32), 0.0, 1.0)
  return output[0] if single else output


def corrupt_batch_randomly(
  images: np.ndarray,
  rng: RngLike,
  names: Sequence[str] = CORRUPTIONS,
  severities: Sequence[int] = SEVERITIES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Gives every image its own random corruption and severity (for fine-tuning on corrupted data).

  Images drawing the same (corruption, severity) are corrupted together, so the work stays
  vectorised.

  Args:
    images: float32 [N, H, W, 3] in [0, 1].
    rng: a numpy Generator, or a seed for one.
    names: the corruptions to draw from (uniformly).
    severities: the severities to draw from (uniformly).

  Returns:
    (corrupted images [N, H, W, 3], corruption names [N] (str), severities [N] (int)).
  """
  for name in names:
    check_corruption(name)
  for severity in severities:
    check_corruption(CORRUPTIONS[0], severity)
  rng = as_generator(rng)
  images = np.asarray(images, np.float32)
  name_indices = rng.integers(0, len(names), len(images))
  severity_values = np.asarray(severities)[rng.integers(0, len(severities), len(images))]
  output = np.empty_like(images)
  for name_index in np.unique(name_indices):
    for severity in np.unique(severity_values):
      chosen = np.flatnonzero((name_indices == name_index) & (severity_values == severity))
      if len(chosen):
        output[chosen] = corrupt(images[chosen], names[name_index], int(severity), rng)
  return output, np.asarray(names)[name_indices], severity_values
