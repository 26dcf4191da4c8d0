"""Devices and processes: the mesh, state and batch placement, multi-host set-up.

One mesh axis, 'data', spans the devices (all of them by default, `config.sharding.data_axis_size`).
The batch is split along it; the train state is replicated, or with `config.sharding.fsdp` each
large parameter (and its optimizer moments) is split along its largest divisible dimension over
the same axis (ZeRO-3 style: XLA gathers a parameter where it is used and reduce-scatters its
gradient). On a multi-host TPU slice or GPU cluster every process runs the same program;
`initialize_distributed` connects them (`jax.distributed.initialize`, a no-op on one host), and
`shard_batch` assembles each host's slice of the batch into one global array with
`jax.make_array_from_process_local_data`.

How each kind of method runs in a sharded train step (tests/test_sharding.py checks every
method in tests/sharding_worker.METHOD_CASES against one device, two steps, to 1e-5 relative):

* loss weightings (EW, UW, DWA, FAMO's extra forward pass, ...) and the Jacobian methods
  (GradDrop's per-task feature gradients, AdaTask, MTL-IO): plain GSPMD (`shard_train_step`:
  the step jitted with `in_shardings`/`out_shardings`; XLA inserts the gradient all-reduce and,
  for batch norm, the all-reduce of the batch statistics, so results match one device exactly).
* Gramian methods at level 'task': T gradients of batch means under GSPMD.
* Gramian methods at levels 'sample' and 'sample_task': the Gramian from the `shard_map` engine
  (`gramian.sharded`; only the level's Gramian is gathered), then one GSPMD backward of the
  weighted losses.
* At every level the weighting itself (solver, random draws, its state and the gradient of its
  own parameters) runs whole and identically on every device (`replicated_program`), never
  partitioned by GSPMD.

The mesh axis is explicitly `AxisType.Auto`: `jax.make_mesh` defaults to Explicit axes, under
which sharded `vmap(jacrev)` over a CNN raises a `ShardingTypeError`.
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from mtl_jax import config_validation

DATA_AXIS = "data"
DISTRIBUTED_MODES = ("auto", "on", "off")
# Parameters with fewer elements stay replicated under FSDP: splitting them saves little memory
# and costs a gather per use.
DEFAULT_FSDP_MIN_SIZE = 2**14


def _sharding_config(config: ml_collections.ConfigDict | None) -> Mapping[str, Any]:
  """config.sharding as a plain dict with defaults filled in, validated."""
  values = dict(
    data_axis_size=-1, fsdp=False, fsdp_min_size=DEFAULT_FSDP_MIN_SIZE, distributed="auto"
  )
  if config is not None and "sharding" in config:
    values.update(config.sharding.to_dict())
  size = values["data_axis_size"]
  if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
    raise config_validation.ConfigError(
      "config.sharding.data_axis_size: expected a positive integer or -1 (all devices), got "
      f"{size!r}."
    )
  if values["distributed"] not in DISTRIBUTED_MODES:
    raise config_validation.ConfigError(
      f"config.sharding.distributed: unknown value {values['distributed']!r}; valid choices: "
      f"{', '.join(DISTRIBUTED_MODES)}."
    )
  return values


def _multi_host_environment() -> bool:
  """Whether environment variables describe a multi-process job (TPU pod slice, SLURM,
  coordinator)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([host for host in hosts.split(",") if host]) > 1:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _distributed_arguments(config: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """`jax.distributed.initialize` keyword arguments from config.sharding (validated); {} for a
  config without a sharding section (JAX's own defaults and detection)."""
  if config is None or "sharding" not in config:
    return {}
  config_validation.validate_distributed(config)
  sharding = config.sharding
  arguments = dict(
    initialization_timeout=int(sharding.initialization_timeout_seconds),
    heartbeat_timeout_seconds=int(sharding.heartbeat_timeout_seconds),
    shutdown_timeout_seconds=int(sharding.shutdown_timeout_seconds),
  )
  if sharding.coordinator_address:
    arguments.update(
      coordinator_address=str(sharding.coordinator_address),
      num_processes=int(sharding.num_processes),
      process_id=int(sharding.process_id),
    )
  return arguments


def initialize_distributed(config: ml_collections.ConfigDict | None = None) -> bool:
  """Connects the processes of a multi-host job; call before any other JAX use.

  `config.sharding.distributed`: 'on' always calls `jax.distributed.initialize` (with
  `coordinator_address`, `num_processes` and `process_id` when the config gives them, else read
  from the TPU, SLURM or JAX_COORDINATOR_ADDRESS environment), 'off' never does, and 'auto' does
  so when the config or the environment names more than one process (so a single TPU VM or GPU
  box skips it). With several processes a liveness check starts (`watch_peers`).

  Returns:
    Whether `jax.distributed.initialize()` was called.

  Raises:
    ConfigError: a bad config.sharding key.
  """
  mode = _sharding_config(config)["distributed"]
  arguments = _distributed_arguments(config)
  wanted = "coordinator_address" in arguments or _multi_host_environment()
  if mode == "off" or (mode == "auto" and not wanted):
    return False
  jax.distributed.initialize(**arguments)
  if jax.process_count() > 1 and config is not None and "sharding" in config:
    watch_peers(int(config.sharding.peer_timeout_seconds))
  return True


# Exit status of a process that stopped because another process of its job was lost.
LOST_PEER_EXIT_CODE = 5
# How often the liveness check runs; a lost process is named within this plus the peer timeout.
PEER_CHECK_INTERVAL_SECONDS = 1.0
_KEY_PREFIX = "mtl_jax"


class LostPeerError(RuntimeError):
  """Another process of a multi-process job did not answer in time (killed, crashed or hung).

  Attributes:
    lost: the indices of the processes that did not answer.
  """

  def __init__(self, message: str, lost: Sequence[int]):
    super().__init__(message)
    self.lost = tuple(lost)


def is_writer() -> bool:
  """Whether this process writes a run's files (config.json, metrics, results, conflict records,
  reports): process 0 only, so each is written once into the shared workdir. Checkpoints are the
  exception: every process writes its shards through Orbax's multi-process save."""
  return jax.process_index() == 0


def _client():
  """The JAX distributed runtime's client (None before `jax.distributed.initialize`).

  jax 0.10.2 has no public barrier with a timeout; `jax.experimental.multihost_utils` and Orbax
  reach the same client this way. Its waits fail with a catchable error after their timeout,
  while a collective with a dead peer blocks until the heartbeat timeout aborts the process.
  """
  return jax_distributed.global_state.client


def _absent(client, key: str, count: int) -> list[int]:
  """The processes (of `count`) that have not set their arrival mark `key/<index>`."""
  absent = []
  for index in range(count):
    try:
      client.key_value_try_get(f"{key}/{index}")
    except Exception:  # NOT_FOUND, or UNAVAILABLE when the coordinator is gone.
      absent.append(index)
  return absent


def _lost_message(
  lost: Sequence[int], timeout_seconds: float, where: str, index: int, count: int
) -> str:
  names = ", ".join(str(lost_index) for lost_index in lost)
  coordinator = " (the coordinator)" if 0 in lost else ""
  return (
    f"lost process {names}{coordinator} of {count}: it did not reach {where} within "
    f"{timeout_seconds:g} s (killed, crashed or hung); process {index} stops too. "
    "Rerun every process with the same command to resume from the last complete checkpoint."
  )


# The longest one call of `_wait` blocks in the coordination client. The liveness check's
# thread sees within this that its process is exiting, so no thread is still inside the client
# when the interpreter finalizes (a daemon thread stopped there aborts the process).
_WAIT_SLICE_SECONDS = 0.25


def _wait(
  client,
  key: str,
  timeout_seconds: float,
  where: str,
  index: int,
  count: int,
  stopped: threading.Event | None = None,
) -> bool:
  """Marks the arrival of process `index` (of `count`) at barrier `key` and waits for every
  process, in slices of _WAIT_SLICE_SECONDS; False if `stopped` is set first (the caller exits).

  It takes the process index and count rather than asking JAX: the liveness check calls it from
  its own thread, which may still be running while JAX's exit handler tears the backend down, and
  asking JAX then would start a new backend against a coordinator that is gone (an abort). The
  marks stay: a peer may still be reading them (the liveness check deletes its old rounds').

  Raises:
    LostPeerError: naming the processes that did not arrive in time.
  """
  client.key_value_set(f"{key}/{index}", "arrived")
  deadline = time.monotonic() + timeout_seconds
  waiting = [peer for peer in range(count) if peer != index]
  while waiting:
    if stopped is not None and stopped.is_set():
      return False
    left = deadline - time.monotonic()
    if left <= 0:
      lost = _absent(client, key, count)
      if index in lost:  # Even our own mark is gone: the coordinator is.
        lost = [0]
      raise LostPeerError(_lost_message(lost, timeout_seconds, where, index, count), lost)
    wait = min(left, _WAIT_SLICE_SECONDS)
    started = time.monotonic()
    try:
      client.blocking_key_value_get(f"{key}/{waiting[0]}", max(1, int(1000 * wait)))
      waiting.pop(0)
    except Exception:  # DEADLINE_EXCEEDED for this slice, or UNAVAILABLE: the coordinator is gone.
      # An error that came at once is not a wait: sleep the slice's rest rather than spin.
      time.sleep(max(0.0, wait - (time.monotonic() - started)))
  return True


def _forget(client, key: str) -> None:
  """Deletes a mark nobody reads any more; when the coordinator is gone there is none to delete."""
  try:
    client.key_value_delete(key)
  except Exception:  # UNAVAILABLE: the coordinator has shut down (this process is exiting).
    pass


_BARRIER_COUNT = itertools.count()


def barrier(name: str) -> None:
  """Waits until every process reaches this point (a no-op with one process).

  Every process must call the same barriers in the same order. Used after process 0 writes a
  file that the others then read (results.json before a sweep's next step).

  Raises:
    LostPeerError: a process did not arrive within config.sharding.peer_timeout_seconds.
  """
  if jax.process_count() == 1:
    return
  client = _client()
  if client is None or _WATCHDOG is None:
    # jax.distributed was set up elsewhere, without our timeout: a device-level barrier.
    multihost_utils.sync_global_devices(name)
    return
  key = f"{_KEY_PREFIX}/barrier/{next(_BARRIER_COUNT)}"
  where = f"the barrier '{name}'"
  _wait(client, key, _WATCHDOG.timeout_seconds, where, jax.process_index(), jax.process_count())


class _PeerWatchdog(threading.Thread):
  """Every PEER_CHECK_INTERVAL_SECONDS, meets the other processes at a barrier of marks in the
  coordination service (`_wait`); when one does not arrive within the timeout, prints an `error:`
  line naming it and ends this process with LOST_PEER_EXIT_CODE.

  It runs beside the main thread because a lost peer usually leaves the main thread blocked in a
  collective, which only the JAX heartbeat (an abort, minutes later by default) would end. A
  process that exits normally marks itself departed first, so its peers do not report it.
  """

  def __init__(self, timeout_seconds: float):
    super().__init__(name="mtl_jax-peer-watchdog", daemon=True)
    self.timeout_seconds = timeout_seconds
    # Read once here, in the main thread: see `_wait`.
    self.index = jax.process_index()
    self.count = jax.process_count()
    self.stopped = threading.Event()
    # Checks passed so far (every process answered); notified after each and when the thread ends.
    self.passed = 0
    self.progress = threading.Condition()

  def run(self) -> None:
    try:
      self._check_until_stopped()
    finally:
      with self.progress:
        self.progress.notify_all()

  def _check_until_stopped(self) -> None:
    client = _client()
    for round_index in itertools.count():
      if self.stopped.wait(PEER_CHECK_INTERVAL_SECONDS):
        return
      key = f"{_KEY_PREFIX}/alive/{round_index}"
      try:
        if not _wait(
          client, key, self.timeout_seconds, "the check", self.index, self.count, self.stopped
        ):
          return
        if round_index >= 2:  # Every peer passed round - 1, so none reads round - 2's marks.
          _forget(client, f"{_KEY_PREFIX}/alive/{round_index - 2}/{self.index}")
        with self.progress:
          self.passed += 1
          self.progress.notify_all()
      except LostPeerError as error:
        if self.stopped.is_set():
          return  # This process is exiting; the client may be shut down already.
        still_expected = set(_absent(client, f"{_KEY_PREFIX}/departed", self.count))
        lost = [index for index in error.lost if index in still_expected]
        if self.stopped.is_set() or not lost:
          return  # This process is exiting, or every missing peer finished normally.
        where = "a liveness check"
        message = _lost_message(lost, self.timeout_seconds, where, self.index, self.count)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The main thread may be blocked in a collective for good: leave without Python's exit
        # handlers (jax.distributed.shutdown would wait for the lost process too).
        os._exit(LOST_PEER_EXIT_CODE)

  def depart(self) -> None:
    """Marks this process as finished (peers stop expecting it) and stops the check, waiting
    for its thread to leave the coordination client (see _WAIT_SLICE_SECONDS)."""
    self.stopped.set()
    try:
      _client().key_value_set(f"{_KEY_PREFIX}/departed/{self.index}", "departed")
    except Exception:  # The coordinator is gone already; nobody is left to tell.
      pass
    if self.is_alive() and threading.current_thread() is not self:
      self.join(timeout=10 * _WAIT_SLICE_SECONDS)


_WATCHDOG: _PeerWatchdog | None = None


def exit_if_peer_lost() -> None:
  """After an error in a multi-process job, lets the liveness check decide whether another
  process was lost; call it from an `except` clause before re-raising.

  A peer killed mid-collective makes this process's collective fail at once (gloo: "Connection
  closed by peer"), before the check has noticed. This waits until two more checks pass (every
  peer is alive: the error is this process's own, and the caller re-raises it) or the check
  names the lost process and ends this one (exit status LOST_PEER_EXIT_CODE), at most about
  twice the peer timeout. A no-op with one process.
  """
  watchdog = _WATCHDOG
  if watchdog is None or not watchdog.is_alive():
    return
  deadline = 2 * (watchdog.timeout_seconds + PEER_CHECK_INTERVAL_SECONDS) + 5
  with watchdog.progress:
    # Two checks: the first may have passed its barrier before the peer was lost.
    target = watchdog.passed + 2
    watchdog.progress.wait_for(
      lambda: watchdog.passed >= target or not watchdog.is_alive(), timeout=deadline
    )


def exit_lost_peer(error: LostPeerError) -> None:
  """Prints `error: <which process was lost>` and ends this process with LOST_PEER_EXIT_CODE,
  without Python's exit handlers (jax.distributed.shutdown would wait for the lost process)."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(LOST_PEER_EXIT_CODE)


def watch_peers(timeout_seconds: float) -> None:
  """Starts the liveness check of a multi-process job (once; see `_PeerWatchdog`).

  Args:
    timeout_seconds: how long a peer may miss a check (and `barrier` wait) before it counts as
      lost; keep it below the JAX heartbeat timeout so this check, not the runtime's abort, ends
      the job.
  """
  global _WATCHDOG
  if _WATCHDOG is not None or jax.process_count() == 1:
    return
  _WATCHDOG = _PeerWatchdog(timeout_seconds)
  _WATCHDOG.start()
  # Registered after JAX's own exit handler, so it runs first: peers learn of a normal exit
  # before this process waits in jax.distributed.shutdown.
  atexit.register(_WATCHDOG.depart)


def make_mesh(
  config: ml_collections.ConfigDict | None = None, data_axis_size: int | None = None
) -> jax.sharding.Mesh:
  """A one-axis ('data') mesh over the first `data_axis_size` devices (-1: all), axis type Auto.

  Args:
    config: an experiment config; its `sharding.data_axis_size` is used unless overridden.
    data_axis_size: devices on the 'data' axis; overrides the config.

  Raises:
    ConfigError: more devices asked for than exist.
  """
  size = (
    _sharding_config(config)["data_axis_size"] if data_axis_size is None else int(data_axis_size)
  )
  devices = jax.devices()
  size = len(devices) if size == -1 else size
  if size > len(devices) or (jax.process_count() > 1 and size != len(devices)):
    raise config_validation.ConfigError(
      f"config.sharding.data_axis_size: {size} devices asked for, {len(devices)} available "
      f"({jax.process_count()} process(es)); use -1 for all of them"
      + (" (multi-host runs must use every device)." if jax.process_count() > 1 else ".")
    )
  return jax.make_mesh(
    (size,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:size]
  )


def data_size(mesh: jax.sharding.Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def check_batch_size(
  batch_size: int, mesh: jax.sharding.Mesh, key: str = "training.batch_size"
) -> None:
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
  """Splits the largest dimension divisible by the device count; small or indivisible leaves stay
  whole."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  for dimension in sorted(range(len(shape)), key=lambda index: -shape[index]):
    if shape[dimension] % devices == 0:
      spec = [None] * len(shape)
      spec[dimension] = DATA_AXIS
      return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(
  state: Any,
  mesh: jax.sharding.Mesh,
  fsdp: bool = False,
  fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
) -> Any:
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
    lambda leaf, sharding: jax.make_array_from_callback(
      np.shape(leaf), sharding, lambda index: np.asarray(leaf)[index]
    ),
    state,
    shardings,
  )


def host_slice(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's contiguous share of a global batch every host computed identically."""
  count, index = jax.process_count(), jax.process_index()
  return {
    key: value[len(value) // count * index : len(value) // count * (index + 1)]
    for key, value in batch.items()
  }


def shard_batch(
  batch: Mapping[str, Any], mesh: jax.sharding.Mesh, process_local: bool | None = None
) -> dict[str, jax.Array]:
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
    raise ValueError(
      f"Batch arrays disagree on the batch size: { {k: len(v) for k, v in batch.items()} }."
    )
  local = sizes.pop()
  check_batch_size(local * (jax.process_count() if process_local else 1), mesh)
  sharding = batch_sharding(mesh)
  if not process_local:
    return jax.device_put(dict(batch), sharding)
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for key, value in batch.items()
  }


def shard_train_step(step: Callable, mesh: jax.sharding.Mesh, shardings: Any) -> Callable:
  """Jits a `(state, batch) -> (state, metrics)` step for the mesh (GSPMD).

  Args:
    step: e.g. the function `train.make_train_step` returns (any weighting kind).
    mesh: from `make_mesh`.
    shardings: `state_shardings(state, mesh, ...)`; the new state keeps them.

  Returns:
    The jitted step; pass batches from `shard_batch`. Metrics come back replicated.
  """
  return jax.jit(
    step,
    in_shardings=(shardings, batch_sharding(mesh)),
    out_shardings=(shardings, replicated(mesh)),
  )


def shard_training(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, step: Callable, state: Any
) -> tuple[Callable, Any]:
  """The training loop's set-up: checks the batch size, places the state, jits the step for the
  mesh.

  Returns:
    (sharded step, placed state); restoring a checkpoint onto the placed state puts it on these
    shardings whatever device count it was saved with.
  """
  options = _sharding_config(config)
  check_batch_size(int(config.training.batch_size), mesh)
  shardings = state_shardings(
    state, mesh, fsdp=bool(options["fsdp"]), fsdp_min_size=int(options["fsdp_min_size"])
  )
  return shard_train_step(step, mesh, shardings), place_state(state, shardings)


def global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """A global batch every host computed identically (the data order is a function of seed and
  step), split over 'data': each host contributes only its own rows."""
  if jax.process_count() == 1:
    return shard_batch(batch, mesh, process_local=False)
  return shard_batch(host_slice(batch), mesh, process_local=True)


def replicated_program(function: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`function` run whole on every device of the mesh (shard_map, everything replicated).

  For the small computations inside a sharded step (a weighting's solver on the Gramian, with
  any gradient it takes of its own parameters, which stays inside the per-device program).
  Left to GSPMD, the batch sharding of the features the weights scale propagates into them and
  splits the solver over devices, with many more collectives (BENCHMARKS.md, 'Sharded steps').
  Every device computes the same value from the same replicated inputs (random keys included).
  """
  return jax.shard_map(
    function, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False
  )
