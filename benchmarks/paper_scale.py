"""Benchmark at the paper's sizes on synthetic data: parameters, compiled peak memory, step time
and the host's time per batch, with their ratio.

Configs (configs/<name>.py as they are, the data synthetic and in memory): cityscapes_segnet
(128x256, batch 64), nyuv2_segnet and nyuv2_deeplab (288x384, batch 8), celeba_resnet18 (64x64,
batch 512, 40 heads). Per config:

* parameters: the model's parameter count;
* peak MiB: XLA's memory analysis of the compiled train step (`jit(...).lower(...).compile()`,
  temporaries plus outputs; the incoming state and batch excluded), for the EW step and for a
  Gramian method's step (PCGrad at level 'task'), each with model.dtype float32 and bfloat16;
* saved MiB: what the EW loss's backward pass keeps from its forward pass (jax's saved residuals
  of the traced step, parameters and batch excluded; `residual_mib`), float32 and bfloat16: the
  part of the memory that the model's dtype decides, whichever backend compiles it. XLA:CPU
  computes every bfloat16 convolution in float32 (with float32 copies of its operands and
  result), so its peak says little about bfloat16 on an accelerator; this column is the model's
  share of that memory;
* step ms: the float32 EW step as training runs it (uint8 image and augmentation draws in,
  augmentation inside the step), median of --steps calls after --warmup untimed ones (the
  program is compiled ahead, so on a CPU, where a paper-size step takes a minute or more,
  `--warmup 0 --steps 1` is enough; `--step-batch b` times b rows and scales by batch / b,
  marked so in the table, for CPUs where a whole paper batch takes minutes);
* host ms per batch: the training pipeline (`data.loader.BatchStream`) reading consecutive
  steps, after its first batch: with the augmentation's pixel work on the device (the host reads
  uint8 rows and draws the crops; 0 workers, no prefetch), and in NumPy on the host with 0
  workers, then 1 and 2 worker processes (prefetch 2);
* host ÷ step: host ms ÷ step ms, for the device placement and for the host placement's best
  worker count.

The synthetic split is a pool of 2 x batch random examples (uint8 images), so the host times
cover indexing, augmentation and the pipeline, not array_record reads or image decoding. A
last line gives the main job's host time per step (configs/reproduce.py, the embedded scenes):
the plain NumPy reference `pipeline.train_batch` against the pipeline.

  python benchmarks/paper_scale.py [--configs cityscapes_segnet,...] [--steps 2] [--warmup 1]
    [--step-batch 0] [--smoke]

--smoke is the CI-sized run of the same path: each config shrunk (small images, batch 4, narrow
networks), one of the four compiled steps (EW float32, the timed one; the bfloat16 model is still
traced, forward and backward, for its saved residuals), one timed step, workers 0 and 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import os
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from jax import ad_checkpoint  # noqa: E402
import numpy as np  # noqa: E402

from mtl_jax import tasks as tasks_lib  # noqa: E402
from mtl_jax import train  # noqa: E402
from mtl_jax.data import augment as augment_lib  # noqa: E402
from mtl_jax.data import dataset as dataset_lib  # noqa: E402
from mtl_jax.data import loader  # noqa: E402
from mtl_jax.data import pipeline  # noqa: E402
from mtl_jax.data import registry  # noqa: E402
from mtl_jax.data import tfds_datasets  # noqa: E402
from mtl_jax.data.builders import cityscapes_mtl  # noqa: E402
from mtl_jax.data.builders import nyuv2_mtl  # noqa: E402
from mtl_jax.models import apply as apply_lib  # noqa: E402
from mtl_jax.models import layers  # noqa: E402
from mtl_jax.train import lanes  # noqa: E402
from mtl_jax.train import steps as steps_lib  # noqa: E402

CONFIGS = ("cityscapes_segnet", "nyuv2_segnet", "nyuv2_deeplab", "celeba_resnet18")
# --smoke: per config (height, width), batch 4 and this width multiplier.
SMOKE_SIZES = {
  "cityscapes_segnet": (32, 64),
  "nyuv2_segnet": (32, 32),
  "nyuv2_deeplab": (16, 24),
  "celeba_resnet18": (16, 16),
}
SMOKE_BATCH, SMOKE_WIDTH = 4, 0.0625
# The compiled steps measured per config: each (method, dtype). --smoke compiles only the timed
# one: each compile of a SegNet step costs 10 to 15 s here, most of the smoke run's time, and
# `compiled_step` is the same function for all four (the other cells read n/a).
VARIANTS = (("ew", "float32"), ("ew", "bfloat16"), ("pcgrad", "float32"), ("pcgrad", "bfloat16"))
SMOKE_VARIANTS = (("ew", "float32"),)
# Host-time batches timed per setting (after the first, which starts the pipeline).
HOST_BATCHES = 6
# Workers of the host-placement rows.
WORKER_COUNTS = (0, 1, 2)
_STARTED = time.perf_counter()


class SyntheticSource:
  """Random examples at a config's shapes, in memory; the image uint8 as a prepared split has it."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(self.arrays["image"])

  def raw_batch(self, indices: np.ndarray) -> pipeline.Batch:
    return {key: value[indices] for key, value in self.arrays.items()}

  def batch(self, indices: np.ndarray) -> pipeline.Batch:
    return pipeline.unit_float_images(self.raw_batch(indices))


def synthetic_dataset(config) -> dataset_lib.Dataset:
  """The config's dataset as random examples (a pool of 2 x batch), with its tasks and
  augmentation."""
  size, height, width = (
    2 * int(config.training.batch_size),
    config.dataset.height,
    config.dataset.width,
  )
  rng = np.random.default_rng(0)
  arrays = {"image": rng.integers(0, 256, (size, height, width, 3), dtype=np.uint8)}
  name = config.dataset.name
  if name == "celeb_a":
    names = tfds_datasets.CELEBA_ATTRIBUTES
    arrays["attributes"] = rng.integers(0, 2, (size, len(names))).astype(np.float32)
    tasks = {name: tasks_lib.BinaryAttribute(name=name, index=i) for i, name in enumerate(names)}
    return dataset_lib.Dataset(name, _splits(arrays), tasks, attribute_tasks=names)
  classes = cityscapes_mtl.NUM_CLASSES if name == "cityscapes" else nyuv2_mtl.NUM_CLASSES
  arrays["segmentation"] = rng.integers(0, classes, (size, height, width)).astype(np.int32)
  arrays["depth"] = rng.uniform(0.5, 10.0, (size, height, width)).astype(np.float32)
  tasks = {
    "segmentation": tasks_lib.Segmentation(name="segmentation", num_classes=classes),
    "depth": tasks_lib.Depth(name="depth"),
  }
  if name == "nyuv2":
    normals = rng.normal(size=(size, height, width, 3)).astype(np.float32)
    arrays["normals"] = normals / np.linalg.norm(normals, axis=-1, keepdims=True)
    tasks["normals"] = tasks_lib.Normals(name="normals")
  # As the prepared datasets: scale-and-crop for both, the flip for NYUv2 only.
  augmentation = augment_lib.Augmentation(tuple(config.dataset.scales), flip=name == "nyuv2")
  return dataset_lib.Dataset(name, _splits(arrays), tasks, augment=augmentation)


def _splits(arrays):
  source = SyntheticSource(arrays)
  return {"train": source, "validation": source, "test": source}


def paper_config(name: str, smoke: bool, method: str = "ew", dtype: str = "float32"):
  """configs/<name>.py with the method and dtype; shrunk under --smoke."""
  config = importlib.import_module(f"configs.{name}").get_config(f"method={method}")
  config.unlock()
  config.method.level = "task"
  config.model.dtype = dtype
  if smoke:
    config.dataset.height, config.dataset.width = SMOKE_SIZES[name]
    config.training.batch_size = config.training.eval_batch_size = SMOKE_BATCH
    config.model.width_multiplier = SMOKE_WIDTH
    config.model.head_hidden_channels = 8
  return config.lock()


def compiled_step(config, dataset, batch, initialise: bool):
  """(compiled train step as training runs it, its initial state, peak MiB or None).

  Without `initialise` the state is only its shapes (`jax.eval_shape`: nothing is compiled or
  computed for it), which is all compiling and the memory analysis need.
  """
  experiment = train.build_experiment(config, dataset)
  if initialise:
    state = train.init_state(experiment, 0)
  else:
    state = jax.eval_shape(lambda: train.init_state(experiment, 0))
  step = train.make_train_step(
    experiment.model, experiment.tasks, experiment.weighting, experiment.optimizer, level="task"
  )
  step = steps_lib.with_prepared_batch(step, lanes.batch_preparation(experiment))
  executable = jax.jit(step).lower(state, batch).compile()
  analysis = executable.memory_analysis()
  peak = None
  if analysis is not None:
    peak = (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / 2**20
  return executable, state, peak


# A saved residual as `ad_checkpoint.print_saved_residuals` prints it: 'bf16[64,128,256,64] ...'.
_RESIDUAL = re.compile(r"^(?P<kind>[a-z]+)(?P<bits>\d*)\[(?P<shape>[\d,]*)\] (?P<source>.*)$")


def residual_mib(config, dataset, batch) -> float:
  """MiB that the EW loss's backward pass keeps from its forward pass, parameters and batch
  excluded: jax's saved residuals of the traced program, before any backend compiles it.

  This is the part of a step's memory that the model's dtype decides; the compiled peak adds what
  the backend makes of it (XLA:CPU, for one, computes every bfloat16 convolution in float32).
  """
  experiment = train.build_experiment(config, dataset)
  state = jax.eval_shape(lambda: train.init_state(experiment, 0))
  prepared = jax.eval_shape(lanes.batch_preparation(experiment), batch)

  def loss(params, batch_stats, batch):
    predictions, _ = apply_lib.predict(experiment.model, params, batch_stats, batch["image"], True)
    losses = tasks_lib.losses_matrix(experiment.tasks, predictions, batch)
    return tasks_lib.task_mean_losses(losses, batch).sum()

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ad_checkpoint.print_saved_residuals(loss, state.params, state.batch_stats, prepared)
  total = 0
  for line in printed.getvalue().splitlines():
    match = _RESIDUAL.match(line)
    if match is None or "from the argument" in match["source"]:
      continue
    size = 1
    for extent in filter(None, match["shape"].split(",")):
      size *= int(extent)
    total += size * max(1, int(match["bits"] or 8) // 8)
  return total / 2**20


def step_milliseconds(executable, state, batch, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(executable(state, batch))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(executable(state, batch))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def host_milliseconds(reader: loader.StepReader, workers: int, prefetch: int) -> float:
  """Milliseconds per batch of the pipeline in steady state (its first batch excluded)."""
  stream = loader.BatchStream(reader, HOST_BATCHES + 1, workers, prefetch)
  try:
    stream.batch(0)
    start = time.perf_counter()
    for step in range(1, HOST_BATCHES + 1):
      stream.batch(step)
    return 1e3 * (time.perf_counter() - start) / HOST_BATCHES
  finally:
    stream.close()


def progress(message: str) -> None:
  """A progress line on stderr, with the seconds since the script started."""
  print(f"[{time.perf_counter() - _STARTED:.0f} s] {message} ...", file=sys.stderr, flush=True)


def measure(name: str, smoke: bool, timing: dict, worker_counts) -> dict:
  """Every figure of one config's row; `timing`: steps, warmup and step_batch (0: the config's)."""
  base = paper_config(name, smoke)
  dataset = synthetic_dataset(base)
  batch_size = int(base.training.batch_size)
  reader = loader.StepReader(
    dataset.splits["train"], batch_size, (0,), dataset.augment, on_device=True
  )
  batch = reader(0)
  row = {"name": name, "batch": batch_size, "shape": (base.dataset.height, base.dataset.width)}
  step_batch = min(timing["step_batch"] or batch_size, batch_size)
  row["step_batch"] = step_batch
  whole = step_batch == batch_size
  for method, dtype in VARIANTS:
    row[f"{method}_{dtype}"] = None
  progress(f"{name}: saved residuals")
  for dtype in ("float32", "bfloat16"):
    row[f"saved_{dtype}"] = residual_mib(paper_config(name, smoke, "ew", dtype), dataset, batch)
  for method, dtype in SMOKE_VARIANTS if smoke else VARIANTS:
    progress(f"{name}: compiling {method} {dtype}")
    config = paper_config(name, smoke, method, dtype)
    timed = whole and method == "ew" and dtype == "float32"
    compiled = compiled_step(config, dataset, batch, timed)
    row[f"{method}_{dtype}"] = compiled[2]
    if method == "ew" and dtype == "float32":
      row["parameters"] = layers.count_parameters(compiled[1].params)
      executable, state = compiled[:2]
    del compiled
  progress(f"{name}: timing the EW step at batch {step_batch}")
  timed_batch = {key: value[:step_batch] for key, value in batch.items()}
  if not whole:
    executable, state, _ = compiled_step(paper_config(name, smoke), dataset, timed_batch, True)
  milliseconds = step_milliseconds(
    executable, state, timed_batch, timing["steps"], timing["warmup"]
  )
  # A convolutional step's work grows linearly with the batch.
  row["step_ms"] = milliseconds * batch_size / step_batch
  del executable, state
  progress(f"{name}: host time per batch")
  row["host_device"] = host_milliseconds(reader, 0, 0)
  host_reader = loader.StepReader(dataset.splits["train"], batch_size, (0,), dataset.augment)
  row["host"] = {
    workers: host_milliseconds(host_reader, workers, 2 if workers else 0)
    for workers in worker_counts
  }
  return row


def _mib(value) -> str:
  return "n/a" if value is None else f"{value:,.0f}"


def _step_cell(row) -> str:
  if row["step_batch"] == row["batch"]:
    return f"{row['step_ms']:,.0f}"
  return f"{row['step_ms']:,.0f} (batch {row['step_batch']} × {row['batch'] // row['step_batch']})"


def _ratio(numerator, denominator) -> str:
  return "n/a" if numerator is None or not denominator else f"{numerator / denominator:.2f}"


def print_header(worker_counts) -> None:
  workers_header = " | ".join(f"host aug {count}w" for count in worker_counts)
  print(
    "| config | B × H × W | params | EW f32 MiB | EW bf16 MiB | bf16 ÷ f32 | EW saved f32 MiB | "
    "EW saved bf16 MiB | saved bf16 ÷ f32 | PCGrad f32 MiB | "
    f"PCGrad bf16 MiB | step ms (EW f32) | host ms: device aug | {workers_header} | "
    "host ÷ step (device aug) | host ÷ step (best host aug) |"
  )
  print("|---" * (15 + len(worker_counts)) + "|", flush=True)


def print_row(row, worker_counts) -> None:
  host = " | ".join(f"{row['host'][count]:.1f}" for count in worker_counts)
  best_host = min(row["host"].values())
  height, width = row["shape"]
  print(
    f"| {row['name']} | {row['batch']} × {height} × {width} | {row['parameters']:,} | "
    f"{_mib(row['ew_float32'])} | {_mib(row['ew_bfloat16'])} | "
    f"{_ratio(row['ew_bfloat16'], row['ew_float32'])} | {_mib(row['saved_float32'])} | "
    f"{_mib(row['saved_bfloat16'])} | {_ratio(row['saved_bfloat16'], row['saved_float32'])} | "
    f"{_mib(row['pcgrad_float32'])} | "
    f"{_mib(row['pcgrad_bfloat16'])} | {_step_cell(row)} | {row['host_device']:.1f} | "
    f"{host} | {_ratio(row['host_device'], row['step_ms'])} | "
    f"{_ratio(best_host, row['step_ms'])} |",
    flush=True,
  )


def main_job_host_times() -> tuple[float, float]:
  """(ms per step of `pipeline.train_batch`, ms of the pipeline) for the main job's grouped runs.

  configs/reproduce.py trains runs differing in seed as one group, one batch per seed a step:
  the reference stacks `pipeline.train_batch` of each seed (what training did before the
  pipeline), the pipeline reads them as the loop does, with the config's data section.
  """
  config = importlib.import_module("configs.reproduce").get_config()
  seeds = tuple(int(seed) for seed in config.sweep.seeds)
  dataset = registry.load_dataset(config.dataset)
  source, batch_size = dataset.splits["train"], int(config.training.batch_size)
  start = time.perf_counter()
  for step in range(1, HOST_BATCHES + 1):
    batches = [pipeline.train_batch(source, batch_size, s, step, dataset.augment) for s in seeds]
    _ = {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}
  reference = 1e3 * (time.perf_counter() - start) / HOST_BATCHES
  reader = loader.StepReader(
    source,
    batch_size,
    seeds,
    dataset.augment,
    on_device=config.data.augment_on == "device",
    stacked=True,
  )
  return reference, host_milliseconds(reader, int(config.data.workers), int(config.data.prefetch))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names")
  parser.add_argument("--steps", type=int, default=2, help="timed EW steps per config")
  parser.add_argument(
    "--warmup", type=int, default=1, help="untimed EW steps first (the program is compiled ahead)"
  )
  parser.add_argument(
    "--step-batch",
    type=int,
    default=0,
    help="time the step on this many rows and scale to the batch (0: the whole batch)",
  )
  parser.add_argument("--smoke", action="store_true", help="the CI-sized run (shrunk configs)")
  arguments = parser.parse_args()
  names = arguments.configs.split(",")
  unknown = [name for name in names if name not in CONFIGS]
  if unknown:
    print(f"error: --configs: unknown {unknown}; valid: {', '.join(CONFIGS)}", file=sys.stderr)
    sys.exit(2)
  worker_counts = WORKER_COUNTS[:2] if arguments.smoke else WORKER_COUNTS
  steps = 1 if arguments.smoke else max(1, arguments.steps)
  warmup = 0 if arguments.smoke else max(0, arguments.warmup)
  timing = dict(steps=steps, warmup=warmup, step_batch=max(0, arguments.step_batch))
  print(
    f"# Paper-scale benchmark{' (--smoke)' if arguments.smoke else ''}, "
    f"{datetime.date.today()}, {platform.machine()} {jax.devices()[0].device_kind} "
    f"x{jax.device_count()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
    f"{jax.default_backend()}, load average {os.getloadavg()[0]:.2f} at the start; step: median "
    f"of {steps} after {warmup} untimed; host: mean of {HOST_BATCHES} batches\n"
  )
  # Each row as soon as it is measured: a run stopped by a time limit keeps what it finished.
  print_header(worker_counts)
  for name in names:
    print_row(measure(name, arguments.smoke, timing, worker_counts), worker_counts)
  progress("main job host times")
  reference, piped = main_job_host_times()
  print(
    f"\nMain job (configs/reproduce.py, grouped seeds) host ms per step: stacked "
    f"pipeline.train_batch {reference:.2f}, data.loader with its config.data {piped:.2f}; "
    f"load average {os.getloadavg()[0]:.2f} at the end"
  )


if __name__ == "__main__":
  main()
