"""The finite guard: a non-finite loss or gradient stops a run with the step, task and parameters
named."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import gramian as gramian_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.models import apply as apply_lib
from mtl_jax.train.state import Experiment
from mtl_jax.train.state import TrainState
from mtl_jax.weighting import present as present_lib


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; the message names the step and task."""


def finite_lanes(step_metrics: Mapping[str, np.ndarray]) -> np.ndarray:
  """[K] whether each lane's loss, gradient norm and task losses are finite (host metrics
  [K, ...])."""
  if "finite" in step_metrics:
    return np.asarray(step_metrics["finite"], bool)
  task_losses = np.asarray(step_metrics["task_losses"])
  return (
    np.isfinite(np.asarray(step_metrics["loss"]))
    & np.isfinite(np.asarray(step_metrics["grad_norm"]))
    & np.all(np.isfinite(task_losses), axis=tuple(range(1, task_losses.ndim)))
  )


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _non_finite_paths(tree, limit: int = 6) -> str:
  """'a/b/kernel, c/bias (and N more)' for the leaves of a bool tree that are False."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  bad = [_path_name(path) for path, finite in flat if not bool(finite)]
  shown = ", ".join(bad[:limit])
  return shown + (f" (and {len(bad) - limit} more)" if len(bad) > limit else "")


def make_gradient_locator(
  experiment: Experiment,
) -> Callable[[TrainState, Mapping[str, np.ndarray]], str]:
  """`(state, batch) -> description` of which parameters get non-finite gradients, from which task.

  Only called after a step reported a non-finite gradient norm (the step itself computes one
  global norm, so the hot path pays nothing); it recomputes the gradient of each task's loss (a
  Jacobian over tasks) and of the weighted total, and names the parameter paths, e.g.
  'encoder/Conv_0/kernel'.
  """
  model, tasks, method = experiment.model, experiment.tasks, experiment.weighting

  def task_losses_fn(params, state, batch):
    predictions, _ = apply_lib.predict(model, params, state.batch_stats, batch["image"], train=True)
    return tasks_lib.task_mean_losses(tasks_lib.losses_matrix(tasks, predictions, batch), batch)

  def total_fn(trainable, state, batch):
    task_losses = task_losses_fn(trainable["model"], state, batch)
    if not isinstance(method, weighting_lib.LossWeighting):
      # A gradient method's objective is implicit; the plain sum locates what its rows share.
      return jnp.sum(task_losses)
    _, step_rng = jax.random.split(state.rng)
    present = tasks_lib.task_present(batch, len(tasks))
    total, _, _ = present_lib.combine(
      method,
      present,
      task_losses,
      trainable["weighting"],
      state.weighting_state,
      step_rng,
      state.step,
    )
    return total

  def finite_flags(state, batch):
    per_task = gramian_lib.jacobian_rows(
      lambda params: task_losses_fn(params, state, batch), state.params
    )
    per_task = jax.tree_util.tree_map(
      lambda g: jnp.all(jnp.isfinite(g), axis=tuple(range(1, g.ndim))), per_task
    )
    total = jax.grad(total_fn)(state.trainable, state, batch)
    return per_task, jax.tree_util.tree_map(lambda g: jnp.all(jnp.isfinite(g)), total)

  finite_flags = jax.jit(finite_flags)

  def locate(state, batch) -> str:
    per_task, total = jax.device_get(finite_flags(state, batch))
    parts = []
    for index, task in enumerate(tasks):
      paths = _non_finite_paths(
        jax.tree_util.tree_map(lambda flags, index=index: flags[index], per_task)
      )
      if paths:
        parts.append(f"gradient of task {task.name!r} loss is non-finite in {paths}")
    if not parts:
      paths = _non_finite_paths(total)
      where = paths or "no parameter on recomputation (non-deterministic overflow?)"
      parts.append(
        f"every task's gradient is finite, but after weighting {method.name!r} non-finite in "
        f"{where}"
      )
    return "; ".join(parts)

  return locate


def check_finite(
  step: int,
  step_metrics: Mapping[str, np.ndarray],
  task_names: Sequence[str],
  where: str,
  locate_gradients: Callable[[], str] | None = None,
) -> None:
  """Raises NonFiniteLossError naming the step and the task(s) when one run's metrics are not
  finite.

  Args:
    step: the step that produced the metrics.
    step_metrics: one run's host metrics ('loss', 'grad_norm', 'task_losses' [T]).
    task_names: the tasks, in column order.
    where: what is left behind (the last good checkpoint), appended to the message.
    locate_gradients: `() -> description` of the non-finite gradients, for a non-finite norm.
  """
  task_losses = np.asarray(step_metrics["task_losses"])
  bad_tasks = [name for name, value in zip(task_names, task_losses) if not np.isfinite(value)]
  if bad_tasks:
    values = ", ".join(f"{name}={task_losses[task_names.index(name)]}" for name in bad_tasks)
    raise NonFiniteLossError(
      f"Non-finite loss at step {step} in task(s) {', '.join(bad_tasks)} ({values}). {where}"
    )
  for key in ("loss", "grad_norm"):
    if not np.isfinite(np.asarray(step_metrics[key])):
      located = ""
      if key == "grad_norm" and locate_gradients is not None:
        located = f" The {locate_gradients()}."
      raise NonFiniteLossError(
        f"Non-finite {key} at step {step} (task losses finite: "
        f"{dict(zip(task_names, task_losses.tolist()))}).{located} {where}"
      )
