r"""TFDS builder `cityscapes_mtl`: Cityscapes images with 7-class segmentation and inverse depth
together.

TFDS's `cityscapes` configs give segmentation or disparity, not both, store full-resolution
PNGs (decoding them needs TensorFlow to build) and keep disparity as 8-bit. This builder
reads the official zips directly (Python's zipfile, PIL), resizes once to the config's size
and stores plain tensors:

- image: uint8 [H, W, 3], bilinear (antialiased) resize of leftImg8bit.
- segmentation: int8 [H, W], the 34 label ids of gtFine mapped to 7 categories (below), -1
  for void; nearest-neighbour resize.
- inverse_depth: float32 [H, W] in 1/m, 0 where the disparity is invalid; nearest-neighbour.

Inverse depth from disparity: a pixel p > 0 of the 16-bit disparity PNG encodes the
disparity d = (p - 1) / 256 in pixels of the full-resolution image, and p = 0 is invalid.
Depth is baseline * focal / d, so inverse depth = d / (baseline * focal), with the nominal
Cityscapes stereo rig (baseline 0.209313 m, focal length 2262.52 px). The value does not
depend on the stored resolution.

The 7 classes are the Cityscapes *categories* (the `category` field of each label id),
void excluded: 0 flat (road, sidewalk, parking, rail track), 1 construction (building, wall,
fence, guard rail, bridge, tunnel), 2 object (pole, pole group, traffic light, traffic sign),
3 nature (vegetation, terrain), 4 sky, 5 human (person, rider), 6 vehicle (car, truck, bus,
caravan, trailer, train, motorcycle, bicycle). Label ids 0-6 (unlabeled, ego vehicle,
rectification border, out of roi, static, dynamic, ground) are void.

Splits: 'train' (2975, official train) and 'validation' (500, official val; the project's
test set). Manual files: leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip,
disparity_trainvaltest.zip from https://www.cityscapes-dataset.com (registration needed).

Build (no TensorFlow needed):
  python experiments/prepare_data.py --dataset=cityscapes --manual_dir=/path/to/zips \
    [--data_dir=...]
"""

from __future__ import annotations

import io
import os
import re
import zipfile

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mtl_jax.data import tfds_data

NUM_CLASSES = 7
CLASS_NAMES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
# Label id -> category class (0-6), -1 for void; ids 0..33 as in cityscapesScripts' labels.py.
_CATEGORY_IDS = {
  "flat": (7, 8, 9, 10),
  "construction": (11, 12, 13, 14, 15, 16),
  "object": (17, 18, 19, 20),
  "nature": (21, 22),
  "sky": (23,),
  "human": (24, 25),
  "vehicle": (26, 27, 28, 29, 30, 31, 32, 33),
}
LABEL_ID_TO_CLASS = np.full(256, -1, np.int8)
for _class, _name in enumerate(CLASS_NAMES):
  LABEL_ID_TO_CLASS[list(_CATEGORY_IDS[_name])] = _class

STEREO_BASELINE_M = 0.209313
FOCAL_LENGTH_PX = 2262.52
MANUAL_FILES = {
  "image": ("leftImg8bit_trainvaltest.zip", "leftImg8bit", "_leftImg8bit.png"),
  "label": ("gtFine_trainvaltest.zip", "gtFine", "_gtFine_labelIds.png"),
  "disparity": ("disparity_trainvaltest.zip", "disparity", "_disparity.png"),
}
# Our split name -> the official folder.
SPLIT_FOLDERS = {"train": "train", "validation": "val"}
_IMAGE_NAME = re.compile(r"^leftImg8bit/(train|val)/([^/]+)/(.+)_leftImg8bit\.png$")


def map_labels(label_ids: np.ndarray) -> np.ndarray:
  """gtFine label ids (uint8) -> the 7 category classes, -1 for void."""
  return LABEL_ID_TO_CLASS[np.asarray(label_ids, np.uint8)]


def inverse_depth_from_disparity_png(pixels: np.ndarray) -> np.ndarray:
  """16-bit disparity PNG values -> inverse depth in 1/m (0 where invalid)."""
  pixels = np.asarray(pixels, np.float64)
  disparity = np.where(pixels > 0, (pixels - 1.0) / 256.0, 0.0)
  return (disparity / (STEREO_BASELINE_M * FOCAL_LENGTH_PX)).astype(np.float32)


def _read_png(archive: zipfile.ZipFile, member: str) -> np.ndarray:
  with Image.open(io.BytesIO(archive.read(member))) as image:
    return np.asarray(image)


def _resize(array: np.ndarray, size: tuple[int, int], bilinear: bool) -> np.ndarray:
  return tfds_data.resize_image(array, size) if bilinear else tfds_data.resize_nearest(array, size)


class CityscapesMtlConfig(tfds.core.BuilderConfig):
  """A stored resolution (height, width)."""

  def __init__(self, *, height: int, width: int, **kwargs):
    super().__init__(version="1.0.0", **kwargs)
    self.height = height
    self.width = width


class CityscapesMtl(tfds.core.GeneratorBasedBuilder):
  """Cityscapes for multi-task learning: image, 7-class segmentation and inverse depth."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Segmentation (7 categories) and inverse depth together; plain tensors."
  }
  BUILDER_CONFIGS = [
    CityscapesMtlConfig(
      name="segmentation_depth_128x256",
      height=128,
      width=256,
      description="7-class segmentation and inverse depth at 128x256, as in MTAN / LibMTL.",
    ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register at https://www.cityscapes-dataset.com and download leftImg8bit_trainvaltest.zip,
  gtFine_trainvaltest.zip and disparity_trainvaltest.zip into one folder (--manual_dir).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    size = (self.builder_config.height, self.builder_config.width)
    zlib = tfds.features.Encoding.ZLIB
    return self.dataset_info_from_configs(
      # Rows keep the order of the source files: row i is a known image, hold-outs are reproducible.
      disable_shuffling=True,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(*size, 3), dtype=np.uint8, encoding=zlib),
          "segmentation": tfds.features.Tensor(shape=size, dtype=np.int8, encoding=zlib),
          "inverse_depth": tfds.features.Tensor(shape=size, dtype=np.float32, encoding=zlib),
        }
      ),
      homepage="https://www.cityscapes-dataset.com",
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    paths = {kind: os.path.join(manual_dir, name) for kind, (name, _, _) in MANUAL_FILES.items()}
    missing = [path for path in paths.values() if not os.path.exists(path)]
    if missing:
      raise FileNotFoundError(
        f"Missing Cityscapes file(s) {missing}; download them from "
        "https://www.cityscapes-dataset.com (see README.md, 'Datasets')."
      )
    return {
      split: self._generate_examples(paths, folder) for split, folder in SPLIT_FOLDERS.items()
    }

  def _generate_examples(self, paths: dict[str, str], folder: str):
    size = (self.builder_config.height, self.builder_config.width)
    archives = {kind: zipfile.ZipFile(path) for kind, path in paths.items()}
    try:
      members = {kind: set(archive.namelist()) for kind, archive in archives.items()}
      for member in sorted(members["image"]):
        match = _IMAGE_NAME.match(member)
        if not match or match.group(1) != folder:
          continue
        _, city, image_id = match.groups()
        others = {
          kind: f"{MANUAL_FILES[kind][1]}/{folder}/{city}/{image_id}{MANUAL_FILES[kind][2]}"
          for kind in ("label", "disparity")
        }
        absent = [name for kind, name in others.items() if name not in members[kind]]
        if absent:
          raise FileNotFoundError(f"Cityscapes image {image_id} has no {absent} in the zips.")
        image = _read_png(archives["image"], member)[..., :3]
        labels = map_labels(_read_png(archives["label"], others["label"]))
        inverse_depth = inverse_depth_from_disparity_png(
          _read_png(archives["disparity"], others["disparity"])
        )
        yield (
          image_id,
          {
            "image": _resize(image.astype(np.uint8), size, bilinear=True),
            "segmentation": _resize(labels, size, bilinear=False),
            "inverse_depth": _resize(inverse_depth, size, bilinear=False),
          },
        )
    finally:
      for archive in archives.values():
        archive.close()
