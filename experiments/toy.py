"""Runs the 2-D toy study (paper Table 1) and prints the iterations table beside the paper's.

  python experiments/toy.py --config=configs/toy.py --workdir=runs/toy
All 162 runs are one compiled program (float64 by default), run again from moved starts and in
float32 for each cell's sensitivity; the figure goes to <workdir>/toy_trajectories.png.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import runtime  # noqa: E402
from mtl_jax.studies import toy as toy_study  # noqa: E402

_CONFIG = runtime.define_config_file("config", "configs/toy.py", "Toy config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/toy", "Directory for the table, figure and results.json."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.setup(_CONFIG.value)
  results = toy_study.run_toy(_CONFIG.value, _WORKDIR.value)
  print(results["markdown"])
  print(results["tolerance"])
  print(
    f"{results['num_runs']} runs in {results['dtype']}, and {len(results['sensitivity']['names'])} "
    f"variants: compile {results['compile_seconds']:.2f} s, run {results['run_seconds']:.2f} s "
    "(after compilation)"
  )
  with open(os.path.join(_WORKDIR.value, "results.json"), "w") as file:
    json.dump({k: v for k, v in results.items() if k != "markdown"}, file, indent=2)
  print(f"Figure: {results['figure']}")


if __name__ == "__main__":
  runtime.run(main)
