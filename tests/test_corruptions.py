"""Tests of the 15 common corruptions: shape, dtype, range, determinism, severity ordering, errors."""

import numpy as np
import pytest

from mtl_jax.data import corruptions
from mtl_jax.data import scenes


@pytest.fixture(scope="module")
def images():
  return scenes.load_split("test", 6, scenes.SceneConfig(height=16, width=32))["image"]


def test_there_are_15_corruptions_in_the_standard_order():
  assert len(corruptions.CORRUPTIONS) == len(set(corruptions.CORRUPTIONS)) == 15
  assert corruptions.CORRUPTIONS[0] == "gaussian_noise" and corruptions.CORRUPTIONS[-1] == "jpeg_compression"


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
  assert all(later >= earlier - tolerance for earlier, later in zip(distances, distances[1:])), distances
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
    assert not np.array_equal(output[index], images[index]) or names[index] in ("defocus_blur", "pixelate")


def test_bad_name_or_severity_gives_a_clear_error(images):
  with pytest.raises(ValueError, match="valid corruptions: gaussian_noise"):
    corruptions.corrupt(images, "rain", 1, 0)
  for severity in (0, 6, 2.5):
    with pytest.raises(ValueError, match="from 1 to 5"):
      corruptions.corrupt(images, "fog", severity, 0)
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    corruptions.corrupt(images[..., :1], "fog", 1, 0)
