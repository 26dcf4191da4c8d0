"""Benchmark: K training runs one after another vs as one compiled group (vmap, loop, lax.map).

  python benchmarks/sweep.py [--config=configs/scenes.py] [--runs=4,8] [--steps=20] [--modes=vmap,loop]

Every side trains the same K runs (different seeds and learning rates, so every run has its own
batches) of the config's model, in one process, side by side:

* sequential: one jitted step per run, as separate `train_and_evaluate` calls build them (the
  learning rate is baked into each program, so each run compiles its own);
* grouped, per lane mode of `mtl_jax.multirun`: 'vmap' (runs batched into every op), 'loop'
  (one compiled single-run step applied to each lane in turn), 'map' (`lax.map` over runs).

Two numbers per side: the steady-state throughput in run-steps/s over `--steps` timed steps
(compilation excluded), and the compile time (all K programs for sequential, one for a group).
The last columns combine both for one full run of the config (its `total_steps` per run):
compile + K·total_steps / throughput, the wall time a sweep of K such runs spends on training.
Evaluation is excluded. Prints a markdown table.
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
_MODES = flags.DEFINE_list("modes", ["vmap", "loop"], f"Lane modes to measure, of {', '.join(multirun.LANE_MODES)}.")


def _batches(experiment, seeds, step):
  source = experiment.dataset.splits["train"]
  size = int(experiment.config.training.batch_size)
  return [source.batch(pipeline.train_indices(len(source), size, seed, step)) for seed in seeds]


def _block(tree):
  jax.tree_util.tree_map(lambda leaf: leaf.block_until_ready(), tree)


def sequential(config, experiment, seeds, rates, steps) -> tuple[float, float]:
  """(compile seconds for all runs, seconds for `steps` steps of every run)."""
  compile_seconds, run_seconds = 0.0, 0.0
  for seed, rate in zip(seeds, rates):
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
      run_config.optimizer.learning_rate = rate
    run_experiment = train.build_experiment(run_config, experiment.dataset)
    step_fn = jax.jit(train.make_train_step(
        run_experiment.model, run_experiment.tasks, run_experiment.weighting, run_experiment.optimizer))
    state = train.init_state(experiment, seed)
    start = time.perf_counter()
    state, _ = step_fn(state, _batches(experiment, [seed], 0)[0])  # The first call compiles.
    _block(state)
    compile_seconds += time.perf_counter() - start
    start = time.perf_counter()
    for step in range(1, steps + 1):
      state, metrics = step_fn(state, _batches(experiment, [seed], step)[0])
      jax.device_get(metrics)
    _block(state)
    run_seconds += time.perf_counter() - start
  return compile_seconds, run_seconds


def grouped(experiment, seeds, rates, steps, lane_mode) -> tuple[float, float]:
  """(compile seconds, seconds for `steps` steps of all runs) of one group in `lane_mode`."""
  step_fn = multirun.make_multi_train_step(experiment, shared_batch=False, skip_non_finite=False, lane_mode=lane_mode)
  step_fn = step_fn if lane_mode == "loop" else jax.jit(step_fn)
  stacked = multirun.stack_states([train.init_state(experiment, seed) for seed in seeds])
  rates_array = jnp.asarray(rates, jnp.float32)

  def stacked_batch(step):
    batches = _batches(experiment, seeds, step)
    return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}

  start = time.perf_counter()
  stacked, _ = step_fn(stacked, stacked_batch(0), rates_array)  # The first call compiles.
  _block(stacked)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for step in range(1, steps + 1):
    stacked, metrics = step_fn(stacked, stacked_batch(step), rates_array)
    jax.device_get(metrics)
  _block(stacked)
  return compile_seconds, time.perf_counter() - start


def main(argv):
  del argv
  config = _CONFIG.value
  experiment = train.build_experiment(config)
  total = experiment.total_steps
  modes = [multirun.default_lane_mode(mode) for mode in _MODES.value]
  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; model {config.model.encoder} "
        f"{config.dataset.height}x{config.dataset.width}, batch {config.training.batch_size}, method "
        f"{config.method.name}; {_STEPS.value} timed steps per run; a full run = {total} steps")
  print("| K | side | run-steps/s | speed-up | compile (s) | K full runs incl. compile (s) | speed-up |")
  print("|---|---|---|---|---|---|---|")
  for runs in (int(value) for value in _RUNS.value):
    seeds = list(range(runs))
    rates = [float(config.optimizer.learning_rate) * (0.5 ** index) for index in range(runs)]
    work = runs * _STEPS.value
    sides = {"sequential": sequential(config, experiment, seeds, rates, _STEPS.value)}
    for mode in modes:
      sides[mode] = grouped(experiment, seeds, rates, _STEPS.value, mode)
    base_compile, base_seconds = sides["sequential"]
    base_full = base_compile + base_seconds * total / _STEPS.value
    for name, (compile_seconds, seconds) in sides.items():
      full = compile_seconds + seconds * total / _STEPS.value
      print(f"| {runs} | {name} | {work / seconds:.2f} | {base_seconds / seconds:.2f}x | {compile_seconds:.1f} | "
            f"{full:.1f} | {base_full / full:.2f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
