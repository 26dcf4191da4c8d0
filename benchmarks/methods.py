"""Benchmark: the step time of gradient-weighting methods relative to EW's step (T = 3, CNN encoder).

Measures, side by side in one process, the jitted train step of EW, of each Gramian method via
the Gramian path (Gramian -> weights -> one weighted backward) and via the Jacobian path
(per-task gradients materialised [T, P], d = wᵀJ), and prints a markdown table of ratios.

  python benchmarks/methods.py [--methods=pcgrad,mgda] [--repeats=20] [--batch_size=16]
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import test as test_config
from mtl_jax import method_steps
from mtl_jax import train
from mtl_jax.data import registry

_METHODS = flags.DEFINE_list("methods", ["pcgrad", "imtl", "cagrad", "mgda", "upgrad", "nash_mtl", "aligned_mtl",
                                         "gradvac"], "Gramian methods to time.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps per method (after one warm-up step).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size.")


def _config(method: str, batch_size: int):
  config = test_config.get_config(f"method={method}")
  config.unlock()
  config.training.batch_size = batch_size
  config.model.features = (16, 16)
  return config.lock()


def jacobian_path_step(experiment, level="task"):
  """The same method via the Jacobian path: per-task encoder gradients J, then d = wᵀJ."""
  model, tasks, weighting, optimizer = experiment.model, experiment.tasks, experiment.weighting, experiment.optimizer

  def step(state, batch):
    rng, step_rng = jax.random.split(state.rng)
    _, pullback, batch_stats, feature_gradients, head_gradients, losses = method_steps._per_task_feature_gradients(
        model, tasks, state, batch)
    (jacobian,) = jax.vmap(pullback)(feature_gradients)
    flat = jnp.concatenate([leaf.reshape(len(tasks), -1) for leaf in jax.tree_util.tree_leaves(jacobian)], axis=1)
    weights, weighting_state, aux = weighting.combine(flat @ flat.T, losses, state.weighting_params,
                                                      state.weighting_state, step_rng, state.step)
    encoder = jax.tree_util.tree_map(lambda leaf: jnp.tensordot(weights, leaf, axes=1), jacobian)
    grads = {"model": {"encoder": encoder, "heads": head_gradients},
             "weighting": jax.tree_util.tree_map(jnp.zeros_like, state.weighting_params)}
    return method_steps._finish(state, optimizer, grads, batch_stats, weighting_state, rng, losses, aux)

  return step


def _time(step, state, batch, repeats):
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(repeats):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / repeats


def main(argv):
  del argv
  batch_size = _BATCH_SIZE.value
  dataset = registry.load_dataset(_config("ew", batch_size).dataset)
  batch = dataset.splits["train"].batch(np.arange(batch_size))
  timings = {}
  for method in ["ew"] + list(_METHODS.value):
    experiment = train.build_experiment(_config(method, batch_size), dataset)
    state = train.init_state(experiment, 0)
    step = jax.jit(train.make_train_step(experiment.model, experiment.tasks, experiment.weighting,
                                         experiment.optimizer))
    gramian_time = _time(step, state, batch, _REPEATS.value)
    jacobian_time = None
    if method != "ew":
      jacobian_time = _time(jax.jit(jacobian_path_step(experiment)), state, batch, _REPEATS.value)
    timings[method] = (gramian_time, jacobian_time)
    print(f"{method}: {gramian_time * 1e3:.1f} ms" + (f", Jacobian path {jacobian_time * 1e3:.1f} ms"
                                                        if jacobian_time else ""), flush=True)
  ew = timings["ew"][0]
  print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.default_backend()}; small_cnn (16, 16) norm "
        f"{_config('ew', batch_size).model.norm}, 16x32 images, batch {batch_size}, T = 3, {_REPEATS.value} steps.\n")
  print("| Method | Gramian path (ms) | ÷ EW | Jacobian path (ms) | ÷ EW |")
  print("|---|---|---|---|---|")
  print(f"| EW | {ew * 1e3:.1f} | 1.00 | – | – |")
  for method in _METHODS.value:
    gramian_time, jacobian_time = timings[method]
    print(f"| {method} | {gramian_time * 1e3:.1f} | {gramian_time / ew:.2f} | {jacobian_time * 1e3:.1f} | "
          f"{jacobian_time / ew:.2f} |")


if __name__ == "__main__":
  app.run(main)
