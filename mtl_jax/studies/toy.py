"""The toy study (paper Table 1): every optimiser x method x learning rate x start as one program.

All 162 runs of the default grid are one `jax.vmap` over runs inside one `jax.lax.scan` over
iterations, compiled once. Each run records the first iteration at which it reaches the
global minimum of the mean objective; a table row's entry is the largest such count over the
starts, or '-' when some start never gets there within `max_iterations`.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_jax.data import toy

# The studied paper's Table 1 (iterations to the minimum, None = '-'), for side-by-side output.
PAPER_TABLE = {
    "gd/ew": (None, 103, None, None, None, None, None, None, None),
    "gd/pcgrad": (None,) * 9,
    "gd/cagrad": (644, None, 213, 621, 8069, 5732, 20418, 34405, None),
    "adam/ew": (26, 37, 22, 58, 709, 2135, 9015, 16005, None),
    "adam/pcgrad": (25, 4960, 56, 15741, 34175, 41438, None, None, None),
    "adam/cagrad": (27, 30, 32, 106, 802, 7109, 11239, 14323, 57700),
}
PAPER_LEARNING_RATES = (10.0, 5.0, 1.0, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001)
OPTIMIZERS = ("gd", "adam")


def _check(config: ml_collections.ConfigDict) -> None:
  for name in config.optimizers:
    if name not in OPTIMIZERS:
      raise ValueError(f"config.optimizers has unknown {name!r}; valid: {', '.join(OPTIMIZERS)}.")
  for name in config.methods:
    if name not in toy.DIRECTIONS:
      raise ValueError(f"config.methods has unknown {name!r}; valid: {', '.join(toy.DIRECTIONS)}.")
  if config.max_iterations < config.dense_iterations or config.record_every <= 0:
    raise ValueError("config.max_iterations must be >= config.dense_iterations and config.record_every > 0.")


def make_program(config: ml_collections.ConfigDict, minimiser: np.ndarray, minimum: float):
  """Builds the jit-able function running every run of the grid.

  Args:
    config: the toy config (configs/toy.py).
    minimiser: [2] the global minimiser of the mean objective.
    minimum: the mean objective's value there.

  Returns:
    `program(optimizer_index [N], method_index [N], learning_rate [N], start [N, 2]) ->
    dict(first_hit [N] int32 (-1 = never), dense [I, N, 2], sparse [S, N, 2], final [N, 2])`.
  """
  methods = tuple(config.methods)
  directions = [
      (lambda g1, g2, name=name: toy.cagrad_direction(g1, g2, float(config.cagrad_c)) if name == "cagrad"
       else toy.DIRECTIONS[name](g1, g2))
      for name in methods
  ]
  b1, b2, eps = float(config.adam_b1), float(config.adam_b2), float(config.adam_eps)
  target = jnp.asarray(minimiser, jnp.float32)
  distance_tolerance, gap_tolerance = float(config.distance_tolerance), float(config.loss_gap_tolerance)
  adam_index = OPTIMIZERS.index("adam")

  def step(run, state, iteration):
    optimizer_index, method_index, learning_rate = run
    point, first_moment, second_moment, first_hit = state
    _, jacobian = toy.gradients(point)
    direction = jax.lax.switch(method_index, directions, jacobian[0], jacobian[1])
    first_moment = b1 * first_moment + (1.0 - b1) * direction
    second_moment = b2 * second_moment + (1.0 - b2) * direction * direction
    count = (iteration + 1).astype(jnp.float32)
    adam_update = (first_moment / (1.0 - b1**count)) / (jnp.sqrt(second_moment / (1.0 - b2**count)) + eps)
    update = jnp.where(optimizer_index == adam_index, adam_update, direction)
    point = point - learning_rate * update
    reached = (jnp.linalg.norm(point - target) < distance_tolerance) | (
        toy.mean_objective(point) - minimum < gap_tolerance)
    first_hit = jnp.where((first_hit < 0) & reached, iteration + 1, first_hit)
    return point, first_moment, second_moment, first_hit

  batched_step = jax.vmap(step, in_axes=(0, 0, None))
  dense_iterations = int(config.dense_iterations)
  record_every = int(config.record_every)
  chunks = (int(config.max_iterations) - dense_iterations) // record_every
  remainder = int(config.max_iterations) - dense_iterations - chunks * record_every

  def program(optimizer_index, method_index, learning_rate, start):
    runs = (optimizer_index, method_index, learning_rate)
    zeros = jnp.zeros_like(start)
    state = (start, zeros, zeros, jnp.full(start.shape[:1], -1, jnp.int32))

    def dense_body(state, iteration):
      state = batched_step(runs, state, iteration)
      return state, state[0]

    state, dense = jax.lax.scan(dense_body, state, jnp.arange(dense_iterations))

    def sparse_body(state, chunk):
      first = dense_iterations + chunk * record_every
      state = jax.lax.fori_loop(first, first + record_every, lambda i, s: batched_step(runs, s, i), state)
      return state, state[0]

    state, sparse = jax.lax.scan(sparse_body, state, jnp.arange(chunks))
    done = dense_iterations + chunks * record_every
    state = jax.lax.fori_loop(done, done + remainder, lambda i, s: batched_step(runs, s, i), state)
    return {"first_hit": state[3], "dense": dense, "sparse": sparse, "final": state[0]}

  return program


def _format(value: Any) -> str:
  return "-" if value is None else str(value)


def format_table(table: dict[str, list[int | None]], learning_rates, paper: bool = True) -> str:
  """Markdown table of iterations (ours, and the paper's beside it where the lr grid matches)."""
  header = "| run | " + " | ".join(f"{lr:g}" for lr in learning_rates) + " |"
  lines = [header, "|---" * (len(learning_rates) + 1) + "|"]
  for key, row in table.items():
    lines.append(f"| {key} (ours) | " + " | ".join(_format(v) for v in row) + " |")
    if paper and key in PAPER_TABLE and tuple(learning_rates) == PAPER_LEARNING_RATES:
      lines.append(f"| {key} (paper) | " + " | ".join(_format(v) for v in PAPER_TABLE[key]) + " |")
  return "\n".join(lines)


def run_toy(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Runs the whole grid and returns (and prints nothing but progress about) the iteration table.

  Args:
    config: the toy config (configs/toy.py).
    workdir: where the trajectory figure and table go; None writes nothing.

  Returns:
    dict with 'table' {'opt/method': [iterations or None per lr]}, 'paper_table',
    'learning_rates', 'minimiser', 'minimum', 'tolerance' (text), 'compile_seconds',
    'run_seconds', 'num_runs', 'markdown' (the side-by-side table) and 'figure' (path or None).
  """
  _check(config)
  minimiser, minimum = toy.global_minimum()
  grid = list(itertools.product(range(len(config.optimizers)), range(len(config.methods)),
                                range(len(config.learning_rates)), range(len(config.starts))))
  optimizer_index = np.array([OPTIMIZERS.index(config.optimizers[g[0]]) for g in grid], np.int32)
  method_index = np.array([g[1] for g in grid], np.int32)
  learning_rate = np.array([config.learning_rates[g[2]] for g in grid], np.float32)
  start = np.array([config.starts[g[3]] for g in grid], np.float32)
  program = jax.jit(make_program(config, minimiser, minimum))
  begin = time.perf_counter()
  compiled = program.lower(optimizer_index, method_index, learning_rate, start).compile()
  compile_seconds = time.perf_counter() - begin
  begin = time.perf_counter()
  outputs = jax.block_until_ready(compiled(optimizer_index, method_index, learning_rate, start))
  run_seconds = time.perf_counter() - begin
  outputs = jax.device_get(outputs)
  hits = outputs["first_hit"].reshape(len(config.optimizers), len(config.methods), len(config.learning_rates),
                                      len(config.starts))
  table = {}
  for o, optimizer in enumerate(config.optimizers):
    for m, method in enumerate(config.methods):
      row = []
      for lr in range(len(config.learning_rates)):
        starts = hits[o, m, lr]
        row.append(None if (starts < 0).any() else int(starts.max()))
      table[f"{optimizer}/{method}"] = row
  tolerance = (f"reached = |z - z*| < {config.distance_tolerance:g} or mean(z) - mean(z*) < "
               f"{config.loss_gap_tolerance:g}, z* = ({minimiser[0]:.4f}, {minimiser[1]:.4f}), "
               f"mean(z*) = {minimum:.6f}; at most {config.max_iterations} iterations")
  results = {
      "table": table,
      "paper_table": {key: list(value) for key, value in PAPER_TABLE.items()},
      "learning_rates": list(config.learning_rates),
      "minimiser": [float(v) for v in minimiser],
      "minimum": minimum,
      "tolerance": tolerance,
      "compile_seconds": compile_seconds,
      "run_seconds": run_seconds,
      "num_runs": len(grid),
      "markdown": format_table(table, config.learning_rates),
      "figure": None,
  }
  if workdir and config.plot:
    os.makedirs(workdir, exist_ok=True)
    results["figure"] = plot_trajectories(config, outputs, minimiser, os.path.join(workdir, "toy_trajectories.png"))
    with open(os.path.join(workdir, "toy_table.md"), "w") as file:
      file.write(results["markdown"] + "\n\n" + tolerance + "\n")
  return results


def plot_trajectories(config: ml_collections.ConfigDict, outputs: dict, minimiser, path: str) -> str:
  """One panel per optimiser x method over the mean objective's contours; colour = learning rate."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  axis = np.linspace(-10, 10, 300)
  xs, ys = np.meshgrid(axis, axis)
  values = np.asarray(jax.jit(jax.vmap(toy.mean_objective))(
      jnp.stack([xs.ravel(), ys.ravel()], -1).astype(jnp.float32))).reshape(xs.shape)
  shape = (len(config.optimizers), len(config.methods), len(config.learning_rates), len(config.starts))
  paths = np.concatenate([outputs["dense"], outputs["sparse"]], axis=0)  # [time, runs, 2]
  paths = paths.reshape(paths.shape[0], *shape, 2)
  colours = plt.cm.viridis(np.linspace(0, 1, len(config.learning_rates)))
  figure, axes = plt.subplots(len(config.optimizers), len(config.methods), figsize=(4 * len(config.methods),
                                                                                     4 * len(config.optimizers)),
                              squeeze=False)
  for o, optimizer in enumerate(config.optimizers):
    for m, method in enumerate(config.methods):
      panel = axes[o, m]
      panel.contourf(xs, ys, values, levels=30, cmap="Greys", alpha=0.5)
      for lr_index, lr in enumerate(config.learning_rates):
        for s in range(len(config.starts)):
          trace = paths[:, o, m, lr_index, s]
          trace = trace[np.isfinite(trace).all(-1)]
          panel.plot(trace[:, 0], trace[:, 1], color=colours[lr_index], lw=0.8,
                     label=f"lr {lr:g}" if s == 0 else None)
      panel.scatter(*np.array(config.starts).T, color="red", marker="o", s=15, zorder=3)
      panel.scatter([minimiser[0]], [minimiser[1]], color="gold", marker="*", s=80, zorder=3)
      panel.set(xlim=(-10, 10), ylim=(-10, 10), title=f"{optimizer.upper()} + {method}")
  axes[0, -1].legend(fontsize=6, loc="upper right")
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)
  return path
