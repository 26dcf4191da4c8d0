"""The one rule for running a model: training or evaluation mode, and its batch statistics.

In training mode a model with batch norm normalises with the batch's statistics and returns the
updated running statistics; in evaluation mode (or without batch norm) it reads the running
statistics and changes nothing. Every caller in mtl_jax (train steps, evaluation, the Gramian
engine, the studies) runs models through these functions, so that rule lives here only.
`batch_stats` is `{}` for a model without batch norm.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax


def has_batch_norm(batch_stats: Any) -> bool:
  """Whether a model's statistics tree holds any batch-norm statistics."""
  return bool(jax.tree_util.tree_leaves(batch_stats))


def variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  """The Flax variables dict: params, plus batch_stats when the model has batch norm."""
  if has_batch_norm(batch_stats):
    return {"params": params, "batch_stats": batch_stats}
  return {"params": params}


def run(
  model: nn.Module,
  params: Any,
  batch_stats: Any,
  inputs: jax.Array,
  train: bool,
  method: Any = None,
  extra_variables: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
  """Applies `model` (or one of its methods) and returns (outputs, batch statistics after it).

  Args:
    model: a Flax module called as `model(inputs, train)`.
    params: its parameters.
    batch_stats: its batch-norm statistics ({} without batch norm).
    inputs: the first positional argument.
    train: training mode (batch statistics from this batch, updated and returned) or
      evaluation mode (running statistics, returned unchanged).
    method: a method of `model` to call instead of `__call__` (e.g. `model.encode`).
    extra_variables: further variable collections to pass in (e.g. perturbations).
  """
  collections = {**variables(params, batch_stats), **(extra_variables or {})}
  if train and has_batch_norm(batch_stats):
    outputs, updates = model.apply(
      collections, inputs, True, method=method, mutable=["batch_stats"]
    )
    return outputs, updates["batch_stats"]
  return model.apply(collections, inputs, train, method=method), batch_stats


def predict(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array, train: bool):
  """{task: prediction} and the batch statistics after the forward pass."""
  return run(model, params, batch_stats, images, train)


def encode(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array, train: bool):
  """The shared encoder's features and the batch statistics after it."""
  return run(model, params, batch_stats, images, train, method=model.encode)


def head_statistics(batch_stats: Any, task_name: str) -> Any:
  """A head's own batch-norm statistics, or None when it has none."""
  if not batch_stats or "heads" not in batch_stats:
    return None
  stats = batch_stats["heads"].get(task_name)
  return stats if stats else None


def apply_head(
  model: nn.Module,
  task_name: str,
  head_params: Any,
  batch_stats: Any,
  features: jax.Array,
  train: bool,
) -> tuple[jax.Array, Any]:
  """One task's head on shared features: (prediction, the head's statistics or None).

  Heads with batch norm (DeepLab's ASPP head) read their statistics from
  batch_stats['heads'][task_name]; in training mode the returned statistics are updated from
  this batch, as the whole model's forward pass would update them.
  """
  head = model.heads[task_name]
  stats = head_statistics(batch_stats, task_name)
  if stats is None:
    return head.apply({"params": head_params}, features, train=train), None
  return run(head, head_params, stats, features, train)


def apply_heads(
  model: nn.Module,
  task_names: Sequence[str],
  head_params: Mapping[str, Any],
  batch_stats: Any,
  features_per_task: Sequence[jax.Array],
  train: bool,
) -> tuple[dict[str, jax.Array], Any]:
  """Head t on features_per_task[t] for every task; returns (predictions, updated batch_stats)."""
  predictions, head_stats = {}, {}
  for name, features in zip(task_names, features_per_task):
    predictions[name], head_stats[name] = apply_head(
      model, name, head_params[name], batch_stats, features, train
    )
  return predictions, with_head_statistics(batch_stats, head_stats)


def with_head_statistics(batch_stats: Any, head_stats: Mapping[str, Any]) -> Any:
  """batch_stats with the heads' entries replaced by `head_stats` ({task: stats}; None skipped)."""
  head_stats = {name: stats for name, stats in head_stats.items() if stats is not None}
  if not head_stats:
    return batch_stats
  return {**batch_stats, "heads": {**batch_stats["heads"], **head_stats}}
