"""Bad configs and bad data: each gives one clear error line naming the key (or split and array) and
the valid choices."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import scenes as scenes_config
from configs import test as test_config
from mtl_jax import config_validation
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax.data import pipeline
from mtl_jax.data import registry
from mtl_jax.data import scenes
from mtl_jax.data import validation
from tests import reliability_helpers as helpers


def _config(**values):
  """The test config with dotted keys set, bypassing type checks (a sweep or notebook could)."""
  config = test_config.get_config()
  config.unlock()
  for dotted, value in values.items():
    section, _, key = dotted.rpartition(".")
    node = config[section] if section else config
    with node.ignore_type():
      node[key] = value
  return config


CASES = [
  ({"method.name": "pcgradd"}, "config.method.name", "valid methods: adatask, aligned_mtl"),
  (
    {"optimizer.name": "rmsprop"},
    "config.optimizer.name",
    "valid optimizers: adam, sgd, signsgd, adamw",
  ),
  (
    {"model.encoder": "vgg"},
    "config.model.encoder",
    "valid encoders: mlp, small_cnn, segnet, resnet18",
  ),
  ({"model.norm": "instance"}, "config.model.norm", "valid norms: batch, group, layer, none"),
  (
    {"dataset.name": "imagenet"},
    "config.dataset.name",
    "valid datasets: celeb_a, cityscapes, nyuv2, scenes",
  ),
  (
    {"training.on_non_finite": "ignore"},
    "config.training.on_non_finite",
    "valid choices: stop, skip",
  ),
  ({"delta_m.variant": "mean"}, "config.delta_m.variant", "valid variants: flat, per_task"),
  (
    {"model.encoder": "resnet18", "model.resnet_stem": "tiny", "tasks": ("has_sphere",)},
    "config.model.resnet_stem",
    "valid stems: imagenet",
  ),
  (
    {"optimizer.learning_rate": 0.0},
    "config.optimizer.learning_rate",
    "must be > 0 and finite, got 0.0",
  ),
  ({"optimizer.learning_rate": -1e-3}, "config.optimizer.learning_rate", "must be > 0"),
  ({"optimizer.learning_rate": float("nan")}, "config.optimizer.learning_rate", "must be > 0"),
  (
    {"optimizer.learning_rate": "1e-3"},
    "config.optimizer.learning_rate",
    "expected a number > 0 and finite, got '1e-3' (str)",
  ),
  (
    {"training.batch_size": 12.5},
    "config.training.batch_size",
    "expected an integer >= 1, got 12.5 (float)",
  ),
  ({"training.batch_size": 0}, "config.training.batch_size", "must be an integer >= 1, got 0"),
  ({"training.num_epochs": 0}, "config.training.num_epochs", "must be an integer >= 1"),
  ({"training.eval_batch_size": -4}, "config.training.eval_batch_size", ">= 1"),
  (
    {"training.async_checkpoints": "yes"},
    "config.training.async_checkpoints",
    "expected True or False",
  ),
  (
    {"tasks": ()},
    "config.tasks",
    "is empty; name at least one task; valid tasks: segmentation, depth, normals",
  ),
  (
    {"tasks": ("depthh",)},
    "config.tasks",
    "Unknown task(s) ['depthh'] for dataset 'scenes'; valid tasks: segmentation",
  ),
  ({"tasks": ("depth", "depth")}, "config.tasks", "names a task twice"),
  ({"tasks": (3,)}, "config.tasks", "expected a tuple of task names"),
  (
    {"model.encoder": "segnet"},
    "config.dataset.height",
    "16 cannot be taken by model.encoder 'segnet', which needs "
    "multiples of 32 (five 2x2 max-pool stages); valid nearby: 32",
  ),
  (
    {"model.encoder": "segnet", "dataset.height": 64, "dataset.width": 40},
    "config.dataset.width",
    "valid nearby: 32 or 64",
  ),
  (
    {"dataset.data_dir": "/nonexistent/nyuv2"},
    "config.dataset.data_dir",
    "directory '/nonexistent/nyuv2' does not exist",
  ),
  ({"dataset.height": "16"}, "config.dataset.height", "expected an integer >= 8, got '16' (str)"),
  ({"model.features": ()}, "config.model.features", "must not be empty"),
  (
    {"model.features": (8, -1)},
    "config.model.features",
    "expected a tuple of positive integers, got (8, -1)",
  ),
  ({"model.width_multiplier": 0}, "config.model.width_multiplier", "must be > 0"),
  ({"optimizer.momentum": 1.0}, "config.optimizer.momentum", "must be in [0, 1)"),
  ({"optimizer.lr_decay_factor": 0.0}, "config.optimizer.lr_decay_factor", "must be in (0, 1]"),
  (
    {"delta_m.baseline": ("/nonexistent/stl_depth",)},
    "config.delta_m.baseline",
    "'/nonexistent/stl_depth' does not exist",
  ),
  ({"seed": -1}, "config.seed", "must be an integer >= 0"),
  (
    {"gramian.verify_every_steps": -2},
    "config.gramian.verify_every_steps",
    "expected -1 (once, at the first step with a fast-path Gramian), 0 (never) or a positive step "
    "count; got -2",
  ),
  (
    {"gramian.verify_every_steps": 2.5},
    "config.gramian.verify_every_steps",
    "or a positive step count; got 2.5",
  ),
  ({"gramian.verify_every_steps": True}, "config.gramian.verify_every_steps", "got True"),
  (
    {"sharding.coordinator_address": "localhost"},
    "config.sharding.coordinator_address",
    "expected 'host:port' of process 0",
  ),
  (
    {"sharding.coordinator_address": "127.0.0.1:12355"},
    "config.sharding.coordinator_address",
    "give coordinator_address, num_processes and process_id together",
  ),
  (
    {
      "sharding.coordinator_address": "127.0.0.1:12355",
      "sharding.num_processes": 2,
      "sharding.process_id": 2,
    },
    "config.sharding.process_id",
    "expected -1 or an integer in [0, num_processes), got 2",
  ),
  (
    {"sharding.peer_timeout_seconds": 100},
    "config.sharding.peer_timeout_seconds",
    "must be below heartbeat_timeout_seconds (100)",
  ),
  (
    {"sharding.shutdown_timeout_seconds": 0},
    "config.sharding.shutdown_timeout_seconds",
    "must be an integer >= 1, got 0",
  ),
]


@pytest.mark.parametrize(
  "values,key,message", CASES, ids=[f"{index}-{key}" for index, (_, key, _) in enumerate(CASES)]
)
def test_bad_config_gives_one_line_naming_the_key(values, key, message):
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate_config(_config(**values), helpers.dataset(), device_count=1)
  text = str(error.value)
  assert "\n" not in text, text
  assert text.startswith(key + ":"), text
  assert message in text, text


def test_batch_size_must_divide_by_the_device_count():
  config = _config(**{"training.batch_size": 12})
  config_validation.validate_config(config, helpers.dataset(), device_count=4)
  with pytest.raises(
    config_validation.ConfigError,
    match=r"^config.training.batch_size: 12 is not divisible by the device count \(8\); use a "
    r"multiple of 8, e.g. 8 or 16.$",
  ):
    config_validation.validate_config(config, helpers.dataset(), device_count=8)


def test_valid_configs_pass():
  config_validation.validate_config(test_config.get_config(), helpers.dataset(), device_count=1)
  config_validation.validate_config(scenes_config.get_config(), device_count=1)


def test_command_line_prints_one_error_line_and_exits_2_on_eight_devices(tmp_path):
  """Eight fake CPU devices: a batch of 12 cannot be split; the entry point says so in one line."""
  result = subprocess.run(
    [
      sys.executable,
      "experiments/train.py",
      "--config=configs/test.py",
      "--config.training.batch_size=12",
      f"--workdir={tmp_path}",
    ],
    cwd=helpers.ROOT,
    capture_output=True,
    text=True,
    timeout=240,
    env=helpers.subprocess_environment(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
  )
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
    "error: config.training.batch_size: 12 is not divisible by the device count (8); "
    "use a multiple of 8, e.g. 8 or 16."
  ], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def _with_split(split, **arrays):
  dataset = helpers.dataset()
  source = dataset.splits[split]
  columns = dict(source.batch(np.arange(len(source))))
  columns.update(arrays)
  splits = dict(dataset.splits)
  splits[split] = pipeline.ArraySource(columns)
  return registry.Dataset(dataset.name, splits, dataset.tasks, dataset.attribute_tasks)


def _column(split, key):
  source = helpers.dataset().splits[split]
  return np.array(source.batch(np.arange(len(source)))[key])


def _bad_data_cases():
  segmentation = _column("validation", "segmentation")
  segmentation[0, 0, 0] = 99
  floats = _column("test", "segmentation").astype(np.float32)
  depth = _column("train", "depth")
  normals = _column("test", "normals")
  attributes = _column("train", "attributes")
  attributes[3, 0] = 2.0
  return [
    (
      "validation",
      {"segmentation": segmentation},
      ["segmentation"],
      "dataset 'scenes' split 'validation': 'segmentation' has class ids [99] outside [0, "
      f"{scenes.NUM_CLASSES})",
    ),
    (
      "test",
      {"segmentation": floats},
      ["segmentation"],
      "'segmentation' has dtype float32; expected integer",
    ),
    (
      "train",
      {"depth": depth[..., None]},
      ["depth"],
      "split 'train': 'depth' has shape (64, 16, 32, 1); expected (64, 16, 32)",
    ),
    ("train", {"depth": -depth}, ["depth"], "'depth' must be finite and >= 0"),
    (
      "test",
      {"normals": normals[..., :2]},
      ["normals"],
      "'normals' has shape (16, 16, 32, 2); expected (16, 16, 32, 3)",
    ),
    (
      "train",
      {"attributes": attributes},
      ["has_sphere"],
      "'attributes' column 0 (task 'has_sphere') must be 0 or 1",
    ),
  ]


def test_bad_labels_are_caught_naming_split_key_expected_and_found():
  for split, arrays, task_names, message in _bad_data_cases():
    dataset = _with_split(split, **arrays)
    with pytest.raises(validation.DataError) as error:
      validation.check_dataset(dataset, dataset.select_tasks(task_names))
    assert message in str(error.value) and "\n" not in str(error.value), (message, str(error.value))


def test_missing_label_key_and_missing_split_are_named():
  dataset = helpers.dataset()
  source = dataset.splits["train"]
  columns = {
    key: value for key, value in source.batch(np.arange(len(source))).items() if key != "normals"
  }
  broken = registry.Dataset(
    dataset.name, {**dataset.splits, "train": pipeline.ArraySource(columns)}, dataset.tasks
  )
  with pytest.raises(
    validation.DataError, match=r"split 'train': task 'normals' needs key 'normals'; found keys"
  ):
    validation.check_dataset(broken, broken.select_tasks(["normals"]))
  without_test = registry.Dataset(dataset.name, {"train": source}, dataset.tasks)
  with pytest.raises(validation.DataError, match=r"has no 'validation' split; found \['train'\]"):
    validation.check_dataset(without_test, without_test.select_tasks(["depth"]))


def test_build_experiment_rejects_bad_data_before_training():
  segmentation = _column("test", "segmentation")
  segmentation[..., 0] = 7
  with pytest.raises(
    validation.DataError, match="split 'test': 'segmentation' has class ids \\[7\\]"
  ):
    train.build_experiment(test_config.get_config(), _with_split("test", segmentation=segmentation))


class _SquareRootDepth(tasks_lib.Depth):
  """Depth whose loss adds sqrt(0 * prediction): a finite loss (0) with a NaN gradient through every
  parameter."""

  def loss(self, prediction, batch):
    return super().loss(prediction, batch) + jnp.mean(
      jnp.sqrt(0.0 * prediction[..., 0] ** 2), axis=(1, 2)
    )


def test_non_finite_gradient_with_finite_losses_names_the_parameters(tmp_path):
  dataset = helpers.dataset()
  poisoned = registry.Dataset(
    dataset.name,
    dataset.splits,
    {**dataset.tasks, "depth": _SquareRootDepth()},
    dataset.attribute_tasks,
  )
  config = test_config.get_config("task=depth")
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path), poisoned)
  message = str(error.value)
  assert message.startswith("Non-finite grad_norm at step 0 (task losses finite: {'depth':"), (
    message
  )
  assert "gradient of task 'depth' loss is non-finite in " in message
  assert "encoder/block_0/conv/kernel" in message and "more)" in message, message
  assert "no checkpoint had been written yet" in message
