"""Where training metrics go: the console (with steps/s and ETA), a JSONL file and TensorBoard.

TensorBoard event files are written with tensorboardX, which needs only protobuf: CLU's
writers would pull in TensorFlow (about 1.4 GB) for the same files. Only the writing process
(`parallel.is_writer`: process 0) writes and prints.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import numpy as np

from mtl_jax import parallel


def _to_float(value) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Writes scalar dicts to console, `metrics.jsonl` and TensorBoard event files in workdir."""

  def __init__(self, workdir: str | None, console: bool = True, tensorboard: bool = True):
    self.active = parallel.is_writer()
    self.console = console
    self._jsonl = None
    self._tensorboard = None
    if self.active and workdir:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter  # noqa: PLC0415  (only when TensorBoard is on)

        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self.active:
      return
    values = {f"{prefix}{key}": _to_float(value) for key, value in scalars.items()}
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
      self._jsonl.flush()
    if self._tensorboard is not None:
      for key, value in values.items():
        self._tensorboard.add_scalar(key, value, int(step))
    if self.console:
      shown = "  ".join(f"{key}={value:.4g}" for key, value in values.items())
      print(f"[step {step}] {shown}", flush=True)

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class ProgressReport:
  """Measures steps/s since the previous report and estimates the time left."""

  def __init__(self, total_steps: int, first_step: int = 0, label: str = ""):
    self.total_steps = total_steps
    self.label = label
    self._last_step = first_step
    self._last_time = time.perf_counter()

  def __call__(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    elapsed = now - self._last_time
    rate = (step - self._last_step) / elapsed if elapsed > 0 else float("nan")
    self._last_step, self._last_time = step, now
    remaining = (self.total_steps - step) / rate if rate and rate > 0 else float("nan")
    return {"steps_per_second": rate, "eta_seconds": remaining}

  def line(self, step: int, stats: Mapping[str, float]) -> str:
    percent = 100.0 * step / max(1, self.total_steps)
    return (
      f"{self.label}step {step}/{self.total_steps} ({percent:.0f}%)  "
      f"{stats['steps_per_second']:.2f} steps/s  ETA {format_duration(stats['eta_seconds'])}"
    )


def status(message: str) -> None:
  """A progress line on stdout (the writing process only)."""
  if parallel.is_writer():
    print(message, file=sys.stdout, flush=True)
