r"""Benchmark: K training runs one after another vs as one compiled group (vmap, loop, lax.map).

  python benchmarks/sweep.py [--config=configs/scenes.py] [--runs=4,8] [--steps=20] \
    [--modes=vmap,loop]

Every side trains the same K runs (different seeds and learning rates, so every run has its own
batches) of the config's model, in one process, side by side:

* sequential: one jitted step per run, as separate `train_and_evaluate` calls build them (the
  learning rate is baked into each program, so each run compiles its own);
* grouped, per lane mode of `mtl_jax.train.lanes`: 'vmap' (runs batched into every op), 'loop'
  (one compiled single-run step applied to each lane in turn), 'map' (`lax.map` over runs).

Two numbers per side: the steady-state throughput in run-steps/s over `--steps` timed steps
(compilation excluded; the median of `--rounds` rounds that alternate between the sides), and
the compile time (all K programs for sequential, one for a group).
The last columns combine both for one full run of the config (its `total_steps` per run):
compile + K·total_steps / throughput, the wall time a sweep of K such runs spends on training.
Evaluation is excluded. Prints a markdown table.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtl_jax import train  # noqa: E402
from mtl_jax.data import pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/scenes.py", "Experiment config.", lock_config=True
)
_RUNS = flags.DEFINE_list("runs", ["4", "8"], "Group sizes K to measure.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per run.")
_ROUNDS = flags.DEFINE_integer(
  "rounds", 5, "Timed rounds per side, alternating; the median round counts."
)
_MODES = flags.DEFINE_list(
  "modes", ["vmap", "loop"], f"Lane modes to measure, of {', '.join(train.LANE_MODES)}."
)


def _batches(experiment, seeds, step):
  source = experiment.dataset.splits["train"]
  size = int(experiment.config.training.batch_size)
  return [source.batch(pipeline.train_indices(len(source), size, seed, step)) for seed in seeds]


def _block(tree):
  jax.tree_util.tree_map(lambda leaf: leaf.block_until_ready(), tree)


class Sequential:
  """K runs one after another, each with its own jitted step (the lr is baked into each program)."""

  def __init__(self, config, experiment, seeds, rates):
    self.experiment, self.seeds, self.steps, self.states = experiment, seeds, [], []
    for seed, rate in zip(seeds, rates):
      run_config = config.copy_and_resolve_references()
      with run_config.unlocked():
        run_config.optimizer.learning_rate = rate
      run_experiment = train.build_experiment(run_config, experiment.dataset)
      self.steps.append(
        jax.jit(
          train.make_train_step(
            run_experiment.model,
            run_experiment.tasks,
            run_experiment.weighting,
            run_experiment.optimizer,
          )
        )
      )
      self.states.append(train.init_state(experiment, seed))

  def compile(self) -> float:
    start = time.perf_counter()
    for index, seed in enumerate(self.seeds):  # The first call of each program compiles it.
      self.states[index], _ = self.steps[index](
        self.states[index], _batches(self.experiment, [seed], 0)[0]
      )
    _block(self.states)
    return time.perf_counter() - start

  def run(self, first_step: int, steps: int) -> float:
    start = time.perf_counter()
    for index, seed in enumerate(self.seeds):
      for step in range(first_step, first_step + steps):
        self.states[index], metrics = self.steps[index](
          self.states[index], _batches(self.experiment, [seed], step)[0]
        )
        jax.device_get(metrics)
    _block(self.states)
    return time.perf_counter() - start


class Grouped:
  """The same K runs as one group of `mtl_jax.train.lanes` in `lane_mode`."""

  def __init__(self, experiment, seeds, rates, lane_mode):
    self.experiment, self.seeds = experiment, seeds
    step_fn = train.make_multi_train_step(
      experiment, shared_batch=False, skip_non_finite=False, lane_mode=lane_mode
    )
    self.step_fn = step_fn if lane_mode == "loop" else jax.jit(step_fn)
    states = [train.init_state(experiment, seed) for seed in seeds]
    self.states = states if lane_mode == "loop" else train.stack_states(states)
    self.rates = jnp.asarray(rates, jnp.float32)
    self.choices = np.zeros(len(seeds), np.int32)

  def _batch(self, step):
    batches = _batches(self.experiment, self.seeds, step)
    return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}

  def compile(self) -> float:
    start = time.perf_counter()
    self.states, _ = self.step_fn(self.states, self._batch(0), self.rates, self.choices)
    _block(self.states)
    return time.perf_counter() - start

  def run(self, first_step: int, steps: int) -> float:
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
      self.states, metrics = self.step_fn(self.states, self._batch(step), self.rates, self.choices)
      jax.device_get(metrics)
    _block(self.states)
    return time.perf_counter() - start


def main(argv):
  del argv
  config = _CONFIG.value
  experiment = train.build_experiment(config)
  total = experiment.total_steps
  modes = [train.default_lane_mode(mode) for mode in _MODES.value]
  print(
    f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; model {config.model.encoder} "
    f"{config.dataset.height}x{config.dataset.width}, batch {config.training.batch_size}, method "
    f"{config.method.name}; {_STEPS.value} timed steps per run in {_ROUNDS.value} rounds; a full "
    f"run = {total} steps"
  )
  print(
    "| K | side | run-steps/s | speed-up | compile (s) | K full runs incl. compile (s) | speed-up |"
  )
  print("|---|---|---|---|---|---|---|")
  for runs in (int(value) for value in _RUNS.value):
    seeds = list(range(runs))
    rates = [float(config.optimizer.learning_rate) * (0.5**index) for index in range(runs)]
    sides = {"sequential": Sequential(config, experiment, seeds, rates)}
    for mode in modes:
      sides[mode] = Grouped(experiment, seeds, rates, mode)
    compile_seconds = {name: side.compile() for name, side in sides.items()}
    # Rounds alternate between the sides, so load that comes and goes hits all of them alike.
    chunk = max(1, _STEPS.value // _ROUNDS.value)
    seconds = {name: [] for name in sides}
    for round_index in range(_ROUNDS.value):
      for name, side in sides.items():
        seconds[name].append(side.run(1 + round_index * chunk, chunk) / chunk)
    per_step = {name: statistics.median(values) for name, values in seconds.items()}
    base_full = compile_seconds["sequential"] + per_step["sequential"] * total
    for name in sides:
      full = compile_seconds[name] + per_step[name] * total
      print(
        f"| {runs} | {name} | {runs / per_step[name]:.2f} | "
        f"{per_step['sequential'] / per_step[name]:.2f}x | {compile_seconds[name]:.1f} | "
        f"{full:.1f} | {base_full / full:.2f}x |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
