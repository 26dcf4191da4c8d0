"""The paper's datasets as registry loaders: CelebA, Cityscapes and NYUv2 through TFDS,
TensorFlow-free.

Each loader opens prepared array_record files with `tfds.data_source` (never downloading),
wraps every split in a `TfdsSource` that maps raw examples to the batch contract, holds out a
fixed random validation set from 'train' where the dataset has none, and attaches the
augmentation (each process reads its share of every training batch: `pipeline.process_rows`).
config.dataset keys: data_dir, height, width, validation_size (-1: the dataset's default),
validation_seed, augment, scales (see configs/base.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import augment as augment_lib
from mtl_jax.data import dataset as dataset_lib
from mtl_jax.data import tfds_data

# The 40 CelebA attributes in the order of the official list_attr_celeba.txt.
CELEBA_ATTRIBUTES = (
  "5_o_Clock_Shadow",
  "Arched_Eyebrows",
  "Attractive",
  "Bags_Under_Eyes",
  "Bald",
  "Bangs",
  "Big_Lips",
  "Big_Nose",
  "Black_Hair",
  "Blond_Hair",
  "Blurry",
  "Brown_Hair",
  "Bushy_Eyebrows",
  "Chubby",
  "Double_Chin",
  "Eyeglasses",
  "Goatee",
  "Gray_Hair",
  "Heavy_Makeup",
  "High_Cheekbones",
  "Male",
  "Mouth_Slightly_Open",
  "Mustache",
  "Narrow_Eyes",
  "No_Beard",
  "Oval_Face",
  "Pale_Skin",
  "Pointy_Nose",
  "Receding_Hairline",
  "Rosy_Cheeks",
  "Sideburns",
  "Smiling",
  "Straight_Hair",
  "Wavy_Hair",
  "Wearing_Earrings",
  "Wearing_Hat",
  "Wearing_Lipstick",
  "Wearing_Necklace",
  "Wearing_Necktie",
  "Young",
)
CITYSCAPES_TFDS_NAME = "cityscapes_mtl/segmentation_depth_128x256"
NYUV2_TFDS_NAME = "nyuv2_mtl"
# Default validation hold-outs from 'train' (SPEC section 2).
CITYSCAPES_VALIDATION_SIZE = 595
NYUV2_VALIDATION_SIZE = 159


def prepare_command(dataset: str, data_dir: str) -> str:
  """The shell command that prepares a dataset for `data_dir` (quoted in missing-data errors)."""
  data_dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  if dataset == "celeb_a":
    return f"pip install tensorflow && tfds build celeb_a --file_format=array_record{data_dir_flag}"
  return (
    f"python experiments/prepare_data.py --dataset={dataset} "
    f"--manual_dir=/path/to/downloaded/{dataset}{data_dir_flag}"
  )


def _validation_size(config: ml_collections.ConfigDict, default: int) -> int:
  size = int(config.get("validation_size", -1))
  return default if size < 0 else size


def _sources(
  config: ml_collections.ConfigDict,
  dataset: str,
  tfds_name: str,
  transform: tfds_data.Transform,
  split_names: dict[str, str],
  holdout_default: int,
) -> dict[str, tfds_data.TfdsSource]:
  """train / validation / test sources; validation is a hold-out from train when split_names lacks
  it."""
  data_dir = str(config.get("data_dir", ""))
  command = prepare_command(dataset, data_dir)
  opened = {
    name: tfds_data.open_data_source(tfds_name, split, data_dir, command)
    for name, split in split_names.items()
  }
  rows = {name: np.arange(len(source)) for name, source in opened.items()}
  if "validation" not in split_names:
    rows["train"], rows["validation"] = tfds_data.holdout_rows(
      len(opened["train"]),
      _validation_size(config, holdout_default),
      int(config.get("validation_seed", 0)),
    )
    opened["validation"] = opened["train"]
  return {
    name: tfds_data.TfdsSource(opened[name], rows[name], transform)
    for name in ("train", "validation", "test")
  }


def _augment(config: ml_collections.ConfigDict, flip: bool) -> augment_lib.Augmentation | None:
  if not bool(config.get("augment", True)):
    return None
  return augment_lib.Augmentation(tuple(config.get("scales", (1.0, 1.2, 1.5))), flip=flip)


def celeba_transform(size: tuple[int, int]) -> tfds_data.Transform:
  """Raw celeb_a examples -> {'image' uint8 [B,H,W,3], 'attributes' [B,40] in {0,1}}."""

  def transform(examples: Sequence[dict[str, Any]]) -> tfds_data.Batch:
    attributes = np.asarray(
      [[bool(example["attributes"][name]) for name in CELEBA_ATTRIBUTES] for example in examples],
      np.float32,
    )
    return {"image": tfds_data.stack_images(examples, "image", size), "attributes": attributes}

  return transform


def load_celeb_a(config: ml_collections.ConfigDict) -> dataset_lib.Dataset:
  """CelebA (TFDS 'celeb_a'): 40 binary attribute tasks at config height x width (64x64 in the
  paper).

  The official train / validation / test splits (162,770 / 19,867 / 19,962); the aligned
  218x178 images are resized whole (no crop) with bilinear antialiasing. No augmentation.
  """
  splits = _sources(
    config,
    "celeb_a",
    "celeb_a",
    celeba_transform(tfds_data.dataset_size(config)),
    {"train": "train", "validation": "validation", "test": "test"},
    0,
  )
  tasks = {
    name: tasks_lib.BinaryAttribute(name=name, index=index)
    for index, name in enumerate(CELEBA_ATTRIBUTES)
  }
  return dataset_lib.Dataset("celeb_a", splits, tasks, attribute_tasks=CELEBA_ATTRIBUTES)


def dense_transform(
  size: tuple[int, int], depth_key: str, with_normals: bool, num_classes: int
) -> tfds_data.Transform:
  """Raw cityscapes_mtl / nyuv2_mtl examples -> image (uint8), segmentation, depth (and normals) at
  size.

  Segmentation values outside 0..num_classes-1 become -1 (ignored); depth that is not a
  positive finite number becomes 0 (invalid); non-finite normals become 0 (invalid). Prepared
  data already follows these rules; mock data (random values) does not.
  """

  def transform(examples: Sequence[dict[str, Any]]) -> tfds_data.Batch:
    batch = {
      "image": tfds_data.stack_images(examples, "image", size),
      "segmentation": np.stack(
        [
          tfds_data.resize_nearest(np.asarray(example["segmentation"]), size)
          for example in examples
        ]
      ).astype(np.int32),
      "depth": np.stack(
        [
          tfds_data.resize_nearest(np.asarray(example[depth_key], np.float32), size)
          for example in examples
        ]
      ),
    }
    labels = batch["segmentation"]
    batch["segmentation"] = np.where((labels >= 0) & (labels < num_classes), labels, -1).astype(
      np.int32
    )
    batch["depth"] = np.where(
      np.isfinite(batch["depth"]) & (batch["depth"] > 0), batch["depth"], 0.0
    )
    batch["depth"] = batch["depth"].astype(np.float32)
    if with_normals:
      normals = np.stack(
        [
          tfds_data.resize_nearest(np.asarray(example["normals"], np.float32), size)
          for example in examples
        ]
      )
      batch["normals"] = np.nan_to_num(normals, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    return batch

  return transform


def load_cityscapes(config: ml_collections.ConfigDict) -> dataset_lib.Dataset:
  """Cityscapes (our 'cityscapes_mtl'): 7-class segmentation + inverse depth ('depth'), 128x256.

  'train' minus a fixed random hold-out of validation_size (595) images; 'test' is the
  official val split. Augmentation: random scale-and-crop (no flip, as in the paper).
  """
  from mtl_jax.data.builders import cityscapes_mtl  # noqa: PLC0415  (registers it with TFDS)

  transform = dense_transform(
    tfds_data.dataset_size(config),
    "inverse_depth",
    with_normals=False,
    num_classes=cityscapes_mtl.NUM_CLASSES,
  )
  splits = _sources(
    config,
    "cityscapes",
    CITYSCAPES_TFDS_NAME,
    transform,
    {"train": "train", "test": "validation"},
    CITYSCAPES_VALIDATION_SIZE,
  )
  tasks = {
    "segmentation": tasks_lib.Segmentation(
      name="segmentation", num_classes=cityscapes_mtl.NUM_CLASSES
    ),
    "depth": tasks_lib.Depth(name="depth"),
  }
  return dataset_lib.Dataset("cityscapes", splits, tasks, augment=_augment(config, flip=False))


def load_nyuv2(config: ml_collections.ConfigDict) -> dataset_lib.Dataset:
  """NYUv2 (our 'nyuv2_mtl'): 13-class segmentation, depth, normals at 288x384.

  'train' (795) minus a fixed random hold-out of validation_size (159); 'test' has 654.
  Augmentation: random scale-and-crop and horizontal flip (normals' x negated).
  """
  from mtl_jax.data.builders import nyuv2_mtl  # noqa: PLC0415  (registers it with TFDS)

  transform = dense_transform(
    tfds_data.dataset_size(config), "depth", with_normals=True, num_classes=nyuv2_mtl.NUM_CLASSES
  )
  splits = _sources(
    config,
    "nyuv2",
    NYUV2_TFDS_NAME,
    transform,
    {"train": "train", "test": "test"},
    NYUV2_VALIDATION_SIZE,
  )
  tasks = {
    "segmentation": tasks_lib.Segmentation(name="segmentation", num_classes=nyuv2_mtl.NUM_CLASSES),
    "depth": tasks_lib.Depth(name="depth"),
    "normals": tasks_lib.Normals(name="normals"),
  }
  return dataset_lib.Dataset("nyuv2", splits, tasks, augment=_augment(config, flip=True))


LOADERS = {"celeb_a": load_celeb_a, "cityscapes": load_cityscapes, "nyuv2": load_nyuv2}
