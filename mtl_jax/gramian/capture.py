"""The fast path's capture: one forward pass records every encoder layer's input, T backward passes
its output gradients.

Layers are captured with a Flax method interceptor (`nn.intercept_methods`): `sow` stores the
input of each encoder `layers.Dense` / `Conv` / `Affine`, and `perturb` adds a zero to its
output, whose gradient is the layer's output gradient. Without the interceptor the model runs
untouched, so ordinary training pays nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.gramian.reference import stack_trees
from mtl_jax.gramian.reference import stacked_vjp
from mtl_jax.models import apply as apply_lib
from mtl_jax.models import layers

_INPUTS = "gramian_inputs"
_PERTURBATIONS = "gramian_output_perturbations"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """What the fast path needs to know about one captured encoder layer (static)."""

  kind: str  # 'dense', 'conv' or 'affine'.
  use_bias: bool = True
  kernel_size: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  dilation: tuple[int, ...] = ()


def layer_info(module: nn.Module) -> LayerInfo:
  if isinstance(module, layers.Conv):
    return LayerInfo(
      "conv",
      bool(module.use_bias),
      tuple(int(v) for v in module.kernel_size),
      tuple(int(v) for v in module.strides),
      tuple(int(v) for v in module.dilation),
    )
  if isinstance(module, layers.Dense):
    return LayerInfo("dense", bool(module.use_bias))
  return LayerInfo("affine")


def _capture_interceptor(registry: dict[tuple[str, ...], LayerInfo]):
  """A Flax interceptor that sows encoder layers' inputs and perturbs their outputs."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    is_layer = isinstance(module, (layers.Dense, layers.Conv, layers.Affine))
    if context.method_name != "__call__" or not is_layer or module.path[:1] != ("encoder",):
      return next_fun(*args, **kwargs)
    if module.path in registry:
      # A reused layer would need the sum over its uses of a ⊗ d, which the capture cannot
      # separate; no encoder in mtl_jax.models reuses a layer.
      raise NotImplementedError(
        f"Layer {'/'.join(module.path)} is applied more than once; the fast Gramian path "
        "supports each encoder layer being called once. Use path='reference'."
      )
    registry[module.path] = layer_info(module)
    module.sow(_INPUTS, "inputs", args[0])
    return module.perturb("outputs", next_fun(*args, **kwargs), collection=_PERTURBATIONS)

  return interceptor


def by_path(tree: Mapping[str, Any], suffix: str) -> dict[tuple[str, ...], Any]:
  """{module path: value} for every `suffix` entry of a nested variables dict."""
  found = {}

  def visit(node, path):
    for key, value in node.items():
      if key == suffix and not isinstance(value, Mapping):
        found[path] = value
      elif isinstance(value, Mapping):
        visit(value, path + (key,))

  visit(tree, ())
  return found


class Capture(NamedTuple):
  """Everything the fast path keeps from one forward and T backward passes.

  Attributes:
    losses: [B, T] per-sample losses.
    inputs: {layer path: input [B, ...]} of each captured encoder layer.
    output_gradients: {layer path: [T, B, ...]}: d L_t(x_i) / d output_i.
    infos: {layer path: LayerInfo} (static).
    head_gradients: per-task gradient of sum_i L_t(x_i) w.r.t. that task's head: {task: tree}.
    head_vjps: {task: VJP of that task's [B] losses w.r.t. (head params, features)}; Python
      closures, so a Capture lives inside one traced function and is never returned from jit.
  """

  losses: jax.Array
  inputs: dict
  output_gradients: dict
  infos: dict
  head_gradients: dict
  head_vjps: dict


def capture(model, params, batch_stats, batch, tasks, train: bool = True) -> Capture:
  """Runs the capturing forward pass and one encoder backward per task.

  Samples must be independent (no training-mode batch norm): the output gradient of
  sum_i L_t(x_i) at sample i is then the output gradient of L_t(x_i) alone. The T backward
  passes go through `stacked_vjp`, one pullback per task, not `jax.vmap` over the pullback,
  which XLA:CPU miscompiled for layer norms (docs/xla_cpu_faults.md).
  """
  registry: dict[tuple[str, ...], LayerInfo] = {}
  images = batch["image"]
  variables = apply_lib.variables(params, batch_stats)

  def encode(perturbations):
    registry.clear()
    with nn.intercept_methods(_capture_interceptor(registry)):
      features, state = model.apply(
        {**variables, _PERTURBATIONS: perturbations},
        images,
        train,
        method=model.encode,
        mutable=[_INPUTS],
      )
    return features, state[_INPUTS]

  def zero_perturbations():
    with nn.intercept_methods(_capture_interceptor({})):
      _, state = model.apply(
        variables, images, train, method=model.encode, mutable=[_PERTURBATIONS, _INPUTS]
      )
    return state[_PERTURBATIONS]

  shapes = jax.eval_shape(zero_perturbations)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  features, encoder_vjp, sown = jax.vjp(encode, zeros, has_aux=True)

  columns, head_gradients, head_vjps, feature_gradients = [], {}, {}, []
  for task in tasks:

    def task_losses(head_params, features, task=task):
      prediction, _ = apply_lib.apply_head(
        model, task.name, head_params, batch_stats, features, train
      )
      return task.loss(prediction, batch)

    losses, head_vjp = jax.vjp(task_losses, params["heads"][task.name], features)
    head_gradient, feature_gradient = head_vjp(jnp.ones_like(losses))
    columns.append(losses)
    head_gradients[task.name] = head_gradient
    head_vjps[task.name] = head_vjp
    feature_gradients.append(feature_gradient)

  (perturbation_gradients,) = stacked_vjp(encoder_vjp, stack_trees(feature_gradients))
  # A bfloat16 model captures bfloat16 activations and output gradients; every product the
  # blocks form from them is accumulated in float32.
  inputs = {path: value[0].astype(jnp.float32) for path, value in by_path(sown, "inputs").items()}
  output_gradients = {
    path: value.astype(jnp.float32)
    for path, value in by_path(perturbation_gradients, "outputs").items()
  }
  infos = dict(registry)
  check_coverage(params["encoder"], infos)
  return Capture(
    jnp.stack(columns, axis=1), inputs, output_gradients, infos, head_gradients, head_vjps
  )


def check_coverage(encoder_params: Any, infos: Mapping[tuple[str, ...], LayerInfo]) -> None:
  """Raises unless every encoder parameter belongs to a captured layer."""
  parameter_paths = set(by_path(encoder_params, "kernel")) | set(by_path(encoder_params, "scale"))
  bias_paths = set(by_path(encoder_params, "bias"))
  captured = {path[1:] for path in infos}
  missing = sorted((parameter_paths | bias_paths) - captured)
  if missing:
    raise ValueError(
      "The fast Gramian path sees only layers.Dense, layers.Conv and layers.Affine; these "
      f"encoder parameters belong to other modules: {', '.join('/'.join(p) for p in missing)}. "
      "Build the encoder from mtl_jax.models.layers, or use path='reference'."
    )
