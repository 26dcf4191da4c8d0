"""Datasets by name: their splits as random-access sources and the tasks each one offers."""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import pipeline
from mtl_jax.data import scenes
from mtl_jax.data.dataset import ALL_ATTRIBUTES
from mtl_jax.data.dataset import Dataset

__all__ = [
  "ALL_ATTRIBUTES",
  "Dataset",
  "dataset_names",
  "load_dataset",
  "load_scenes",
  "register_dataset",
]


def _scene_config(config: ml_collections.ConfigDict) -> scenes.SceneConfig:
  fields = {field.name for field in dataclasses.fields(scenes.SceneConfig)}
  overrides = {key: config[key] for key in config.keys() if key in fields}
  return scenes.SceneConfig(**overrides)


def load_scenes(config: ml_collections.ConfigDict) -> Dataset:
  """The embedded procedural scenes: segmentation, depth, normals and scene attributes."""
  scene_config = _scene_config(config)
  seed = int(config.get("seed", 0))
  sizes = {
    "train": int(config.num_train),
    "validation": int(config.num_validation),
    "test": int(config.num_test),
  }
  splits = {
    split: pipeline.ArraySource(scenes.load_split(split, size, scene_config, seed=seed))
    for split, size in sizes.items()
  }
  tasks: dict[str, tasks_lib.Task] = {
    "segmentation": tasks_lib.Segmentation(name="segmentation", num_classes=scenes.NUM_CLASSES),
    "depth": tasks_lib.Depth(name="depth"),
    "normals": tasks_lib.Normals(name="normals"),
  }
  for index, attribute in enumerate(scenes.ATTRIBUTE_NAMES):
    tasks[attribute] = tasks_lib.BinaryAttribute(name=attribute, index=index)
  return Dataset("scenes", splits, tasks, attribute_tasks=tuple(scenes.ATTRIBUTE_NAMES))


def _tfds_loader(name: str) -> Callable[[ml_collections.ConfigDict], Dataset]:
  """A loader that imports mtl_jax.data.tfds_datasets only when the dataset is used."""

  def load(config: ml_collections.ConfigDict) -> Dataset:
    from mtl_jax.data import tfds_datasets  # noqa: PLC0415  (lazy: TFDS is a heavy import)

    return tfds_datasets.LOADERS[name](config)

  return load


_LOADERS: dict[str, Callable[[ml_collections.ConfigDict], Dataset]] = {"scenes": load_scenes}
# The paper's datasets (TFDS array_record files; see README.md, 'Datasets').
_LOADERS.update({name: _tfds_loader(name) for name in ("celeb_a", "cityscapes", "nyuv2")})


def dataset_names() -> tuple[str, ...]:
  return tuple(sorted(_LOADERS))


def register_dataset(name: str, loader: Callable[[ml_collections.ConfigDict], Dataset]) -> None:
  """Adds a dataset loader (config.dataset -> Dataset) under name."""
  _LOADERS[name] = loader


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Loads the dataset named by config.name, or raises a ValueError listing the valid names."""
  name = config.name
  if name not in _LOADERS:
    raise ValueError(f"Unknown dataset {name!r}; valid datasets: {', '.join(dataset_names())}.")
  return _LOADERS[name](config)
