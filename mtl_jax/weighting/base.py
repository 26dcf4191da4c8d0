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


@dataclasses.dataclass(frozen=True)
class Weighting:
  """A multi-task loss weighting.

  Attributes:
    name: registry name.
    kind: one of KINDS; tells the train step which inputs the method needs.
    init: num_tasks -> (trainable parameters, state); either may be an empty dict.
    combine: for kind 'loss': (task_losses [T], params, state, rng, step) ->
      (total loss, new state, aux metrics dict). Other kinds define their own signature.
    description: one line shown in listings and reports.
  """

  name: str
  kind: str
  init: Callable[[int], tuple[Any, Any]]
  combine: Callable[..., Any]
  description: str = ""


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
