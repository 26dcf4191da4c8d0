"""Lane strategies: how the one training loop advances K runs of one experiment together.

A lane is one run. `SingleLane` is an ordinary run (K = 1): one jitted step, on one device or
split over a mesh. The grouped strategies train K runs that share dataset, tasks, model and method
but differ in seed, learning rate and/or optimizer with one compiled program (runs of several
optimizers hold all their states and each lane runs its own: `optim.switched`):

* 'vmap' batches the runs, their states stacked along a leading run axis, into every op (for
  accelerators, where one small run leaves the device idle);
* 'map' is `lax.map` over the stacked runs inside one program;
* 'loop' keeps the runs' states as a list and steps them one after another through one compiled
  single-run step (for CPU, where a vmapped convolution whose kernel carries the run axis
  becomes a grouped convolution that XLA:CPU runs slower than K separate ones).

Because `optim.make_optimizer` applies the learning rate last and every update is exactly
proportional to it, each grouped lane builds the same optimizer with the schedule
`lr_k * unit_schedule(step)`, so a lane computes what the single run computes, up to float
reordering by XLA. Each run's data order is a function of its own seed, as in a single run.

Every strategy offers the same interface to the loop: initial states, the batch of a step (read
through the grain pipeline of `data.loader`), the host's copy of the first run's batch as the
step trains on it (for the conflict probe, the Gramian self-check and the finite guard),
`step(states, batch) -> (states, metrics with a leading [K] axis)`, evaluation of every lane,
a lane's own state, the steps done, the selection of improved lanes, and `close()` (stops the
pipeline's reader thread or worker processes).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_jax import optim
from mtl_jax import parallel
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import augment_device
from mtl_jax.data import loader
from mtl_jax.data import pipeline
from mtl_jax.train import evaluation
from mtl_jax.train import steps
from mtl_jax.train.state import Experiment
from mtl_jax.train.state import TrainState
from mtl_jax.train.state import group_key
from mtl_jax.train.state import init_state
from mtl_jax.train.state import optimizer_choice

LANE_MODES = ("vmap", "map", "loop")


def default_lane_mode(requested: str = "auto") -> str:
  """The lane mode for `requested` ('auto' or one of LANE_MODES): 'auto' is 'loop' on CPU, else
  'vmap'.

  On CPU vmapped convolutions run slower than K separate ones and `lax.map` slower still
  (BENCHMARKS.md, 'Sweeps'), so a group's gain there is its single compilation, which 'loop'
  keeps at sequential step speed.
  """
  if requested == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  if requested not in LANE_MODES:
    raise ValueError(f"Unknown lane mode {requested!r}; valid: auto, {', '.join(LANE_MODES)}.")
  return requested


def _skip_non_finite(config: ml_collections.ConfigDict) -> bool:
  return config.training.on_non_finite == "skip"


def _on_device(experiment: Experiment) -> bool:
  return experiment.config.data.augment_on == "device"


def batch_preparation(experiment: Experiment):
  """What the train step does to its batch first (`augment_device.prepare_batch`): the float
  image, and the augmentation when it runs on the device."""
  return augment_device.preparation(experiment.dataset.augment if _on_device(experiment) else None)


def step_reader(experiment: Experiment, seeds: Sequence[int], stacked: bool) -> loader.StepReader:
  """The reader of the training batches of runs with these seeds, as their steps take them."""
  return loader.StepReader(
    experiment.dataset.splits["train"],
    int(experiment.config.training.batch_size),
    tuple(int(seed) for seed in seeds),
    experiment.dataset.augment,
    _on_device(experiment),
    jax.process_index(),
    jax.process_count(),
    stacked,
  )


def first_training_batch(experiment: Experiment, seed: int) -> dict[str, np.ndarray]:
  """A run's batch of step 0 as its step takes it (the whole global batch)."""
  return step_reader(experiment, [seed], stacked=False).lane_batch(seed, 0, whole=True)


class TrainingBatches:
  """The training batches of K runs (stacked, or one shared), read through `data.loader`."""

  def __init__(self, experiment: Experiment, seeds: Sequence[int], stacked: bool):
    config = experiment.config
    self.stacked = stacked
    self.on_device = _on_device(experiment)
    self.reader = step_reader(experiment, seeds, stacked)
    self.stream = loader.BatchStream(
      self.reader, experiment.total_steps, int(config.data.workers), int(config.data.prefetch)
    )
    self._prepare = jax.jit(batch_preparation(experiment))
    self._last: tuple[int, dict[str, np.ndarray]] | None = None

  def read(self, step: int) -> dict[str, np.ndarray]:
    """This process's batch of `step` (each array [K, B, ...] when stacked)."""
    batch = self.stream.batch(step)
    self._last = (step, batch)
    return batch

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    """The first run's global batch of `step` as its step trains on it, in host memory."""
    if self._last is not None and self._last[0] == step and self.reader.process_count == 1:
      batch = self._last[1]
      if self.stacked:
        batch = {key: value[0] for key, value in batch.items()}
    else:
      batch = self.reader.lane_batch(self.reader.seeds[0], step, whole=True)
    if not self.on_device:
      return pipeline.unit_float_images(batch)
    return jax.device_get(self._prepare(batch))

  def close(self) -> None:
    self._last = None
    self.stream.close()


def _with_rate(lane_step: Callable, learning_rate, state: TrainState, batch):
  return lane_step(state, batch, learning_rate, np.int32(0))


class SingleLane:
  """One run: on one device, the experiment's lane program (`lane_programs`) at the run's learning
  rate; on a mesh, the step jitted for it (GSPMD, batch split over 'data')."""

  size = 1
  grouped = False

  def __init__(self, experiment: Experiment, mesh: jax.sharding.Mesh | None = None):
    self.experiment = experiment
    self.mesh = mesh
    self.seed = int(experiment.config.seed)
    self._step = None
    if mesh is None:
      # The experiment's programs with the learning rate as an argument, which every group of
      # this experiment shares too (and, through the persistent cache, runs of another rate).
      programs = lane_programs(experiment)
      self._eval_step = programs.evaluate
      rate = np.float32(experiment.config.optimizer.learning_rate)
      self._step_function = functools.partial(_with_rate, programs.step, rate)
    else:
      step = steps.with_prepared_batch(
        steps.experiment_train_step(experiment, mesh=mesh), batch_preparation(experiment)
      )
      skip = _skip_non_finite(experiment.config)
      self._step_function = steps.with_skipping(step) if skip else step
      self._eval_step = jax.jit(steps.make_eval_step(experiment.model, experiment.tasks))
    self.batches = TrainingBatches(experiment, [self.seed], stacked=False)

  def initial_states(self) -> TrainState:
    """The initial state, placed on the mesh's devices when there is one."""
    state = init_state(self.experiment, self.seed)
    if self.mesh is None:
      self._step = self._step_function
      return state
    self._step, state = parallel.shard_training(
      self.experiment.config, self.mesh, self._step_function, state
    )
    return state

  def batch(self, step: int) -> Any:
    """The batch the step takes: this process's rows, split over the mesh when there is one."""
    batch = self.batches.read(step)
    if self.mesh is None:
      return batch
    return parallel.shard_batch(batch, self.mesh)

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    return self.batches.host_batch(step)

  def close(self) -> None:
    self.batches.close()

  def step(self, states: TrainState, batch) -> tuple[TrainState, dict[str, np.ndarray]]:
    new_state, step_metrics = self._step(states, batch)
    step_metrics = jax.device_get(step_metrics)
    return new_state, {key: np.asarray(value)[None] for key, value in step_metrics.items()}

  def evaluate(self, states: TrainState, split: str) -> list[dict[str, float]]:
    totals = evaluation.summed_statistics(
      self._eval_step, self.experiment, states.params, states.batch_stats, split
    )
    return [evaluation.flat_metrics(self.experiment.tasks, totals)]

  def steps_done(self, states: TrainState) -> int:
    return int(jax.device_get(states.step))

  def run_state(self, states: TrainState, index: int) -> TrainState:
    del index
    return states


def stack_states(states: Sequence[TrainState]) -> TrainState:
  """Stacks K states along a new leading axis."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


def unstack_state(states: TrainState, index: int) -> TrainState:
  """Run `index` of a stacked state."""
  return jax.tree_util.tree_map(lambda leaf: leaf[index], states)


def _unit_optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  unit = ml_collections.ConfigDict(config.optimizer.to_dict())
  unit.learning_rate = 1.0
  return unit


def make_lane_step(experiment: Experiment, skip_non_finite: bool):
  """`(state, batch, learning_rate, choice) -> (state, metrics)`: one run's step with a traced
  learning rate and, in a group of several optimizers (`state.build_group_experiment`), the
  traced index of its optimizer (`optimizer_choice`; 0 otherwise)."""
  unit_config = _unit_optimizer_config(experiment.config)
  unit_schedule = optim.learning_rate_schedule(unit_config, experiment.steps_per_epoch)
  prepare = batch_preparation(experiment)

  def lane_step(state, batch, learning_rate, choice):
    # The optimizer is rebuilt per lane at trace time; only the scale of its schedule (and the
    # choice among a group's optimizers) is traced.
    def schedule(count):
      return learning_rate * unit_schedule(count)

    if experiment.optimizer_names:
      optimizer = optim.switched(
        [
          optim.make_optimizer(
            optim.renamed(unit_config, name), experiment.steps_per_epoch, schedule
          )
          for name in experiment.optimizer_names
        ],
        choice,
      )
    else:
      optimizer = weighting_lib.make_optimizer(
        experiment.weighting,
        unit_config,
        experiment.steps_per_epoch,
        experiment.task_names,
        learning_rate=schedule,
      )
    step = steps.with_prepared_batch(steps.experiment_train_step(experiment, optimizer), prepare)
    step = steps.with_skipping(step) if skip_non_finite else step
    return step(state, batch)

  return lane_step


def make_multi_train_step(
  experiment: Experiment, shared_batch: bool, skip_non_finite: bool, lane_mode: str = "vmap"
):
  """The step of K runs: `(states, batch, learning_rates [K], choices [K]) -> (states, metrics
  [K])`, the states stacked along a leading [K] axis ('vmap', 'map') or a list of K states
  ('loop'); `choices` are the lanes' optimizer indices (`make_lane_step`).

  Args:
    experiment: built from any config of the group (its optimizer is not used).
    shared_batch: True when all runs see the same batch (same seed); the batch then has no run
      axis, otherwise every array is [K, B, ...].
    skip_non_finite: on a non-finite loss or gradient, keep the lane's previous state (the data
      position and RNG still advance), as `training.on_non_finite='skip'` does.
    lane_mode: one of LANE_MODES; all compute the same per-run steps.

  Returns:
    The un-jitted step for 'vmap' and 'map'; for 'loop' a Python function that calls one
    compiled program K times and returns host metrics (do not jit it).
  """
  if lane_mode not in LANE_MODES:
    raise ValueError(f"Unknown lane_mode {lane_mode!r}; valid modes: {', '.join(LANE_MODES)}.")
  if lane_mode == "loop":
    return _looped(lane_programs(experiment, skip_non_finite).step, shared_batch)
  lane_step = make_lane_step(experiment, skip_non_finite)
  if lane_mode == "vmap":
    return jax.vmap(lane_step, in_axes=(0, None if shared_batch else 0, 0, 0))

  def mapped_step(states, batch, learning_rates, choices):
    if shared_batch:
      return jax.lax.map(
        lambda lane: lane_step(lane[0], batch, lane[1], lane[2]), (states, learning_rates, choices)
      )
    return jax.lax.map(lambda lane: lane_step(*lane), (states, batch, learning_rates, choices))

  return mapped_step


class LanePrograms(NamedTuple):
  """One run's compiled programs with a traced learning rate, shared by every group (and every
  group size) of one experiment in this process.

  Attributes:
    step: `(state, batch, learning_rate, choice) -> (state, metrics)`, jitted (`make_lane_step`).
    evaluate: `(params, batch_stats, batch, mask) -> statistics`, jitted (`steps.make_eval_step`).
  """

  step: Callable
  evaluate: Callable


# Programs per (group_key of the config, the optimizers, dataset, skip_non_finite), most recently
# used last (group_key leaves the optimizer's name out); the dataset is held beside them, so its
# id is not reused while the entry lives.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_PROGRAMS_KEPT = 32


def lane_programs(experiment: Experiment, skip_non_finite: bool | None = None) -> LanePrograms:
  """The compiled one-run programs of `experiment`, built once per process.

  A sweep trains many groups of one experiment (a coarse grid, its refinement, a study reusing
  runs) and its single runs on one device: they differ only in seeds, learning rates and group
  size, so one trace and compilation serves them all. `skip_non_finite` defaults to the config's
  `training.on_non_finite`.
  """
  if skip_non_finite is None:
    skip_non_finite = _skip_non_finite(experiment.config)
  optimizers = experiment.optimizer_names or (str(experiment.config.optimizer.name),)
  key = (group_key(experiment.config), optimizers, id(experiment.dataset), skip_non_finite)
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key][1]
  programs = LanePrograms(
    jax.jit(make_lane_step(experiment, skip_non_finite)),
    jax.jit(steps.make_eval_step(experiment.model, experiment.tasks)),
  )
  _PROGRAMS[key] = (experiment.dataset, programs)
  while len(_PROGRAMS) > _PROGRAMS_KEPT:
    _PROGRAMS.popitem(last=False)
  return programs


def _lane_of(batch: Any, index: int) -> Any:
  """Lane `index` of a stacked host batch, sliced on the host."""
  return jax.tree_util.tree_map(lambda leaf: leaf[index], batch)


def _stack_on_host(per_lane: Sequence[Any]) -> Any:
  """Per-lane device outputs fetched in one transfer and stacked on the host: [K, ...] numpy."""
  per_lane = jax.device_get(list(per_lane))
  return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *per_lane)


def _looped(lane_step, shared_batch: bool):
  """Steps a list of lane states one after another through one compiled single-run step.

  The step sees one lane's state, so groups of any size share its compilation, and the lanes'
  states stay separate arrays: nothing is stacked, sliced or written back, which would compile a
  program of its own for every state structure.
  """

  def step(states, batch, learning_rates, choices):
    rates, choices = np.asarray(learning_rates, np.float32), np.asarray(choices, np.int32)
    new_states, per_lane = [], []
    for index, state in enumerate(states):
      lane_batch = batch if shared_batch else _lane_of(batch, index)
      new_state, step_metrics = lane_step(state, lane_batch, rates[index], choices[index])
      new_states.append(new_state)
      per_lane.append(step_metrics)
    return new_states, _stack_on_host(per_lane)

  return step


class _GroupLanes:
  """What every group strategy shares: the runs' seeds and learning rates, and their batches."""

  grouped = True

  def __init__(self, experiment: Experiment, configs: Sequence[ml_collections.ConfigDict]):
    self.experiment = experiment
    self.size = len(configs)
    self.seeds = [int(config.seed) for config in configs]
    self.shared_batch = len(set(self.seeds)) == 1
    rates = [float(config.optimizer.learning_rate) for config in configs]
    self.learning_rates = jnp.asarray(rates, jnp.float32)
    self.optimizers = [str(config.optimizer.name) for config in configs]
    self.choices = np.asarray(
      [optimizer_choice(experiment, config) for config in configs], np.int32
    )
    self.batches = TrainingBatches(
      experiment, self.seeds[:1] if self.shared_batch else self.seeds, not self.shared_batch
    )

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The stacked batch [K, B, ...], or the one batch all runs share."""
    return self.batches.read(step)

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    return self.batches.host_batch(step)

  def close(self) -> None:
    self.batches.close()


class StackedLanes(_GroupLanes):
  """K runs with states stacked along a leading axis, advanced by one compiled program ('vmap'
  or 'map', see `make_multi_train_step`)."""

  def __init__(
    self, experiment: Experiment, configs: Sequence[ml_collections.ConfigDict], lane_mode: str
  ):
    super().__init__(experiment, configs)
    self.mode = lane_mode
    self._step = jax.jit(
      make_multi_train_step(
        experiment, self.shared_batch, _skip_non_finite(experiment.config), self.mode
      )
    )
    eval_step = steps.make_eval_step(experiment.model, experiment.tasks)
    self._eval_step = jax.jit(jax.vmap(eval_step, in_axes=(0, 0, None, None)))

  def initial_states(self) -> TrainState:
    return stack_states([init_state(self.experiment, seed) for seed in self.seeds])

  def steps_done(self, states: TrainState) -> int:
    return int(np.max(jax.device_get(states.step)))

  def step(self, states: TrainState, batch) -> tuple[TrainState, dict[str, np.ndarray]]:
    states, step_metrics = self._step(states, batch, self.learning_rates, self.choices)
    return states, jax.device_get(step_metrics)

  def evaluate(self, states: TrainState, split: str) -> list[dict[str, float]]:
    totals = evaluation.summed_statistics(
      self._eval_step, self.experiment, states.params, states.batch_stats, split
    )
    return evaluation.per_run_metrics(self.experiment.tasks, totals)

  def run_state(self, states: TrainState, index: int) -> TrainState:
    return unstack_state(states, index)

  def select(self, improved: np.ndarray, new: TrainState, old: TrainState) -> TrainState:
    """Lanes where `improved` is True from `new`, the others from `old`."""
    return _select_lanes(jnp.asarray(improved), new, old)


@jax.jit
def _select_lanes(mask, new: Any, old: Any) -> Any:
  return jax.tree_util.tree_map(
    lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old
  )


class LoopedLanes(_GroupLanes):
  """K runs whose states are a list, stepped one after another through the experiment's one
  compiled single-run step (`lane_programs`; 'loop', for CPU)."""

  mode = "loop"

  def __init__(self, experiment: Experiment, configs: Sequence[ml_collections.ConfigDict]):
    super().__init__(experiment, configs)
    self._programs = lane_programs(experiment)
    self._step = _looped(self._programs.step, self.shared_batch)

  def initial_states(self) -> list[TrainState]:
    return [init_state(self.experiment, seed) for seed in self.seeds]

  def steps_done(self, states: list[TrainState]) -> int:
    return max(int(step) for step in jax.device_get([state.step for state in states]))

  def step(self, states: list[TrainState], batch) -> tuple[list[TrainState], dict]:
    return self._step(states, batch, self.learning_rates, self.choices)

  def evaluate(self, states: list[TrainState], split: str) -> list[dict[str, float]]:
    single = self._programs.evaluate

    def every_lane(params, batch_stats, batch, mask):
      return _stack_on_host(
        [single(each, stats, batch, mask) for each, stats in zip(params, batch_stats)]
      )

    params = [state.params for state in states]
    batch_stats = [state.batch_stats for state in states]
    totals = evaluation.summed_statistics(every_lane, self.experiment, params, batch_stats, split)
    return evaluation.per_run_metrics(self.experiment.tasks, totals)

  def run_state(self, states: list[TrainState], index: int) -> TrainState:
    return states[index]

  def select(self, improved: np.ndarray, new: list, old: list) -> list[TrainState]:
    """Lanes where `improved` is True from `new`, the others from `old`."""
    return [fresh if keep else kept for fresh, kept, keep in zip(new, old, improved)]


def group_lanes(
  experiment: Experiment, configs: Sequence[ml_collections.ConfigDict], lane_mode: str = "auto"
) -> StackedLanes | LoopedLanes:
  """The lanes of a group of runs in `lane_mode` ('auto' or one of LANE_MODES)."""
  mode = default_lane_mode(lane_mode)
  if mode == "loop":
    return LoopedLanes(experiment, configs)
  return StackedLanes(experiment, configs, mode)
