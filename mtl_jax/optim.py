"""Optax recipes for the optimizers the study compares: Adam, SGD(+momentum), signSGD, AdamW.

All recipes share one layout, `weight decay -> direction -> learning rate`, with the learning
rate applied last. Two facts follow that the rest of the project relies on:

* Weight decay is coupled by default (L2 added to the gradient before the optimizer, as
  PyTorch's `weight_decay=` does, which is how the paper's runs were made); with
  `decoupled_weight_decay=True` it is added to the update instead (AdamW-style).
* Every update is exactly proportional to the learning rate, so a sweep over learning rates
  can share one optimizer state layout and rescale updates per run.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

OPTIMIZERS = ("adam", "sgd", "signsgd", "adamw")


def check_optimizer_name(name: str) -> str:
  """Returns name, or raises a ValueError listing the valid optimizers."""
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}.")
  return name


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Step decay: the learning rate is multiplied by `lr_decay_factor` every `lr_decay_every_epochs`.

  Args:
    config: the `optimizer` section of an experiment config.
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    A schedule; constant when `lr_decay_every_epochs` is 0.
  """
  learning_rate = float(config.learning_rate)
  if not learning_rate > 0:
    raise ValueError(f"config.optimizer.learning_rate must be > 0, got {config.learning_rate!r}.")
  every_epochs = int(config.get("lr_decay_every_epochs", 0))
  if every_epochs <= 0:
    return optax.constant_schedule(learning_rate)
  return optax.exponential_decay(
      init_value=learning_rate,
      transition_steps=every_epochs * max(1, steps_per_epoch),
      decay_rate=float(config.get("lr_decay_factor", 0.5)),
      staircase=True,
  )


def direction(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer's update direction at learning rate 1, without weight decay."""
  name = check_optimizer_name(config.name)
  if name in ("adam", "adamw"):
    return optax.scale_by_adam(
        b1=float(config.get("b1", 0.9)),
        b2=float(config.get("b2", 0.999)),
        eps=float(config.get("eps", 1e-8)),
    )
  momentum = float(config.get("momentum", 0.9))
  if name == "sgd":
    # PyTorch's heavy-ball momentum, buffer = momentum * buffer + g, is optax.trace.
    return optax.trace(decay=momentum) if momentum else optax.identity()
  # signSGD with momentum (signum): the sign of the trace equals the sign of the usual EMA.
  parts = [optax.trace(decay=momentum)] if momentum else []
  return optax.chain(*parts, optax.scale_by_sign())


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, learning_rate: Any = None
) -> optax.GradientTransformation:
  """Builds the optimizer named by `config.name`.

  Args:
    config: the `optimizer` section: name, learning_rate, momentum, b1, b2, eps, weight_decay,
      decoupled_weight_decay, lr_decay_every_epochs, lr_decay_factor.
    steps_per_epoch: optimizer steps in one epoch, for the step-decay schedule.
    learning_rate: overrides the schedule (a float or an optax schedule) when given.

  Returns:
    An optax GradientTransformation whose updates are already negated (apply with
    `optax.apply_updates`).
  """
  schedule = learning_rate if learning_rate is not None else learning_rate_schedule(config, steps_per_epoch)
  weight_decay = float(config.get("weight_decay", 0.0))
  if weight_decay < 0:
    raise ValueError(f"config.optimizer.weight_decay must be >= 0, got {weight_decay}.")
  decoupled = bool(config.get("decoupled_weight_decay", False)) or config.name == "adamw"
  parts = []
  if weight_decay and not decoupled:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(direction(config))
  if weight_decay and decoupled:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)
