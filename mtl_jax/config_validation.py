"""Checks an experiment config before anything is built: one clear line per bad key, with the valid
choices.

`validate_config` is called by `train.build_experiment` (and by the studies before they start), so
every entry point (experiments/*.py, sweeps, notebooks) rejects a bad config before loading data
or compiling. Every key of configs/base.py and of the study sections in configs/sections/ has a
rule (`RULES`: type and range), whatever the method or encoder; then the keys that constrain each
other are checked together (method and level and norm, batch size and devices, paths that must
exist, ...). A key the rules do not know, in a section they know, is rejected with the valid
names: a typo in a notebook or sweep would otherwise be ignored. Checks that need the loaded
dataset (task names, the training split's size) run when one is given. The entry points print a
`ConfigError` as `error:` lines and exit with status 2 (`runtime.run`).
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections

from mtl_jax import metrics as metrics_lib
from mtl_jax import optim
from mtl_jax import statistics
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import augment as augment_lib
from mtl_jax.data import labels as labels_lib
from mtl_jax.data import registry as data_registry
from mtl_jax.data import scenes as scenes_lib
from mtl_jax.gramian import modes as gramian_modes
from mtl_jax.models import architectures as architectures_lib
from mtl_jax.models import encoders as encoders_lib
from mtl_jax.models import layers as layers_lib
from mtl_jax.models import multitask

ON_NON_FINITE = ("stop", "skip")
# Choices owned by modules that import this one (an import back would be a cycle); tests check
# that they equal parallel.DISTRIBUTED_MODES, ('auto',) + train.LANE_MODES and the conflict
# study's SETTINGS.
DISTRIBUTED_MODES = ("auto", "on", "off")
LANE_MODES = ("auto", "vmap", "map", "loop")
CONFLICT_SETTINGS = ("dense", "attributes", "config")
ROBUSTNESS_MODES = ("study", "figure")
# Top-level sections that hold another study's own config (configs/reproduce.py nests the toy and
# invariance configs); those studies check their keys themselves.
FOREIGN_SECTIONS = ("invariance", "toy")
# The smallest image side the models and the scenes renderer take.
MIN_IMAGE_SIZE = 8

# A rule takes a value and returns what is wrong with it, or None when it is valid.
Rule = Callable[[Any], "str | None"]


class ConfigError(ValueError):
  """A config value is of the wrong type, out of range, or names something that does not exist."""


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
  return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _got(value: Any) -> str:
  return f"{value!r} ({type(value).__name__})"


def integer(minimum: int, maximum: int | None = None, special: tuple[int, ...] = ()) -> Rule:
  """An integer in [minimum, maximum] (no maximum when None), or one of the special values."""
  bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
  allowed = " or ".join([str(value) for value in special] + [f"an integer {bounds}"])

  def rule(value):
    if not _is_int(value):
      return f"expected {allowed}, got {_got(value)}."
    if value in special:
      return None
    if value < minimum or (maximum is not None and value > maximum):
      return (
        f"must be {allowed}, got {value}."
        if special
        else f"must be an integer {bounds}, got {value}."
      )
    return None

  return rule


def real(check: Callable[[float], bool], allowed: str) -> Rule:
  """A real number (not a bool) for which check holds; `allowed` says which in words."""

  def rule(value):
    if not _is_real(value):
      return f"expected a number {allowed}, got {_got(value)}."
    if not check(float(value)):
      return f"must be {allowed}, got {value!r}."
    return None

  return rule


def positive(value: float) -> bool:
  return 0 < value < math.inf


def non_negative(value: float) -> bool:
  return 0 <= value < math.inf


def choice(choices: Sequence[str], noun: str = "choices") -> Rule:
  def rule(value):
    if isinstance(value, str) and value in choices:
      return None
    return f"unknown value {value!r}; valid {noun}: {', '.join(map(str, choices))}."

  return rule


def boolean(value: Any) -> str | None:
  return None if isinstance(value, bool) else f"expected True or False, got {_got(value)}."


def text(value: Any) -> str | None:
  return None if isinstance(value, str) else f"expected a string, got {_got(value)}."


def int_sequence(allow_empty: bool, minimum: int = 1, maximum: int | None = None) -> Rule:
  """A tuple of integers in [minimum, maximum]."""
  what = (
    "positive integers" if (minimum, maximum) == (1, None) else f"integers in {minimum}..{maximum}"
  )

  def rule(value):
    if not _is_sequence(value):
      return f"expected a tuple of {what}, got {value!r}."
    if not allow_empty and not value:
      return f"must not be empty; give at least one of the {what}."
    if not all(
      _is_int(item) and item >= minimum and (maximum is None or item <= maximum) for item in value
    ):
      return f"expected a tuple of {what}, got {tuple(value)!r}."
    return None

  return rule


def real_sequence(check: Callable[[float], bool], allowed: str, allow_empty: bool) -> Rule:
  def rule(value):
    if not _is_sequence(value) or not all(_is_real(item) for item in value):
      return f"expected a tuple of numbers {allowed}, got {value!r}."
    if not allow_empty and not value:
      return f"must not be empty; give at least one number {allowed}."
    if not all(check(float(item)) for item in value):
      return f"expected a tuple of numbers {allowed}, got {tuple(value)!r}."
    return None

  return rule


def text_sequence(allow_empty: bool, choices: Sequence[str] | None = None, noun: str = "") -> Rule:
  """A tuple of strings, each one of choices when given."""

  def rule(value):
    if not _is_sequence(value) or not all(isinstance(item, str) and item for item in value):
      return f"expected a tuple of names, got {value!r}."
    if not allow_empty and not value:
      return "must not be empty; name at least one."
    unknown = [item for item in value if choices is not None and item not in choices]
    if unknown:
      return f"unknown {unknown}; valid {noun}: {', '.join(choices)}."
    if len(set(value)) != len(value):
      return f"names an entry twice: {tuple(value)!r}."
    return None

  return rule


def _verify_every_steps(value: Any) -> str | None:
  if _is_int(value) and value >= -1:
    return None
  return (
    "expected -1 (once, at the first step with a fast-path Gramian), 0 (never) or a positive step "
    f"count; got {value!r}."
  )


def _corruption_rules() -> tuple[Rule, Rule]:
  """The rules of robustness.corruptions and robustness.severities."""
  # Imported here: the corruptions pull in SciPy and Matplotlib (~1 s), which only the robustness
  # study needs.
  from mtl_jax.data import corruptions  # noqa: PLC0415  (heavy; robustness configs only)

  severities = corruptions.SEVERITIES
  return (
    text_sequence(True, corruptions.CORRUPTIONS, "corruptions"),
    int_sequence(allow_empty=False, minimum=min(severities), maximum=max(severities)),
  )


def _sequence_or_text(rule: Rule) -> Rule:
  """rule applied to (value,) when value is a single string (a lone path or task)."""
  return lambda value: rule((value,) if isinstance(value, str) else value)


# Every key of configs/base.py and of configs/sections/*, with its rule. Keys with conditions on
# others are also checked together in `validate_config`.
RULES: dict[str, Rule] = {
  "seed": integer(0),
  "tasks": lambda value: None,  # Checked by `_check_tasks` (names depend on the dataset).
  "dataset.name": choice(data_registry.dataset_names(), "datasets"),
  "dataset.height": integer(MIN_IMAGE_SIZE),
  "dataset.width": integer(MIN_IMAGE_SIZE),
  "dataset.num_train": integer(1),
  "dataset.num_validation": integer(1),
  "dataset.num_test": integer(1),
  "dataset.seed": integer(0),
  "dataset.max_objects": integer(scenes_lib.SceneConfig.min_objects),
  "dataset.data_dir": text,
  "dataset.validation_size": integer(1, special=(-1,)),
  "dataset.validation_seed": integer(0),
  "dataset.augment": boolean,
  "dataset.scales": real_sequence(lambda value: 1 <= value < math.inf, ">= 1", False),
  "dataset.label_fraction": real(lambda value: 0 < value <= 1, "in (0, 1]"),
  "dataset.label_fraction_tasks": text_sequence(True),
  "dataset.label_fractions": lambda value: _label_fractions_rule(value),
  "dataset.label_fraction_splits": text_sequence(False, labels_lib.SPLITS, "splits"),
  "model.encoder": choice(multitask.ENCODERS, "encoders"),
  "model.norm": choice(layers_lib.NORM_KINDS, "norms"),
  "model.dtype": choice(layers_lib.DTYPES, "dtypes"),
  "model.width_multiplier": real(positive, "> 0"),
  "model.hidden": int_sequence(allow_empty=True),
  "model.features": int_sequence(allow_empty=False),
  "model.head_hidden_channels": integer(1),
  "model.head_hidden": int_sequence(allow_empty=True),
  "model.resnet_stem": choice(encoders_lib.RESNET_STEMS, "stems"),
  "model.pretrained_backbone": text,
  "model.architecture": choice(architectures_lib.ARCHITECTURES, "architectures"),
  "model.num_experts": integer(1),
  "model.num_task_experts": integer(1),
  "model.num_levels": integer(1),
  "method.name": choice(weighting_lib.method_names(), "methods"),
  "method.uw_initial_log_variance": real(math.isfinite, "finite"),
  "method.uw_o_epsilon": real(positive, "> 0"),
  "method.level": choice(weighting_lib.LEVELS, "levels"),
  "method.solver_iterations": integer(1),
  "method.cagrad_c": real(non_negative, ">= 0"),
  "method.cagrad_rescale": integer(0, 2),
  "method.cagrad_outer_iterations": integer(1),
  "method.gradvac_beta": real(lambda value: 0 <= value <= 1, "in [0, 1]"),
  "method.imtl_loss_scaling": boolean,
  "method.nash_mtl_iterations": integer(1),
  "method.nash_mtl_max_norm": real(positive, "> 0"),
  "method.nash_mtl_ridge": real(non_negative, ">= 0"),
  "method.graddrop_leak": real(lambda value: 0 <= value <= 1, "in [0, 1]"),
  "method.dwa_temperature": real(positive, "> 0"),
  "method.gradnorm_alpha": real(non_negative, ">= 0"),
  "method.famo_learning_rate": real(positive, "> 0"),
  "method.famo_weight_decay": real(non_negative, ">= 0"),
  "method.config_eigenvalue_cutoff": real(lambda value: 0 <= value < 1, "in [0, 1)"),
  "method.fairgrad_alpha": real(positive, "> 0"),
  "method.fairgrad_iterations": integer(1),
  "method.cr_mogm_alpha": real(lambda value: 0 <= value <= 1, "in [0, 1]"),
  "method.cr_mogm_base": choice(weighting_lib.method_names(), "methods"),
  "method.db_mtl_beta": real(lambda value: 0 <= value <= 1, "in [0, 1]"),
  "method.db_mtl_beta_sigma": real(non_negative, ">= 0"),
  "method.moco_beta": real(lambda value: 0 <= value <= 1, "in [0, 1]"),
  "method.moco_beta_sigma": real(non_negative, ">= 0"),
  "method.moco_gamma": real(non_negative, ">= 0"),
  "method.moco_gamma_sigma": real(non_negative, ">= 0"),
  "method.moco_rho": real(non_negative, ">= 0"),
  "method.moco_weight_map": choice(("simplex", "softmax"), "weight maps"),
  "method.moco_gradient_scale": choice(("loss", "none"), "gradient scales"),
  "method.excess_mtl_step_size": real(non_negative, ">= 0"),
  "method.sdmgrad_lambda": real(non_negative, ">= 0"),
  "method.sdmgrad_learning_rate": real(positive, "> 0"),
  "method.sdmgrad_momentum": real(lambda value: 0 <= value < 1, "in [0, 1)"),
  "method.sdmgrad_iterations": integer(1),
  "method.modo_gamma": real(non_negative, ">= 0"),
  "method.modo_rho": real(non_negative, ">= 0"),
  "method.stch_mu": real(positive, "> 0"),
  "method.stch_warmup_epochs": integer(0),
  "method.go4align_step_size": real(non_negative, ">= 0"),
  "method.go4align_groups": integer(1),
  "method.auto_lambda_initial_weight": real(math.isfinite, "finite"),
  "method.auto_lambda_learning_rate": real(positive, "> 0"),
  "gramian.verify_every_steps": _verify_every_steps,
  "optimizer.name": choice(optim.OPTIMIZERS, "optimizers"),
  "optimizer.learning_rate": real(positive, "> 0 and finite"),
  "optimizer.momentum": real(lambda value: 0 <= value < 1, "in [0, 1)"),
  "optimizer.b1": real(lambda value: 0 <= value < 1, "in [0, 1)"),
  "optimizer.b2": real(lambda value: 0 <= value < 1, "in [0, 1)"),
  "optimizer.eps": real(positive, "> 0"),
  "optimizer.weight_decay": real(non_negative, ">= 0"),
  "optimizer.decoupled_weight_decay": boolean,
  "optimizer.lr_decay_every_epochs": integer(0),
  "optimizer.lr_decay_factor": real(lambda value: 0 < value <= 1, "in (0, 1]"),
  "data.workers": integer(0),
  "data.prefetch": integer(0),
  "data.augment_on": choice(augment_lib.PLACEMENTS, "placements"),
  "training.num_epochs": integer(1),
  "training.batch_size": integer(1),
  "training.eval_batch_size": integer(1),
  "training.eval_every_epochs": integer(1),
  "training.log_every_steps": integer(1),
  "training.checkpoint_every_steps": integer(0),
  "training.early_stopping_patience": integer(0),
  "training.on_non_finite": choice(ON_NON_FINITE),
  "training.async_checkpoints": boolean,
  "delta_m.baseline": _sequence_or_text(text_sequence(allow_empty=True)),
  "delta_m.variant": choice(metrics_lib.DELTA_M_VARIANTS, "variants"),
  "sharding.data_axis_size": integer(1, special=(-1,)),
  "sharding.fsdp": boolean,
  "sharding.fsdp_min_size": integer(0),
  "sharding.distributed": choice(DISTRIBUTED_MODES),
  # Checked together by `_check_connection`.
  "sharding.coordinator_address": lambda value: None,
  "sharding.num_processes": lambda value: None,
  "sharding.process_id": lambda value: None,
  "sharding.initialization_timeout_seconds": integer(1),
  "sharding.heartbeat_timeout_seconds": integer(1),
  "sharding.shutdown_timeout_seconds": integer(1),
  "sharding.peer_timeout_seconds": integer(1),
  "conflicts.probe_every_steps": integer(0),
  "conflicts.max_samples": integer(0),
  "conflicts.max_tasks": integer(0),
  "conflicts.path": choice(gramian_modes.PATHS, "paths"),
  "conflicts.batch_norm": choice(gramian_modes.BATCH_NORM_MODES, "modes"),
  "conflicts.parameter_ratio": boolean,
  "conflicts.zero_tolerance": real(lambda value: 0 <= value < 1, "in [0, 1)"),
  "conflicts.sign_tolerance": real(lambda value: 0 <= value < 1, "in [0, 1)"),
  # configs/sections/conflicts.py
  "conflicts.settings": text_sequence(False, CONFLICT_SETTINGS, "settings"),
  "conflicts.study_probe_every_steps": integer(1),
  "conflicts.architectures": text_sequence(allow_empty=False),
  "conflicts.heads": lambda value: None,  # Checked by `_check_conflict_heads`.
  # configs/sections/optimizers.py
  "sweep.methods": text_sequence(allow_empty=False),
  "sweep.optimizers": text_sequence(False, optim.OPTIMIZERS, "optimizers"),
  "sweep.lr_grid": real_sequence(positive, "> 0", False),
  "sweep.stl_lr_grid": real_sequence(positive, "> 0", False),
  "sweep.seeds": int_sequence(allow_empty=False, minimum=0),
  "sweep.group_runs": boolean,
  "sweep.lane_mode": choice(LANE_MODES, "lane modes"),
  "sweep.refine_budget": integer(0),
  "sweep.refine_factor": real(lambda value: 1 < value < math.inf, "> 1"),
  # configs/sections/findings.py
  "findings.confidence": real(lambda value: 0 < value < 1, "in (0, 1)"),
  "findings.interval_method": choice(statistics.METHODS, "methods"),
  "findings.bootstrap_resamples": integer(1),
  "findings.bootstrap_seed": integer(0),
  "findings.trivial_margin_percent": real(non_negative, ">= 0"),
  # configs/sections/sample_alignment.py
  "sample_alignment.methods": text_sequence(False, weighting_lib.method_names(), "methods"),
  "sample_alignment.levels": text_sequence(False, ("task", "sample", "sample_task"), "levels"),
  "sample_alignment.optimizers": text_sequence(False, optim.OPTIMIZERS, "optimizers"),
  "sample_alignment.lr_grid": real_sequence(positive, "> 0", False),
  "sample_alignment.seeds": int_sequence(allow_empty=False, minimum=0),
  "sample_alignment.refine_budget": integer(0),
  "sample_alignment.timing_repeats": integer(1),
  "sample_alignment.probe_every_steps": integer(0),
  # configs/sections/label_scarcity.py (the study checks the task against config.tasks)
  "label_scarcity.task": text,
  "label_scarcity.fractions": real_sequence(lambda value: 0 < value <= 1, "in (0, 1]", False),
  "label_scarcity.methods": text_sequence(False, weighting_lib.method_names(), "methods"),
  "label_scarcity.seeds": int_sequence(allow_empty=False, minimum=0),
  # configs/sections/robustness.py
  "robustness.mode": choice(ROBUSTNESS_MODES, "modes"),
  "robustness.mtl_runs": text_sequence(allow_empty=True),
  "robustness.stl_runs": text_sequence(allow_empty=True),
  "robustness.prepare_methods": text_sequence(False, weighting_lib.method_names(), "methods"),
  "robustness.corruptions": lambda value: _corruption_rules()[0](value),
  "robustness.severities": lambda value: _corruption_rules()[1](value),
  "robustness.corruption_seed": integer(0),
  "robustness.finetune_epochs": integer(0),
  "robustness.finetune_learning_rate": real(positive, "> 0"),
  "robustness.max_test_examples": integer(0),
  "robustness.probe_task": text,
  "robustness.probe_steps": integer(1),
  "robustness.probe_learning_rate": real(positive, "> 0"),
  "robustness.figure_path": text,
}


class _Checker:
  """Collects problems as 'config.<key>: ...' lines; remembers which keys were looked at."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.problems: list[str] = []
    self.seen: set[str] = set()

  def value(self, key: str) -> tuple[bool, Any]:
    self.seen.add(key)
    node = self.config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        return False, None
      node = node[part]
    return True, node

  def fail(self, key: str, message: str) -> None:
    # One line per problem, even when a value's repr spans several (a ConfigDict's does).
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    self.problems.append(f"config.{key}: {message}")

  def failed(self, *keys: str) -> bool:
    """Whether any of keys already has a problem (so checks that combine them are skipped)."""
    return any(problem.startswith(f"config.{key}:") for problem in self.problems for key in keys)

  def apply(self, key: str, rule: Rule) -> None:
    present, value = self.value(key)
    problem = rule(value) if present else None
    if problem:
      self.fail(key, problem)

  # The checks below are the ones other modules may call for keys they add.
  def integer(self, key: str, minimum: int) -> None:
    self.apply(key, integer(minimum))

  def real(self, key: str, check: Callable[[float], bool], allowed: str) -> None:
    self.apply(key, real(check, allowed))

  def choice(self, key: str, choices: Sequence[str], noun: str = "choices") -> None:
    self.apply(key, choice(choices, noun))

  def boolean(self, key: str) -> None:
    self.apply(key, boolean)


def _check_unknown_keys(checker: _Checker) -> None:
  """Rejects keys no rule (nor any other check) looked at, naming the valid ones nearby."""
  config = checker.config
  known_top = {key.split(".")[0] for key in checker.seen} | set(FOREIGN_SECTIONS)
  sections = {key.split(".")[0] for key in checker.seen if "." in key} | set(FOREIGN_SECTIONS)
  for name in config.keys():
    if name not in known_top:
      _fail_unknown(checker, name, sorted(known_top & set(config.keys()) | {"seed", "tasks"}))
    elif name in sections and not isinstance(config[name], ml_collections.ConfigDict):
      checker.fail(name, f"expected a section (ConfigDict) of keys, got {_got(config[name])}.")
    elif isinstance(config[name], ml_collections.ConfigDict) and name not in FOREIGN_SECTIONS:
      valid = sorted(key.split(".", 1)[1] for key in checker.seen if key.startswith(name + "."))
      for key in config[name].keys():
        if f"{name}.{key}" not in checker.seen:
          _fail_unknown(checker, f"{name}.{key}", valid)


def _fail_unknown(checker: _Checker, key: str, valid: Sequence[str]) -> None:
  leaf = key.rsplit(".", 1)[-1]
  close = difflib.get_close_matches(leaf, valid, n=1)
  hint = f"did you mean {close[0]!r}? " if close else ""
  parent = f"config.{key.rsplit('.', 1)[0]}" if "." in key else "config"
  checker.fail(key, f"unknown key; {hint}valid keys of {parent}: {', '.join(valid)}.")


def _check_tasks(checker: _Checker, dataset: data_registry.Dataset | None) -> None:
  present, tasks = checker.value("tasks")
  if not present:
    return
  if isinstance(tasks, str):
    tasks = (tasks,)
  valid = dataset.valid_task_names() if dataset is not None else None
  suffix = f"; valid tasks: {valid}." if valid else "."
  if not _is_sequence(tasks) or not all(isinstance(task, str) for task in tasks):
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
    else:
      _check_dense_encoder(checker, dataset.select_tasks(list(tasks)))


def _label_fractions_rule(value: Any) -> str | None:
  """dataset.label_fractions: 'task=fraction' entries separated by commas."""
  if not isinstance(value, str):
    return f"expected a string like 'depth=0.2,normals=0.5', got {_got(value)}."
  try:
    labels_lib.parse_label_fractions(value)
  except ValueError as error:
    return str(error)
  return None


def _check_label_fraction_tasks(checker: _Checker, dataset: data_registry.Dataset | None) -> None:
  """dataset.label_fraction_tasks and dataset.label_fractions name tasks of the run
  (config.tasks, aliases expanded)."""
  tasks_present, tasks = checker.value("tasks")
  if not tasks_present or checker.failed("tasks"):
    return
  tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
  if dataset is not None:
    tasks = tuple(task.name for task in dataset.select_tasks(list(tasks)))
  elif data_registry.ALL_ATTRIBUTES in tasks:
    return  # the alias's task names depend on the dataset
  for key in ("dataset.label_fraction_tasks", "dataset.label_fractions"):
    present, chosen = checker.value(key)
    if not present or checker.failed(key):
      continue
    if isinstance(chosen, str):
      chosen = tuple(labels_lib.parse_label_fractions(chosen))
    unknown = [name for name in chosen if name not in tasks]
    if unknown:
      empty = " (empty: every task)" if key.endswith("_tasks") else ""
      checker.fail(key, f"{unknown} not among the run's tasks; valid: {', '.join(tasks)}{empty}.")


def _check_dense_encoder(checker: _Checker, tasks) -> None:
  _, encoder = checker.value("model.encoder")
  dense = [task.name for task in tasks if task.dense]
  if dense and encoder in multitask.GLOBAL_ENCODERS and not checker.failed("model.encoder"):
    checker.fail(
      "model.encoder",
      f"{encoder!r} outputs global features, but task(s) {', '.join(dense)} are per-pixel; use "
      f"one of: {', '.join(multitask.DENSE_ENCODERS + ('small_cnn',))}.",
    )


def _multiple_of(size: int, step: int) -> str:
  lower = (size // step) * step
  return " or ".join(str(option) for option in (lower, lower + step) if option > 0)


def _check_image_size(checker: _Checker) -> None:
  _, encoder = checker.value("model.encoder")
  if encoder != "segnet" or checker.failed("dataset.height", "dataset.width"):
    return
  step = encoders_lib.SEGNET_DOWNSAMPLING
  for key in ("dataset.height", "dataset.width"):
    present, size = checker.value(key)
    if present and size % step:
      checker.fail(
        key,
        f"{size} cannot be taken by model.encoder 'segnet', which needs multiples of {step} "
        f"(five 2x2 max-pool stages); valid nearby: {_multiple_of(size, step)}.",
      )


def _check_architecture(checker: _Checker) -> None:
  """MTAN and Cross-stitch are built on some encoders only (`architectures.SUPPORTED_ENCODERS`)."""
  _, architecture = checker.value("model.architecture")
  _, encoder = checker.value("model.encoder")
  if checker.failed("model.architecture"):
    return
  supported = architectures_lib.SUPPORTED_ENCODERS.get(architecture)
  if supported and encoder not in supported and not checker.failed("model.encoder"):
    checker.fail(
      "model.architecture",
      f"{architecture!r} is built on the encoders {', '.join(supported)}; got model.encoder "
      f"{encoder!r}.",
    )


def _check_paths(checker: _Checker) -> None:
  """Directories and files the config names must exist ('' = none)."""
  present, data_dir = checker.value("dataset.data_dir")
  if present and data_dir and not checker.failed("dataset.data_dir"):
    if not os.path.isdir(os.path.expanduser(data_dir)):
      checker.fail(
        "dataset.data_dir",
        f"directory {data_dir!r} does not exist (absolute: "
        f"{os.path.abspath(os.path.expanduser(data_dir))}).",
      )
  present, backbone = checker.value("model.pretrained_backbone")
  if present and backbone and not checker.failed("model.pretrained_backbone"):
    if not os.path.isfile(os.path.expanduser(backbone)):
      checker.fail("model.pretrained_backbone", f"file {backbone!r} does not exist.")
  present, baselines = checker.value("delta_m.baseline")
  if present and not checker.failed("delta_m.baseline"):
    for path in (baselines,) if isinstance(baselines, str) else baselines:
      if not os.path.exists(path):
        checker.fail(
          "delta_m.baseline",
          f"{path!r} does not exist; give STL run directories or results.json files.",
        )
  for key in ("robustness.mtl_runs", "robustness.stl_runs"):
    present, runs = checker.value(key)
    if present and not checker.failed(key):
      missing = [run for run in runs if not os.path.isdir(run)]
      if missing:
        checker.fail(key, f"run director(ies) {missing} do not exist.")


def _key_named_in(error: Exception, default: str) -> str:
  """The config key an error message names ('config.<key>'), when the rules know it."""
  for word in str(error).replace(",", " ").split():
    key = word.strip("'\"`.;:()").removeprefix("config.")
    if word.strip("'\"`(").startswith("config.") and key in RULES:
      return key
  return default


def _check_method(checker: _Checker):
  """The method as built from config.method: its factory's own checks, the levels it is defined
  at, the norms a per-sample level needs, and the optimizers a Jacobian method allows. Returns
  the built method (None when its keys are bad), for the checks that depend on it."""
  method_keys = [key for key in RULES if key.startswith(("method.", "optimizer."))]
  present, name = checker.value("method.name")
  if not present or checker.failed(*method_keys, "model.norm"):
    return None
  config = checker.config
  try:
    method = weighting_lib.get(name, weighting_lib.method_options(config, 1))
    if isinstance(method, weighting_lib.JacobianMethod):
      weighting_lib.make_optimizer(method, config.optimizer, 1, ["first", "second"])
  except (ValueError, KeyError, AttributeError) as error:
    checker.fail(_key_named_in(error, "method.name"), str(error))
    return None
  if isinstance(method, weighting_lib.LossWeighting):
    return method  # Loss weightings take no Gramian: the level is unused.
  level, norm = config.method.level, config.model.get("norm")
  if level not in method.levels:
    checker.fail(
      "method.level",
      f"method {name!r} works on level(s) {', '.join(map(repr, method.levels))}; got {level!r}.",
    )
  elif level != "task" and norm == "batch":
    checker.fail(
      "method.level",
      f"{level!r} needs per-sample gradients, which train-mode batch norm does not define "
      "(its statistics couple the samples of a batch); use config.model.norm = 'group', "
      "'layer' or 'none', or level 'task'.",
    )
  return method


def _check_batches(
  checker: _Checker, dataset: data_registry.Dataset | None, device_count: int
) -> None:
  for key in ("training.batch_size", "training.eval_batch_size"):
    present, size = checker.value(key)
    if present and not checker.failed(key) and size % device_count:
      checker.fail(
        key,
        f"{size} is not divisible by the device count ({device_count}); use a multiple of "
        f"{device_count}, e.g. {_multiple_of(size, device_count)}.",
      )
  present, size = checker.value("training.batch_size")
  if dataset is not None and present and not checker.failed("training.batch_size"):
    examples = len(dataset.splits["train"])
    if size > examples:
      checker.fail(
        "training.batch_size",
        f"{size} is larger than the training split of dataset {dataset.name!r} ({examples} "
        f"examples); use at most {examples}.",
      )
  present, axis = checker.value("sharding.data_axis_size")
  if present and not checker.failed("sharding.data_axis_size") and axis > device_count:
    checker.fail(
      "sharding.data_axis_size",
      f"{axis} devices asked for, {device_count} available; use -1 (all) or at most "
      f"{device_count}.",
    )


def _check_probe(checker: _Checker) -> None:
  """The conflict probe's per-sample gradients under batch norm need a definition."""
  keys = ("conflicts.probe_every_steps", "conflicts.batch_norm", "conflicts.path", "model.norm")
  values = [checker.value(key) for key in keys]
  if not all(present for present, _ in values) or checker.failed(*keys):
    return
  every, mode, path, norm = (value for _, value in values)
  if every == 0 or norm != "batch":
    return
  if mode == "error":
    checker.fail(
      "conflicts.batch_norm",
      "'error' refuses the probe's per-sample gradients under config.model.norm 'batch'; choose "
      "'eval' (running statistics), 'batch_statistics' (with conflicts.path 'reference'), or "
      "norm 'group', 'layer' or 'none'.",
    )
  elif mode == "batch_statistics" and path != "reference":
    checker.fail(
      "conflicts.batch_norm",
      f"'batch_statistics' needs conflicts.path 'reference', got {path!r}.",
    )


def _check_conflict_heads(checker: _Checker) -> None:
  """Each architecture of the conflict study overrides model keys with its heads entry."""
  present, heads = checker.value("conflicts.heads")
  if not present:
    return
  if not hasattr(heads, "items"):
    checker.fail("conflicts.heads", f"expected architecture name -> model keys, got {heads!r}.")
    return
  model_keys = sorted(key.split(".", 1)[1] for key in RULES if key.startswith("model."))
  for architecture, entry in heads.items():
    where = f"conflicts.heads.{architecture}"
    if not hasattr(entry, "items"):
      checker.fail(where, f"expected a ConfigDict of model keys, got {entry!r}.")
      continue
    for key, value in entry.items():
      if key not in model_keys:
        _fail_unknown(checker, f"{where}.{key}", model_keys)
      elif problem := RULES[f"model.{key}"](value):
        checker.fail(f"{where}.{key}", problem)
  present, architectures = checker.value("conflicts.architectures")
  if present and not checker.failed("conflicts.architectures"):
    unknown = [name for name in architectures if name not in heads]
    if unknown:
      checker.fail(
        "conflicts.architectures",
        f"unknown {unknown}; valid (defined in config.conflicts.heads): {', '.join(heads)}.",
      )


def _check_robustness(checker: _Checker, dataset: data_registry.Dataset | None) -> None:
  present, mtl_runs = checker.value("robustness.mtl_runs")
  _, stl_runs = checker.value("robustness.stl_runs")
  if present and not checker.failed("robustness.mtl_runs", "robustness.stl_runs"):
    if bool(mtl_runs) != bool(stl_runs):
      checker.fail(
        "robustness.mtl_runs" if not mtl_runs else "robustness.stl_runs",
        "give both robustness.mtl_runs and robustness.stl_runs, or neither (to train them first).",
      )
  present, probe_task = checker.value("robustness.probe_task")
  if dataset is not None and present and not checker.failed("robustness.probe_task"):
    if probe_task not in dataset.tasks:
      checker.fail(
        "robustness.probe_task",
        f"{probe_task!r} is not a task of {dataset.name!r}; valid tasks: "
        f"{', '.join(dataset.tasks)}.",
      )


def _check_batch_parts(checker: _Checker, method, device_count: int) -> None:
  """A method that splits each batch into parts needs at least that many samples per device."""
  present, batch_size = checker.value("training.batch_size")
  if method is None or not present or checker.failed("training.batch_size"):
    return
  parts = weighting_lib.batch_parts(method)
  if batch_size // max(device_count, 1) < parts:
    checker.fail(
      "training.batch_size",
      f"method {method.name!r} splits each batch into {parts} parts; it needs at least "
      f"{parts} samples per device, got {batch_size} on {device_count} device(s).",
    )


def _check_connection(checker: _Checker) -> None:
  """coordinator_address, num_processes and process_id: all three given, or none."""
  present, address = checker.value("sharding.coordinator_address")
  if not present:
    return
  _, count = checker.value("sharding.num_processes")
  _, index = checker.value("sharding.process_id")
  host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
  if not isinstance(address, str) or (address and not (host and port.isdigit())):
    checker.fail(
      "sharding.coordinator_address",
      f"expected 'host:port' of process 0 (or '' to detect it), got {address!r}.",
    )
  elif not _is_int(count) or (count < 1 and count != -1):
    checker.fail("sharding.num_processes", f"expected a positive integer or -1, got {count!r}.")
  elif not _is_int(index) or index < -1 or (count > 0 and index >= count):
    checker.fail(
      "sharding.process_id", f"expected -1 or an integer in [0, num_processes), got {index!r}."
    )
  elif len({bool(address), count != -1, index != -1}) > 1:
    checker.fail(
      "sharding.coordinator_address",
      f"give coordinator_address, num_processes and process_id together, or none of them to "
      f"detect them from the environment; got {address!r}, {count!r}, {index!r}.",
    )


def _check_peer_timeout(checker: _Checker) -> None:
  _, peer = checker.value("sharding.peer_timeout_seconds")
  _, heartbeat = checker.value("sharding.heartbeat_timeout_seconds")
  if _is_int(peer) and _is_int(heartbeat) and 1 <= heartbeat <= peer:
    checker.fail(
      "sharding.peer_timeout_seconds",
      f"must be below heartbeat_timeout_seconds ({heartbeat}), or the JAX runtime aborts on a "
      f"lost process before it can be named; got {peer}.",
    )


def validate_distributed(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming each bad multi-process key of config.sharding (checked before
  `jax.distributed.initialize`, so before `validate_config` can run)."""
  checker = _Checker(config)
  for key in [key for key in RULES if key.startswith("sharding.")]:
    checker.apply(key, RULES[key])
  _check_connection(checker)
  _check_peer_timeout(checker)
  if checker.problems:
    raise ConfigError("\n".join(checker.problems))


def validate_config(
  config: ml_collections.ConfigDict,
  dataset: data_registry.Dataset | None = None,
  device_count: int | None = None,
) -> None:
  """Raises a ConfigError naming each bad key and its valid choices; returns None if the config is
  usable.

  Args:
    config: an experiment config (see configs/base.py and configs/sections/).
    dataset: the loaded dataset, to check task names and split sizes against; None skips those.
    device_count: devices the batch is split across; defaults to jax.device_count().

  Raises:
    ConfigError: one line per problem found, each 'config.<key>: ...'.
  """
  checker = _Checker(config)
  device_count = jax.device_count() if device_count is None else int(device_count)
  for key, rule in RULES.items():
    checker.apply(key, rule)
  _check_tasks(checker, dataset)
  _check_label_fraction_tasks(checker, dataset)
  _check_image_size(checker)
  _check_architecture(checker)
  _check_paths(checker)
  _check_batch_parts(checker, _check_method(checker), device_count)
  _check_batches(checker, dataset, device_count)
  _check_connection(checker)
  _check_peer_timeout(checker)
  _check_probe(checker)
  _check_conflict_heads(checker)
  _check_robustness(checker, dataset)
  _check_unknown_keys(checker)
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
