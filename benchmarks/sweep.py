"""Benchmark: training throughput of K runs one after another vs as one vmapped program.

  python benchmarks/sweep.py [--config=configs/scenes.py] [--runs=4,8] [--steps=20]

Both sides train the same K runs (different seeds and learning rates, so every run has its own
batches) of the config's model for `--steps` steps after a warm-up step that compiles, in one
process, side by side, as run-steps/s: sequentially (one jitted step per run), vmapped over
runs, and `lax.map` over runs inside one compiled program.
Evaluation is excluded (it is vmapped too, but its share depends on eval_every_epochs).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtl_jax import multirun  # noqa: E402
from mtl_jax import train  # noqa: E402
from mtl_jax.data import pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/scenes.py", "Experiment config.", lock_config=True)
_RUNS = flags.DEFINE_list("runs", ["4", "8"], "Group sizes K to measure.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per run.")


def _batches(experiment, seeds, step):
  source = experiment.dataset.splits["train"]
  size = int(experiment.config.training.batch_size)
  return [source.batch(pipeline.train_indices(len(source), size, seed, step)) for seed in seeds]


def _block(tree):
  jax.tree_util.tree_map(lambda leaf: leaf.block_until_ready(), tree)


def measure(config, runs: int, steps: int) -> tuple[float, float, float]:
  """Seconds for `steps` steps of `runs` runs: (sequential, vmapped, lax.map in one program)."""
  experiment = train.build_experiment(config)
  seeds = list(range(runs))
  rates = [float(config.optimizer.learning_rate) * (0.5 ** index) for index in range(runs)]
  # Sequential: one jitted step per learning rate would recompile; the foundation bakes the lr
  # into the optimizer, so build one step per run as a sweep of train_and_evaluate calls would.
  sequential_steps = []
  for rate in rates:
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
      run_config.optimizer.learning_rate = rate
    run_experiment = train.build_experiment(run_config, experiment.dataset)
    sequential_steps.append(jax.jit(train.make_train_step(
        run_experiment.model, run_experiment.tasks, run_experiment.weighting, run_experiment.optimizer)))
  states = [train.init_state(experiment, seed) for seed in seeds]
  for index in range(runs):  # compile (one program per run, as separate processes/runs would)
    states[index], _ = sequential_steps[index](states[index], _batches(experiment, [seeds[index]], 0)[0])
  _block(states)
  start = time.perf_counter()
  for index in range(runs):
    state = states[index]
    for step in range(1, steps + 1):
      state, metrics = sequential_steps[index](state, _batches(experiment, [seeds[index]], step)[0])
      jax.device_get(metrics)
    _block(state)
  sequential = time.perf_counter() - start

  rates_array = jnp.asarray(rates, jnp.float32)
  return sequential, _grouped(experiment, seeds, rates_array, steps, "vmap"), _grouped(
      experiment, seeds, rates_array, steps, "map")


def _grouped(experiment, seeds, rates_array, steps, lane_mode):
  step_fn = jax.jit(multirun.make_multi_train_step(experiment, shared_batch=False, skip_non_finite=False,
                                                   lane_mode=lane_mode))
  stacked = multirun.stack_states([train.init_state(experiment, seed) for seed in seeds])

  def stacked_batch(step):
    batches = _batches(experiment, seeds, step)
    return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}

  stacked, _ = step_fn(stacked, stacked_batch(0), rates_array)
  _block(stacked)
  start = time.perf_counter()
  for step in range(1, steps + 1):
    stacked, metrics = step_fn(stacked, stacked_batch(step), rates_array)
    jax.device_get(metrics)
  _block(stacked)
  return time.perf_counter() - start


def main(argv):
  del argv
  config = _CONFIG.value
  experiment = train.build_experiment(config)
  total = experiment.total_steps
  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; model {config.model.encoder} "
        f"{config.dataset.height}x{config.dataset.width}, batch {config.training.batch_size}; "
        f"{_STEPS.value} timed steps per run; a full run = {total} steps")
  print("| K | sequential run-steps/s | vmap run-steps/s | vmap speed-up | lax.map run-steps/s | lax.map speed-up |")
  print("|---|---|---|---|---|---|")
  for runs in (int(value) for value in _RUNS.value):
    sequential, vmapped, mapped = measure(config, runs, _STEPS.value)
    work = runs * _STEPS.value
    print(f"| {runs} | {work / sequential:.2f} | {work / vmapped:.2f} | {sequential / vmapped:.2f}x | "
          f"{work / mapped:.2f} | {sequential / mapped:.2f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
