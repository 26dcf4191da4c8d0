"""The Gramian engine: inner products of per-sample, per-task gradients of the shared encoder.

Rows are (sample i, task t) and the gradient of row (i, t) is the gradient of the per-sample loss
L_t(x_i) with respect to the encoder parameters `params['encoder']` (heads are task-specific and
never enter a Gramian). `compute_gramian` returns G[i, t, j, s] = <g_{i,t}, g_{j,s}>, shape
[B, T, B, T], float32; the reductions (`task_gramian`, `sample_gramian`, `row_norms`,
`rows_gramian`) give the coarser objects the weighting methods and conflict statistics use.

Two paths compute the same G:

* 'reference': `jax.vmap` over samples of `jax.jacrev` over tasks (vmap(grad)), flattened, then
  J Jᵀ. Exact and simple; memory B·T·P. The ground truth in the tests.
* 'fast' (ghost): one forward pass captures every encoder layer's input, one backward per task
  (`stacked_vjp`) gives every layer's output gradient d_{i,t} for all samples at once, and each
  layer's contribution to G is assembled from those, never materialising the B·T·P Jacobian:
  - Dense (S = 1 position): <g_i, g_j> = (<a_i, a_j> + 1{bias}) <d_i, d_j>.
  - Conv, or Dense over positions: either the "ghost" form sum_{p,q} <a_ip, a_jq><d_ip, d_jq>,
    costing B²S², or that layer's per-row gradient [B·T, k·k·Cin·Cout] materialised from the
    input patches; `layer_strategy` picks the cheaper from static shapes.
  - Affine (a norm's scale and shift): per-row gradients are only 2C numbers, materialised.
  The materialised layers' per-row gradients sit side by side in one [B·T, F] matrix
  (`materialised_rows`): one matmul gives their share of G, and a weighted sum of its rows gives
  their share of any weighted gradient (`weighted_gradients`), so a training step pays for
  them once. Layers are captured with a Flax method interceptor (`nn.intercept_methods`): `sow` stores each
  encoder `layers.Dense`/`Conv`/`Affine` input and `perturb` adds a zero to its output, whose
  gradient is the output gradient. Without the interceptor the model runs untouched, so ordinary
  training pays nothing.

Batch normalisation in training mode makes a sample's loss depend on the other samples through
the batch statistics, so "the gradient of sample i" needs a definition. `batch_norm` chooses:

* 'error' (default): models with batch norm raise a ValueError that explains the choices.
* 'eval': every per-sample loss uses the running statistics (the model in evaluation mode);
  samples are then independent and both paths compute the exact per-sample gradients of that
  model.
* 'batch_statistics' (reference path only): L_t(x_i) is the per-sample loss of the model in
  training mode, with the batch's statistics; its gradient is the full derivative, including the
  dependence of the shared statistics on every sample's activations (a row of the Jacobian of the
  [B, T] loss matrix). Rows still sum to the batch gradient, but row (i, t) is not the gradient
  of any single-sample model. The fast path cannot compute it (its output gradients are only
  per-sample when samples are independent) and raises.

Group, layer and no normalisation keep samples independent and work on both paths. All public
functions are jit-able when `model` and `tasks` are closed over (or static).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.models import layers

PATHS = ("reference", "fast")
BATCH_NORM_MODES = ("error", "eval", "batch_statistics")
LEVELS = ("task", "sample", "sample_task")
STRATEGIES = ("ghost", "materialise")

_HIGHEST = jax.lax.Precision.HIGHEST
_INPUTS = "gramian_inputs"
_PERTURBATIONS = "gramian_output_perturbations"

Batch = Mapping[str, jax.Array]


def _einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
  """float32 einsum at full precision: Gramian entries are differences of large products."""
  return jnp.einsum(
      subscripts, *operands, precision=_HIGHEST, preferred_element_type=jnp.float32
  )


# ----------------------------------------------------------------------------------------------
# Modes, losses and validation.


def _has_batch_norm(batch_stats: Any) -> bool:
  return bool(jax.tree_util.tree_leaves(batch_stats))


def _check_choice(value: str, valid: Sequence[str], what: str) -> str:
  if value not in valid:
    raise ValueError(f"Unknown {what} {value!r}; valid choices: {', '.join(valid)}.")
  return value


def _resolve_mode(batch_stats: Any, path: str, batch_norm: str) -> tuple[bool, bool]:
  """(train, coupled): the model mode used for per-sample losses and whether samples interact."""
  _check_choice(path, PATHS, "Gramian path")
  _check_choice(batch_norm, BATCH_NORM_MODES, "batch_norm mode")
  if not _has_batch_norm(batch_stats):
    return True, False
  if batch_norm == "error":
    raise ValueError(
        "The model uses batch normalisation, which couples the samples of a batch: in training "
        "mode a per-sample gradient is not the gradient of the model applied to that sample "
        "alone. Pass batch_norm='eval' for exact per-sample gradients of the model with its "
        "running statistics, batch_norm='batch_statistics' (reference path only) for the rows "
        "of the Jacobian of the training-mode [B, T] loss matrix, or use norm='group', 'layer' "
        "or 'none'. The task-level Gramian of batch-mean losses is well defined under batch "
        "norm: use task_level_gramian."
    )
  if batch_norm == "eval":
    return False, False
  if path == "fast":
    raise ValueError(
        "batch_norm='batch_statistics' is only available on the 'reference' path: the fast "
        "path's output gradients are per-sample only when samples are independent, and under "
        "training-mode batch norm each sample's loss depends on every sample's activations. "
        "Use path='reference', or batch_norm='eval'."
    )
  return True, True


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  variables = {"params": params}
  if _has_batch_norm(batch_stats):
    variables["batch_stats"] = batch_stats
  return variables


def _predict(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array, train: bool):
  """Predictions of the model; training-mode batch-stat updates are discarded."""
  variables = _variables(params, batch_stats)
  if train and "batch_stats" in variables:
    predictions, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return predictions
  return model.apply(variables, images, train=train)


def per_sample_losses(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    batch: Batch,
    tasks: Sequence[tasks_lib.Task],
    train: bool = True,
) -> jax.Array:
  """Every task's per-sample losses.

  Args:
    model: a `MultiTaskModel`.
    params: its parameters {'encoder': ..., 'heads': ...}.
    batch_stats: its batch-norm statistics ({} without batch norm).
    batch: the batch dict; `batch['image']` is [B, H, W, 3].
    tasks: the tasks, in column order.
    train: training mode (batch norm uses the batch's statistics) or evaluation mode.

  Returns:
    float32 [B, T].
  """
  predictions = _predict(model, params, batch_stats, batch["image"], train)
  return tasks_lib.losses_matrix(tasks, predictions, batch)


def apply_head(model: nn.Module, task_name: str, head_params: Any, batch_stats: Any, features: jax.Array,
               train: bool) -> tuple[jax.Array, Any]:
  """One task's head on shared features: (prediction, the head's batch-norm statistics or None).

  Heads with batch norm (DeepLab's ASPP head) read their statistics from
  batch_stats['heads'][task_name]; in training mode the returned statistics are updated from
  this batch, as the full model's apply would update them. Heads without return None.
  """
  head = model.heads[task_name]
  stats = _head_stats(batch_stats, task_name)
  if stats is None:
    return head.apply({"params": head_params}, features, train=train), None
  variables = {"params": head_params, "batch_stats": stats}
  if train:
    prediction, updates = head.apply(variables, features, train=True, mutable=["batch_stats"])
    return prediction, updates["batch_stats"]
  return head.apply(variables, features, train=False), stats


def _head_stats(batch_stats: Any, task_name: str) -> Any:
  if not batch_stats or "heads" not in batch_stats:
    return None
  stats = batch_stats["heads"].get(task_name)
  return stats if stats else None


def with_head_stats(batch_stats: Any, head_stats: Mapping[str, Any]) -> Any:
  """batch_stats with the heads' entries replaced by `head_stats` ({task: stats}; None skipped)."""
  head_stats = {name: stats for name, stats in head_stats.items() if stats is not None}
  if not head_stats:
    return batch_stats
  return {**batch_stats, "heads": {**batch_stats["heads"], **head_stats}}


def _flatten_rows(tree: Any, leading: int) -> jax.Array:
  """Concatenates a pytree's leaves, keeping `leading` axes: [..., P] in tree_leaves order."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.concatenate(
      [leaf.reshape(*leaf.shape[:leading], -1).astype(jnp.float32) for leaf in leaves], axis=-1
  )


# ----------------------------------------------------------------------------------------------
# Reference path: vmap(grad), materialised.


def stacked_vjp(pullback: Callable, cotangents: Any, unroll_limit: int = 16) -> Any:
  """`pullback` applied to each cotangent along the leading axis, results stacked.

  One VJP per cotangent, deliberately not `vmap`/`jacrev`: on XLA CPU (jax 0.10.2) a VJP
  vmapped over cotangents with a shared primal returned wrong gradients (measured: 125%
  relative error on a task Gramian of a small CNN; 59% already for the feature gradients of its
  three dense conv heads alone; disabling XLA's CSE pass made them exact), while one VJP per
  cotangent is exact (tests/test_gramian.py pins this against eager per-task gradients).

  A second fault of the same shape: XLA:CPU hands reductions to YNNPACK ("__ynn_fusion", the
  dot-library-rewriter pass), and in a fusion of two sibling minor-axis reductions, one of them
  of a product with an operand broadcast along the leading axis, the leading axis is cut into
  tiles of about 128 KiB of input and every tile after the first gets the first tile's product
  reduction (row t gets row t mod k's). A vmapped layer norm backward is that pattern (the
  cotangent axis leads; the primal's statistics are broadcast along it), which made the fast
  Gramian of a layer-normalised SegNet wrong by 2-4 relative. The same program compiled without
  YNNPACK reduce fusions is exact (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
  individual_convolution, or the jit compiler option xla_cpu_experimental_ynn_fusion_type='');
  tests/test_xla_cpu_faults.py records the fault and pins this workaround.

  Up to `unroll_limit` rows are unrolled, which measured 4-5x faster than `lax.map` (a loop XLA
  optimises less); longer stacks use `lax.map` to bound compile time.
  """
  count = jax.tree_util.tree_leaves(cotangents)[0].shape[0]
  if count > unroll_limit:
    return jax.lax.map(pullback, cotangents)
  results = [pullback(jax.tree_util.tree_map(lambda leaf, index=index: leaf[index], cotangents))
             for index in range(count)]
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *results)


def jacobian_rows(function: Callable, primal: Any) -> Any:
  """Jacobian of a function with a small output, row by row through `stacked_vjp`.

  Returns the pytree of `primal`'s structure with the output's shape as leading axes.
  """
  outputs, pullback = jax.vjp(function, primal)
  size = int(np.prod(outputs.shape))
  basis = jnp.eye(size, dtype=outputs.dtype).reshape((size, *outputs.shape))
  (rows,) = stacked_vjp(pullback, basis)
  return jax.tree_util.tree_map(lambda leaf: leaf.reshape((*outputs.shape, *leaf.shape[1:])), rows)


def _reference_jacobian(model, params, batch_stats, batch, tasks, train, coupled, rows=None):
  """Flattened encoder gradients of rows (i, t): [B, T, P], or [n_s, n_t, P] for `rows`.

  `rows` = (sample_indices, task_indices) restricts the computation to those rows.
  """
  sample_indices, task_indices = rows if rows is not None else (None, None)

  def losses_of(encoder_params, sub_batch):
    full = {**params, "encoder": encoder_params}
    return per_sample_losses(model, full, batch_stats, sub_batch, tasks, train)

  if coupled:
    # Every row depends on the whole batch: the Jacobian of the [B, T] matrix, row by row.
    def selected(encoder_params):
      losses = losses_of(encoder_params, batch)
      if sample_indices is not None:
        losses = losses[np.asarray(sample_indices)][:, np.asarray(task_indices)]
      return losses

    jacobian = jacobian_rows(selected, params["encoder"])
    return _flatten_rows(jacobian, 2)

  if sample_indices is not None:
    batch = jax.tree_util.tree_map(lambda leaf: leaf[np.asarray(sample_indices)], batch)

  def sample_losses(encoder_params, sample):
    losses = losses_of(encoder_params, jax.tree_util.tree_map(lambda leaf: leaf[None], sample))[0]
    return losses if task_indices is None else losses[np.asarray(task_indices)]

  jacobian = jax.vmap(jax.jacrev(sample_losses), in_axes=(None, 0))(params["encoder"], batch)
  return _flatten_rows(jacobian, 2)


def per_sample_gradients(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    batch: Batch,
    tasks: Sequence[tasks_lib.Task],
    sample_indices: Sequence[int],
    task_indices: Sequence[int],
    batch_norm: str = "error",
) -> jax.Array:
  """Materialised, flattened encoder gradients of chosen rows, for coordinate statistics.

  Args:
    model, params, batch_stats, batch, tasks: as in `compute_gramian`.
    sample_indices: which samples (static ints).
    task_indices: which tasks, as column indices into `tasks` (static ints).
    batch_norm: see the module docstring; 'batch_statistics' keeps the whole batch in the
      computation (the rows of the training-mode Jacobian).

  Returns:
    float32 [n_s, n_t, P]; the parameter axis follows `jax.tree_util.tree_leaves(params['encoder'])`
    order, each leaf flattened in row-major order.
  """
  train, coupled = _resolve_mode(batch_stats, "reference", batch_norm)
  rows = (tuple(int(i) for i in sample_indices), tuple(int(t) for t in task_indices))
  return _reference_jacobian(model, params, batch_stats, batch, tasks, train, coupled, rows)


# ----------------------------------------------------------------------------------------------
# Fast path: capture layer inputs and output gradients.


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """What the fast path needs to know about one captured encoder layer (static)."""

  kind: str  # 'dense', 'conv' or 'affine'.
  use_bias: bool = True
  kernel_size: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  dilation: tuple[int, ...] = ()


def _layer_info(module: nn.Module) -> LayerInfo:
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
    registry[module.path] = _layer_info(module)
    module.sow(_INPUTS, "inputs", args[0])
    return module.perturb("outputs", next_fun(*args, **kwargs), collection=_PERTURBATIONS)

  return interceptor


def _by_path(tree: Mapping[str, Any], suffix: str) -> dict[tuple[str, ...], Any]:
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
  passes go through `stacked_vjp`, one pullback per task, not `jax.vmap` over the pullback: on
  XLA:CPU (jaxlib 0.10.2) the vmapped pullback of a layer-normalised SegNet returned wrong
  output gradients for the third and later tasks (see `stacked_vjp` for the compiler fault).
  """
  registry: dict[tuple[str, ...], LayerInfo] = {}
  images = batch["image"]
  variables = _variables(params, batch_stats)

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
      prediction, _ = apply_head(model, task.name, head_params, batch_stats, features, train)
      return task.loss(prediction, batch)

    losses, head_vjp = jax.vjp(task_losses, params["heads"][task.name], features)
    head_gradient, feature_gradient = head_vjp(jnp.ones_like(losses))
    columns.append(losses)
    head_gradients[task.name] = head_gradient
    head_vjps[task.name] = head_vjp
    feature_gradients.append(feature_gradient)

  (perturbation_gradients,) = stacked_vjp(encoder_vjp, jnp.stack(feature_gradients))
  inputs = {path: value[0] for path, value in _by_path(sown, "inputs").items()}
  output_gradients = _by_path(perturbation_gradients, "outputs")
  infos = dict(registry)
  _check_coverage(params["encoder"], infos)
  return Capture(
      jnp.stack(columns, axis=1), inputs, output_gradients, infos, head_gradients, head_vjps
  )


def _check_coverage(encoder_params: Any, infos: Mapping[tuple[str, ...], LayerInfo]) -> None:
  """Raises unless every encoder parameter belongs to a captured layer."""
  parameter_paths = set(_by_path(encoder_params, "kernel")) | set(_by_path(encoder_params, "scale"))
  bias_paths = set(_by_path(encoder_params, "bias"))
  captured = {path[1:] for path in infos}
  missing = sorted((parameter_paths | bias_paths) - captured)
  if missing:
    raise ValueError(
        "The fast Gramian path sees only layers.Dense, layers.Conv and layers.Affine; these "
        f"encoder parameters belong to other modules: {', '.join('/'.join(p) for p in missing)}. "
        "Build the encoder from mtl_jax.models.layers, or use path='reference'."
    )


def _conv_patches(inputs: jax.Array, info: LayerInfo) -> jax.Array:
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
    limits = [start + (count - 1) * stride + 1 for start, count, stride in zip(starts, outputs, info.strides)]
    windows.append(jax.lax.slice(padded, (0, *starts, 0), (batch, *limits, channels), (1, *info.strides, 1)))
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


# Row counts from which `_gram` computes only the upper blocks of the symmetric Gramian: below
# it the extra slices and dots cost more than the third of the flops they save.
_SYMMETRIC_MIN_ROWS = 96


def _gram(rows: jax.Array) -> jax.Array:
  """rows rowsᵀ for rows [R, F]; for large R, 6 of 9 blocks are computed and 3 mirrored."""
  count = rows.shape[0]
  if count < _SYMMETRIC_MIN_ROWS:
    return _einsum("rf,sf->rs", rows, rows)
  bounds = [count * part // 3 for part in range(4)]
  chunks = [rows[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
  blocks = {(i, j): _einsum("rf,sf->rs", chunks[i], chunks[j]) for i in range(3) for j in range(i, 3)}
  return jnp.block([[blocks[i, j] if i <= j else blocks[j, i].T for j in range(3)] for i in range(3)])


def _positional(info: LayerInfo, inputs: jax.Array, output_gradients: jax.Array):
  """(inputs [B, S, K], output gradients [T, B, S, N]) of a dense or conv layer."""
  num_tasks, batch = output_gradients.shape[:2]
  if info.kind == "conv":
    inputs = _conv_patches(inputs, info)
  inputs = inputs.reshape(batch, -1, inputs.shape[-1])
  return inputs, output_gradients.reshape(num_tasks, batch, inputs.shape[1], -1)


def _is_materialised(info: LayerInfo, inputs: jax.Array, output_gradients: jax.Array,
                     total_batch: int | None = None) -> bool:
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


def _layer_rows(info: LayerInfo, inputs: jax.Array, output_gradients: jax.Array) -> jax.Array:
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
  by_sample = jnp.transpose(output_gradients, (1, 2, 0, 3)).reshape(batch, positions, num_tasks * outputs)
  kernel = _einsum("bpn,bpk->bnk", by_sample, inputs).reshape(batch, num_tasks, -1)
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
    if not _is_materialised(info, inputs, gradients, total_batch):
      continue
    block = _layer_rows(info, inputs, gradients)
    blocks.append(block)
    segments.append((path, offset, block.shape[-1]))
    offset += block.shape[-1]
  if not blocks:
    return MaterialisedRows(None, ())
  return MaterialisedRows(jnp.concatenate(blocks, axis=-1), tuple(segments))


def _ghost_contribution(info: LayerInfo, inputs: jax.Array, output_gradients: jax.Array,
                        other_inputs: jax.Array | None = None, other_gradients: jax.Array | None = None):
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
    return _gram(left) if symmetric else _einsum("rf,sf->rs", left, right)

  num_tasks, batch, positions, outputs = output_gradients.shape
  other_batch = other_gradients.shape[1]
  by_sample = jnp.transpose(output_gradients, (1, 0, 2, 3))  # [B, T, S, N]
  other_by_sample = jnp.transpose(other_gradients, (1, 0, 2, 3))
  if positions == 1:
    # The textbook ghost form: the kernel gradient d aᵀ factorises, and a bias adds
    # <d_i, d_j> (its gradient is d), so the bias folds in as a +1 on the input products.
    output_products = products(by_sample.reshape(batch * num_tasks, outputs),
                               other_by_sample.reshape(other_batch * num_tasks, outputs))
    input_products = products(inputs[:, 0], other_inputs[:, 0])
    if info.use_bias:
      input_products = input_products + 1.0
    return output_products.reshape(batch, num_tasks, other_batch, num_tasks) * input_products[:, None, :, None]
  input_products = _einsum("bpk,cqk->bcpq", inputs, other_inputs)
  output_products = _einsum("btpn,csqn->btcspq", by_sample, other_by_sample)
  contribution = _einsum("bcpq,btcspq->btcs", input_products, output_products)
  if info.use_bias:
    bias = products(jnp.sum(by_sample, axis=2).reshape(batch * num_tasks, outputs),
                    jnp.sum(other_by_sample, axis=2).reshape(other_batch * num_tasks, outputs))
    contribution = contribution + bias.reshape(batch, num_tasks, other_batch, num_tasks)
  return contribution


def fast_gramian_from_capture(captured: "Capture", rows: MaterialisedRows | None = None) -> jax.Array:
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
    total = _gram(flat).reshape(batch, num_tasks, batch, num_tasks)
  for path, info in captured.infos.items():
    if path in materialised:
      continue
    contribution = _ghost_contribution(info, captured.inputs[path], captured.output_gradients[path])
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
    kernel = _einsum("...k,...n->kn", inputs, output_gradient)
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


def _unpack_layer(info: LayerInfo, vector: jax.Array, node: Mapping[str, jax.Array]) -> dict:
  """A layer's params dict from its F-slice of a (weighted) materialised row; see `_layer_rows`."""
  if info.kind == "affine":
    channels = vector.shape[0] // 2
    return {"scale": vector[:channels], "bias": vector[channels:]}
  kernel_shape = node["kernel"].shape
  inputs, outputs = int(np.prod(kernel_shape[:-1])), kernel_shape[-1]
  kernel = vector[: inputs * outputs].reshape(outputs, inputs).T.reshape(kernel_shape)
  gradients = {"kernel": kernel}
  if info.use_bias:
    gradients["bias"] = vector[inputs * outputs:]
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
    vector = _einsum("bt,btf->f", weights, rows.matrix)
    for path, offset, width in rows.segments:
      node = node_of(path)
      node.update(_unpack_layer(captured.infos[path], vector[offset:offset + width], node))
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


# ----------------------------------------------------------------------------------------------
# Public API.


def compute_gramian(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    batch: Batch,
    tasks: Sequence[tasks_lib.Task],
    path: str = "fast",
    batch_norm: str = "error",
) -> jax.Array:
  """The Gramian of per-sample, per-task encoder gradients.

  Args:
    model: a `MultiTaskModel` whose encoder is built from `mtl_jax.models.layers`.
    params: {'encoder': ..., 'heads': {task: ...}}.
    batch_stats: batch-norm statistics ({} without batch norm).
    batch: the batch dict, 'image' [B, H, W, 3] plus the tasks' targets.
    tasks: the T tasks, in row order.
    path: 'fast' (ghost, no B·T·P memory) or 'reference' (vmap(grad), materialised).
    batch_norm: 'error', 'eval' or 'batch_statistics'; see the module docstring.

  Returns:
    float32 [B, T, B, T]: G[i, t, j, s] = <grad L_t(x_i), grad L_s(x_j)> over encoder params.

  Raises:
    ValueError: unknown path/mode, or a batch-norm model with a mode the path cannot compute.
  """
  train, coupled = _resolve_mode(batch_stats, path, batch_norm)
  if path == "reference":
    jacobian = _reference_jacobian(model, params, batch_stats, batch, tasks, train, coupled)
    return _einsum("itp,jsp->itjs", jacobian, jacobian)
  return fast_gramian_from_capture(capture(model, params, batch_stats, batch, tasks, train))


class LossGradsGramian(NamedTuple):
  """What `loss_grads_and_gramian` returns.

  Attributes:
    loss: the training loss, sum_t weights_t · mean_i L_t(x_i) (equal weights by default).
    task_losses: [T] batch-mean task losses.
    losses: [B, T] per-sample losses.
    grads: gradient of `loss` w.r.t. all params (encoder and heads).
    gramian: [B, T, B, T] float32, or None when not asked for.
    batch_stats: updated batch-norm statistics (changed only by a training-mode forward).
  """

  loss: jax.Array
  task_losses: jax.Array
  losses: jax.Array
  grads: Any
  gramian: jax.Array | None
  batch_stats: Any


def loss_grads_and_gramian(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    batch: Batch,
    tasks: Sequence[tasks_lib.Task],
    path: str = "fast",
    batch_norm: str = "error",
    with_gramian: bool = True,
    weights_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> LossGradsGramian:
  """Training loss, its gradients and (optionally) the Gramian, from one jit-able function.

  On the fast path all three come from one forward pass and T encoder backward passes: the
  gradients are assembled from the same captured layer inputs and output gradients as the
  Gramian (see `weighted_gradients`), so no extra backward is spent on the training gradient.

  Args:
    model, params, batch_stats, batch, tasks, path, batch_norm: as in `compute_gramian`.
    with_gramian: False returns gramian=None after an ordinary training-mode step (any norm).
    weights_fn: optional `(gramian, losses [B, T]) -> weights`, [T] weights of the batch-mean
      task losses or [B, T] weights of the per-sample losses (divided by nothing: the loss is
      sum_{i,t} w_it L_t(x_i)); treated as constants. None means equal weights 1 per task.

  Returns:
    A `LossGradsGramian`.
  """
  if not with_gramian:
    if weights_fn is not None:
      raise ValueError("weights_fn needs the Gramian; pass with_gramian=True.")
    return _plain_step(model, params, batch_stats, batch, tasks)
  train, coupled = _resolve_mode(batch_stats, path, batch_norm)
  if path == "fast":
    captured = capture(model, params, batch_stats, batch, tasks, train)
    rows = materialised_rows(captured)
    gramian = fast_gramian_from_capture(captured, rows)
    weights = _weights(weights_fn, gramian, captured.losses)
    grads = weighted_gradients(captured, params, weights, rows)
    return _result(captured.losses, weights, grads, gramian, batch_stats)

  gramian = compute_gramian(model, params, batch_stats, batch, tasks, path, batch_norm)

  def losses_and_stats(all_params):
    variables = _variables(all_params, batch_stats)
    if train and "batch_stats" in variables:
      predictions, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
      new_stats = updates["batch_stats"]
    else:
      predictions, new_stats = model.apply(variables, batch["image"], train=train), batch_stats
    return tasks_lib.losses_matrix(tasks, predictions, batch), new_stats

  losses, losses_vjp, new_stats = jax.vjp(losses_and_stats, params, has_aux=True)
  weights = _weights(weights_fn, gramian, losses)
  (grads,) = losses_vjp(_row_weights(weights, losses.shape[0]))
  return _result(losses, weights, grads, gramian, new_stats)


def _weights(weights_fn, gramian, losses):
  if weights_fn is None:
    return jnp.ones((losses.shape[1],), jnp.float32)
  weights = jax.lax.stop_gradient(weights_fn(gramian, losses))
  if weights.shape not in ((losses.shape[1],), tuple(losses.shape)):
    raise ValueError(
        f"weights_fn must return [T] = {(losses.shape[1],)} or [B, T] = {tuple(losses.shape)} "
        f"weights; got shape {tuple(weights.shape)}."
    )
  return weights


def _row_weights(weights: jax.Array, batch: int) -> jax.Array:
  """[B, T] per-row weights from [T] weights of batch-mean losses or [B, T] row weights."""
  if weights.ndim == 1:
    return jnp.broadcast_to(weights[None, :] / batch, (batch, weights.shape[0]))
  return weights


def _result(losses, weights, grads, gramian, batch_stats) -> LossGradsGramian:
  loss = jnp.sum(_row_weights(weights, losses.shape[0]) * losses)
  return LossGradsGramian(loss, jnp.mean(losses, axis=0), losses, grads, gramian, batch_stats)


def _plain_step(model, params, batch_stats, batch, tasks) -> LossGradsGramian:
  """The equal-weight training loss and its gradients in training mode, without a Gramian."""

  def loss_fn(all_params):
    variables = _variables(all_params, batch_stats)
    if "batch_stats" in variables:
      predictions, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
      new_stats = updates["batch_stats"]
    else:
      predictions, new_stats = model.apply(variables, batch["image"], train=True), batch_stats
    losses = tasks_lib.losses_matrix(tasks, predictions, batch)
    return jnp.sum(jnp.mean(losses, axis=0)), (losses, new_stats)

  (loss, (losses, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return LossGradsGramian(loss, jnp.mean(losses, axis=0), losses, grads, None, new_stats)


class TaskGradients(NamedTuple):
  """Per-task gradients of the batch-mean task losses (see `task_gradients`).

  Attributes:
    losses: [T] batch-mean task losses L_t.
    encoder: a pytree like `params['encoder']` whose leaves have a leading [T] axis: row t is
      the gradient of L_t with respect to the encoder.
    heads: {task: gradient of L_t with respect to that task's head} (no other loss reaches it).
    batch_stats: batch-norm statistics updated by the training-mode forward ({} without).
  """

  losses: jax.Array
  encoder: Any
  heads: dict
  batch_stats: Any


def task_gradients(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    batch: Batch,
    tasks: Sequence[tasks_lib.Task],
) -> TaskGradients:
  """Every task's gradient of its batch-mean loss, from one forward and T backward passes.

  The model runs in training mode (batch-mean losses are well defined under training-mode batch
  norm: they are what training minimises). After one encoder forward, each head's VJP gives
  that head's gradient and the task's feature cotangent, and the encoder pullback is applied
  to the T cotangents one at a time (`stacked_vjp`, which is exact where a vmapped VJP was not).
  This is everything a task-level gradient method needs: the Gramian is rows rowsᵀ and any
  combination Σ_t w_t rows_t is the weighted encoder gradient, with no second backward pass.

  Args:
    model, params, batch_stats, batch, tasks: as in `compute_gramian`.

  Returns:
    A `TaskGradients`.
  """

  def encode(encoder_params):
    return encode_train(model, {**params, "encoder": encoder_params}, batch_stats, batch["image"])

  features, pullback, new_stats = jax.vjp(encode, params["encoder"], has_aux=True)
  losses, heads, feature_gradients, head_stats = [], {}, [], {}
  for task in tasks:

    def task_loss(head_params, features, task=task):
      prediction, stats = apply_head(model, task.name, head_params, batch_stats, features, True)
      return jnp.mean(task.loss(prediction, batch)), stats

    loss, head_vjp, head_stats[task.name] = jax.vjp(task_loss, params["heads"][task.name], features, has_aux=True)
    heads[task.name], feature_gradient = head_vjp(jnp.ones_like(loss))
    losses.append(loss)
    feature_gradients.append(feature_gradient)
  (encoder_rows,) = stacked_vjp(pullback, jnp.stack(feature_gradients))
  return TaskGradients(jnp.stack(losses), encoder_rows, heads, with_head_stats(new_stats, head_stats))


def encode_train(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array) -> tuple[jax.Array, Any]:
  """Training-mode encoder features and the batch-norm statistics this batch updates ({} without)."""
  variables = _variables(params, batch_stats)
  if "batch_stats" in variables:
    features, updates = model.apply(variables, images, True, method=model.encode, mutable=["batch_stats"])
    return features, updates["batch_stats"]
  return model.apply(variables, images, True, method=model.encode), batch_stats


def gramian_of_task_gradients(result: TaskGradients) -> jax.Array:
  """[T, T] Gramian of the encoder rows of a `task_gradients` result."""
  jacobian = _flatten_rows(result.encoder, 1)
  return _einsum("tp,sp->ts", jacobian, jacobian)


def task_level_gramian(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    batch: Batch,
    tasks: Sequence[tasks_lib.Task],
) -> tuple[jax.Array, jax.Array]:
  """T×T Gramian of the batch-mean task losses' encoder gradients, for every norm.

  The rows come from `task_gradients` (one training-mode forward, T backward passes, T·P
  memory), so this needs no `batch_norm` choice.

  Returns:
    (gramian [T, T] float32, task_losses [T]).
  """
  result = task_gradients(model, params, batch_stats, batch, tasks)
  return gramian_of_task_gradients(result), result.losses


def task_gramian(gramian: jax.Array) -> jax.Array:
  """[T, T] Gramian of the batch-mean task gradients: the mean over i, j of G[i, t, j, s]."""
  batch = gramian.shape[0]
  return jnp.sum(gramian, axis=(0, 2)) / (batch * batch)


def sample_gramian(gramian: jax.Array, task: int | None = None) -> jax.Array:
  """[B, B] Gramian of per-sample gradients: of one task, or (task=None) of sum_t L_t(x_i)."""
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


def rows_gramian(gramian: jax.Array, level: str) -> jax.Array:
  """The Gramian at one level of rows.

  Args:
    gramian: [B, T, B, T].
    level: 'task' (T×T of batch-mean task gradients), 'sample' (B×B of the per-sample gradients
      of the summed-over-tasks loss) or 'sample_task' ((B·T)×(B·T), row index i·T + t).

  Returns:
    [R, R].
  """
  _check_choice(level, LEVELS, "Gramian level")
  if level == "task":
    return task_gramian(gramian)
  if level == "sample":
    return sample_gramian(gramian)
  batch, num_tasks = gramian.shape[:2]
  return gramian.reshape(batch * num_tasks, batch * num_tasks)
