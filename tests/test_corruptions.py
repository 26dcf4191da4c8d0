"""Tests of the 15 common corruptions: shape, dtype, range, determinism, severity ordering, errors,
and four of them against the CIFAR-10-C recipe."""

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from mtl_jax.data import corruptions
from mtl_jax.data import scenes


@pytest.fixture(scope="module")
def images():
  return scenes.load_split("test", 6, scenes.SceneConfig(height=16, width=32))["image"]


def test_there_are_15_corruptions_in_the_standard_order():
  assert len(corruptions.CORRUPTIONS) == len(set(corruptions.CORRUPTIONS)) == 15
  assert (
    corruptions.CORRUPTIONS[0] == "gaussian_noise"
    and corruptions.CORRUPTIONS[-1] == "jpeg_compression"
  )


@pytest.mark.parametrize("name", corruptions.CORRUPTIONS)
def test_corruption_properties(name, images):
  distances = []
  for severity in corruptions.SEVERITIES:
    output = corruptions.corrupt(images, name, severity, 7)
    assert output.shape == images.shape and output.dtype == np.float32
    assert output.min() >= 0.0 and output.max() <= 1.0 and np.isfinite(output).all()
    np.testing.assert_array_equal(output, corruptions.corrupt(images, name, severity, 7))
    distances.append(float(np.mean(np.abs(output - images))))
  # Mean distance to the clean images grows with severity. Tiny images make neighbouring
  # severities of pixelate and glass blur nearly equal, hence the small tolerance.
  tolerance = 0.1 * distances[-1]
  assert all(later >= earlier - tolerance for earlier, later in zip(distances, distances[1:])), (
    distances
  )
  assert distances[-1] > 1.2 * distances[0] and distances[-1] > 0.005, distances


def test_single_image_and_other_sizes(images):
  single = corruptions.corrupt(images[0], "motion_blur", 3, 0)
  assert single.shape == images[0].shape
  np.testing.assert_allclose(single, corruptions.corrupt(images[:1], "motion_blur", 3, 0)[0])
  odd = scenes.load_split("test", 2, scenes.SceneConfig(height=24, width=40))["image"]
  for name in ("fog", "frost", "pixelate", "zoom_blur", "glass_blur"):
    assert corruptions.corrupt(odd, name, 5, 1).shape == odd.shape


def test_random_corruptions_differ_by_seed_but_not_on_repeat(images):
  first = corruptions.corrupt(images, "gaussian_noise", 3, (0, 1))
  assert not np.array_equal(first, corruptions.corrupt(images, "gaussian_noise", 3, (0, 2)))
  output, names, severities = corruptions.corrupt_batch_randomly(images, 3)
  again, names_again, severities_again = corruptions.corrupt_batch_randomly(images, 3)
  np.testing.assert_array_equal(output, again)
  assert list(names) == list(names_again) and list(severities) == list(severities_again)
  assert set(names) <= set(corruptions.CORRUPTIONS) and set(severities) <= {1, 2, 3, 4, 5}
  for index in range(len(images)):
    assert not np.array_equal(output[index], images[index]) or names[index] in (
      "defocus_blur",
      "pixelate",
    )


def test_bad_name_or_severity_gives_a_clear_error(images):
  with pytest.raises(ValueError, match="valid corruptions: gaussian_noise"):
    corruptions.corrupt(images, "rain", 1, 0)
  for severity in (0, 6, 2.5):
    with pytest.raises(ValueError, match="from 1 to 5"):
      corruptions.corrupt(images, "fog", severity, 0)
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    corruptions.corrupt(images[..., :1], "fog", 1, 0)


# ----------------------------------------------------------------------------------------------
# Four corruptions against the CIFAR-10-C recipe, written again here from it (32x32 images, where
# the pixel parameters apply unscaled).

CIFAR_SIZE = 32


@pytest.fixture(scope="module")
def cifar_images():
  return scenes.load_split("test", 3, scenes.SceneConfig(height=CIFAR_SIZE, width=CIFAR_SIZE))[
    "image"
  ]


def cifar_contrast(image, severity):
  factor = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
  means = np.mean(image, axis=(0, 1), keepdims=True)
  return np.clip((image - means) * factor + means, 0, 1)


def cifar_pixelate(image, severity):
  """PIL's BOX resize down to int(32c) and back to 32, per channel on float ('F') images."""
  factor = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
  small = int(CIFAR_SIZE * factor)
  channels = []
  for channel in np.moveaxis(image, -1, 0):
    picture = Image.fromarray(channel.astype(np.float32), mode="F")
    picture = picture.resize((small, small), Image.BOX).resize((CIFAR_SIZE, CIFAR_SIZE), Image.BOX)
    channels.append(np.asarray(picture))
  return np.clip(np.stack(channels, axis=-1), 0, 1)


def cifar_clipped_zoom(image, factor):
  size = image.shape[0]
  crop = int(np.ceil(size / factor))
  top = (size - crop) // 2
  zoomed = ndimage.zoom(image[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
  trim = (zoomed.shape[0] - size) // 2
  return zoomed[trim : trim + size, trim : trim + size]


def cifar_zoom_blur(image, severity):
  factors = [
    np.arange(1, 1.06, 0.01),
    np.arange(1, 1.11, 0.01),
    np.arange(1, 1.16, 0.01),
    np.arange(1, 1.21, 0.01),
    np.arange(1, 1.26, 0.01),
  ][severity - 1]
  total = np.zeros_like(image)
  for factor in factors:
    total += cifar_clipped_zoom(image, factor)
  return np.clip((image + total) / (len(factors) + 1), 0, 1)


def imagemagick_motion_blur(image, severity, angle):
  """MotionBlurImage: a 2⌈r⌉+1 pixel ray of normalised exp(-t²/2σ²) weights, edge pixels outside."""
  radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
  width = 2 * radius + 1
  weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
  weights /= weights.sum()
  stencil = np.zeros((2 * width + 1, 2 * width + 1))
  for step, weight in enumerate(weights):
    column = int(np.ceil(step * np.cos(np.deg2rad(angle)) - 0.5))
    row = int(np.ceil(step * np.sin(np.deg2rad(angle)) - 0.5))
    stencil[width + row, width + column] += weight
  channels = [
    ndimage.correlate(channel, stencil, mode="nearest") for channel in np.moveaxis(image, -1, 0)
  ]
  return np.clip(np.stack(channels, axis=-1), 0, 1)


def _motion_blur_references(images, severity, seed):
  # corrupt() draws one angle per image from the generator it is given.
  angles = np.random.default_rng(seed).uniform(-45, 45, len(images))
  return [imagemagick_motion_blur(image, severity, angle) for image, angle in zip(images, angles)]


RECIPES = {
  "contrast": lambda images, severity, seed: [cifar_contrast(image, severity) for image in images],
  "pixelate": lambda images, severity, seed: [cifar_pixelate(image, severity) for image in images],
  "zoom_blur": lambda images, severity, seed: [
    cifar_zoom_blur(image.astype(np.float32), severity) for image in images
  ],
  "motion_blur": _motion_blur_references,
}


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_four_corruptions_follow_the_cifar_10_c_recipe(cifar_images, name, severity):
  reference = np.stack(RECIPES[name](cifar_images.astype(np.float64), severity, 5))
  ours = corruptions.corrupt(cifar_images, name, severity, np.random.default_rng(5))
  # float32 images against float64 references.
  np.testing.assert_allclose(ours, reference, atol=1e-5)
