"""Small models with parameters away from their initialisation, and batches for dense and global
tasks.

Shared by the exactness tests of the Gramian engine (test_gramian_exactness_matrix.py,
test_xla_cpu_faults.py). Sizes are as small as the encoders allow, except that the first
encoder layer's activations of one task's backward pass are at least 36 KiB: XLA:CPU cuts
larger arrays into tiles, and the fault these tests were written for (docs/xla_cpu_faults.md)
only showed past the first tile of the task axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_jax import models
from mtl_jax import tasks as tasks_lib
from mtl_jax.models import multitask

BATCH = 3
NUM_CLASSES = 4
# Share of pixels without a target: ignored segmentation labels, zero depth, zero normals.
MISSING = 0.2
DENSE_TASKS = (
  tasks_lib.Segmentation(num_classes=NUM_CLASSES),
  tasks_lib.Depth(),
  tasks_lib.Normals(),
  tasks_lib.BinaryAttribute(name="attribute", index=0),  # A global head on dense features.
)
GLOBAL_TASKS = (
  tasks_lib.BinaryAttribute(name="smiling", index=0),
  tasks_lib.Classification(name="digit", num_classes=3),
  tasks_lib.BinaryAttribute(name="glasses", index=1),
  tasks_lib.BinaryAttribute(name="hat", index=2),
)
# Encoder settings and image size; dense encoders get the dense task set.
ENCODERS = {
  "mlp": (dict(hidden=(3072,)), 8),
  "small_cnn": (dict(features=(4, 4)), 32),
  "segnet": (dict(width_multiplier=0.0625), 32),
  "resnet18": (dict(width_multiplier=0.0625, resnet_stem="cifar"), 32),
  "deeplabv3_resnet50": (dict(width_multiplier=0.0625), 32),
}


@dataclasses.dataclass(frozen=True)
class Case:
  model: models.MultiTaskModel
  tasks: tuple
  params: Any
  batch_stats: Any
  batch: dict


def is_dense(encoder: str) -> bool:
  return encoder not in multitask.GLOBAL_ENCODERS


def build(encoder: str, norm: str):
  """(model, tasks, image size) of one encoder with four tasks, dense and global mixed where
  possible."""
  settings, size = ENCODERS[encoder]
  config = ml_collections.ConfigDict(
    dict(encoder=encoder, norm=norm, head_hidden=(5,), head_hidden_channels=4, **settings)
  )
  tasks = DENSE_TASKS if is_dense(encoder) else GLOBAL_TASKS
  specs = {task.name: models.HeadSpec(task.output_channels, dense=task.dense) for task in tasks}
  return models.build_model(config, specs), tasks, size


def random_variables(model, size: int, seed: int) -> tuple[Any, Any]:
  """(params, batch_stats) away from any initialisation, from numpy (no compilation).

  He-normal kernels, norm scales 1 + 0.3 N(0, 1), biases 0.1 N(0, 1); running statistics
  (batch norm) mean 0.3 N(0, 1) and variance in [0.5, 1.5].
  """
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  generator = np.random.default_rng(seed)

  def parameter(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return generator.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name == "scale":
      return (1.0 + 0.3 * generator.normal(size=leaf.shape)).astype(np.float32)
    return (0.1 * generator.normal(size=leaf.shape)).astype(np.float32)

  def statistic(path, leaf):
    if path[-1].key == "var":
      return generator.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (0.3 * generator.normal(size=leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(parameter, shapes["params"])
  batch_stats = jax.tree_util.tree_map_with_path(statistic, shapes.get("batch_stats", {}))
  return params, batch_stats


def random_batch(size: int, seed: int, batch_size: int = BATCH) -> dict:
  """Images and targets of every task in this module, a share MISSING of the pixels without one."""
  generator = np.random.default_rng([seed, 1])
  shape = (batch_size, size, size)
  missing = generator.uniform(size=shape) < MISSING
  normals = generator.normal(size=(*shape, 3))
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  return {
    "image": generator.normal(size=(*shape, 3)).astype(np.float32),
    "segmentation": np.where(missing, -1, generator.integers(0, NUM_CLASSES, shape)).astype(
      np.int32
    ),
    "depth": np.where(
      generator.uniform(size=shape) < MISSING, 0.0, generator.uniform(0.5, 5.0, shape)
    ).astype(np.float32),
    "normals": np.where((generator.uniform(size=shape) < MISSING)[..., None], 0.0, normals).astype(
      np.float32
    ),
    "attributes": (generator.uniform(size=(batch_size, 3)) > 0.5).astype(np.float32),
    "label": generator.integers(0, 3, batch_size).astype(np.int32),
  }


def make_case(encoder: str, norm: str, seed: int, model_and_tasks=None) -> Case:
  """One case; pass `build(encoder, norm)`'s model and tasks to reuse them (and their compiled
  programs)."""
  model, tasks, size = model_and_tasks or build(encoder, norm)
  params, batch_stats = random_variables(model, size, seed)
  return Case(model, tuple(tasks), params, batch_stats, random_batch(size, seed))


def flat(tree: Any) -> np.ndarray:
  """A pytree's leaves, flattened and concatenated in tree_leaves order (float64)."""
  return np.concatenate(
    [np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree_util.tree_leaves(tree)]
  )


def eager_rows(case: Case, train: bool = True) -> np.ndarray:
  """[B, T, P]: each row's encoder gradient from an eager loop over samples and tasks.

  For each sample, its [T] losses alone (a batch of one) and one pullback per task: the
  gradient `jax.grad` gives of each single-sample, single-task loss. Nothing is jitted here, so
  the operations run one by one and no fused program of the model is involved.
  `train=False` evaluates batch norm with its running statistics.
  """
  rows = []
  for sample in range(case.batch["image"].shape[0]):
    single = {key: value[sample : sample + 1] for key, value in case.batch.items()}

    def losses(encoder_params, single=single):
      variables = {"params": {**case.params, "encoder": encoder_params}}
      if case.batch_stats:
        variables["batch_stats"] = case.batch_stats
      predictions = case.model.apply(variables, single["image"], train=train)
      return tasks_lib.losses_matrix(case.tasks, predictions, single)[0]

    values, pullback = jax.vjp(losses, case.params["encoder"])
    basis = np.eye(len(case.tasks), dtype=np.float32)
    rows.append(np.stack([flat(pullback(basis[index])[0]) for index in range(len(case.tasks))]))
  return np.stack(rows)
