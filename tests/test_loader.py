"""Tests of the grain input pipeline and the augmentation's two placements: the batches are those
of the NumPy reference for any worker count and process count, and the device's pixel work equals
NumPy's on the same draws."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
from mtl_jax.data import augment
from mtl_jax.data import augment_device
from mtl_jax.data import loader
from mtl_jax.data import pipeline
from mtl_jax.data import registry


def _dense_arrays(size, height, width, seed=0, image_dtype=np.float32):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (size, height, width, 3), dtype=np.uint8)
  return {
    "image": image if image_dtype == np.uint8 else (image / 255.0).astype(np.float32),
    "segmentation": rng.integers(-1, 7, (size, height, width)).astype(np.int32),
    "depth": (rng.random((size, height, width)) * 10).astype(np.float32),
    "normals": rng.normal(size=(size, height, width, 3)).astype(np.float32),
    "attributes": rng.random((size, 2)).astype(np.float32),
  }


def _assert_same_batches(expected, got):
  assert len(expected) == len(got)
  for left, right in zip(expected, got):
    assert set(left) == set(right)
    for key in left:
      np.testing.assert_array_equal(np.asarray(left[key]), np.asarray(right[key]), err_msg=key)


def test_stream_equals_the_numpy_reference_for_any_worker_count_and_start():
  # 36 examples, batch 8: 4 steps per epoch, so steps 3..11 cross two epoch boundaries.
  source = pipeline.ArraySource(_dense_arrays(36, 8, 12))
  augmentation = augment.Augmentation((1.0, 1.5), flip=True)
  expected = [pipeline.train_batch(source, 8, 5, step, augmentation) for step in range(3, 12)]
  reader = loader.StepReader(source, 8, (5,), augmentation)
  for workers, prefetch in ((0, 0), (0, 2), (2, 1)):
    stream = loader.BatchStream(reader, 12, workers, prefetch)
    try:
      got = [stream.batch(step) for step in range(3, 12)]
      # Asked for an earlier step (a resumed run), the stream restarts there.
      again = stream.batch(4)
    finally:
      stream.close()
    _assert_same_batches(expected, got)
    _assert_same_batches(expected[1:2], [again])


def test_process_shares_assemble_the_global_batch_in_both_placements():
  source = pipeline.ArraySource(_dense_arrays(24, 8, 12, image_dtype=np.uint8))
  augmentation = augment.Augmentation((1.0, 1.2, 1.5), flip=True)
  for on_device in (False, True):
    whole = loader.StepReader(source, 8, (2,), augmentation, on_device)(5)
    shares = [
      loader.StepReader(source, 8, (2,), augmentation, on_device, index, 2)(5) for index in (0, 1)
    ]
    assert set(whole) == set(shares[0])
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([share[key] for share in shares]), whole[key])
  assert augment.DRAWS_KEY in whole and whole["image"].dtype == np.uint8


def test_stacked_reader_stacks_each_seed_batch():
  source = pipeline.ArraySource(_dense_arrays(16, 4, 4))
  stacked = loader.StepReader(source, 4, (0, 3), stacked=True)(6)
  for index, seed in enumerate((0, 3)):
    single = pipeline.train_batch(source, 4, seed, 6)
    for key in single:
      np.testing.assert_array_equal(stacked[key][index], single[key])


def test_draws_consume_the_generator_as_the_two_random_transforms_do():
  batch = _dense_arrays(6, 16, 20)
  augmentation = augment.Augmentation((1.0, 1.2, 1.5), flip=True)
  combined = augmentation(batch, np.random.default_rng(11))
  rng = np.random.default_rng(11)
  separate = augment.random_horizontal_flip(
    augment.random_scale_crop(batch, rng, (1.0, 1.2, 1.5)), rng
  )
  _assert_same_batches([separate], [combined])


@pytest.mark.parametrize("height, width", [(16, 24), (36, 48)])
def test_device_augmentation_equals_numpy_on_the_same_draws(height, width):
  batch = _dense_arrays(8, height, width, seed=height, image_dtype=np.uint8)
  augmentation = augment.Augmentation((1.0, 1.2, 1.5), flip=True)
  draws = augmentation.draw(np.random.default_rng(3), 8, height, width)
  # Every scale and both flip choices, with crops at both extremes of the allowed corners.
  draws[:, augment.SCALE_INDEX] = [0, 1, 2, 0, 1, 2, 2, 1]
  crop_heights, crop_widths = augment.crop_sizes(np.asarray([1.0, 1.2, 1.5]), height, width)
  scale_index = draws[:, augment.SCALE_INDEX]
  draws[:, augment.TOP] = np.where(np.arange(8) % 2, height - crop_heights[scale_index], 0)
  draws[:, augment.LEFT] = np.where(np.arange(8) % 3, width - crop_widths[scale_index], 0)
  draws[:, augment.FLIP] = [0, 1, 1, 0, 1, 0, 1, 0]
  expected = augmentation.apply(batch, draws)
  prepare = jax.jit(augment_device.preparation(augmentation))
  got = jax.device_get(prepare({**batch, augment.DRAWS_KEY: draws}))
  assert set(got) == set(expected)
  for key in ("segmentation", "normals", "attributes"):
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  # Image and depth: float32 arithmetic in another order (and depth / float32(s) against NumPy's
  # float64 s) differ by a rounding step at most.
  np.testing.assert_allclose(got["image"], expected["image"], rtol=0, atol=3e-7)
  np.testing.assert_allclose(got["depth"], expected["depth"], rtol=3e-7, atol=0)
  assert got["image"].dtype == np.float32 and got["depth"].dtype == np.float32


def test_preparation_without_draws_only_converts_integer_images():
  batch = _dense_arrays(2, 4, 4, image_dtype=np.uint8)
  prepared = jax.device_get(jax.jit(augment_device.preparation(None))(batch))
  np.testing.assert_array_equal(prepared["image"], batch["image"].astype(np.float32) / 255.0)
  floats = _dense_arrays(2, 4, 4)
  unchanged = jax.device_get(jax.jit(augment_device.preparation(None))(floats))
  _assert_same_batches([floats], [unchanged])


def test_tfds_source_reads_uint8_for_the_device_and_both_placements_agree():
  config = base.get_config().dataset
  config.name, config.height, config.width, config.validation_size = "nyuv2", 32, 64, 2
  with tfds.testing.mock_data(num_examples=10):
    dataset = registry.load_dataset(config)
    source = dataset.splits["train"]
    host = loader.StepReader(source, 4, (1,), dataset.augment, on_device=False)(3)
    device = loader.StepReader(source, 4, (1,), dataset.augment, on_device=True)(3)
    rows = pipeline.train_indices(len(source), 4, 1, 3)
    np.testing.assert_array_equal(
      source.batch(rows)["image"], source.raw_batch(rows)["image"].astype(np.float32) / 255.0
    )
  assert device["image"].dtype == np.uint8 and host["image"].dtype == np.float32
  prepared = jax.device_get(jax.jit(augment_device.preparation(dataset.augment))(device))
  assert set(prepared) == set(host)
  for key in ("segmentation", "normals"):
    np.testing.assert_array_equal(prepared[key], host[key], err_msg=key)
  np.testing.assert_allclose(prepared["image"], host["image"], rtol=0, atol=3e-7)
  np.testing.assert_allclose(prepared["depth"], host["depth"], rtol=3e-7, atol=0)
