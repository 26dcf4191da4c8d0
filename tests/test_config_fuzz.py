"""A config fuzzer: random wrong types, out-of-range values and unknown names for every key of
configs/base.py and the study sections, checked against `config_validation.validate_config`.

What each key accepts is written down here (`SPECS`), from the keys' documentation in configs/,
not from the validator's rules: a case is either accepted, or rejected with a ConfigError naming
the key (or a key it is checked together with); an invalid value is never accepted, and nothing
else is ever raised. Validation only (no dataset, no training): several hundred cases in a few
seconds.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple

import hypothesis
import hypothesis.strategies as st
import jax
import ml_collections

from configs import test as test_config
from configs.sections import conflicts as conflicts_section
from configs.sections import optimizers as optimizers_section
from configs.sections import findings as findings_section
from configs.sections import label_scarcity as label_scarcity_section
from configs.sections import robustness as robustness_section
from configs.sections import sample_alignment as sample_alignment_section
from mtl_jax import config_validation
from mtl_jax import metrics as metrics_lib
from mtl_jax import optim
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import corruptions
from mtl_jax.data import registry as data_registry
from mtl_jax.gramian import modes as gramian_modes
from mtl_jax.models import architectures as architectures_lib
from mtl_jax.models import encoders as encoders_lib
from mtl_jax.models import layers as layers_lib
from mtl_jax.models import multitask

# Paths the fuzzer uses: one that exists (this directory, and this file), one that does not.
EXISTING_DIR = os.path.dirname(os.path.abspath(__file__))
EXISTING_FILE = os.path.abspath(__file__)
MISSING_PATH = os.path.join(EXISTING_DIR, "no_such_run_directory")
HEADS = ("small_heads", "large_heads")


def _int(value) -> bool:
  return type(value) is int


def _real(value) -> bool:
  return type(value) in (int, float)


def _tuple(value) -> bool:
  return isinstance(value, (tuple, list))


def _distinct_texts(value) -> bool:
  return (
    _tuple(value)
    and all(isinstance(item, str) and item for item in value)
    and len(set(value)) == len(value)
  )


class Spec(NamedTuple):
  """What one key accepts (valid) and values to try on it (a strategy mixing good and bad)."""

  valid: Callable[[Any], bool]
  values: st.SearchStrategy
  # Other keys it is checked together with: a rejection may name them instead.
  related: tuple[str, ...] = ()


_ANY_TYPE = st.one_of(
  st.none(),
  st.booleans(),
  st.integers(-(10**6), 10**6),
  st.floats(allow_nan=True, allow_infinity=True),
  st.text(max_size=6),
  st.lists(st.integers(-3, 3), max_size=3).map(tuple),
  st.just({"a": 1}),
)


def ints(minimum: int, maximum: int | None = None, special=(), related=()) -> Spec:
  def valid(value):
    return _int(value) and (
      value in special or (value >= minimum and (maximum is None or value <= maximum))
    )

  edges = [minimum - 1, minimum, minimum + 1, *special]
  if maximum is not None:
    edges += [maximum, maximum + 1]
  values = st.one_of(st.sampled_from(edges), st.integers(minimum - 50, minimum + 50), _ANY_TYPE)
  return Spec(valid, values, related)


def reals(check: Callable[[float], bool], edges=(0.0, 1.0), related=()) -> Spec:
  def valid(value):
    return _real(value) and check(float(value))

  probes = [*edges, -1.0, 1e-9, 0.5, 2.0, math.inf, -math.inf, math.nan, 1e300]
  return Spec(valid, st.one_of(st.sampled_from(probes), st.floats(-10, 10), _ANY_TYPE), related)


def choices(options, related=()) -> Spec:
  options = tuple(options)
  bad = st.sampled_from([option.upper() for option in options] + ["", "pixel", " " + options[0]])
  return Spec(
    lambda value: isinstance(value, str) and value in options,
    st.one_of(st.sampled_from(options), bad, _ANY_TYPE),
    related,
  )


BOOL = Spec(lambda value: type(value) is bool, st.one_of(st.booleans(), _ANY_TYPE))
TEXT = Spec(lambda value: isinstance(value, str), st.one_of(st.text(max_size=8), _ANY_TYPE))


def int_tuples(minimum: int, maximum: int | None = None, allow_empty=True) -> Spec:
  def valid(value):
    return (
      _tuple(value)
      and (allow_empty or len(value) > 0)
      and all(
        _int(item) and item >= minimum and (maximum is None or item <= maximum) for item in value
      )
    )

  items = st.one_of(st.integers(minimum - 2, (maximum or minimum + 64) + 2), st.floats(0, 4))
  return Spec(valid, st.one_of(st.lists(items, max_size=4).map(tuple), _ANY_TYPE))


def real_tuples(check: Callable[[float], bool], allow_empty=False) -> Spec:
  def valid(value):
    return (
      _tuple(value)
      and (allow_empty or len(value) > 0)
      and all(_real(item) and check(float(item)) for item in value)
    )

  items = st.one_of(st.floats(-2, 4), st.sampled_from([math.nan, math.inf, 0.0, 1.0]))
  return Spec(valid, st.one_of(st.lists(items, max_size=4).map(tuple), _ANY_TYPE))


def text_tuples(options=None, allow_empty=True, related=()) -> Spec:
  def valid(value):
    return (
      _distinct_texts(value)
      and (allow_empty or len(value) > 0)
      and (options is None or all(item in options for item in value))
    )

  names = st.sampled_from(tuple(options or ("ew", "first", "second")) + ("", "unknown_name"))
  values = st.one_of(st.lists(names, max_size=3).map(tuple), _ANY_TYPE)
  return Spec(valid, values, related)


# Entries of dataset.label_fractions, good and bad ('task=fraction', fraction in (0, 1]).
_FRACTION_ENTRIES = (
  "depth=0.2",
  " normals = 1",
  "segmentation=0.05",
  "depth=0",
  "depth=1.5",
  "depth",
  "=0.5",
  "depth=x",
  "unknown_task=0.5",
  "",
)


def _label_fractions_valid(value) -> bool:
  """'task=fraction' entries of the default tasks, separated by commas; each task once."""
  if not isinstance(value, str):
    return False
  names = []
  for entry in [part.strip() for part in value.split(",") if part.strip()]:
    name, separator, number = (piece.strip() for piece in entry.partition("="))
    try:
      fraction = float(number)
    except ValueError:
      return False
    if not separator or name not in ("segmentation", "depth", "normals"):
      return False
    if not 0 < fraction <= 1 or name in names:
      return False
    names.append(name)
  return True


def paths(kind: str, related=()) -> Spec:
  """A path key: '' (none) or an existing directory/file; 'paths' also takes a tuple of paths."""
  exists = {"dir": os.path.isdir, "file": os.path.isfile, "paths": os.path.exists}[kind]

  def valid(value):
    if kind == "paths":
      value = (value,) if isinstance(value, str) else value
      return _tuple(value) and all(isinstance(path, str) and exists(path) for path in value)
    return isinstance(value, str) and (value == "" or exists(value))

  some = st.sampled_from(["", EXISTING_DIR, EXISTING_FILE, MISSING_PATH])
  return Spec(valid, st.one_of(some, st.lists(some, max_size=2).map(tuple), _ANY_TYPE), related)


def _runs(related) -> Spec:
  def valid(value):
    return _tuple(value) and all(isinstance(path, str) and os.path.isdir(path) for path in value)

  some = st.sampled_from([EXISTING_DIR, MISSING_PATH, EXISTING_FILE])
  return Spec(valid, st.one_of(st.lists(some, max_size=2).map(tuple), _ANY_TYPE), related)


def _tasks_valid(value) -> bool:
  # Without a dataset only the shape is known: a name, or distinct names, at least one.
  return isinstance(value, str) or (_distinct_texts(value) and len(value) > 0)


def _in_unit(value: float) -> bool:
  return 0 <= value <= 1


def _unit_open(value: float) -> bool:
  return 0 <= value < 1


def _positive(value: float) -> bool:
  return 0 < value < math.inf


def _non_negative(value: float) -> bool:
  return 0 <= value < math.inf


# Keys checked together: a valid value of one may be refused because of the other (a segnet
# encoder needs image sides that are multiples of 32; MTL-IO and AdaTask take only their own
# optimizers; a per-sample level needs a norm without batch statistics).
_IMAGE = ("model.encoder", "dataset.height", "dataset.width")
# MTAN and Cross-stitch are built on some encoders only.
_ARCHITECTURE = ("model.architecture", "model.encoder")
# The method is built from these together; a method that splits batches needs enough samples.
_METHOD = ("method.name", "method.level", "model.norm", "optimizer.name", "training.batch_size")
_PROBE = ("conflicts.probe_every_steps", "conflicts.batch_norm", "conflicts.path", "model.norm")

_PROCESSES = ("sharding.coordinator_address", "sharding.num_processes", "sharding.process_id")
_TIMEOUTS = ("sharding.heartbeat_timeout_seconds", "sharding.peer_timeout_seconds")
_ADDRESSES = ("", "127.0.0.1:1234", "localhost:80", "nohost", ":1234", "host:port", "1.2.3.4:")


def _address(value) -> bool:
  if not isinstance(value, str):
    return False
  host, _, port = value.rpartition(":")
  return value == "" or (bool(host) and port.isdigit())


SPECS: dict[str, Spec] = {
  "seed": ints(0),
  "tasks": Spec(_tasks_valid, st.one_of(text_tuples().values, st.text(max_size=4))),
  "dataset.name": choices(data_registry.dataset_names()),
  "dataset.height": ints(8, related=_IMAGE),
  "dataset.width": ints(8, related=_IMAGE),
  "dataset.num_train": ints(1),
  "dataset.num_validation": ints(1),
  "dataset.num_test": ints(1),
  "dataset.seed": ints(0),
  "dataset.max_objects": ints(1),
  "dataset.data_dir": paths("dir"),
  "dataset.validation_size": ints(1, special=(-1,)),
  "dataset.validation_seed": ints(0),
  "dataset.augment": BOOL,
  "dataset.scales": real_tuples(lambda value: 1 <= value < math.inf),
  "dataset.label_fraction": reals(lambda value: 0 < value <= 1),
  "dataset.label_fraction_tasks": text_tuples(
    ("segmentation", "depth", "normals"), related=("tasks",)
  ),
  "dataset.label_fractions": Spec(
    _label_fractions_valid,
    st.one_of(
      st.lists(st.sampled_from(_FRACTION_ENTRIES), max_size=3).map(",".join),
      _ANY_TYPE,
    ),
    related=("tasks",),
  ),
  "dataset.label_fraction_splits": text_tuples(("train", "validation", "test"), allow_empty=False),
  "model.encoder": choices(multitask.ENCODERS, related=_IMAGE + _ARCHITECTURE),
  "model.norm": choices(layers_lib.NORM_KINDS, related=_METHOD + _PROBE),
  # Parameters stay float32 either way; activations may be bfloat16.
  "model.dtype": choices(("float32", "bfloat16")),
  "model.width_multiplier": reals(_positive),
  "model.hidden": int_tuples(1),
  "model.features": int_tuples(1, allow_empty=False),
  "model.head_hidden_channels": ints(1),
  "model.head_hidden": int_tuples(1),
  "model.resnet_stem": choices(encoders_lib.RESNET_STEMS),
  "model.pretrained_backbone": paths("file"),
  "model.architecture": choices(architectures_lib.ARCHITECTURES, related=_ARCHITECTURE),
  "model.num_experts": ints(1),
  "model.num_task_experts": ints(1),
  "model.num_levels": ints(1),
  "method.name": choices(weighting_lib.method_names(), related=_METHOD),
  "method.uw_initial_log_variance": reals(math.isfinite),
  "method.uw_o_epsilon": reals(_positive),
  "method.level": choices(weighting_lib.LEVELS, related=_METHOD),
  "method.solver_iterations": ints(1),
  "method.cagrad_c": reals(_non_negative),
  "method.cagrad_rescale": ints(0, 2),
  "method.cagrad_outer_iterations": ints(1),
  "method.gradvac_beta": reals(_in_unit),
  "method.imtl_loss_scaling": BOOL,
  "method.nash_mtl_iterations": ints(1),
  "method.nash_mtl_max_norm": reals(_positive),
  "method.nash_mtl_ridge": reals(_non_negative),
  "method.graddrop_leak": reals(_in_unit),
  "method.dwa_temperature": reals(_positive),
  "method.gradnorm_alpha": reals(_non_negative),
  "method.famo_learning_rate": reals(_positive),
  "method.famo_weight_decay": reals(_non_negative),
  "method.config_eigenvalue_cutoff": reals(_unit_open),
  "method.fairgrad_alpha": reals(_positive),
  "method.fairgrad_iterations": ints(1),
  "method.cr_mogm_alpha": reals(_in_unit),
  # CR-MOGM smooths a Gramian weighting's weights: a loss weighting is refused by its factory.
  "method.cr_mogm_base": choices(weighting_lib.method_names(), related=_METHOD),
  "method.db_mtl_beta": reals(_in_unit),
  "method.db_mtl_beta_sigma": reals(_non_negative),
  "method.moco_beta": reals(_in_unit),
  "method.moco_beta_sigma": reals(_non_negative),
  "method.moco_gamma": reals(_non_negative),
  "method.moco_gamma_sigma": reals(_non_negative),
  "method.moco_rho": reals(_non_negative),
  "method.moco_weight_map": choices(("simplex", "softmax")),
  "method.moco_gradient_scale": choices(("loss", "none")),
  "method.excess_mtl_step_size": reals(_non_negative),
  "method.sdmgrad_lambda": reals(_non_negative),
  "method.sdmgrad_learning_rate": reals(_positive),
  "method.sdmgrad_momentum": reals(_unit_open),
  "method.sdmgrad_iterations": ints(1),
  "method.modo_gamma": reals(_non_negative),
  "method.modo_rho": reals(_non_negative),
  "method.stch_mu": reals(_positive),
  "method.stch_warmup_epochs": ints(0),
  "method.go4align_step_size": reals(_non_negative),
  "method.go4align_groups": ints(1),
  "method.auto_lambda_initial_weight": reals(math.isfinite),
  "method.auto_lambda_learning_rate": reals(_positive),
  "gramian.verify_every_steps": ints(-1),
  "optimizer.name": choices(optim.OPTIMIZERS, related=_METHOD),
  "optimizer.learning_rate": reals(_positive),
  "optimizer.momentum": reals(_unit_open),
  "optimizer.b1": reals(_unit_open),
  "optimizer.b2": reals(_unit_open),
  "optimizer.eps": reals(_positive),
  "optimizer.weight_decay": reals(_non_negative),
  "optimizer.decoupled_weight_decay": BOOL,
  "optimizer.lr_decay_every_epochs": ints(0),
  "optimizer.lr_decay_factor": reals(lambda value: 0 < value <= 1),
  "training.num_epochs": ints(1),
  "data.workers": ints(0),
  "data.prefetch": ints(0),
  "data.augment_on": choices(("host", "device")),
  "training.batch_size": ints(1),
  "training.eval_batch_size": ints(1),
  "training.eval_every_epochs": ints(1),
  "training.log_every_steps": ints(1),
  "training.checkpoint_every_steps": ints(0),
  "training.early_stopping_patience": ints(0),
  "training.on_non_finite": choices(("stop", "skip")),
  "training.async_checkpoints": BOOL,
  "delta_m.baseline": paths("paths"),
  "delta_m.variant": choices(metrics_lib.DELTA_M_VARIANTS),
  # Only as many devices as there are (-1 = all).
  "sharding.data_axis_size": ints(1, jax.device_count(), special=(-1,)),
  "sharding.fsdp": BOOL,
  "sharding.fsdp_min_size": ints(0),
  "sharding.distributed": choices(("auto", "on", "off")),
  # All three given (a 'host:port', a count, an index below it) or none ('', -1, -1).
  "sharding.coordinator_address": Spec(
    _address, st.one_of(st.sampled_from(_ADDRESSES), _ANY_TYPE), _PROCESSES
  ),
  "sharding.num_processes": ints(1, special=(-1,), related=_PROCESSES),
  "sharding.process_id": ints(0, special=(-1,), related=_PROCESSES),
  "sharding.initialization_timeout_seconds": ints(1),
  "sharding.heartbeat_timeout_seconds": ints(1, related=_TIMEOUTS),
  "sharding.shutdown_timeout_seconds": ints(1),
  # The liveness check must name a lost process before the heartbeat aborts the runtime.
  "sharding.peer_timeout_seconds": ints(1, related=_TIMEOUTS),
  "conflicts.probe_every_steps": ints(0, related=_PROBE),
  "conflicts.max_samples": ints(0),
  "conflicts.max_tasks": ints(0),
  "conflicts.path": choices(gramian_modes.PATHS, related=_PROBE),
  "conflicts.batch_norm": choices(gramian_modes.BATCH_NORM_MODES, related=_PROBE),
  "conflicts.parameter_ratio": BOOL,
  "conflicts.zero_tolerance": reals(_unit_open),
  "conflicts.sign_tolerance": reals(_unit_open),
  "conflicts.settings": text_tuples(("dense", "attributes", "config"), allow_empty=False),
  "conflicts.study_probe_every_steps": ints(1),
  # Names of config.conflicts.heads entries (those the section defines).
  "conflicts.architectures": text_tuples(HEADS, allow_empty=False, related=("conflicts.heads",)),
  "conflicts.heads": Spec(
    lambda value: isinstance(value, ml_collections.ConfigDict),
    st.one_of(st.none(), st.integers(), st.text(max_size=4)),
    ("conflicts.architectures",),
  ),
  "sweep.methods": text_tuples(allow_empty=False),
  "sweep.optimizers": text_tuples(optim.OPTIMIZERS, allow_empty=False),
  "sweep.lr_grid": real_tuples(_positive),
  "sweep.stl_lr_grid": real_tuples(_positive),
  "sweep.seeds": int_tuples(0, allow_empty=False),
  "sweep.group_runs": BOOL,
  "sweep.lane_mode": choices(("auto", "vmap", "map", "loop")),
  # Extra learning rates per pair around the best, a factor apart (> 1, or no new rate).
  "sweep.refine_budget": ints(0),
  "sweep.refine_factor": reals(lambda value: 1 < value < math.inf, edges=(1.0, 3.0)),
  "findings.confidence": reals(lambda value: 0 < value < 1),
  "findings.interval_method": choices(("t", "bootstrap")),
  "findings.bootstrap_resamples": ints(1),
  "findings.bootstrap_seed": ints(0),
  "findings.trivial_margin_percent": reals(_non_negative),
  "label_scarcity.task": TEXT,
  "label_scarcity.fractions": real_tuples(lambda value: 0 < value <= 1),
  "label_scarcity.methods": text_tuples(weighting_lib.method_names(), allow_empty=False),
  "label_scarcity.seeds": int_tuples(0, allow_empty=False),
  "sample_alignment.methods": text_tuples(weighting_lib.method_names(), allow_empty=False),
  "sample_alignment.levels": text_tuples(("task", "sample", "sample_task"), allow_empty=False),
  "sample_alignment.optimizers": text_tuples(optim.OPTIMIZERS, allow_empty=False),
  "sample_alignment.lr_grid": real_tuples(_positive),
  "sample_alignment.seeds": int_tuples(0, allow_empty=False),
  "sample_alignment.refine_budget": ints(0),
  "sample_alignment.timing_repeats": ints(1),
  "sample_alignment.probe_every_steps": ints(0),
  "robustness.mode": choices(("study", "figure")),
  # Run directories that exist; both given or neither (then the study trains them).
  "robustness.mtl_runs": _runs(("robustness.stl_runs",)),
  "robustness.stl_runs": _runs(("robustness.mtl_runs",)),
  "robustness.prepare_methods": text_tuples(weighting_lib.method_names(), allow_empty=False),
  "robustness.corruptions": text_tuples(corruptions.CORRUPTIONS),
  "robustness.severities": int_tuples(1, 5, allow_empty=False),
  "robustness.corruption_seed": ints(0),
  "robustness.finetune_epochs": ints(0),
  "robustness.finetune_learning_rate": reals(_positive),
  "robustness.max_test_examples": ints(0),
  "robustness.probe_task": TEXT,
  "robustness.probe_steps": ints(1),
  "robustness.probe_learning_rate": reals(_positive),
  "robustness.figure_path": TEXT,
}


def _full_config() -> ml_collections.ConfigDict:
  """configs/test.py with every study section added: every key the validator must know."""
  config = test_config.get_config()
  sections = (
    conflicts_section,
    optimizers_section,
    robustness_section,
    sample_alignment_section,
    label_scarcity_section,
    findings_section,
  )
  for section in sections:
    section.add(config)
  return config


def _leaf_keys(config, prefix="") -> set[str]:
  keys = set()
  for name, value in config.items():
    key = f"{prefix}{name}"
    if isinstance(value, ml_collections.ConfigDict) and key != "conflicts.heads":
      keys |= _leaf_keys(value, key + ".")
    else:
      keys.add(key)
  return keys


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
  """Sets a dotted key, of any type (a notebook or a sweep could)."""
  section, _, name = key.rpartition(".")
  node = config
  for part in section.split(".") if section else ():
    node = node[part]
  with node.ignore_type():
    node[name] = value


def _get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def test_every_key_has_a_spec_and_the_defaults_are_valid():
  config = _full_config()
  assert _leaf_keys(config) == set(SPECS)
  for key, spec in SPECS.items():
    assert spec.valid(_get(config, key)), (key, _get(config, key))
  config_validation.validate_config(config)


_UNKNOWN_PARENTS = ("", "dataset", "model", "method", "training", "sweep", "robustness")


@st.composite
def _cases(draw):
  """(changes, unknown): 1-3 (key, value) changes, and maybe one unknown key to add."""
  keys = draw(st.lists(st.sampled_from(sorted(SPECS)), min_size=1, max_size=3, unique=True))
  changes = [(key, draw(SPECS[key].values)) for key in keys]
  unknown = None
  if draw(st.integers(0, 4)) == 0:
    parent = draw(st.sampled_from(_UNKNOWN_PARENTS))
    # Besides random names, the other studies' sections, which must be sections, not values.
    names = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)
    name = draw(st.one_of(names, st.sampled_from(config_validation.FOREIGN_SECTIONS)))
    unknown = f"{parent}.{name}".lstrip(".")
    hypothesis.assume(unknown not in SPECS)
    hypothesis.assume(not any(key.startswith(unknown + ".") for key in SPECS))
  return changes, unknown


def _named(message: str, key: str) -> bool:
  return f"config.{key}:" in message or f"config.{key}." in message


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(_cases())
def test_fuzzed_configs_are_accepted_or_rejected_naming_the_key(case):
  changes, unknown = case
  config = _full_config()
  for key, value in changes:
    _set(config, key, value)
  if unknown is not None:
    _set(config, unknown, 1)
  # Judged on the value stored: ml_collections turns a bool given to a float key into 0.0 or 1.0.
  changes = [(key, _get(config, key)) for key, _ in changes]
  invalid = [key for key, value in changes if not SPECS[key].valid(value)]
  hypothesis.event(f"invalid values: {len(invalid)}, unknown key: {unknown is not None}")
  try:
    config_validation.validate_config(config, device_count=jax.device_count())
  except config_validation.ConfigError as error:
    message = str(error)
    lines = message.splitlines()
    assert all(line.startswith("config.") for line in lines), message
    for key in invalid + ([unknown] if unknown else []):
      assert _named(message, key), (key, message)
    if not invalid and unknown is None:
      # Each value is valid alone: only a key checked together with a changed one may be refused.
      allowed = {key for key, _ in changes} | {
        other for key, _ in changes for other in SPECS[key].related
      }
      assert all(any(_named(line, key) for key in allowed) for line in lines), (changes, message)
    return
  assert not invalid and unknown is None, (
    f"accepted invalid value(s) {[(key, value) for key, value in changes if key in invalid]} "
    f"or unknown key {unknown}"
  )
