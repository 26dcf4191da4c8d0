"""The toy study (paper Table 1): every optimiser x method x learning rate x start as one program.

All 162 runs of the default grid are one `jax.vmap` over runs inside one `jax.lax.scan` over
iterations, compiled once. Each run records the first iteration at which it reaches the
global minimum of the mean objective; a table row's entry is the largest such count over the
starts, or '-' when some start never gets there within `max_iterations`.

The runs are chaotic: in the valley the two log-troughs cancel to a few digits, so float32
and float64, or starts 1e-6 apart, can end in iteration counts that differ by orders of
magnitude. The study therefore runs in `config.dtype` (float64 by default, inside a scoped
`jax.enable_x64`, so the rest of the process keeps its float32 default) and repeats the grid
from `config.perturbed_starts` starts moved by `config.perturbation` and in float32; each cell
shows its range over these variants, and cells whose variants disagree by more than
`config.reproducible_spread` are marked as showing only the pattern.
"""

from __future__ import annotations

import contextlib
import itertools
import math
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
    raise ValueError(
      "config.max_iterations must be >= config.dense_iterations and config.record_every > 0."
    )
  _precision(config.dtype)


def make_program(
  config: ml_collections.ConfigDict, minimiser: np.ndarray, minimum: float, dtype=jnp.float32
):
  """Builds the jit-able function running every run of the grid.

  Args:
    config: the toy config (configs/toy.py).
    minimiser: [2] the global minimiser of the mean objective.
    minimum: the mean objective's value there.
    dtype: the floating type of the runs (float64 needs x64 enabled while tracing).

  Returns:
    `program(optimizer_index [N], method_index [N], learning_rate [N], start [N, 2]) ->
    dict(first_hit [N] int32 (-1 = never), dense [I, N, 2], sparse [S, N, 2], final [N, 2])`.
  """
  batched_step = jax.vmap(_make_step(config, minimiser, minimum, dtype), in_axes=(0, 0, None))
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

    state, dense = jax.lax.scan(dense_body, state, jnp.arange(dense_iterations, dtype=jnp.int32))

    def sparse_body(state, chunk):
      first = dense_iterations + chunk * record_every
      state = jax.lax.fori_loop(
        first, first + record_every, lambda i, s: batched_step(runs, s, i), state
      )
      return state, state[0]

    state, sparse = jax.lax.scan(sparse_body, state, jnp.arange(chunks, dtype=jnp.int32))
    done = dense_iterations + chunks * record_every
    state = jax.lax.fori_loop(done, done + remainder, lambda i, s: batched_step(runs, s, i), state)
    return {"first_hit": state[3], "dense": dense, "sparse": sparse, "final": state[0]}

  return program


def _make_step(config: ml_collections.ConfigDict, minimiser: np.ndarray, minimum: float, dtype):
  """`step((optimizer, method, lr), (point, m, v, first hit), iteration) -> state` of one run."""
  directions = [
    (
      lambda g1, g2, name=name: (
        toy.cagrad_direction(g1, g2, float(config.cagrad_c))
        if name == "cagrad"
        else toy.DIRECTIONS[name](g1, g2)
      )
    )
    for name in config.methods
  ]
  b1, b2, eps = float(config.adam_b1), float(config.adam_b2), float(config.adam_eps)
  # 1 - βᵗ as -expm1(t log β), log β in Python's float64: no cancellation when βᵗ is near 1,
  # so even a float32 run gets the bias corrections PyTorch computes in float64.
  log_b1, log_b2 = math.log(b1), math.log(b2)
  target = jnp.asarray(minimiser, dtype)
  distance_tolerance, gap_tolerance = (
    float(config.distance_tolerance),
    float(config.loss_gap_tolerance),
  )
  adam_index = OPTIMIZERS.index("adam")

  def step(run, state, iteration):
    optimizer_index, method_index, learning_rate = run
    point, first_moment, second_moment, first_hit = state
    iteration = jnp.asarray(iteration, jnp.int32)
    _, jacobian = toy.gradients(point)
    direction = jax.lax.switch(method_index, directions, jacobian[0], jacobian[1])
    first_moment = b1 * first_moment + (1.0 - b1) * direction
    second_moment = b2 * second_moment + (1.0 - b2) * direction * direction
    count = (iteration + 1).astype(dtype)
    correction_1, correction_2 = -jnp.expm1(count * log_b1), -jnp.expm1(count * log_b2)
    # PyTorch's order: lr / (1 - β1ᵗ) · m / (√v / √(1 - β2ᵗ) + eps).
    adam_update = (
      first_moment / (jnp.sqrt(second_moment) / jnp.sqrt(correction_2) + eps)
    ) / correction_1
    update = jnp.where(optimizer_index == adam_index, adam_update, direction)
    point = point - learning_rate * update
    reached = (jnp.linalg.norm(point - target) < distance_tolerance) | (
      toy.mean_objective(point) - minimum < gap_tolerance
    )
    first_hit = jnp.where((first_hit < 0) & reached, iteration + 1, first_hit)
    return point, first_moment, second_moment, first_hit

  return step


def _format(value: Any) -> str:
  return "-" if value is None else str(value)


def _cell(value, variants, reproducible: bool) -> str:
  """'126' when every variant agrees, '126 [98, 140]' with their range, '*' when not
  reproducible."""
  text = _format(value) + ("" if reproducible else "*")
  if all(variant == value for variant in variants):
    return text
  converged = [variant for variant in variants if variant is not None]
  low = _format(min(converged)) if converged else "-"
  high = "-" if len(converged) < len(variants) else _format(max(converged))
  return f"{text} [{low}, {high}]"


def format_table(
  table: dict[str, list[int | None]],
  learning_rates,
  paper: bool = True,
  sensitivity: dict | None = None,
) -> str:
  """Markdown table of iterations (ours, and the paper's beside it where the lr grid matches).

  Args:
    table: 'opt/method' -> iterations (None = never) per learning rate.
    learning_rates: the column headers.
    paper: add the paper's rows where the grids match.
    sensitivity: optional {'variants': 'opt/method' -> per lr the list of variant values,
      'reproducible': 'opt/method' -> per lr bool}: ranges and marks shown in each cell.
  """
  header = "| run | " + " | ".join(f"{lr:g}" for lr in learning_rates) + " |"
  lines = [header, "|---" * (len(learning_rates) + 1) + "|"]
  for key, row in table.items():
    if sensitivity is None:
      cells = [_format(v) for v in row]
    else:
      cells = [
        _cell(v, variants, ok)
        for v, variants, ok in zip(
          row, sensitivity["variants"][key], sensitivity["reproducible"][key]
        )
      ]
    lines.append(f"| {key} (ours) | " + " | ".join(cells) + " |")
    if paper and key in PAPER_TABLE and tuple(learning_rates) == PAPER_LEARNING_RATES:
      lines.append(f"| {key} (paper) | " + " | ".join(_format(v) for v in PAPER_TABLE[key]) + " |")
  return "\n".join(lines)


def _precision(dtype: str):
  """(jnp dtype, context) for a run in 'float32' or 'float64' (x64 enabled only inside the
  context)."""
  if dtype == "float64":
    return jnp.float64, jax.enable_x64(True)
  if dtype == "float32":
    return jnp.float32, contextlib.nullcontext()
  raise ValueError(f"config.dtype must be 'float32' or 'float64', got {dtype!r}.")


def _run_grid(
  config, minimiser, minimum, start_sets: list[np.ndarray], dtype: str
) -> tuple[dict, float, float]:
  """Runs the grid from every set of starts [S, 2] in `dtype`, all as one program.

  Returns:
    (outputs on host with a leading axis over the start sets, compile seconds, run seconds).
  """
  grid = list(
    itertools.product(
      range(len(start_sets)),
      range(len(config.optimizers)),
      range(len(config.methods)),
      range(len(config.learning_rates)),
      range(len(start_sets[0])),
    )
  )
  float_type, precision = _precision(dtype)
  with precision:
    optimizer_index = jnp.asarray(
      [OPTIMIZERS.index(config.optimizers[g[1]]) for g in grid], jnp.int32
    )
    method_index = jnp.asarray([g[2] for g in grid], jnp.int32)
    learning_rate = jnp.asarray([config.learning_rates[g[3]] for g in grid], float_type)
    start = jnp.asarray(np.array([start_sets[g[0]][g[4]] for g in grid]), float_type)
    program = jax.jit(make_program(config, minimiser, minimum, float_type))
    begin = time.perf_counter()
    compiled = program.lower(optimizer_index, method_index, learning_rate, start).compile()
    compile_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    outputs = jax.device_get(
      jax.block_until_ready(compiled(optimizer_index, method_index, learning_rate, start))
    )
    run_seconds = time.perf_counter() - begin
  sets, per_set = len(start_sets), len(grid) // len(start_sets)
  # first_hit and final are [runs, ...]; the trajectories [time, runs, 2].
  outputs = {
    key: (
      value.reshape(sets, per_set, *value.shape[1:])
      if key in ("first_hit", "final")
      else np.moveaxis(value.reshape(value.shape[0], sets, per_set, *value.shape[2:]), 1, 0)
    )
    for key, value in outputs.items()
  }
  return outputs, compile_seconds, run_seconds


def _iteration_table(config, first_hit: np.ndarray, num_starts: int) -> dict[str, list[int | None]]:
  """'opt/method' -> per lr the largest first hit over the starts (None when one never hits)."""
  hits = first_hit.reshape(
    len(config.optimizers), len(config.methods), len(config.learning_rates), num_starts
  )
  table = {}
  for o, optimizer in enumerate(config.optimizers):
    for m, method in enumerate(config.methods):
      table[f"{optimizer}/{method}"] = [
        None if (starts < 0).any() else int(starts.max()) for starts in hits[o, m]
      ]
  return table


def perturbed_starts(config: ml_collections.ConfigDict) -> list[np.ndarray]:
  """`config.perturbed_starts` copies of the starts, each moved by `config.perturbation` in a random
  direction."""
  generator = np.random.default_rng(int(config.perturbation_seed))
  starts = np.asarray(config.starts, np.float64)
  copies = []
  for _ in range(int(config.perturbed_starts)):
    angles = generator.uniform(0, 2 * np.pi, len(starts))
    copies.append(
      starts + float(config.perturbation) * np.stack([np.cos(angles), np.sin(angles)], -1)
    )
  return copies


def _sensitivity(config, table, variant_tables) -> dict:
  """Per cell, the variants' values and whether all are within `reproducible_spread` of ours."""
  spread = float(config.reproducible_spread)
  variants, reproducible = {}, {}
  for key, row in table.items():
    variants[key] = [
      [variant_table[key][lr] for variant_table in variant_tables.values()]
      for lr in range(len(row))
    ]
    reproducible[key] = [
      all(v == value for v in values)
      if value is None or None in values
      else all(abs(v - value) <= spread * value for v in values)
      for value, values in zip(row, variants[key])
    ]
  return {"names": list(variant_tables), "variants": variants, "reproducible": reproducible}


def run_toy(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Runs the grid and its variants and returns (and prints nothing but progress about) the table.

  Args:
    config: the toy config (configs/toy.py).
    workdir: where the trajectory figure and table go; None writes nothing.

  Returns:
    dict with 'table' {'opt/method': [iterations or None per lr]}, 'paper_table',
    'learning_rates', 'minimiser', 'minimum', 'tolerance' (text), 'dtype', 'compile_seconds',
    'run_seconds' (all variants), 'num_runs' (of the main grid), 'sensitivity' ('names' of the
    variants, per-cell 'variants' values and 'reproducible' flags), 'reproducible_cells',
    'cells', 'markdown' (the side-by-side table with ranges and its legend) and 'figure'.
  """
  _check(config)
  minimiser, minimum = toy.global_minimum()
  starts = np.asarray(config.starts, np.float64)
  moved = perturbed_starts(config)
  # The moved starts run in the same program as the main grid (one compilation).
  runs, compile_seconds, run_seconds = _run_grid(
    config, minimiser, minimum, [starts] + moved, config.dtype
  )
  outputs = {key: value[0] for key, value in runs.items()}
  table = _iteration_table(config, outputs["first_hit"], len(starts))
  variant_tables = {
    f"start moved {float(config.perturbation):g} #{k + 1}": _iteration_table(
      config, runs["first_hit"][k + 1], len(starts)
    )
    for k in range(len(moved))
  }
  if config.compare_precisions:
    other = "float32" if config.dtype == "float64" else "float64"
    runs, compile_more, run_more = _run_grid(config, minimiser, minimum, [starts], other)
    variant_tables[other] = _iteration_table(config, runs["first_hit"][0], len(starts))
    compile_seconds, run_seconds = compile_seconds + compile_more, run_seconds + run_more
  sensitivity = _sensitivity(config, table, variant_tables)
  flags = [flag for row in sensitivity["reproducible"].values() for flag in row]
  tolerance = (
    f"reached = |z - z*| < {config.distance_tolerance:g} or mean(z) - mean(z*) < "
    f"{config.loss_gap_tolerance:g}, z* = ({minimiser[0]:.4f}, {minimiser[1]:.4f}), "
    f"mean(z*) = {minimum:.6f}; at most {config.max_iterations} iterations"
  )
  legend = (
    f"Runs in {config.dtype}. [low, high]: the range of a cell over {len(variant_tables)} variants "
    f"({'; '.join(variant_tables)}); '-' there: some variant never reached the minimum. *: a "
    f"variant differs by more than {100 * float(config.reproducible_spread):g}% (or in whether it "
    f"converges): the cell shows the pattern, not a reproducible number. {sum(flags)} of "
    f"{len(flags)} cells are reproducible."
  )
  results = {
    "table": table,
    "paper_table": {key: list(value) for key, value in PAPER_TABLE.items()},
    "learning_rates": list(config.learning_rates),
    "minimiser": [float(v) for v in minimiser],
    "minimum": minimum,
    "tolerance": tolerance,
    "dtype": config.dtype,
    "compile_seconds": compile_seconds,
    "run_seconds": run_seconds,
    "num_runs": len(outputs["first_hit"]),
    "sensitivity": sensitivity,
    "reproducible_cells": sum(flags),
    "cells": len(flags),
    "markdown": format_table(table, config.learning_rates, sensitivity=sensitivity)
    + "\n\n"
    + legend,
    "figure": None,
  }
  if workdir and config.plot:
    os.makedirs(workdir, exist_ok=True)
    results["figure"] = plot_trajectories(
      config, outputs, minimiser, os.path.join(workdir, "toy_trajectories.png")
    )
    with open(os.path.join(workdir, "toy_table.md"), "w") as file:
      file.write(results["markdown"] + "\n\n" + tolerance + "\n")
  return results


def plot_trajectories(
  config: ml_collections.ConfigDict, outputs: dict, minimiser, path: str
) -> str:
  """One panel per optimiser x method over the mean objective's contours; colour = learning rate."""
  import matplotlib  # noqa: PLC0415  (plotting is optional at import time)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  axis = np.linspace(-10, 10, 300)
  xs, ys = np.meshgrid(axis, axis)
  values = np.asarray(
    jax.jit(jax.vmap(toy.mean_objective))(
      jnp.stack([xs.ravel(), ys.ravel()], -1).astype(jnp.float32)
    )
  ).reshape(xs.shape)
  shape = (
    len(config.optimizers),
    len(config.methods),
    len(config.learning_rates),
    len(config.starts),
  )
  paths = np.concatenate([outputs["dense"], outputs["sparse"]], axis=0)  # [time, runs, 2]
  paths = paths.reshape(paths.shape[0], *shape, 2)
  colours = plt.cm.viridis(np.linspace(0, 1, len(config.learning_rates)))
  figure, axes = plt.subplots(
    len(config.optimizers),
    len(config.methods),
    figsize=(4 * len(config.methods), 4 * len(config.optimizers)),
    squeeze=False,
  )
  for o, optimizer in enumerate(config.optimizers):
    for m, method in enumerate(config.methods):
      panel = axes[o, m]
      panel.contourf(xs, ys, values, levels=30, cmap="Greys", alpha=0.5)
      for lr_index, lr in enumerate(config.learning_rates):
        for s in range(len(config.starts)):
          trace = paths[:, o, m, lr_index, s]
          trace = trace[np.isfinite(trace).all(-1)]
          panel.plot(
            trace[:, 0],
            trace[:, 1],
            color=colours[lr_index],
            lw=0.8,
            label=f"lr {lr:g}" if s == 0 else None,
          )
      panel.scatter(*np.array(config.starts).T, color="red", marker="o", s=15, zorder=3)
      panel.scatter([minimiser[0]], [minimiser[1]], color="gold", marker="*", s=80, zorder=3)
      panel.set(xlim=(-10, 10), ylim=(-10, 10), title=f"{optimizer.upper()} + {method}")
  axes[0, -1].legend(fontsize=6, loc="upper right")
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)
  return path
