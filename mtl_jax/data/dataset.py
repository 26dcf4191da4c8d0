"""The Dataset type: a dataset's splits as random-access sources, and the tasks it offers."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import pipeline

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
      raise ValueError(
        f"config.tasks is empty; valid tasks for {self.name!r}: {self.valid_task_names()}."
      )
    unknown = [name for name in expanded if name not in self.tasks]
    if unknown:
      raise ValueError(
        f"Unknown task(s) {unknown} for dataset {self.name!r}; valid tasks: "
        f"{self.valid_task_names()}."
      )
    if len(set(expanded)) != len(expanded):
      raise ValueError(f"config.tasks names a task twice: {list(names)}.")
    return [self.tasks[name] for name in expanded]

  def valid_task_names(self) -> str:
    names = list(self.tasks) + ([ALL_ATTRIBUTES] if self.attribute_tasks else [])
    return ", ".join(names)
