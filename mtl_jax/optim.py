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

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adam", "sgd", "signsgd", "adamw")


def check_optimizer_name(name: str) -> str:
  """Returns name, or raises a ValueError listing the valid optimizers."""
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}.")
  return name


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
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
  schedule = (
    learning_rate if learning_rate is not None else learning_rate_schedule(config, steps_per_epoch)
  )
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


def renamed(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of an optimizer section with another optimizer's name."""
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.name = name
  return copy


def switched(
  optimizers: Sequence[optax.GradientTransformation], choice: Any
) -> optax.GradientTransformation:
  """The optimizer `optimizers[choice]`, with `choice` an int that may be traced.

  The state holds every optimizer's state (a tuple, in order), so runs that differ in their
  optimizer have states of one structure and share one compiled step; an update runs the chosen
  optimizer alone (`lax.switch`: the other states pass through unchanged) and gives its update up
  to float rounding (XLA fuses nothing across the switch, so it may round differently).
  """
  optimizers = tuple(optimizers)

  def init(params):
    return tuple(optimizer.init(params) for optimizer in optimizers)

  def update(updates, state, params=None):
    def branch(index):
      def run(operand):
        gradients, states = operand
        new_updates, new_state = optimizers[index].update(gradients, states[index], params)
        return new_updates, states[:index] + (new_state,) + states[index + 1 :]

      return run

    branches = [branch(index) for index in range(len(optimizers))]
    return jax.lax.switch(choice, branches, (updates, tuple(state)))

  return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# One Adam per task (AdaTask-style), used by the loss-scale invariance study.


class PerTaskAdamState(NamedTuple):
  """Per-task first and second moments: every leaf has a leading task axis [T, ...]."""

  count: Any
  mu: Any
  nu: Any


def scale_by_per_task_adam(
  num_tasks: int, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  """Adam with separate moments per task, summed over tasks: invariant to per-task loss scales.

  Unlike other transformations, `update` takes the PER-TASK gradients, a pytree whose leaves
  have a leading task axis [T, *param_shape], and returns an update shaped like the
  parameters: sum_t m_hat_t / (sqrt(v_hat_t) + eps). Put it first in a chain (e.g. followed by
  `optax.scale_by_learning_rate`). A task whose gradient on a leaf is always zero (another
  task's head) contributes 0 there.

  Args:
    num_tasks: T.
    b1, b2, eps: Adam's decay rates and denominator constant.

  Returns:
    An optax GradientTransformation with state PerTaskAdamState.
  """

  def init(params):
    zeros = jax.tree_util.tree_map(
      lambda p: jnp.zeros((num_tasks, *jnp.shape(p)), jnp.result_type(p)), params
    )
    return PerTaskAdamState(count=jnp.zeros((), jnp.int32), mu=zeros, nu=zeros)

  def update(task_gradients, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, task_gradients)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, task_gradients)
    first_correction, second_correction = 1 - b1**count, 1 - b2**count

    def direction(m, v):
      denominator = jnp.sqrt(v / second_correction) + eps
      # 0/0 (a task that never touched this leaf, with eps = 0) contributes nothing.
      ratio = jnp.where(
        denominator > 0, (m / first_correction) / jnp.where(denominator > 0, denominator, 1), 0
      )
      return jnp.sum(ratio, axis=0)

    return jax.tree_util.tree_map(direction, mu, nu), PerTaskAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)
