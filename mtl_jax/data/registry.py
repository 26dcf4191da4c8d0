"""Datasets by name: their splits as random-access sources and the tasks each one offers."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import ml_collections

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import pipeline
from mtl_jax.data import scenes

# A config may name every attribute task of a dataset at once with this alias.
ALL_ATTRIBUTES = "attributes"


@dataclasses.dataclass
class Dataset:
  """A dataset ready for training.

  Attributes:
    name: registry name.
    splits: 'train', 'validation', 'test' -> source.
    tasks: every task the dataset offers, by name, in a stable order.
    attribute_tasks: names of the per-image binary attribute tasks (for the alias).
    augment: optional training augmentation (batch, numpy rng) -> batch.
  """

  name: str
  splits: Mapping[str, pipeline.Source]
  tasks: Mapping[str, tasks_lib.Task]
  attribute_tasks: tuple[str, ...] = ()
  augment: pipeline.Augment | None = None

  def select_tasks(self, names: Sequence[str]) -> list[tasks_lib.Task]:
    """The tasks named, in the order given; 'attributes' expands to all attribute tasks."""
    if isinstance(names, str):
      names = [names]
    expanded: list[str] = []
    for name in names:
      expanded.extend(self.attribute_tasks if name == ALL_ATTRIBUTES else [name])
    if not expanded:
      raise ValueError(f"config.tasks is empty; valid tasks for {self.name!r}: {self.valid_task_names()}.")
    unknown = [name for name in expanded if name not in self.tasks]
    if unknown:
      raise ValueError(
          f"Unknown task(s) {unknown} for dataset {self.name!r}; valid tasks: {self.valid_task_names()}."
      )
    if len(set(expanded)) != len(expanded):
      raise ValueError(f"config.tasks names a task twice: {list(names)}.")
    return [self.tasks[name] for name in expanded]

  def valid_task_names(self) -> str:
    names = list(self.tasks) + ([ALL_ATTRIBUTES] if self.attribute_tasks else [])
    return ", ".join(names)


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
    from mtl_jax.data import tfds_datasets  # Lazy: it imports this module, and TFDS.

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
