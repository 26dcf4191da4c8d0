"""Partial labels in the methods: a weighting sees only the rows (tasks, samples, pairs) present.

When a batch lacks every label of a task, that task's loss is 0 and its gradient row is zero.
Left in, an absent row would still count: in normalisations (UPGrad's and CAGrad's means over
rows, GradNorm's and DWA's T), in solvers (MGDA's min-norm point is 0 as soon as one row is
zero; Nash-MTL's and FairGrad's conditions (Gw)_k = f(w_k) have no finite solution for it) and
in logs (GLS, FAMO and STCH take log L_t). So the train step calls the method on the present
rows alone: a stable permutation moves them to the front and `lax.switch` on their count k
picks the method traced at size k (one trace per possible count, R + 1 in all; only batches
with a label mask pay for them). Absent rows get weight 0 and a zero loss coefficient.

What is per row: an argument leaf of the row inputs (Gramian, task losses at level 'task',
parameters, state) whose leading axis has length R is gathered to the k present rows, and
also along its second axis when that has length R too (GradVac's pairwise targets). An output
leaf whose full-size shape leads with R is scattered back: state and parameters into their old
value (an absent row's EMA, epoch means, logits, ... stay as they were: a task's record only
advances on batches that label it), everything else (the weights) into zeros. Leaves of other
shapes (counters, epoch indices, scalars) are shared and pass through; the random key and the
step are never gathered. With every row present the method runs unchanged on its full input.

Auto-Lambda's bilevel update (`bilevel`) and the 'task_gradients' Jacobian methods
(`task_gradients_combine`, whose [T, ...] coordinates are taken along the task axis only, and
whose encoder direction is never per row) run the same way. Per-method consequences:
`weighting/base.py` lists them with the three protocols.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def _gather(tree: Any, indices: jax.Array, size: int) -> Any:
  def gather(leaf):
    if jnp.ndim(leaf) >= 1 and leaf.shape[0] == size:
      leaf = leaf[indices]
      if leaf.ndim >= 2 and leaf.shape[1] == size:
        leaf = leaf[:, indices]
    return leaf

  return jax.tree_util.tree_map(gather, tree)


def _scatter(tree: Any, base: Any, template: Any, indices: jax.Array, size: int) -> Any:
  """Leaves whose full-size template leads with R: `base` with the present rows replaced."""

  def scatter(leaf, old, spec):
    if len(spec.shape) == 0 or spec.shape[0] != size:
      return leaf
    if len(spec.shape) >= 2 and spec.shape[1] == size:
      return old.at[indices[:, None], indices[None, :]].set(leaf)
    return old.at[indices].set(leaf)

  return jax.tree_util.tree_map(scatter, tree, base, template)


def call_on_present(
  function: Callable[..., tuple],
  present: jax.Array,
  row_args: Sequence[Any],
  shared_args: Sequence[Any],
  kept: dict[int, int],
) -> tuple:
  """`function(*row_args, *shared_args)` on the present rows only, its outputs at full size.

  Args:
    function: returns a tuple of pytrees.
    present: bool [R], the rows present in the batch.
    row_args: arguments holding per-row leaves (see the module docstring).
    shared_args: arguments passed unchanged (random key, step, losses of other shapes).
    kept: output position -> row_args position of the value an absent row keeps (the state:
      its absent rows, and the whole of it when no row is present, stay as they were).

  Returns:
    The outputs, shaped as for all R rows.
  """
  size = int(present.shape[0])
  template = jax.eval_shape(function, *row_args, *shared_args)
  order = jnp.argsort(jnp.logical_not(present).astype(jnp.int32), stable=True)

  def zeros(spec):
    return jnp.zeros(spec.shape, spec.dtype)

  def bases():
    outputs = [jax.tree_util.tree_map(zeros, spec) for spec in template]
    for output, argument in kept.items():
      outputs[output] = row_args[argument]
    return tuple(outputs)

  def branch(count: int):
    def run(row_args, shared_args):
      if count == 0:
        return bases()
      indices = order[:count]
      outputs = function(*_gather(tuple(row_args), indices, size), *shared_args)
      return tuple(
        _scatter(output, base, spec, indices, size)
        for output, base, spec in zip(outputs, bases(), template)
      )

    return run

  count = jnp.sum(present.astype(jnp.int32))
  branches = [branch(count) for count in range(size + 1)]
  return jax.lax.switch(count, branches, tuple(row_args), tuple(shared_args))


def present_rows(label_mask: jax.Array | None, level: str) -> jax.Array | None:
  """bool [R]: the rows of a level with a labelled (sample, task) pair; None without a mask.

  'task': tasks with a labelled example in the batch; 'sample': samples with at least one
  label; 'sample_task': the labelled pairs, row i·T + t.
  """
  if label_mask is None:
    return None
  mask = jnp.asarray(label_mask) > 0
  if level == "task":
    return jnp.any(mask, axis=0)
  if level == "sample":
    return jnp.any(mask, axis=1)
  return mask.reshape(-1)


def combine(method, present, task_losses, params, state, rng, step) -> tuple:
  """A loss weighting's `combine` on the present tasks (all of them when `present` is None)."""
  if present is None:
    return method.combine(task_losses, params, state, rng, step)
  return call_on_present(method.combine, present, (task_losses, params, state), (rng, step), {1: 2})


def after_update(method, present, losses, state) -> Any:
  """A loss weighting's `after_update` (FAMO) on the present tasks."""
  if present is None:
    return method.after_update(losses, state)

  def update(losses, state):
    return (method.after_update(losses, state),)

  return call_on_present(update, present, (losses, state), (), {0: 1})[0]


def weigh(method, level, present, gramian, task_losses, params, state, rng, step) -> tuple:
  """A Gramian weighting's `weigh` on the present rows; the task losses are per row at level
  'task' only (at the per-sample levels they pass whole)."""
  if present is None:
    return method.weigh(gramian, task_losses, params, state, rng, step)
  if level == "task":
    rows, shared = (gramian, task_losses, params, state), (rng, step)
    return call_on_present(method.weigh, present, rows, shared, {1: 3})

  def per_sample(gramian, params, state, task_losses, rng, step):
    return method.weigh(gramian, task_losses, params, state, rng, step)

  rows, shared = (gramian, params, state), (task_losses, rng, step)
  return call_on_present(per_sample, present, rows, shared, {1: 2})


def bilevel(method, present, train_losses, meta_losses, model_params, state, step) -> Any:
  """A loss weighting's `bilevel` update (Auto-Lambda) on the tasks present in the first half.

  The method sees the first half's losses of those tasks only, so its virtual step and its
  per-task state (λ_t and their Adam moments) leave the absent tasks alone; the meta loss keeps
  every task's held-out loss (a task unlabelled there adds a constant 0). Shared leaves (Adam's
  step count) advance on every step that labels some task.
  """
  if present is None:
    return method.bilevel(train_losses, meta_losses, model_params, state, step)

  def update(state, rows, model_params, step):
    def present_train_losses(params):
      return train_losses(params)[rows]

    return (method.bilevel(present_train_losses, meta_losses, model_params, state, step),)

  rows = jnp.arange(present.shape[0])
  return call_on_present(update, present, (state, rows), (model_params, step), {0: 0})[0]


def _rows_flattened(tree: Any, like: Any, size: int) -> Any:
  """Leaves whose counterpart in `like` leads with `size`, reshaped to [rows, 1, n]: per row along
  their first axis only, whatever their other axes (a [T, ...] stack of encoder coordinates)."""
  return _per_row_leaves(tree, like, size, lambda spec: (1, -1))


def _rows_restored(tree: Any, like: Any, size: int) -> Any:
  """The inverse of `_rows_flattened`: each flattened leaf back to its rows and `like`'s axes."""
  return _per_row_leaves(tree, like, size, lambda spec: jnp.shape(spec)[1:])


def _per_row_leaves(tree: Any, like: Any, size: int, trailing_shape) -> Any:
  """Reshapes the leaves of `tree` whose counterpart in `like` leads with `size` to
  (their rows, *trailing_shape(counterpart)); other leaves pass through."""

  def reshape(leaf, spec):
    if jnp.ndim(spec) >= 1 and jnp.shape(spec)[0] == size:
      return jnp.reshape(leaf, (jnp.shape(leaf)[0], *trailing_shape(spec)))
    return leaf

  return jax.tree_util.tree_map(reshape, tree, like)


def task_gradients_combine(method, present, parts, params, state, rng, step) -> tuple:
  """A 'task_gradients' Jacobian method's `combine` on the tasks present in the batch.

  The parts' losses and encoder gradients, and the method's per-task state ([T, ...] leaves),
  are taken along their task axis only; the encoder direction is never per task. Absent tasks
  get head scale 0 and keep their state.
  """
  if present is None:
    return method.combine(parts, params, state, rng, step)
  size = int(present.shape[0])

  def combine(flat_parts, params, flat_state, rng, step):
    parts_rows = _rows_restored(flat_parts, parts, size)
    state_rows = _rows_restored(flat_state, state, size)
    direction, head_scales, new_state, aux = method.combine(
      parts_rows, params, state_rows, rng, step
    )
    # A leading axis of 1 keeps the direction from being taken for per-task rows.
    direction = jax.tree_util.tree_map(lambda leaf: leaf[None], direction)
    return direction, head_scales, _rows_flattened(new_state, state, size), aux

  row_args = (_rows_flattened(parts, parts, size), params, _rows_flattened(state, state, size))
  direction, head_scales, flat_state, aux = call_on_present(
    combine, present, row_args, (rng, step), {2: 2}
  )
  direction = jax.tree_util.tree_map(lambda leaf: leaf[0], direction)
  return direction, head_scales, _rows_restored(flat_state, state, size), aux
