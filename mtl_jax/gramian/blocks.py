"""The fast path's Gramian blocks: each encoder layer's share of G from its captured inputs and
output gradients.

Never materialising the B·T·P Jacobian, each layer's contribution to G is assembled from what
`capture` recorded:

* Dense (S = 1 position): <g_i, g_j> = (<a_i, a_j> + 1{bias}) <d_i, d_j>.
* Conv, or Dense over positions: either the "ghost" form sum_{p,q} <a_ip, a_jq><d_ip, d_jq>,
  costing B²S², or that layer's per-row gradient [B·T, k·k·Cin·Cout] materialised from the
  input patches; `layer_strategy` picks the cheaper from static shapes.
* Affine (a norm's scale and shift): per-row gradients are only 2C numbers, materialised.

The materialised layers' per-row gradients sit side by side in one [B·T, F] matrix
(`materialised_rows`): one matmul gives their share of G, and a weighted sum of its rows gives
their share of any weighted gradient (`weighted_gradients`), so a training step pays for them
once.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.gramian import modes
from mtl_jax.gramian.capture import Capture
from mtl_jax.gramian.capture import LayerInfo


def conv_patches(inputs: jax.Array, info: LayerInfo) -> jax.Array:
  """[B, H', W', kh·kw·Cin]: the input window each output position of the conv sees.

  The last axis is in (kh, kw, Cin) order, the row-major order of an HWIO kernel's first three
  axes, so a per-row kernel gradient reshapes straight to the kernel's shape. Built from kh·kw
  strided slices of the padded input (pure copies): `conv_general_dilated_patches` computes
  the same by convolving with a one-hot [kh, kw, Cin, kh·kw·Cin] kernel, k²·Cin multiply-adds
  per copied value, which cost more than the layer itself.
  """
  batch, *spatial, channels = inputs.shape
  effective = [(size - 1) * rate + 1 for size, rate in zip(info.kernel_size, info.dilation)]
  pads = jax.lax.padtype_to_pads(spatial, effective, info.strides, "SAME")
  padded = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
  outputs = [-(-size // stride) for size, stride in zip(spatial, info.strides)]
  windows = []
  for offsets in itertools.product(*(range(size) for size in info.kernel_size)):
    starts = [offset * rate for offset, rate in zip(offsets, info.dilation)]
    limits = [
      start + (count - 1) * stride + 1
      for start, count, stride in zip(starts, outputs, info.strides)
    ]
    windows.append(
      jax.lax.slice(padded, (0, *starts, 0), (batch, *limits, channels), (1, *info.strides, 1))
    )
  return jnp.stack(windows, axis=-2).reshape(batch, *outputs, -1)


def layer_strategy(batch: int, tasks: int, positions: int, inputs: int, outputs: int) -> str:
  """'ghost' or 'materialise' for a (positional) linear layer, whichever needs fewer flops.

  Ghost: the [B, B, S, S] input and [BT, BT, S, S] output-gradient products and their
  contraction. Materialise: the per-row gradients [BT, K·N] and their Gramian.

  Args:
    batch: B. tasks: T. positions: S, output positions per sample. inputs: K, input features
      per position (Cin·kh·kw for a conv). outputs: N, output channels.

  Returns:
    The cheaper strategy.
  """
  rows = batch * tasks
  ghost = batch**2 * positions**2 * inputs + rows**2 * positions**2 * (outputs + 1)
  materialise = rows * positions * inputs * outputs + rows**2 * inputs * outputs
  return "ghost" if ghost <= materialise else "materialise"


_SYMMETRIC_MIN_ROWS = 96


def gram(rows: jax.Array) -> jax.Array:
  """rows rowsᵀ for rows [R, F]; for large R, 6 of 9 blocks are computed and 3 mirrored."""
  count = rows.shape[0]
  if count < _SYMMETRIC_MIN_ROWS:
    return modes.einsum("rf,sf->rs", rows, rows)
  bounds = [count * part // 3 for part in range(4)]
  chunks = [rows[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
  blocks = {
    (i, j): modes.einsum("rf,sf->rs", chunks[i], chunks[j]) for i in range(3) for j in range(i, 3)
  }
  return jnp.block(
    [[blocks[i, j] if i <= j else blocks[j, i].T for j in range(3)] for i in range(3)]
  )


def _positional(info: LayerInfo, inputs: jax.Array, output_gradients: jax.Array):
  """(inputs [B, S, K], output gradients [T, B, S, N]) of a dense or conv layer."""
  num_tasks, batch = output_gradients.shape[:2]
  if info.kind == "conv":
    inputs = conv_patches(inputs, info)
  inputs = inputs.reshape(batch, -1, inputs.shape[-1])
  return inputs, output_gradients.reshape(num_tasks, batch, inputs.shape[1], -1)


def is_materialised(
  info: LayerInfo, inputs: jax.Array, output_gradients: jax.Array, total_batch: int | None = None
) -> bool:
  """Whether a layer's per-row gradients are formed (static: from shapes only; `total_batch`
  overrides the batch size of the shapes, for a device holding part of a batch)."""
  if info.kind == "affine":
    return True
  num_tasks, batch = output_gradients.shape[:2]
  batch = total_batch or batch
  positions = int(np.prod(output_gradients.shape[2:-1], dtype=np.int64))
  features = inputs.shape[-1] * (int(np.prod(info.kernel_size)) if info.kind == "conv" else 1)
  strategy = layer_strategy(batch, num_tasks, positions, features, output_gradients.shape[-1])
  return strategy == "materialise"


def layer_rows(info: LayerInfo, inputs: jax.Array, output_gradients: jax.Array) -> jax.Array:
  """[B, T, F]: one materialised layer's per-row parameter gradients, flattened.

  F is, for an affine layer, scale then bias [C + C]; for a dense or conv layer, the kernel
  gradient in [N, K] order (output channel major: the einsum below then needs no transpose of
  its result) followed by the bias [N] if there is one.
  """
  num_tasks, batch = output_gradients.shape[:2]
  if info.kind == "affine":
    positions = tuple(range(2, output_gradients.ndim - 1))
    scale = jnp.sum(output_gradients * inputs[None], axis=positions)
    bias = jnp.sum(output_gradients, axis=positions)
    return jnp.transpose(jnp.concatenate([scale, bias], axis=-1), (1, 0, 2))
  inputs, output_gradients = _positional(info, inputs, output_gradients)
  positions, outputs = output_gradients.shape[2:]
  # [B, S, T·N]: the T tasks side by side, so each sample's kernel rows are one matmul.
  by_sample = jnp.transpose(output_gradients, (1, 2, 0, 3)).reshape(
    batch, positions, num_tasks * outputs
  )
  kernel = modes.einsum("bpn,bpk->bnk", by_sample, inputs).reshape(batch, num_tasks, -1)
  if not info.use_bias:
    return kernel
  bias = jnp.sum(by_sample, axis=1).reshape(batch, num_tasks, outputs)
  return jnp.concatenate([kernel, bias], axis=-1)


class MaterialisedRows(NamedTuple):
  """The per-row gradients of every materialised layer, side by side (see `materialised_rows`).

  Attributes:
    matrix: [B, T, F] float32, or None when no layer is materialised.
    segments: static ((layer path, offset, width), ...): where each layer's F-slice lies.
  """

  matrix: jax.Array | None
  segments: tuple


def materialised_rows(captured: "Capture", total_batch: int | None = None) -> MaterialisedRows:
  """Per-row gradients of the layers whose Gramian is cheaper from them than in ghost form.

  Affine layers always; dense and conv layers as `layer_strategy` decides. The same matrix
  gives their Gramian block (one matmul for all of them) and, weighted, their gradient, so
  `loss_grads_and_gramian` forms it once. Memory B·T·F: F counts only the materialised
  layers' parameters, which the strategy picks where their per-row gradient is smaller than
  the ghost form's products. `total_batch`: the whole batch's size when `captured` holds one
  device's share of it (the strategy is chosen for the whole batch).
  """
  blocks, segments, offset = [], [], 0
  for path, info in captured.infos.items():
    inputs, gradients = captured.inputs[path], captured.output_gradients[path]
    if not is_materialised(info, inputs, gradients, total_batch):
      continue
    block = layer_rows(info, inputs, gradients)
    blocks.append(block)
    segments.append((path, offset, block.shape[-1]))
    offset += block.shape[-1]
  if not blocks:
    return MaterialisedRows(None, ())
  return MaterialisedRows(jnp.concatenate(blocks, axis=-1), tuple(segments))


def ghost_contribution(
  info: LayerInfo,
  inputs: jax.Array,
  output_gradients: jax.Array,
  other_inputs: jax.Array | None = None,
  other_gradients: jax.Array | None = None,
):
  """[B, T, C, T] Gramian block of a dense or conv layer in ghost form (no per-row gradients).

  Rows (inputs [B, ...], output gradients [T, B, ...]) against rows (other_inputs [C, ...],
  other_gradients [T, C, ...]); without the others, against themselves ([B, T, B, T], symmetric
  products computed once). Inputs are the layer's raw inputs (before patch extraction), so a
  device sends k·k times fewer numbers for the other side (`sharding`).
  """
  symmetric = other_inputs is None
  inputs, output_gradients = _positional(info, inputs, output_gradients)
  if symmetric:
    other_inputs, other_gradients = inputs, output_gradients
  else:
    other_inputs, other_gradients = _positional(info, other_inputs, other_gradients)

  def products(left, right):  # left [R, F], right [R', F] -> [R, R']
    return gram(left) if symmetric else modes.einsum("rf,sf->rs", left, right)

  num_tasks, batch, positions, outputs = output_gradients.shape
  other_batch = other_gradients.shape[1]
  by_sample = jnp.transpose(output_gradients, (1, 0, 2, 3))  # [B, T, S, N]
  other_by_sample = jnp.transpose(other_gradients, (1, 0, 2, 3))
  if positions == 1:
    # The textbook ghost form: the kernel gradient d aᵀ factorises, and a bias adds
    # <d_i, d_j> (its gradient is d), so the bias folds in as a +1 on the input products.
    output_products = products(
      by_sample.reshape(batch * num_tasks, outputs),
      other_by_sample.reshape(other_batch * num_tasks, outputs),
    )
    input_products = products(inputs[:, 0], other_inputs[:, 0])
    if info.use_bias:
      input_products = input_products + 1.0
    return (
      output_products.reshape(batch, num_tasks, other_batch, num_tasks)
      * input_products[:, None, :, None]
    )
  input_products = modes.einsum("bpk,cqk->bcpq", inputs, other_inputs)
  output_products = modes.einsum("btpn,csqn->btcspq", by_sample, other_by_sample)
  contribution = modes.einsum("bcpq,btcspq->btcs", input_products, output_products)
  if info.use_bias:
    bias = products(
      jnp.sum(by_sample, axis=2).reshape(batch * num_tasks, outputs),
      jnp.sum(other_by_sample, axis=2).reshape(other_batch * num_tasks, outputs),
    )
    contribution = contribution + bias.reshape(batch, num_tasks, other_batch, num_tasks)
  return contribution


def fast_gramian_from_capture(
  captured: "Capture", rows: MaterialisedRows | None = None
) -> jax.Array:
  """The [B, T, B, T] Gramian assembled layer by layer from a `Capture`.

  Args:
    captured: the output of `capture`.
    rows: `materialised_rows(captured)` if already formed (it is then reused), else None.
  """
  if rows is None:
    rows = materialised_rows(captured)
  batch, num_tasks = captured.losses.shape
  materialised = {path for path, _, _ in rows.segments}
  total = None
  if rows.matrix is not None:
    flat = rows.matrix.reshape(batch * num_tasks, -1)
    total = gram(flat).reshape(batch, num_tasks, batch, num_tasks)
  for path, info in captured.infos.items():
    if path in materialised:
      continue
    contribution = ghost_contribution(info, captured.inputs[path], captured.output_gradients[path])
    total = contribution if total is None else total + contribution
  return total


def _layer_parameter_gradients(info: LayerInfo, inputs: jax.Array, output_gradient: jax.Array):
  """Gradients of a layer's parameters for one output cotangent [B, ...], as a params dict."""
  channels_axes = tuple(range(output_gradient.ndim - 1))
  if info.kind == "affine":
    return {
      "scale": jnp.sum(output_gradient * inputs, axis=channels_axes),
      "bias": jnp.sum(output_gradient, axis=channels_axes),
    }
  if info.kind == "dense":
    kernel = modes.einsum("...k,...n->kn", inputs, output_gradient)
  else:

    def convolve(kernel):
      return jax.lax.conv_general_dilated(
        inputs,
        kernel,
        window_strides=info.strides,
        padding="SAME",
        rhs_dilation=info.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )

    kernel_shape = (*info.kernel_size, inputs.shape[-1], output_gradient.shape[-1])
    _, conv_vjp = jax.vjp(convolve, jnp.zeros(kernel_shape, inputs.dtype))
    (kernel,) = conv_vjp(output_gradient)
  gradients = {"kernel": kernel}
  if info.use_bias:
    gradients["bias"] = jnp.sum(output_gradient, axis=channels_axes)
  return gradients


def unpack_layer(info: LayerInfo, vector: jax.Array, node: Mapping[str, jax.Array]) -> dict:
  """A layer's params dict from its F-slice of a (weighted) materialised row; see `layer_rows`."""
  if info.kind == "affine":
    channels = vector.shape[0] // 2
    return {"scale": vector[:channels], "bias": vector[channels:]}
  kernel_shape = node["kernel"].shape
  inputs, outputs = int(np.prod(kernel_shape[:-1])), kernel_shape[-1]
  kernel = vector[: inputs * outputs].reshape(outputs, inputs).T.reshape(kernel_shape)
  gradients = {"kernel": kernel}
  if info.use_bias:
    gradients["bias"] = vector[inputs * outputs :]
  return gradients


def weighted_gradients(
  captured: "Capture", params: Any, weights: jax.Array, rows: MaterialisedRows | None = None
) -> Any:
  """Gradient of sum_{i,t} weights[i, t] L_t(x_i) w.r.t. all params, from a `Capture`.

  No further backward pass: every encoder layer's gradient is either the weighted sum of its
  materialised per-row gradients (when `rows` holds them: one matrix-vector product) or its
  input contracted with the weighted sum of the captured per-row output gradients, and heads
  are scaled per task.

  Args:
    captured: the output of `capture`.
    params: the parameters the capture was taken at (for the tree structure).
    weights: [B, T] row weights, or [T] task weights of the batch-MEAN losses (then each row
      gets weights[t] / B).
    rows: `materialised_rows(captured)` to reuse, or None (every layer then takes the second
      route, which forms no per-row gradients).

  Returns:
    A pytree like `params`.
  """
  batch, num_tasks = captured.losses.shape
  per_task = weights.ndim == 1
  if per_task:
    weights = jnp.broadcast_to(weights[None, :] / batch, (batch, num_tasks))
  weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
  encoder = _unfreeze(jax.tree_util.tree_map(jnp.zeros_like, params["encoder"]))

  def node_of(path):
    node = encoder
    for key in path[1:]:
      node = node[key]
    return node

  done = set()
  if rows is not None and rows.matrix is not None:
    vector = modes.einsum("bt,btf->f", weights, rows.matrix)
    for path, offset, width in rows.segments:
      node = node_of(path)
      node.update(unpack_layer(captured.infos[path], vector[offset : offset + width], node))
      done.add(path)
  for path, info in captured.infos.items():
    if path in done:
      continue
    gradient = captured.output_gradients[path]
    scale = weights.T.reshape(num_tasks, batch, *([1] * (gradient.ndim - 2)))
    combined = jnp.sum(gradient * scale, axis=0)
    node_of(path).update(_layer_parameter_gradients(info, captured.inputs[path], combined))
  heads = {}
  for index, task_name in enumerate(captured.head_gradients):
    column = weights[:, index]
    if per_task:
      # Constant weight over samples: the already computed gradient of sum_i L_t(x_i), scaled.
      heads[task_name] = jax.tree_util.tree_map(
        lambda leaf, scale=column[0]: leaf * scale, captured.head_gradients[task_name]
      )
    else:
      (heads[task_name], _) = captured.head_vjps[task_name](column)
  return {**params, "encoder": encoder, "heads": heads}


def _unfreeze(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {key: _unfreeze(value) for key, value in tree.items()}
  return tree
