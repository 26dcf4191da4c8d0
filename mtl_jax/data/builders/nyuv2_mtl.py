"""TFDS builder `nyuv2_mtl`: NYUv2 with 13-class segmentation, depth and surface normals (795/654).

TFDS's own `nyu_depth_v2` has depth only. The 3-task NYUv2 of MTAN / LibMTL is distributed as
preprocessed NumPy arrays at 288x384 (the "nyuv2.zip" of the MTAN repository), laid out as

  <manual_dir>/[nyuv2/]{train,val}/{image,label,depth,normal}/<index>.npy

with image float [H,W,3] in [0,1], label [H,W] in {-1 (void), 0..12}, depth [H,W] or [H,W,1]
in metres (0 = missing) and normal [H,W,3] unit vectors (zero = missing). `train` has 795
examples and `val` 654 (the official test set); this builder stores them as splits 'train'
and 'test' (the validation hold-out is taken from 'train' at read time).

Build (no TensorFlow needed):
  python experiments/prepare_data.py --dataset=nyuv2 --manual_dir=/path/to/nyuv2 [--data_dir=...]
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

HEIGHT, WIDTH = 288, 384
NUM_CLASSES = 13
# Folder of each split in the preprocessed arrays -> our TFDS split name.
SPLIT_FOLDERS = {"train": "train", "test": "val"}
_ARRAY_FOLDERS = ("image", "label", "depth", "normal")


def find_root(manual_dir: str) -> str:
  """The folder holding train/ and val/ (manual_dir itself or manual_dir/nyuv2)."""
  for candidate in (manual_dir, os.path.join(manual_dir, "nyuv2")):
    if all(
      os.path.isdir(os.path.join(candidate, folder, "image")) for folder in SPLIT_FOLDERS.values()
    ):
      return candidate
  raise FileNotFoundError(
    f"No preprocessed NYUv2 arrays under {manual_dir!r}: expected "
    "{train,val}/{image,label,depth,normal}/<index>.npy (optionally inside a 'nyuv2' folder). "
    "Download MTAN's preprocessed nyuv2.zip (see README.md, 'Datasets'), unzip it and pass its "
    "folder as --manual_dir."
  )


def convert_example(
  image: np.ndarray, label: np.ndarray, depth: np.ndarray, normal: np.ndarray
) -> dict:
  """The stored features of one example from its four preprocessed arrays."""
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
    image = np.moveaxis(image, 0, -1)  # Some copies are stored channels-first.
  if image.max() <= 1.0 + 1e-6:
    image = image * 255.0
  label = np.asarray(label).reshape(image.shape[:2])
  # Anything outside the 13 classes (the void label -1, or a stray value) is ignored.
  segmentation = np.where((label >= 0) & (label < NUM_CLASSES), np.round(label), -1).astype(np.int8)
  depth = np.asarray(depth, np.float32).reshape(image.shape[:2])
  normal = np.asarray(normal, np.float32)
  if normal.shape[0] == 3 and normal.shape[-1] != 3:
    normal = np.moveaxis(normal, 0, -1)
  return {
    "image": np.clip(np.round(image), 0, 255).astype(np.uint8),
    "segmentation": segmentation,
    "depth": np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32),
    "normals": np.nan_to_num(normal).astype(np.float32),
  }


class Nyuv2Mtl(tfds.core.GeneratorBasedBuilder):
  """NYUv2 for multi-task learning: image, 13-class segmentation, depth, normals at 288x384."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From MTAN's preprocessed arrays; plain tensor features."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download MTAN's preprocessed NYUv2 (nyuv2.zip, linked from the MTAN / LibMTL READMEs), unzip it,
  and pass the folder holding train/ and val/ as --manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    zlib = tfds.features.Encoding.ZLIB
    return self.dataset_info_from_configs(
      # Rows keep the order of the source files: row i is a known image, hold-outs are reproducible.
      disable_shuffling=True,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(HEIGHT, WIDTH, 3), dtype=np.uint8, encoding=zlib),
          "segmentation": tfds.features.Tensor(shape=(HEIGHT, WIDTH), dtype=np.int8, encoding=zlib),
          "depth": tfds.features.Tensor(shape=(HEIGHT, WIDTH), dtype=np.float32, encoding=zlib),
          "normals": tfds.features.Tensor(
            shape=(HEIGHT, WIDTH, 3), dtype=np.float32, encoding=zlib
          ),
        }
      ),
      homepage="https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html",
    )

  def _split_generators(self, dl_manager):
    root = find_root(os.fspath(dl_manager.manual_dir))
    return {
      split: self._generate_examples(os.path.join(root, folder))
      for split, folder in SPLIT_FOLDERS.items()
    }

  def _generate_examples(self, folder: str):
    names = sorted(os.listdir(os.path.join(folder, "image")), key=lambda name: (len(name), name))
    for name in names:
      if not name.endswith(".npy"):
        continue
      arrays = [np.load(os.path.join(folder, kind, name)) for kind in _ARRAY_FOLDERS]
      yield name[: -len(".npy")], convert_example(*arrays)
