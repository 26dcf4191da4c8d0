"""The Weighting type and the one registry that maps method names to weightings.

A weighting turns the per-task losses of a batch into the scalar the optimizer descends,
possibly with trainable parameters (UW's log-variances, trained by the same optimizer as the
model) and non-trainable state (kept in the train state and checkpointed with it).
Gradient-based methods (Gramian or Jacobian) register here too, with their own `kind`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

# 'loss': total = combine(task losses); 'gramian': weights from the Gramian of task gradients;
# 'jacobian': needs the task gradients' coordinates.
KINDS = ("loss", "gramian", "jacobian")

# What the rows of a Gramian are: 'task' (one row per task, the batch-mean loss L_t), 'sample'
# (one row per sample, its loss summed over tasks, divided by B) or 'sample_task' (one row per
# (sample, task), L_it / B). Each level's rows sum to the EW objective Σ_t L_t, so a
# sum-convention method without conflicts reproduces EW's step at every level.
LEVELS = ("task", "sample", "sample_task")

# How a 'jacobian' weighting uses coordinates: 'features' (combine maps the per-task gradients
# with respect to the shared features to one feature cotangent), 'per_task_optimizer' (the
# per-task gradients of the shared parameters go, stacked, to an optimizer built by
# `make_optimizer`), 'sequential' (one optimizer step per task in turn, each on a fresh gradient).
JACOBIAN_MODES = ("features", "per_task_optimizer", "sequential")


def check_level(level: str) -> str:
  """Returns level, or raises a ValueError naming config.method.level and the valid levels."""
  if level not in LEVELS:
    raise ValueError(f"Unknown config.method.level {level!r}; valid levels: {', '.join(LEVELS)}.")
  return level


def num_rows(level: str, num_tasks: int, batch_size: int) -> int:
  """The number of Gramian rows R at a level."""
  return {"task": num_tasks, "sample": batch_size, "sample_task": batch_size * num_tasks}[check_level(level)]


@dataclasses.dataclass(frozen=True)
class Weighting:
  """A multi-task loss weighting.

  Attributes:
    name: registry name.
    kind: one of KINDS; tells the train step which inputs the method needs.
    init: for kinds 'loss' and 'jacobian', num_tasks -> (trainable parameters, state); for
      kind 'gramian', the number of Gramian rows R (see `num_rows`). Either may be {}.
    combine: by kind,
      'loss': (task_losses [T], params, state, rng, step) -> (total loss, new state, aux);
      'gramian': (gramian [R, R], task_losses [T], params, state, rng, step) ->
        (weights [R], new state, aux); the train step then descends Σ_r stop_gradient(w_r) L_r
        on the shared parameters. aux may hold 'weighting_loss', a scalar differentiable in
        params, which the optimizer minimises for the weighting's own parameters;
      'jacobian' with jacobian_mode 'features': (feature_gradients [T, *features.shape],
        features, params, state, rng, step) -> (feature cotangent, new state, aux);
      'jacobian' with another mode: unused (the method lives in its optimizer).
      aux is a dict of metrics; 'weights' is logged as the task weights.
    description: one line shown in listings and reports.
    jacobian_mode: for kind 'jacobian', one of JACOBIAN_MODES.
    make_optimizer: when set, (optimizer config, steps_per_epoch, task names) -> the optax
      transformation that replaces `optim.make_optimizer` (AdaTask, MTL-IO).
    after_update: when set, (task losses after the update on the same batch [T], state) -> new
      state; the train step runs one more forward pass for it (FAMO).
  """

  name: str
  kind: str
  init: Callable[[int], tuple[Any, Any]]
  combine: Callable[..., Any]
  description: str = ""
  jacobian_mode: str = ""
  make_optimizer: Callable[..., Any] | None = None
  after_update: Callable[..., Any] | None = None


WeightingFactory = Callable[[ml_collections.ConfigDict], Weighting]
_REGISTRY: dict[str, WeightingFactory] = {}


def register(name: str) -> Callable[[WeightingFactory], WeightingFactory]:
  """Decorator adding a factory `options -> Weighting` to the registry under name."""

  def decorate(factory: WeightingFactory) -> WeightingFactory:
    if name in _REGISTRY:
      raise ValueError(f"Weighting {name!r} is registered twice.")
    _REGISTRY[name] = factory
    return factory

  return decorate


def method_names() -> tuple[str, ...]:
  """The registered method names, sorted."""
  return tuple(sorted(_REGISTRY))


def get_weighting(name: str, options: Mapping[str, Any] | ml_collections.ConfigDict | None = None) -> Weighting:
  """Builds the weighting registered under name.

  Args:
    name: a registered method name (see `method_names()`).
    options: method options (e.g. CAGrad's c); methods ignore options they do not use.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(method_names())}.")
  if options is None:
    options = ml_collections.ConfigDict()
  elif not isinstance(options, ml_collections.ConfigDict):
    options = ml_collections.ConfigDict(dict(options))
  return _REGISTRY[name](options)
