"""Benchmark: the step time of every architecture relative to hard sharing, with EW and a Gramian
method.

Each architecture's jitted train step (`train.make_train_step`) is timed with EW and with
UPGrad at level 'task' (T backward passes through the shared part) and, optionally, at level
'sample' (the fast per-sample Gramian), all side by side in one process: rounds are
interleaved (one call of every step per round; medians), so load from other processes hits all
steps alike. The case is configs/test.py's: small_cnn with `--features` (16, 16 by default),
group norm, 16x32 images, batch 16, T = 3 scene tasks, Adam; MMoE and CGC / PLE with their
default expert counts (configs/base.py). The parameter counts of the shared part
(params['encoder']) and of the task-specific parts (params['heads']) are printed alongside.

  python benchmarks/architectures.py [--architectures=hps,mmoe] [--levels=task,sample]
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import test as test_config  # noqa: E402
from mtl_jax import train  # noqa: E402
from mtl_jax.data import registry  # noqa: E402
from mtl_jax.models import architectures  # noqa: E402
from mtl_jax.models import layers  # noqa: E402

_ARCHITECTURES = flags.DEFINE_list(
  "architectures", list(architectures.ARCHITECTURES), "Architectures to time ('hps' first)."
)
_GRAMIAN_METHOD = flags.DEFINE_string("gramian_method", "upgrad", "The Gramian method timed.")
_LEVELS = flags.DEFINE_list("levels", ["task"], "Levels of the Gramian method: task, sample.")
_FEATURES = flags.DEFINE_list("features", ["16", "16"], "small_cnn block widths.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed rounds (after a warm-up).")


def case_config(architecture: str, method: str, level: str = "task"):
  """The locked config of one architecture and method."""
  config = test_config.get_config(f"method={method}")
  config.unlock()
  config.training.batch_size = 16
  config.model.features = tuple(int(value) for value in _FEATURES.value)
  config.model.architecture = architecture
  config.method.level = level
  return config.lock()


def runs() -> list[tuple[str, str]]:
  """(method, level) pairs timed for every architecture."""
  return [("ew", "task")] + [(_GRAMIAN_METHOD.value, level) for level in _LEVELS.value]


def compile_all(dataset, batch) -> tuple[dict, dict]:
  """{(architecture, method, level): (executable, state)} and {architecture: parameter counts}."""
  executables, counts = {}, {}
  for architecture in _ARCHITECTURES.value:
    for method, level in runs():
      print(f"[compiling {architecture} {method}@{level} ...]", file=sys.stderr, flush=True)
      experiment = train.build_experiment(case_config(architecture, method, level), dataset)
      compiled, state = train.compiled_train_step(experiment, batch)
      executables[architecture, method, level] = (compiled, state)
      counts[architecture] = (
        layers.count_parameters(state.params["encoder"]),
        layers.count_parameters(state.params["heads"]),
      )
  return executables, counts


def main(argv):
  del argv
  for architecture in _ARCHITECTURES.value:
    architectures.check_architecture(architecture, "small_cnn")
  config = case_config("hps", "ew")
  dataset = registry.load_dataset(config.dataset)
  batch = dataset.splits["train"].batch(np.arange(config.training.batch_size))
  executables, counts = compile_all(dataset, batch)
  calls = {
    key: functools.partial(compiled, state, batch) for key, (compiled, state) in executables.items()
  }
  medians = train.interleaved_medians(calls, _REPEATS.value)
  print(
    f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} "
    f"CPU cores, jax {jax.__version__} on {jax.default_backend()}; load average "
    f"{os.getloadavg()[0]:.2f} at the end; medians of {_REPEATS.value} interleaved rounds; "
    f"small_cnn features {tuple(config.model.features)}, group norm, "
    f"{config.dataset.height}x{config.dataset.width} images, batch {config.training.batch_size}, "
    f"T = {len(config.tasks)}."
  )
  labels = [f"{method} ({level})" for method, level in runs()]
  print(
    "\n| Architecture | shared / task params | "
    + " | ".join(f"{label} ms | ÷ hps" for label in labels)
    + " |"
  )
  print("|---|---|" + "---|---|" * len(labels))
  for architecture in _ARCHITECTURES.value:
    shared, own = counts[architecture]
    cells = [f"{shared:,} / {own:,}"]
    for method, level in runs():
      value = medians[architecture, method, level]
      baseline = medians.get(("hps", method, level))
      ratio = f"{value / baseline:.2f}" if baseline else "-"
      cells += [f"{1e3 * value:.1f}", ratio]
    print(f"| {architecture} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
