"""Methods that need the task gradients' coordinates, not just their Gramian: GradDrop, AdaTask,
MTL-IO.

* GradDrop acts on the gradients with respect to the shared *features* (LibMTL's
  representation-level variant): it needs each task's feature gradient [T, *features], a cheap
  Jacobian (T backward passes through the heads only), and returns one feature cotangent that
  is then pulled back through the encoder once.
* AdaTask and MTL-IO change the optimizer, not the direction: AdaTask keeps Adam moments per
  task on the shared parameters (the train step hands the optimizer the stacked per-task
  gradients of the encoder); MTL-IO gives every task its own optimizer and takes one step per
  task in turn, each on a fresh gradient (Pascal et al. 2021's 'independent optimizers').
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mtl_jax import optim
from mtl_jax.weighting.base import JacobianMethod
from mtl_jax.weighting.base import register


def graddrop_cotangent(
  feature_gradients: jax.Array, features: jax.Array, rng: jax.Array, leak: float
) -> jax.Array:
  """GradDrop's feature cotangent (Chen et al. 2020, as in LibMTL).

  Per feature element, the sign purity P = ½(1 + Σ_t s_t / Σ_t |s_t|) with s_t = Σ_batch
  (∂L_t/∂f) ⊙ f decides, against one uniform draw U, whether the positive (P > U) or the
  negative (P < U) task gradients pass; the others are dropped (kept at `leak`).

  Args:
    feature_gradients: [T, B, ...] each task's gradient with respect to the features.
    features: [B, ...].
    rng: the key for U.
    leak: the fraction of a dropped gradient that is kept.

  Returns:
    The feature cotangent [B, ...].
  """
  signs = jnp.sum(feature_gradients * features[None], axis=1)
  purity = 0.5 * (1.0 + jnp.sum(signs, axis=0) / (jnp.sum(jnp.abs(signs), axis=0) + 1e-7))
  uniform = jax.random.uniform(rng, purity.shape)
  keep = ((purity > uniform)[None] & (signs > 0)) | ((purity < uniform)[None] & (signs < 0))
  scale = leak + (1.0 - leak) * keep.astype(feature_gradients.dtype)
  return jnp.sum(feature_gradients * scale[:, None], axis=0)


@register("graddrop")
def graddrop(options: ml_collections.ConfigDict) -> JacobianMethod:
  """GradDrop with leak `graddrop_leak` (LibMTL's default 0) on the shared features."""
  leak = float(options.graddrop_leak)

  def combine(feature_gradients, features, params, state, rng, step):
    del params, step
    if isinstance(features, jax.Array):
      return graddrop_cotangent(feature_gradients, features, rng, leak), state, {}
    # Architectures other than hard sharing give a pytree of features: each leaf is dropped
    # with its own draw.
    leaves, treedef = jax.tree_util.tree_flatten(features)
    keys = jax.random.split(rng, len(leaves))
    gradients = treedef.flatten_up_to(feature_gradients)
    cotangents = [
      graddrop_cotangent(gradient, leaf, key, leak)
      for gradient, leaf, key in zip(gradients, leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, cotangents), state, {}

  description = "gradient sign dropout on shared features"
  return JacobianMethod("graddrop", "features", combine=combine, description=description)


def _labels(trainable: Any, encoder_label: str, head_label) -> Any:
  """Labels for optax.multi_transform over {'model': {'encoder', 'heads'}, 'weighting'}."""
  return {
    "model": {
      "encoder": jax.tree_util.tree_map(lambda _: encoder_label, trainable["model"]["encoder"]),
      "heads": {
        task: jax.tree_util.tree_map(lambda _, task=task: head_label(task), head)
        for task, head in trainable["model"]["heads"].items()
      },
    },
    "weighting": jax.tree_util.tree_map(lambda _: "base", trainable["weighting"]),
  }


def per_task_transform(
  inner: optax.GradientTransformation, num_tasks: int
) -> optax.GradientTransformationExtraArgs:
  """Runs `inner` separately on each of T stacked gradients [T, ...] and sums the T updates.

  The state is inner's state with a leading task axis: per-task moments on the same parameters.
  `update` takes `task_present` (bool [T], optional): a task absent from the batch (partial
  labels) neither updates its state nor adds its update (its moments would still move the
  parameters).
  """

  def init(params):
    state = inner.init(params)
    return jax.tree_util.tree_map(
      lambda leaf: jnp.broadcast_to(leaf, (num_tasks, *jnp.shape(leaf))), state
    )

  def update(updates, state, params=None, task_present=None, **extra_args):
    del extra_args  # the other transforms' arguments
    per_task, new_state = jax.vmap(inner.update, in_axes=(0, 0, None))(updates, state, params)
    if task_present is not None:

      def keep_present(new, old):
        present = jnp.reshape(task_present, (-1,) + (1,) * (jnp.ndim(new) - 1))
        return jnp.where(present, new, old)

      new_state = jax.tree_util.tree_map(keep_present, new_state, state)
      per_task = jax.tree_util.tree_map(
        lambda leaf: keep_present(leaf, jnp.zeros_like(leaf)), per_task
      )
    return jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), per_task), new_state

  return optax.GradientTransformationExtraArgs(init, update)


def _check_optimizer(method: str, name: str, allowed: Sequence[str]) -> None:
  if name not in allowed:
    raise ValueError(
      f"Method {method!r} needs config.optimizer.name in {', '.join(allowed)}; got {name!r} "
      f"(the study runs AdaTask with Adam and MTL-IO with SGD)."
    )


@register("adatask")
def adatask(options: ml_collections.ConfigDict) -> JacobianMethod:
  """AdaTask (Yang et al. 2023): per-task Adam moments on the shared parameters; Adam only.

  The encoder's update is Σ_t adam_t(g_t), each task with its own complete copy of the base
  optimizer (moments, weight decay, schedule); heads and weighting parameters use one copy,
  since each head only ever sees its own task's gradient.
  """
  del options

  def make_optimizer(config, steps_per_epoch, task_names, learning_rate=None):
    _check_optimizer("adatask", config.name, ("adam", "adamw"))
    base = optim.make_optimizer(config, steps_per_epoch, learning_rate)
    transforms = {"per_task": per_task_transform(base, len(task_names)), "base": base}
    return optax.multi_transform(
      transforms, lambda trainable: _labels(trainable, "per_task", lambda task: "base")
    )

  description = "per-task Adam moments on the shared parameters"
  return JacobianMethod(
    "adatask", "per_task_optimizer", make_optimizer=make_optimizer, description=description
  )


class SequentialOptimizers(NamedTuple):
  """One optimizer per task, stepped in turn by the train step (MTL-IO)."""

  transforms: tuple[optax.GradientTransformation, ...]

  def init(self, params):
    return tuple(transform.init(params) for transform in self.transforms)


@register("mtl_io")
def mtl_io(options: ml_collections.ConfigDict) -> JacobianMethod:
  """MTL-IO (Pascal et al. 2021): per batch, one step per task in turn, each with its own SGD.

  Task t's optimizer covers the shared parameters and head t (other heads are frozen for it);
  each step uses the gradient of L_t at the parameters left by the previous task's step.
  """
  del options

  def make_optimizer(config, steps_per_epoch, task_names, learning_rate=None):
    _check_optimizer("mtl_io", config.name, ("sgd",))
    transforms = []
    for own in task_names:
      base = optim.make_optimizer(config, steps_per_epoch, learning_rate)
      transforms.append(
        optax.multi_transform(
          {"base": base, "frozen": optax.set_to_zero()},
          lambda trainable, own=own: _labels(
            trainable, "base", lambda task: "base" if task == own else "frozen"
          ),
        )
      )
    return SequentialOptimizers(tuple(transforms))

  description = "one optimizer per task, stepped in turn"
  return JacobianMethod(
    "mtl_io", "sequential", make_optimizer=make_optimizer, description=description
  )
