"""Checks an experiment config before anything is built: one clear line per bad key, with the valid
choices.

`validate_config` is called by `train.build_experiment`, so every entry point (experiments/train.py,
sweeps, notebooks) rejects a bad config before loading data or compiling. It checks types, ranges
and names of the keys in configs/base.py; keys it does not know (added by other modules) are left
to their owners. Checks that need the loaded dataset (task names) run when one is given.
`experiments/train.py` prints a `ConfigError` as a single `error:` line and exits with status 2.
"""

from __future__ import annotations

import copy
import numbers
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections

from mtl_jax import metrics as metrics_lib
from mtl_jax import optim
from mtl_jax import statistics
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import registry as data_registry
from mtl_jax.models import encoders as encoders_lib
from mtl_jax.models import layers as layers_lib
from mtl_jax.models import multitask

ON_NON_FINITE = ("stop", "skip")


class ConfigError(ValueError):
  """A config value is of the wrong type, out of range, or names something that does not exist."""


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


class _Checker:
  """Collects problems as 'config.<key>: ...' lines."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.problems: list[str] = []

  def value(self, key: str) -> tuple[bool, Any]:
    node = self.config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        return False, None
      node = node[part]
    return True, node

  def fail(self, key: str, message: str) -> None:
    self.problems.append(f"config.{key}: {message}")

  def integer(
    self, key: str, minimum: int, divisor: int | None = None, divisor_name: str = ""
  ) -> None:
    present, value = self.value(key)
    if not present:
      return
    if not _is_int(value):
      self.fail(key, f"expected an integer >= {minimum}, got {value!r} ({type(value).__name__}).")
    elif value < minimum:
      self.fail(key, f"must be an integer >= {minimum}, got {value}.")
    elif divisor and value % divisor:
      lower = (value // divisor) * divisor
      options = " or ".join(str(option) for option in (lower, lower + divisor) if option > 0)
      self.fail(
        key,
        f"{value} is not divisible by {divisor_name} ({divisor}); use a multiple of {divisor}, "
        f"e.g. {options}.",
      )

  def real(self, key: str, check: Callable[[float], bool], allowed: str) -> None:
    present, value = self.value(key)
    if not present:
      return
    if not _is_real(value):
      self.fail(key, f"expected a number {allowed}, got {value!r} ({type(value).__name__}).")
    elif not check(float(value)):
      self.fail(key, f"must be {allowed}, got {value!r}.")

  def choice(self, key: str, choices: Sequence[str], noun: str = "choices") -> None:
    present, value = self.value(key)
    if present and value not in choices:
      self.fail(key, f"unknown value {value!r}; valid {noun}: {', '.join(map(str, choices))}.")

  def boolean(self, key: str) -> None:
    present, value = self.value(key)
    if present and not isinstance(value, bool):
      self.fail(key, f"expected True or False, got {value!r} ({type(value).__name__}).")

  def int_sequence(self, key: str, allow_empty: bool) -> None:
    present, value = self.value(key)
    if not present:
      return
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
      self.fail(key, f"expected a tuple of positive integers, got {value!r}.")
    elif not allow_empty and not value:
      self.fail(key, "must not be empty; give at least one positive integer.")
    elif not all(_is_int(item) and item > 0 for item in value):
      self.fail(key, f"expected a tuple of positive integers, got {tuple(value)!r}.")


def _check_tasks(checker: _Checker, dataset: data_registry.Dataset | None) -> None:
  present, tasks = checker.value("tasks")
  if not present:
    return
  if isinstance(tasks, str):
    tasks = (tasks,)
  valid = dataset.valid_task_names() if dataset is not None else None
  suffix = f"; valid tasks: {valid}." if valid else "."
  if not isinstance(tasks, Sequence) or not all(isinstance(task, str) for task in tasks):
    checker.fail("tasks", f"expected a tuple of task names, got {tasks!r}{suffix}")
  elif not tasks:
    checker.fail("tasks", f"is empty; name at least one task{suffix}")
  elif len(set(tasks)) != len(tasks):
    checker.fail("tasks", f"names a task twice: {tuple(tasks)!r}.")
  elif dataset is not None:
    known = set(dataset.tasks) | (
      {data_registry.ALL_ATTRIBUTES} if dataset.attribute_tasks else set()
    )
    unknown = [task for task in tasks if task not in known]
    if unknown:
      checker.fail(
        "tasks", f"Unknown task(s) {unknown} for dataset {dataset.name!r}; valid tasks: {valid}."
      )


def _check_model(checker: _Checker) -> None:
  checker.choice("model.encoder", multitask.ENCODERS, "encoders")
  checker.choice("model.norm", layers_lib.NORM_KINDS, "norms")
  checker.real("model.width_multiplier", lambda value: value > 0, "> 0")
  checker.int_sequence("model.hidden", allow_empty=True)
  checker.int_sequence("model.features", allow_empty=False)
  checker.int_sequence("model.head_hidden", allow_empty=True)
  checker.integer("model.head_hidden_channels", 1)
  _, encoder = checker.value("model.encoder")
  if encoder == "resnet18":
    checker.choice("model.resnet_stem", encoders_lib.RESNET_STEMS, "stems")
  _, height = checker.value("dataset.height")
  _, width = checker.value("dataset.width")
  if encoder == "segnet" and _is_int(height) and _is_int(width) and height > 0 and width > 0:
    step = encoders_lib.SEGNET_DOWNSAMPLING
    for key, size in (("dataset.height", height), ("dataset.width", width)):
      if size % step:
        lower = (size // step) * step
        options = " or ".join(str(option) for option in (lower, lower + step) if option > 0)
        checker.fail(
          key,
          f"{size} cannot be taken by model.encoder 'segnet', which needs multiples of {step} "
          f"(five 2x2 max-pool stages); valid nearby: {options}.",
        )


def _check_gramian(checker: _Checker) -> None:
  present, value = checker.value("gramian.verify_every_steps")
  if present and (not _is_int(value) or value < -1):
    checker.fail(
      "gramian.verify_every_steps",
      f"expected -1 (once, at the first step with a fast-path Gramian), 0 "
      f"(never) or a positive step count; got {value!r}.",
    )


def _check_findings(checker: _Checker) -> None:
  """config.findings (configs/sections/findings.py) and the sweep's grid refinement."""
  checker.real("findings.confidence", lambda value: 0 < value < 1, "in (0, 1)")
  checker.choice("findings.interval_method", statistics.METHODS, "methods")
  checker.integer("findings.bootstrap_resamples", 1)
  checker.integer("findings.bootstrap_seed", 0)
  checker.real("findings.trivial_margin_percent", lambda value: value >= 0, ">= 0")
  checker.integer("sweep.refine_budget", 0)
  checker.real("sweep.refine_factor", lambda value: value > 1, "> 1")


def _check_sample_alignment(checker: _Checker) -> None:
  """config.sample_alignment (configs/sections/sample_alignment.py)."""
  present, options = checker.value("sample_alignment")
  if not present:
    return
  valid = {
    "methods": weighting_lib.method_names(),
    "levels": ("task", "sample", "sample_task"),
    "optimizers": optim.OPTIMIZERS,
  }
  for key, choices in valid.items():
    values = options[key]
    if isinstance(values, str) or not values or any(value not in choices for value in values):
      checker.fail(
        f"sample_alignment.{key}",
        f"expected a non-empty tuple of {', '.join(map(str, choices))}; got {values!r}.",
      )
  rates = options.lr_grid
  if isinstance(rates, str) or not rates or not all(_is_real(rate) and rate > 0 for rate in rates):
    checker.fail("sample_alignment.lr_grid", f"expected a tuple of rates > 0, got {rates!r}.")
  seeds = options.seeds
  if isinstance(seeds, str) or not seeds or not all(_is_int(seed) and seed >= 0 for seed in seeds):
    checker.fail("sample_alignment.seeds", f"expected a tuple of integers >= 0, got {seeds!r}.")
  checker.integer("sample_alignment.refine_budget", 0)
  checker.integer("sample_alignment.timing_repeats", 1)
  checker.integer("sample_alignment.probe_every_steps", 0)


def validate_config(
  config: ml_collections.ConfigDict,
  dataset: data_registry.Dataset | None = None,
  device_count: int | None = None,
) -> None:
  """Raises a ConfigError naming each bad key and its valid choices; returns None if the config is
  usable.

  Args:
    config: an experiment config (see configs/base.py).
    dataset: the loaded dataset, to check task names against; None skips that check.
    device_count: devices the batch is split across; defaults to jax.device_count().

  Raises:
    ConfigError: one line per problem found.
  """
  checker = _Checker(config)
  device_count = jax.device_count() if device_count is None else int(device_count)
  checker.integer("seed", 0)
  checker.choice("dataset.name", data_registry.dataset_names(), "datasets")
  for key in (
    "dataset.height",
    "dataset.width",
    "dataset.num_train",
    "dataset.num_validation",
    "dataset.num_test",
  ):
    checker.integer(key, 1)
  present, data_dir = checker.value("dataset.data_dir")
  if present and data_dir and not isinstance(data_dir, str):
    checker.fail("dataset.data_dir", f"expected a directory path (string), got {data_dir!r}.")
  elif present and data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    checker.fail(
      "dataset.data_dir",
      f"directory {data_dir!r} does not exist (absolute: "
      f"{os.path.abspath(os.path.expanduser(data_dir))}).",
    )
  _check_tasks(checker, dataset)
  _check_model(checker)
  checker.choice("method.name", weighting_lib.method_names(), "methods")
  _check_gramian(checker)
  _check_findings(checker)
  _check_sample_alignment(checker)
  checker.choice("optimizer.name", optim.OPTIMIZERS, "optimizers")
  checker.real("optimizer.learning_rate", lambda value: 0 < value < float("inf"), "> 0 and finite")
  for key in ("optimizer.momentum", "optimizer.b1", "optimizer.b2"):
    checker.real(key, lambda value: 0 <= value < 1, "in [0, 1)")
  checker.real("optimizer.eps", lambda value: value > 0, "> 0")
  checker.real("optimizer.weight_decay", lambda value: value >= 0, ">= 0")
  checker.boolean("optimizer.decoupled_weight_decay")
  checker.integer("optimizer.lr_decay_every_epochs", 0)
  checker.real("optimizer.lr_decay_factor", lambda value: 0 < value <= 1, "in (0, 1]")
  checker.integer("training.num_epochs", 1)
  checker.integer("training.batch_size", 1, device_count, "the device count")
  checker.integer("training.eval_batch_size", 1, device_count, "the device count")
  checker.integer("training.eval_every_epochs", 1)
  checker.integer("training.log_every_steps", 1)
  checker.integer("training.checkpoint_every_steps", 0)
  checker.integer("training.early_stopping_patience", 0)
  checker.choice("training.on_non_finite", ON_NON_FINITE)
  checker.boolean("training.async_checkpoints")
  checker.choice("delta_m.variant", metrics_lib.DELTA_M_VARIANTS, "variants")
  present, baselines = checker.value("delta_m.baseline")
  if present and isinstance(baselines, str):
    baselines = (baselines,)
  for path in (baselines or ()) if present else ():
    if not os.path.exists(path):
      checker.fail(
        "delta_m.baseline",
        f"{path!r} does not exist; give STL run directories or results.json files.",
      )
  if checker.problems:
    raise ConfigError("\n".join(checker.problems))


def with_overrides(config: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """A deep copy of config with dotted keys ('training.num_epochs') set to the given values."""
  result = copy.deepcopy(config)
  with result.unlocked():
    for key, value in values.items():
      target = result
      *parents, leaf = key.split(".")
      for parent in parents:
        target = target[parent]
      target[leaf] = value
  return result
