"""Levels of rows, and the reductions of the per-sample Gramian to them.

The engine's finest object is the per-sample Gramian G[i, t, j, s] = <g_it, g_js> of the
gradients of the per-sample losses L_t(x_i) ('full', shape [B, T, B, T]). A training step's
rows are coarser, scaled so that at every level they sum to the EW objective Σ_t L_t (L_t the
batch-mean loss):

* 'task': one row per task, L_t = mean_i L_t(x_i); G is T×T.
* 'sample': one row per sample, Σ_t L_t(x_i) / B; G is B×B.
* 'sample_task': one row per (sample, task), L_t(x_i) / B, row index i·T + t; G is BT×BT.

So a sum-convention method without conflicts reproduces EW's step at every level.

With partial labels (a label mask in the batch) the coefficient 1/B of L_t(x_i) becomes
c_it = m_it / max(n_t, 1) (`tasks.label_scales`): rows still sum to the EW objective, now of the
means over labelled examples, and an unlabelled pair's row is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import LEVELS
from mtl_jax.weighting.base import num_rows

FULL = "full"

__all__ = [
  "FULL",
  "LEVELS",
  "at_level",
  "check_level",
  "num_rows",
  "row_norms",
  "sample_gramian",
  "task_gramian",
]


def check_level(level: str, allow_full: bool = False) -> str:
  """Returns level, or raises a ValueError naming the valid levels ('full' too when allowed)."""
  valid = LEVELS + ((FULL,) if allow_full else ())
  if level not in valid:
    raise ValueError(f"Unknown Gramian level {level!r}; valid levels: {', '.join(valid)}.")
  return level


def task_gramian(gramian: jax.Array) -> jax.Array:
  """[T, T] Gramian of the batch-mean task gradients: the mean over i, j of G[i, t, j, s]."""
  batch = gramian.shape[0]
  return jnp.sum(gramian, axis=(0, 2)) / (batch * batch)


def sample_gramian(gramian: jax.Array, task: int | None = None) -> jax.Array:
  """[B, B] Gramian of per-sample gradients: of one task, or (task=None) of Σ_t L_t(x_i)."""
  if task is None:
    return jnp.sum(gramian, axis=(1, 3))
  num_tasks = gramian.shape[1]
  if not -num_tasks <= task < num_tasks:
    raise ValueError(f"task index {task} out of range for {num_tasks} tasks.")
  return gramian[:, task, :, task]


def row_norms(gramian: jax.Array) -> jax.Array:
  """[B, T] gradient norms of the rows: sqrt(G[i, t, i, t])."""
  batch, num_tasks = gramian.shape[:2]
  diagonal = jnp.diagonal(gramian.reshape(batch * num_tasks, batch * num_tasks))
  return jnp.sqrt(jnp.maximum(diagonal, 0.0)).reshape(batch, num_tasks)


def at_level(gramian: jax.Array, level: str, scales: jax.Array | None = None) -> jax.Array:
  """The [R, R] Gramian of a level's rows (see the module docstring) from the full [B, T, B, T]
  one; `scales` [B, T] are the rows' coefficients c_it under partial labels (None: 1/B)."""
  check_level(level, allow_full=True)
  batch, num_tasks = gramian.shape[:2]
  if level == FULL:
    return gramian
  if scales is not None:
    scaled = gramian * scales[:, :, None, None] * scales[None, None, :, :]
    if level == "task":
      return jnp.sum(scaled, axis=(0, 2))
    if level == "sample":
      return jnp.sum(scaled, axis=(1, 3))
    return scaled.reshape(batch * num_tasks, batch * num_tasks)
  if level == "task":
    return task_gramian(gramian)
  if level == "sample":
    return sample_gramian(gramian) / (batch * batch)
  return gramian.reshape(batch * num_tasks, batch * num_tasks) / (batch * batch)
