"""Timing compiled train steps fairly, for the benchmarks and the sample-alignment study's step
costs: each step compiled and warmed up first, then rounds that call every step once in turn, so
that load from other processes falls on all of them alike."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Hashable, Mapping

import jax

from mtl_jax.train import steps
from mtl_jax.train.state import Experiment
from mtl_jax.train.state import TrainState
from mtl_jax.train.state import init_state


def compiled_train_step(experiment: Experiment, batch) -> tuple[Any, TrainState]:
  """The experiment's train step compiled for `batch` and run once (its warm-up), with the
  initial state (seed 0) it is timed on."""
  state = init_state(experiment, 0)
  compiled = jax.jit(steps.experiment_train_step(experiment)).lower(state, batch).compile()
  jax.block_until_ready(compiled(state, batch))
  return compiled, state


def interleaved_medians(calls: Mapping[Hashable, Callable[[], Any]], rounds: int) -> dict:
  """Median seconds of each call (waiting for its results) over `rounds` rounds, each round
  calling every one once in turn."""
  times: dict[Hashable, list[float]] = {key: [] for key in calls}
  for _ in range(rounds):
    for key, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[key].append(time.perf_counter() - start)
  return {key: statistics.median(values) for key, values in times.items()}
