"""Benchmark: the step time of every registered method relative to EW's step (T = 3, CNN
encoders).

Every method's jitted train step (`train.make_train_step`: for a Gramian weighting, per-row
gradients -> Gramian -> the method's weights -> their weighted sum; for the others, their own
step) is timed side by side with EW's step, in two cases printed next to each other:

* tiny: configs/test.py's small_cnn with features (16, 16), group norm, 16x32 images, batch 16:
  a step of a few milliseconds, where fixed per-op and solver overheads weigh the most;
* scenes: configs/scenes.py as is (SegNet-small, width 0.125, batch norm, 32x64 images,
  batch 32), the default experiment, where the passes over the network dominate.

Rounds are interleaved (one call of every step per round; medians), so load from other
processes hits all steps alike. Per-sample levels need a norm other than batch norm, so the
optional `--sample_level_methods` rows run in the tiny case only.

  python benchmarks/methods.py [--methods=pcgrad,mgda] [--cases=tiny,scenes] [--repeats=15]
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

from configs import scenes as scenes_config  # noqa: E402
from configs import test as test_config  # noqa: E402
from mtl_jax import train  # noqa: E402
from mtl_jax import weighting  # noqa: E402
from mtl_jax.data import registry  # noqa: E402

_METHODS = flags.DEFINE_list(
  "methods",
  [name for name in weighting.method_names() if name != "ew"],
  "Methods to time (at level 'task'); every registered one by default.",
)
_SAMPLE_LEVEL_METHODS = flags.DEFINE_list(
  "sample_level_methods", ["upgrad"], "Methods also timed at level 'sample_task' (tiny case only)."
)
_CASES = flags.DEFINE_list("cases", ["tiny", "scenes"], "Cases to run: tiny, scenes.")
_REPEATS = flags.DEFINE_integer(
  "repeats", 15, "Timed rounds (one call of every step each, after a warm-up)."
)

CASES = ("tiny", "scenes")


def case_config(case: str, method: str, level: str = "task"):
  """The locked config of one case and method."""
  if case == "tiny":
    config = test_config.get_config(f"method={method}")
    config.unlock()
    config.training.batch_size = 16
    config.model.features = (16, 16)
  elif case == "scenes":
    config = scenes_config.get_config(f"method={method}")
    config.unlock()
  else:
    raise ValueError(f"Unknown case {case!r}; valid cases: {', '.join(CASES)}.")
  config.method.level = level
  if method == "mtl_io":  # its per-task optimizers are SGD (weighting.jacobian_based)
    config.optimizer.name = "sgd"
  return config.lock()


def describe(case: str) -> str:
  config = case_config(case, "ew")
  model = config.model
  features = (
    f"features {tuple(model.features)}"
    if model.encoder == "small_cnn"
    else f"width {model.width_multiplier}"
  )
  return (
    f"{case}: {model.encoder} ({features}, {model.norm} norm), "
    f"{config.dataset.height}x{config.dataset.width} images, batch {config.training.batch_size}, "
    f"T = {len(config.tasks)}"
  )


def time_case(case: str, methods, sample_level_methods, repeats: int) -> dict[str, float]:
  """Median step seconds of EW and every method (key 'method' or 'method@sample_task')."""
  dataset = registry.load_dataset(case_config(case, "ew").dataset)
  batch_size = case_config(case, "ew").training.batch_size
  batch = dataset.splits["train"].batch(np.arange(batch_size))
  runs = [("ew", "task")] + [(method, "task") for method in methods]
  runs += [(method, "sample_task") for method in sample_level_methods]
  calls = {}
  for method, level in runs:
    key = method if level == "task" else f"{method}@{level}"
    print(f"[{case}: compiling {key} ...]", file=sys.stderr, flush=True)
    experiment = train.build_experiment(case_config(case, method, level), dataset)
    compiled, state = train.compiled_train_step(experiment, batch)
    calls[key] = functools.partial(compiled, state, batch)
  return train.interleaved_medians(calls, repeats)


def main(argv):
  del argv
  cases = list(_CASES.value)
  for case in cases:
    if case not in CASES:
      raise ValueError(f"Unknown --cases entry {case!r}; valid cases: {', '.join(CASES)}.")
  results = {
    case: time_case(
      case, _METHODS.value, _SAMPLE_LEVEL_METHODS.value if case == "tiny" else [], _REPEATS.value
    )
    for case in cases
  }
  print(
    f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} "
    f"CPU cores, jax {jax.__version__} on {jax.default_backend()}; medians of {_REPEATS.value} "
    "interleaved rounds."
  )
  for case in cases:
    print(f"- {describe(case)}")
  print()
  print("| Method | " + " | ".join(f"{case} (ms) | ÷ EW" for case in cases) + " |")
  print("|---|" + "---|---|" * len(cases))
  keys = (
    ["ew"]
    + list(_METHODS.value)
    + [f"{method}@sample_task" for method in _SAMPLE_LEVEL_METHODS.value]
  )
  for key in keys:
    label = "EW" if key == "ew" else key.replace("@sample_task", " (level sample_task)")
    cells = []
    for case in cases:
      if key in results[case]:
        seconds = results[case][key]
        cells.append(f"{seconds * 1e3:.1f} | {seconds / results[case]['ew']:.2f}")
      else:
        cells.append("– | –")
    print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
