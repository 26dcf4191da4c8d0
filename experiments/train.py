"""Trains one model from a config and prints its test metrics (the entry point for single runs).

  python experiments/train.py --config=configs/scenes.py --workdir=runs/scenes
  python experiments/train.py --config=configs/scenes.py:task=depth --workdir=runs/stl_depth
Re-running the same command resumes from the workdir's latest checkpoint.

Exit status: 0 done; 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun to resume);
2 bad flag, config or data, a workdir in use by another run, or a checkpoint the disk refused
(`runtime.run` prints these as `error:` lines); 3 non-finite loss or gradient; 4 no intact
checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import checkpoint  # noqa: E402
from mtl_jax import report  # noqa: E402
from mtl_jax import runtime  # noqa: E402
from mtl_jax import train  # noqa: E402

_CONFIG = runtime.define_config_file("config", "configs/scenes.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/scenes", "Directory for checkpoints, metrics and results."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Multi-host jobs connect before anything touches a device (a no-op on one host).
  runtime.setup(_CONFIG.value)
  try:
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Preempted:
    # The loop has already printed where it stopped and how to resume.
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except train.NonFiniteLossError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(3)
  except checkpoint.CheckpointError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(4)
  print(report.results_table(results))
  print(f"Results written to {os.path.join(_WORKDIR.value, train.RESULTS_FILE)}")


if __name__ == "__main__":
  runtime.run(main)
