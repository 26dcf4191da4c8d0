"""Benchmark of the Gramian engine: plain EW step vs reference and fast B×T Gramians, side by side.

Each case (encoder, batch size) compiles three jit functions on the same inputs:

* plain: equal-weight loss and gradients of all parameters (one ordinary backward pass);
* reference: loss, gradients and the [B, T, B, T] Gramian by vmap(grad) (B·T·P memory);
* fast: loss, gradients and the same Gramian from captured layer inputs and output gradients;
* fast-path check: what `config.gramian.verify_every_steps` runs (once per run by default): the
  fast Gramian of the batch and the reference gradients of a few rows (`gramian.check`).

Timings are medians of interleaved runs (one call of each function per round, plus an untimed
plain call after the reference's), so load from other processes hits all three alike; ratios
are to the plain step. Peak memory is XLA's own account of the compiled program (temporary
buffers plus outputs), which on CPU is the only allocator-independent number; compile time is
that of `jit(...).lower(...).compile()` with the persistent cache off. Prints a markdown table,
then the relative error of the fast Gramian of a bfloat16 model (config.model.dtype) against
float32's, per case.

  python benchmarks/gramian.py [--rounds 15] [--batch-sizes 64,128]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from mtl_jax import gramian  # noqa: E402
from mtl_jax.gramian import check as gramian_check  # noqa: E402
from mtl_jax import models  # noqa: E402
from mtl_jax import tasks as tasks_lib  # noqa: E402

IMAGE_SHAPE = (32, 32, 3)
TASKS = (
  tasks_lib.Classification(name="digit", num_classes=10),
  tasks_lib.BinaryAttribute(name="smiling", index=0),
  tasks_lib.BinaryAttribute(name="glasses", index=1),
)
ENCODERS = {
  "mlp": dict(encoder="mlp", norm="group", hidden=(256, 256)),
  "small_cnn": dict(encoder="small_cnn", norm="group", features=(16, 32, 32)),
}


def make_case(encoder: str, batch_size: int, dtype: str = "float32"):
  config = ml_collections.ConfigDict({**ENCODERS[encoder], "dtype": dtype})
  specs = {task.name: models.HeadSpec(task.output_channels, dense=False) for task in TASKS}
  model = models.build_model(config, specs)
  variables = models.init_model(model, jax.random.PRNGKey(0), (1, *IMAGE_SHAPE))
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  batch = {
    "image": jax.random.normal(keys[0], (batch_size, *IMAGE_SHAPE)),
    "attributes": (jax.random.uniform(keys[1], (batch_size, 2)) > 0.5).astype(jnp.float32),
    "label": jax.random.randint(keys[2], (batch_size,), 0, 10),
  }
  return model, variables["params"], batch


def compiled(function, *arguments):
  """(compiled function, peak bytes, compile seconds) of a jit function on these arguments."""
  start = time.perf_counter()
  executable = jax.jit(function).lower(*arguments).compile()
  seconds = time.perf_counter() - start
  analysis = executable.memory_analysis()
  peak = None
  if analysis is not None:
    peak = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
  return executable, peak, seconds


def benchmark(encoder: str, batch_size: int, rounds: int) -> list[dict]:
  model, params, batch = make_case(encoder, batch_size)

  def step(path):
    def run(params, batch):
      if path is None:

        def loss_fn(p):
          return jnp.sum(jnp.mean(gramian.per_sample_losses(model, p, {}, batch, TASKS), axis=0))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, grads, None
      result = gramian.compute(model, params, {}, batch, TASKS, gramian.FULL, path=path)
      # Equal weights of the batch-mean losses: the EW direction, from the same capture.
      weights = jnp.full((batch_size, len(TASKS)), 1.0 / batch_size)
      return jnp.sum(result.task_losses), result.gradient(weights), result.gramian

    return run

  def check(params, batch):
    samples = tuple(range(min(gramian_check.SAMPLES, batch_size)))
    return gramian_check.discrepancy(
      model, params, {}, batch, TASKS, samples, gramian_check.checked_tasks(len(TASKS))
    )

  functions = {
    "plain EW step": step(None),
    "reference Gramian": step("reference"),
    "fast Gramian": step("fast"),
    "fast-path check": check,
  }
  executables, peaks, compile_seconds, times = {}, {}, {}, {name: [] for name in functions}
  for name, function in functions.items():
    executables[name], peaks[name], compile_seconds[name] = compiled(function, params, batch)
    jax.block_until_ready(executables[name](params, batch))  # Warm-up.
  # Each round times the reference first, then one untimed plain call, then plain and fast: a
  # call right after the reference's multi-GB program ran measurably slower (cold caches,
  # fresh allocations), which would bias whichever step came next.
  order = ["reference Gramian", "plain EW step", "fast Gramian", "fast-path check"]
  for _ in range(rounds):
    for name in order:
      if name == "plain EW step":
        jax.block_until_ready(executables[name](params, batch))
      start = time.perf_counter()
      jax.block_until_ready(executables[name](params, batch))
      times[name].append(time.perf_counter() - start)
  parameters = models.count_parameters(params["encoder"])
  rows = []
  for name in functions:
    rows.append(
      dict(
        encoder=encoder,
        batch=batch_size,
        parameters=parameters,
        method=name,
        median_ms=1e3 * statistics.median(times[name]),
        peak_mib=None if peaks[name] is None else peaks[name] / 2**20,
        compile_s=compile_seconds[name],
      )
    )
  plain = rows[0]
  for row in rows:
    row["time_ratio"] = row["median_ms"] / plain["median_ms"]
    row["memory_ratio"] = (
      None
      if row["peak_mib"] is None or not plain["peak_mib"]
      else row["peak_mib"] / plain["peak_mib"]
    )
  return rows


def bfloat16_error(encoder: str, batch_size: int) -> float:
  """‖G_bf16 − G_f32‖_F / ‖G_f32‖_F: the fast Gramian of the model with bfloat16 activations
  against float32's, on the same parameters and batch."""
  model, params, batch = make_case(encoder, batch_size)
  half_model = make_case(encoder, batch_size, "bfloat16")[0]

  def fast_gramian(network):
    return jax.jit(
      lambda params, batch: gramian.compute(network, params, {}, batch, TASKS, gramian.FULL).gramian
    )(params, batch)

  single, half = fast_gramian(model), fast_gramian(half_model)
  return float(jnp.linalg.norm(half - single) / jnp.linalg.norm(single))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15, help="timed calls of each function")
  parser.add_argument("--batch-sizes", default="64,128", help="comma-separated batch sizes")
  parser.add_argument("--encoders", default="mlp,small_cnn", help="comma-separated: mlp,small_cnn")
  arguments = parser.parse_args()
  print(
    f"# Gramian benchmark, {datetime.date.today()}, {platform.machine()} "
    f"{platform.processor() or ''} {jax.devices()[0].device_kind} x{jax.device_count()}, "
    f"{os.cpu_count()} CPU cores, jax {jax.__version__}, T={len(TASKS)}, images {IMAGE_SHAPE}"
  )
  print()
  print(
    "| encoder | B | encoder params P | method | median ms | x plain | peak MiB | x plain | "
    "compile s |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for encoder in arguments.encoders.split(","):
    for batch_size in (int(size) for size in arguments.batch_sizes.split(",")):
      print(f"[running {encoder} B={batch_size} ...]", file=sys.stderr, flush=True)
      rows = benchmark(encoder, batch_size, arguments.rounds)
      for row in rows:
        peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        memory_ratio = "n/a" if row["memory_ratio"] is None else f"{row['memory_ratio']:.2f}"
        print(
          f"| {row['encoder']} | {row['batch']} | {row['parameters']:,} | {row['method']} | "
          f"{row['median_ms']:.1f} | {row['time_ratio']:.2f} | {peak} | {memory_ratio} | "
          f"{row['compile_s']:.1f} |",
          flush=True,
        )
      fast = next(row for row in rows if row["method"] == "fast Gramian")
      reference = next(row for row in rows if row["method"] == "reference Gramian")
      print(
        f"[{encoder} B={batch_size}: fast is {reference['median_ms'] / fast['median_ms']:.1f}x "
        "faster than reference]",
        file=sys.stderr,
        flush=True,
      )
  print()
  print("bfloat16 activations (model.dtype): the fast Gramian's relative Frobenius error")
  print()
  print("| encoder | B | ‖G_bf16 − G_f32‖ / ‖G_f32‖ |")
  print("|---|---|---|")
  for encoder in arguments.encoders.split(","):
    for batch_size in (int(size) for size in arguments.batch_sizes.split(",")):
      print(f"| {encoder} | {batch_size} | {bfloat16_error(encoder, batch_size):.2e} |", flush=True)


if __name__ == "__main__":
  main()
