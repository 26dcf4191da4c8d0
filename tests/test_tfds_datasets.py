"""Tests of the TFDS datasets: our builders on generated files, mock-data pipelines, hold-outs and
shards."""

import io
import os
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import base
from mtl_jax.data import pipeline
from mtl_jax.data import registry
from mtl_jax.data import tfds_data
from mtl_jax.data import tfds_datasets
from mtl_jax.data.builders import cityscapes_mtl
from mtl_jax.data.builders import nyuv2_mtl


def _dataset_config(name, height, width, **overrides):
  config = base.get_config().dataset
  config.unlock()
  config.name, config.height, config.width = name, height, width
  config.update(overrides)
  return config


def _write_nyuv2_arrays(root, counts):
  """MTAN-layout arrays: returns {split folder: [(image, label, depth, normal), ...]}."""
  rng = np.random.default_rng(0)
  written = {}
  for folder, count in counts.items():
    written[folder] = []
    for index in range(count):
      image = rng.integers(0, 256, (288, 384, 3)).astype(np.float32) / 255.0
      label = rng.integers(-1, 13, (288, 384)).astype(np.float32)
      depth = rng.uniform(0.5, 10.0, (288, 384, 1)).astype(np.float32)
      depth[0, :5] = 0.0
      normal = rng.normal(size=(288, 384, 3)).astype(np.float32)
      normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
      for kind, array in zip(("image", "label", "depth", "normal"), (image, label, depth, normal)):
        os.makedirs(os.path.join(root, "nyuv2", folder, kind), exist_ok=True)
        np.save(os.path.join(root, "nyuv2", folder, kind, f"{index}.npy"), array)
      written[folder].append((image, label, depth, normal))
  return written


def test_nyuv2_builder_round_trip_and_loader(tmp_path):
  written = _write_nyuv2_arrays(str(tmp_path / "manual"), {"train": 4, "val": 2})
  data_dir = str(tmp_path / "tfds")
  builder = nyuv2_mtl.Nyuv2Mtl(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual"))
  )
  assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
    "train": 4,
    "test": 2,
  }

  dataset = registry.load_dataset(
    _dataset_config("nyuv2", 288, 384, data_dir=data_dir, validation_size=1)
  )
  assert {name: len(source) for name, source in dataset.splits.items()} == {
    "train": 3,
    "validation": 1,
    "test": 2,
  }
  batch = dataset.splits["test"].batch(np.arange(2))
  # Files are read in index order, so test example i is val/i.npy.
  for index, (image, label, depth, normal) in enumerate(written["val"]):
    np.testing.assert_allclose(batch["image"][index], image, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(batch["segmentation"][index], label.astype(np.int32))
    np.testing.assert_allclose(batch["depth"][index], depth[..., 0])
    np.testing.assert_allclose(batch["normals"][index], normal)
  assert batch["segmentation"].dtype == np.int32 and batch["image"].dtype == np.float32
  # Validation and train rows together are the 4 training examples, without overlap.
  rows = np.concatenate([dataset.splits["train"].rows, dataset.splits["validation"].rows])
  assert sorted(rows.tolist()) == [0, 1, 2, 3]


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def test_cityscapes_builder_maps_categories_and_inverse_depth(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  height, width = 256, 512  # Twice the stored 128x256: the builder resizes.
  rng = np.random.default_rng(0)
  label_ids = np.repeat(np.arange(34, dtype=np.uint8), (height * width) // 34 + 1)[: height * width]
  label_ids = label_ids.reshape(height, width)
  disparity = rng.integers(0, 30000, (height, width)).astype(np.uint16)
  members = {"image": [], "label": [], "disparity": []}
  for split, count in (("train", 3), ("val", 1)):
    for index in range(count):
      image_id = f"aachen_{index:06d}_000019"
      members["image"].append(
        (
          f"leftImg8bit/{split}/aachen/{image_id}_leftImg8bit.png",
          _png(rng.integers(0, 256, (height, width, 3)).astype(np.uint8)),
        )
      )
      members["label"].append(
        (f"gtFine/{split}/aachen/{image_id}_gtFine_labelIds.png", _png(label_ids))
      )
      members["disparity"].append(
        (f"disparity/{split}/aachen/{image_id}_disparity.png", _png(disparity))
      )
  for kind, (file_name, _, _) in cityscapes_mtl.MANUAL_FILES.items():
    with zipfile.ZipFile(manual / file_name, "w") as archive:
      for name, data in members[kind]:
        archive.writestr(name, data)
  data_dir = str(tmp_path / "tfds")
  builder = cityscapes_mtl.CityscapesMtl(
    config="segmentation_depth_128x256", data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))

  dataset = registry.load_dataset(
    _dataset_config("cityscapes", 128, 256, data_dir=data_dir, validation_size=1)
  )
  assert {name: len(source) for name, source in dataset.splits.items()} == {
    "train": 2,
    "validation": 1,
    "test": 1,
  }
  batch = dataset.splits["test"].batch(np.arange(1))
  assert batch["image"].shape == (1, 128, 256, 3) and batch["depth"].shape == (1, 128, 256)
  # Nearest-neighbour downsizing by 2 keeps the odd source pixels (pixel centres aligned).
  kept_ids = label_ids[1::2, 1::2]
  expected = cityscapes_mtl.map_labels(kept_ids)
  np.testing.assert_array_equal(batch["segmentation"][0], expected)
  # Spot-check the category mapping itself: road flat, sky, car vehicle, ground and id 0 void.
  assert [int(cityscapes_mtl.map_labels(np.uint8(i))) for i in (7, 23, 26, 6, 0, 33)] == [
    0,
    4,
    6,
    -1,
    -1,
    6,
  ]
  kept_disparity = disparity[1::2, 1::2].astype(np.float64)
  expected_depth = np.where(
    kept_disparity > 0, (kept_disparity - 1) / 256 / (0.209313 * 2262.52), 0.0
  )
  np.testing.assert_allclose(batch["depth"][0], expected_depth, rtol=1e-5)


@pytest.mark.parametrize(
  "name, height, width, keys",
  [
    ("celeb_a", 32, 32, {"image", "attributes"}),
    ("cityscapes", 32, 64, {"image", "segmentation", "depth"}),
    ("nyuv2", 32, 64, {"image", "segmentation", "depth", "normals"}),
  ],
)
def test_mock_pipelines_follow_the_batch_contract(name, height, width, keys):
  with tfds.testing.mock_data(num_examples=6):
    dataset = registry.load_dataset(_dataset_config(name, height, width, validation_size=2))
    batch = dataset.splits["train"].batch(np.array([0, 3, 1]))
  assert set(batch) == keys
  assert batch["image"].shape == (3, height, width, 3) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  if name == "celeb_a":
    assert batch["attributes"].shape == (3, 40) and set(np.unique(batch["attributes"])) <= {
      0.0,
      1.0,
    }
    assert set(dataset.tasks) == set(tfds_datasets.CELEBA_ATTRIBUTES) and dataset.augment is None
    # TFDS's attribute names are exactly ours (it stores them as a dict).
    info = tfds.builder("celeb_a").info
    assert set(info.features["attributes"].keys()) == set(tfds_datasets.CELEBA_ATTRIBUTES)
    return
  classes = dataset.tasks["segmentation"].num_classes
  assert batch["segmentation"].dtype == np.int32
  assert batch["segmentation"].min() >= -1 and batch["segmentation"].max() < classes
  assert batch["depth"].dtype == np.float32 and batch["depth"].min() >= 0.0
  assert len(dataset.splits["validation"]) == 2 and len(dataset.splits["train"]) == 4
  augmented = dataset.augment(batch, np.random.default_rng(0))
  assert {key: value.shape for key, value in augmented.items()} == {
    key: value.shape for key, value in batch.items()
  }


def test_missing_data_names_the_prepare_command(tmp_path):
  config = _dataset_config("nyuv2", 288, 384, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="python experiments/prepare_data.py --dataset=nyuv2"):
    registry.load_dataset(config)
  assert not os.listdir(tmp_path) or not any("downloads" in name for name in os.listdir(tmp_path))


def test_holdout_and_process_shares_are_fixed_disjoint_and_cover():
  kept, held = tfds_data.holdout_rows(2975, 595, seed=0)
  again_kept, again_held = tfds_data.holdout_rows(2975, 595, seed=0)
  np.testing.assert_array_equal(held, again_held)
  assert len(held) == 595 and len(kept) == 2380 and not set(kept) & set(held)
  assert not np.array_equal(held, tfds_data.holdout_rows(2975, 595, seed=1)[1])
  batch_rows = pipeline.train_indices(len(kept), 48, seed=0, step=5)
  shards = [pipeline.process_rows(batch_rows, index, 3) for index in range(3)]
  assert all(len(shard) == 16 for shard in shards)
  np.testing.assert_array_equal(np.concatenate(shards), batch_rows)
  with pytest.raises(ValueError, match="split evenly"):
    pipeline.process_rows(batch_rows, 0, 5)
  with pytest.raises(ValueError, match="validation_size"):
    tfds_data.holdout_rows(10, 10, seed=0)
