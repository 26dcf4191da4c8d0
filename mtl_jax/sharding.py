"""Data-parallel and multi-host training: the device mesh, state and batch placement, sharded Gramians.

One mesh axis, 'data', spans the devices (all of them by default, `config.sharding.data_axis_size`).
The batch is split along it; the train state is replicated, or with `config.sharding.fsdp` each
large parameter (and its optimizer moments) is split along its largest divisible dimension over
the same axis (ZeRO-3 style: XLA gathers a parameter where it is used and reduce-scatters its
gradient). On a multi-host TPU slice or GPU cluster every process runs the same program;
`initialize_distributed` connects them (`jax.distributed.initialize`, a no-op on one host), and
`shard_batch` assembles each host's slice of the batch into one global array with
`jax.make_array_from_process_local_data`.

Two ways to run a computation sharded:

* GSPMD (`shard_train_step`): the step function from `train.make_train_step(..., mesh=mesh)`,
  jitted with `in_shardings`/`out_shardings`; XLA inserts the gradient all-reduce (and, for
  batch norm, the all-reduce of the batch statistics, so results match one device exactly).
  The mesh axis is explicitly `AxisType.Auto`: `jax.make_mesh` defaults to Explicit axes, under
  which sharded `vmap(jacrev)` over a CNN raises a `ShardingTypeError`.
* `shard_map` (the Gramian functions below): each device runs the per-device program on its
  rows, and every cross-device transfer is written out. This is the path for per-sample
  gradients: GSPMD auto-sharding of `vmap(grad)` over conv kernels has been measured to give
  wrong per-sample gradients on emulated CPU devices (relative error ~0.9), while `shard_map`
  is exact. Inside `shard_map`, the gradient with respect to a replicated (device-invariant)
  input comes back already summed over devices, so a further `psum` would count it n times;
  the parameters are therefore first marked device-varying (`jax.lax.pcast(..., to='varying')`)
  and every sum over devices is an explicit `psum`.

How each kind of method runs in a sharded train step (tests/test_sharding.py checks every
method in tests/sharding_worker.METHOD_CASES against one device, two steps, to 1e-5 relative):

* loss weightings (EW, UW, DWA, FAMO's extra forward pass, ...) and the Jacobian methods
  (GradDrop's per-task feature gradients, AdaTask, MTL-IO): plain GSPMD; their per-task
  gradients are ordinary data-parallel gradients of batch means.
* Gramian methods at level 'task': `gramian.task_level_gramian` (T gradients of batch means)
  under GSPMD.
* Gramian methods at levels 'sample' and 'sample_task': the Gramian from
  `sharded_rows_gramian` (shard_map; only the level's Gramian is gathered), then one GSPMD
  backward of the weighted losses.
* At every level the weighting itself (solver, random draws, its state and the gradient of its
  own parameters) runs whole and identically on every device (`replicated_program`), never
  partitioned by GSPMD.

What crosses devices (n devices, B rows in all, b = B / n per device, T tasks, P encoder params):

* `sharded_task_gramian` (T×T Gramian of the batch-mean task gradients): each device computes the
  Jacobian of its rows' share of the T batch-mean losses, [T, P], and these are all-reduced
  (`psum`): T·P numbers, the same traffic as T ordinary data-parallel gradient all-reduces. The
  exact value needs the cross-device terms <g_a, g_b> for a ≠ b, which no device can form from
  its own small Gramian, so "only the small Gramian crosses devices" does not hold exactly
  here; it would be an approximation (dropping cross terms), which this module does not offer.
* `sharded_gramian` (the full [B, T, B, T] per-row Gramian): device a computes the block rows
  G[a's rows, :, all rows, :]. Per encoder layer it all-gathers what the other devices' rows
  need, whichever is smaller by the static `gramian.layer_strategy` choice: the captured layer
  inputs [B, ...] and output gradients [T, B, ...] (ghost form), or the per-row layer
  gradients [T, B, K·N] (materialised form). Then the [b, T, B, T] blocks are gathered:
  B²T² numbers. No [B·T, P] Jacobian is formed or sent for ghost-form layers.
* `sharded_rows_gramian` (the Gramian at level 'sample' or 'sample_task', what the train step
  uses): as `sharded_gramian` per layer, but each device reduces its block rows to the level
  before the gather: B² numbers at 'sample', B²T² at 'sample_task', plus a psum of T losses.
* `sharded_loss_grads_and_gramian` (a Gramian method's step): as `sharded_gramian`, plus the
  [B, T] losses gathered so every device computes the same weights from the same Gramian, then
  one `psum` of the weighted gradient (P numbers), as in ordinary data parallelism.

The `shard_map` paths need samples that are independent on each device: norms 'group',
'layer', 'none', or batch norm with batch_norm='eval' (running statistics). Training-mode batch
norm would use per-device batch statistics there; use the GSPMD path for it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_jax import config_validation
from mtl_jax import gramian as gramian_lib
from mtl_jax import tasks as tasks_lib

DATA_AXIS = "data"
DISTRIBUTED_MODES = ("auto", "on", "off")
# Parameters with fewer elements stay replicated under FSDP: splitting them saves little memory
# and costs a gather per use.
DEFAULT_FSDP_MIN_SIZE = 2**14


def _sharding_config(config: ml_collections.ConfigDict | None) -> Mapping[str, Any]:
  """config.sharding as a plain dict with defaults filled in, validated."""
  values = dict(data_axis_size=-1, fsdp=False, fsdp_min_size=DEFAULT_FSDP_MIN_SIZE, distributed="auto")
  if config is not None and "sharding" in config:
    values.update(config.sharding.to_dict())
  size = values["data_axis_size"]
  if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
    raise config_validation.ConfigError(
        f"config.sharding.data_axis_size: expected a positive integer or -1 (all devices), got {size!r}.")
  if values["distributed"] not in DISTRIBUTED_MODES:
    raise config_validation.ConfigError(
        f"config.sharding.distributed: unknown value {values['distributed']!r}; valid choices: "
        f"{', '.join(DISTRIBUTED_MODES)}.")
  return values


def _multi_host_environment() -> bool:
  """Whether environment variables describe a multi-process job (TPU pod slice, SLURM, coordinator)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([host for host in hosts.split(",") if host]) > 1:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed(config: ml_collections.ConfigDict | None = None) -> bool:
  """Connects the processes of a multi-host job; call before any other JAX use.

  `config.sharding.distributed`: 'on' always calls `jax.distributed.initialize()` (which reads
  the TPU, SLURM or JAX_COORDINATOR_ADDRESS environment), 'off' never does, and 'auto' does so
  when the environment names more than one host (so a single TPU VM or GPU box skips it).

  Returns:
    Whether `jax.distributed.initialize()` was called.
  """
  mode = _sharding_config(config)["distributed"]
  if mode == "off" or (mode == "auto" and not _multi_host_environment()):
    return False
  jax.distributed.initialize()
  return True


def make_mesh(config: ml_collections.ConfigDict | None = None, data_axis_size: int | None = None) -> jax.sharding.Mesh:
  """A one-axis ('data') mesh over the first `data_axis_size` devices (-1: all), axis type Auto.

  Args:
    config: an experiment config; its `sharding.data_axis_size` is used unless overridden.
    data_axis_size: devices on the 'data' axis; overrides the config.

  Raises:
    ConfigError: more devices asked for than exist.
  """
  size = _sharding_config(config)["data_axis_size"] if data_axis_size is None else int(data_axis_size)
  devices = jax.devices()
  size = len(devices) if size == -1 else size
  if size > len(devices) or (jax.process_count() > 1 and size != len(devices)):
    raise config_validation.ConfigError(
        f"config.sharding.data_axis_size: {size} devices asked for, {len(devices)} available "
        f"({jax.process_count()} process(es)); use -1 for all of them"
        + (" (multi-host runs must use every device)." if jax.process_count() > 1 else "."))
  return jax.make_mesh((size,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:size])


def data_size(mesh: jax.sharding.Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, key: str = "training.batch_size") -> None:
  """Raises a ConfigError unless batch_size splits evenly over the mesh's 'data' axis.

  The check is `config_validation`'s (one wording for every entry point), applied to this key.
  """
  probe = ml_collections.ConfigDict()
  section, name = key.split(".")
  probe[section] = ml_collections.ConfigDict({name: int(batch_size)})
  config_validation.validate_config(probe, device_count=data_size(mesh))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (example) axis split over 'data'; a pytree prefix for every leaf of a batch."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _fsdp_spec(shape: Sequence[int], devices: int, min_size: int) -> PartitionSpec:
  """Splits the largest dimension divisible by the device count; small or indivisible leaves stay whole."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  for dimension in sorted(range(len(shape)), key=lambda index: -shape[index]):
    if shape[dimension] % devices == 0:
      spec = [None] * len(shape)
      spec[dimension] = DATA_AXIS
      return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(state: Any, mesh: jax.sharding.Mesh, fsdp: bool = False,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """A pytree of NamedShardings like `state`: replicated, or FSDP-split large leaves.

  The rule depends only on a leaf's shape, so a parameter and its optimizer moments are split
  alike.
  """
  devices = data_size(mesh)

  def leaf_sharding(leaf):
    shape = np.shape(leaf)
    if not fsdp or not shape:
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(shape, devices, fsdp_min_size))

  return jax.tree_util.tree_map(leaf_sharding, state)


def place_state(state: Any, shardings: Any) -> Any:
  """Puts every leaf of state on the devices of its sharding (identical values on every host)."""
  if jax.process_count() == 1:
    return jax.device_put(state, shardings)
  # Every host holds the full value; each places the pieces its devices own.
  return jax.tree_util.tree_map(
      lambda leaf, sharding: jax.make_array_from_callback(np.shape(leaf), sharding, lambda index: np.asarray(leaf)[index]),
      state, shardings)


def host_slice(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's contiguous share of a global batch every host computed identically."""
  count, index = jax.process_count(), jax.process_index()
  return {key: value[len(value) // count * index: len(value) // count * (index + 1)] for key, value in batch.items()}


def shard_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh, process_local: bool | None = None) -> dict[str, jax.Array]:
  """A batch as global arrays split over 'data'.

  Args:
    batch: {key: [B, ...]}; the global batch on one host, or this host's rows when
      `process_local`.
    mesh: from `make_mesh`.
    process_local: whether batch holds only this process's rows (assembled into the global
      batch with `jax.make_array_from_process_local_data`); None means "when several
      processes run".

  Raises:
    ConfigError: the global batch size does not split over the 'data' axis.
  """
  process_local = jax.process_count() > 1 if process_local is None else process_local
  sizes = {len(value) for value in batch.values()}
  if len(sizes) != 1:
    raise ValueError(f"Batch arrays disagree on the batch size: { {k: len(v) for k, v in batch.items()} }.")
  local = sizes.pop()
  check_batch_size(local * (jax.process_count() if process_local else 1), mesh)
  sharding = batch_sharding(mesh)
  if not process_local:
    return jax.device_put(dict(batch), sharding)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}


def shard_train_step(step: Callable, mesh: jax.sharding.Mesh, shardings: Any) -> Callable:
  """Jits a `(state, batch) -> (state, metrics)` step for the mesh (GSPMD).

  Args:
    step: e.g. the function `train.make_train_step` returns (any weighting kind).
    mesh: from `make_mesh`.
    shardings: `state_shardings(state, mesh, ...)`; the new state keeps them.

  Returns:
    The jitted step; pass batches from `shard_batch`. Metrics come back replicated.
  """
  return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated(mesh)))


def shard_training(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, step: Callable,
                   state: Any) -> tuple[Callable, Any]:
  """The training loop's set-up: checks the batch size, places the state, jits the step for the mesh.

  Returns:
    (sharded step, placed state); restoring a checkpoint onto the placed state puts it on these
    shardings whatever device count it was saved with.
  """
  options = _sharding_config(config)
  check_batch_size(int(config.training.batch_size), mesh)
  shardings = state_shardings(state, mesh, fsdp=bool(options["fsdp"]), fsdp_min_size=int(options["fsdp_min_size"]))
  return shard_train_step(step, mesh, shardings), place_state(state, shardings)


def global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """A global batch every host computed identically (the data order is a function of seed and
  step), split over 'data': each host contributes only its own rows."""
  if jax.process_count() == 1:
    return shard_batch(batch, mesh, process_local=False)
  return shard_batch(host_slice(batch), mesh, process_local=True)


# ----------------------------------------------------------------------------------------------
# Gramians with shard_map.


def _gather(value: jax.Array, axis: int) -> jax.Array:
  return jax.lax.all_gather(value, DATA_AXIS, axis=axis, tiled=True)


def _varying(tree: Any) -> Any:
  """Identity: kept as the one place a future check_vma=True version would mark inputs varying."""
  return tree


def _gramian_rows(captured: gramian_lib.Capture, total_batch: int) -> jax.Array:
  """This device's block rows [b, T, B, T] of the Gramian from its local capture.

  Materialised layers (`gramian.materialised_rows`, chosen for the whole batch) send their
  per-row gradients [b, T, F]; ghost-form layers their inputs and output gradients.
  """
  rows = gramian_lib.materialised_rows(captured, total_batch)
  total = None
  if rows.matrix is not None:
    einsum = gramian_lib._einsum  # pylint: disable=protected-access
    total = einsum("btf,csf->btcs", rows.matrix, _gather(rows.matrix, 0))
  materialised = {path for path, _, _ in rows.segments}
  for path, info in captured.infos.items():
    if path in materialised:
      continue
    # This device's rows against every device's: the others' raw layer inputs (before patch
    # extraction, k·k times smaller) and output gradients are gathered.
    inputs, gradients = captured.inputs[path], captured.output_gradients[path]
    block = gramian_lib._ghost_contribution(  # pylint: disable=protected-access
        info, inputs, gradients, _gather(inputs, 0), _gather(gradients, 1))
    total = block if total is None else total + block
  return total


def _captured_rows(model, params, batch_stats, batch, tasks, train: bool, total_batch: int):
  """Inside shard_map: (params marked varying, this device's capture, its block rows [b, T, B, T])."""
  params, batch_stats = _varying((params, batch_stats))
  captured = gramian_lib.capture(model, params, batch_stats, batch, tasks, train)
  return params, captured, _gramian_rows(captured, total_batch)


def _local_mode(batch_stats: Any, batch_norm: str) -> bool:
  """The model mode (train) for per-sample losses on the shard_map path; raises when samples couple."""
  train, coupled = gramian_lib._resolve_mode(batch_stats, "fast", batch_norm)  # pylint: disable=protected-access
  assert not coupled  # The fast path already refuses coupled samples.
  return train


def _check_divisible(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> int:
  size = int(next(iter(batch.values())).shape[0])
  check_batch_size(size, mesh)
  return size


def sharded_gramian(model, params, batch_stats, batch, tasks: Sequence[tasks_lib.Task],
                    mesh: jax.sharding.Mesh, batch_norm: str = "error") -> jax.Array:
  """The [B, T, B, T] Gramian of `gramian.compute_gramian`, computed with the batch split over 'data'.

  Args:
    model, params, batch_stats, batch, tasks, batch_norm: as in `gramian.compute_gramian`
      (fast path); params are replicated, batch is split (global arrays or host arrays).
    mesh: from `make_mesh`.

  Returns:
    float32 [B, T, B, T], its first axis split over 'data' (device a holds its rows' blocks).

  Raises:
    ConfigError: B does not split over the devices. ValueError: a batch-norm mode the fast path
    cannot compute.
  """
  total_batch = _check_divisible(batch, mesh)
  train = _local_mode(batch_stats, batch_norm)

  def per_device(params, batch_stats, batch):
    return _captured_rows(model, params, batch_stats, batch, tasks, train, total_batch)[2]

  function = jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(DATA_AXIS)),
                           out_specs=PartitionSpec(DATA_AXIS), check_vma=False)
  return function(params, batch_stats, batch)


def sharded_task_gramian(model, params, batch_stats, batch, tasks: Sequence[tasks_lib.Task],
                         mesh: jax.sharding.Mesh, batch_norm: str = "error") -> tuple[jax.Array, jax.Array]:
  """T×T Gramian of the batch-mean task losses' encoder gradients, with the batch split over 'data'.

  Equal to `gramian.task_level_gramian` for models whose samples are independent (see the
  module docstring for batch norm). Crossing devices: the [T, P] local Jacobians (one psum) and
  the [T] losses.

  Returns:
    (gramian [T, T], task_losses [T]), replicated.
  """
  total_batch = _check_divisible(batch, mesh)
  train = _local_mode(batch_stats, batch_norm)

  def per_device(params, batch_stats, batch):
    params, batch_stats = _varying((params, batch_stats))

    def local_share(encoder_params):
      # This device's share of the batch-mean losses: sum over its rows / B.
      full = {**params, "encoder": encoder_params}
      losses = gramian_lib.per_sample_losses(model, full, batch_stats, batch, tasks, train)
      return jnp.sum(losses, axis=0) / total_batch

    jacobian = jax.jacrev(local_share)(params["encoder"])
    jacobian = gramian_lib._flatten_rows(jacobian, 1)  # pylint: disable=protected-access
    jacobian = jax.lax.psum(jacobian, DATA_AXIS)
    losses = jax.lax.psum(local_share(params["encoder"]), DATA_AXIS)
    return gramian_lib._einsum("tp,sp->ts", jacobian, jacobian), losses  # pylint: disable=protected-access

  function = jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(DATA_AXIS)),
                           out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
  return function(params, batch_stats, batch)


def sharded_loss_grads_and_gramian(model, tasks: Sequence[tasks_lib.Task], mesh: jax.sharding.Mesh,
                                   weights_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                                   batch_norm: str = "error") -> Callable:
  """`gramian.loss_grads_and_gramian` (fast path) with the batch split over 'data'.

  Every device captures its rows, computes its block rows of the Gramian, gathers the full
  [B, T, B, T] Gramian and [B, T] losses (so every device computes identical weights), forms
  its rows' weighted gradient from the capture, and one psum adds the devices' gradients.

  Args:
    model, tasks: as in `gramian.loss_grads_and_gramian`.
    mesh: from `make_mesh`.
    weights_fn: `(gramian [B, T, B, T], losses [B, T]) -> [T] or [B, T]` weights; None = equal.
    batch_norm: as in `gramian.compute_gramian`.

  Returns:
    `(params, batch_stats, batch) -> gramian.LossGradsGramian` with replicated loss, task_losses
    and grads; losses [B, T] and gramian [B, T, B, T] split over 'data' along their first axis.
  """

  def run(params, batch_stats, batch):
    total_batch = _check_divisible(batch, mesh)
    train = _local_mode(batch_stats, batch_norm)

    def per_device(params, batch_stats, batch):
      params, captured, rows = _captured_rows(model, params, batch_stats, batch, tasks, train, total_batch)
      full_gramian, all_losses = _gather(rows, 0), _gather(captured.losses, 0)
      weights = gramian_lib._weights(weights_fn, full_gramian, all_losses)  # pylint: disable=protected-access
      row_weights = gramian_lib._row_weights(weights, total_batch)  # pylint: disable=protected-access
      local_batch = captured.losses.shape[0]
      start = jax.lax.axis_index(DATA_AXIS) * local_batch
      local_weights = jax.lax.dynamic_slice_in_dim(row_weights, start, local_batch, axis=0)
      grads = jax.lax.psum(gramian_lib.weighted_gradients(captured, params, local_weights), DATA_AXIS)
      loss = jax.lax.psum(jnp.sum(local_weights * captured.losses), DATA_AXIS)
      task_losses = jax.lax.psum(jnp.sum(captured.losses, axis=0), DATA_AXIS) / total_batch
      return loss, task_losses, captured.losses, grads, rows

    data = PartitionSpec(DATA_AXIS)
    function = jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(), data),
                             out_specs=(PartitionSpec(), PartitionSpec(), data, PartitionSpec(), data), check_vma=False)
    loss, task_losses, losses, grads, gramian = function(params, batch_stats, batch)
    return gramian_lib.LossGradsGramian(loss, task_losses, losses, grads, gramian, batch_stats)

  return run


def replicated_program(function: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`function` run whole on every device of the mesh (shard_map, everything replicated).

  For the small computations inside a sharded step (a weighting's solver on the Gramian, with
  any gradient it takes of its own parameters, which stays inside the per-device program).
  Left to GSPMD, the batch sharding of the features the weights scale propagates into them:
  measured on 8 emulated devices, the compiled UPGrad step at level 'sample' then held 7
  all-reduces, 13 all-gathers and 3 all-to-alls (its solver and least-squares polish split
  over devices) against 1 all-reduce and the Gramian's 7 all-gathers here. Every device
  computes the same value from the same replicated inputs (random keys included).
  """
  return jax.shard_map(function, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False)


def sharded_rows_gramian(model, params, batch_stats, batch, tasks: Sequence[tasks_lib.Task],
                         mesh: jax.sharding.Mesh, level: str,
                         batch_norm: str = "error") -> tuple[jax.Array, jax.Array]:
  """The Gramian at a per-sample level of rows, computed with the batch split over 'data', replicated.

  Like `sharded_gramian`, each device computes its block rows from its own capture; each
  reduces them to the level first, so what is gathered is the level's Gramian: [b, B] per
  device at 'sample' (B² numbers in all), [b·T, B·T] at 'sample_task' (B²T²).

  Args:
    model, params, batch_stats, batch, tasks, mesh, batch_norm: as in `sharded_gramian`.
    level: 'sample' (rows sum_t L_t(x_i)) or 'sample_task' (rows L_t(x_i), index i·T + t); see
      `gramian.rows_gramian`.

  Returns:
    (gramian [R, R], task_losses [T] batch means), both replicated.
  """
  if level not in ("sample", "sample_task"):
    raise ValueError(f"sharded_rows_gramian computes per-sample levels 'sample' or 'sample_task', got {level!r}; "
                     "the task level is `sharded_task_gramian`.")
  total_batch = _check_divisible(batch, mesh)
  train = _local_mode(batch_stats, batch_norm)

  def per_device(params, batch_stats, batch):
    _, captured, rows = _captured_rows(model, params, batch_stats, batch, tasks, train, total_batch)
    local_batch, num_tasks = rows.shape[:2]
    if level == "sample":
      local = jnp.sum(rows, axis=(1, 3))
    else:
      local = rows.reshape(local_batch * num_tasks, total_batch * num_tasks)
    task_losses = jax.lax.psum(jnp.sum(captured.losses, axis=0), DATA_AXIS) / total_batch
    return _gather(local, 0), task_losses

  function = jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(DATA_AXIS)),
                           out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
  return function(params, batch_stats, batch)


def conflict_statistics(task_gramian: jax.Array, gramian: jax.Array | None = None) -> dict[str, jax.Array]:
  """Gradient-conflict statistics from (sharded or not) Gramians.

  Args:
    task_gramian: [T, T] Gramian of batch-mean task gradients.
    gramian: optional [B, T, B, T] per-row Gramian.

  Returns:
    'task_cosine' [T, T]; with `gramian`, 'sample_conflict_fraction' [T, T]: the fraction of
    sample pairs (i, j), i ≠ j, whose row gradients (i, t), (j, s) have a negative inner product.
  """
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(task_gramian), 1e-30))
  statistics = {"task_cosine": task_gramian / (norms[:, None] * norms[None, :])}
  if gramian is not None:
    batch = gramian.shape[0]
    off_diagonal = 1.0 - jnp.eye(batch)
    negative = (gramian < 0).astype(jnp.float32) * off_diagonal[:, None, :, None]
    statistics["sample_conflict_fraction"] = jnp.sum(negative, axis=(0, 2)) / (batch * (batch - 1))
  return statistics
