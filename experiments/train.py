"""Trains one model from a config and prints its test metrics (the entry point for single runs).

  python experiments/train.py --config=configs/scenes.py --workdir=runs/scenes
  python experiments/train.py --config=configs/scenes.py:task=depth --workdir=runs/stl_depth
Re-running the same command resumes from the workdir's latest checkpoint.

Several processes (e.g. 2 on one machine, 4 emulated CPU devices each; README, 'Scaling out'):
  for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python experiments/train.py --config=configs/test.py --workdir=runs/two_processes \
    --config.sharding.coordinator_address=127.0.0.1:12355 \
    --config.sharding.num_processes=2 --config.sharding.process_id=$i & done; wait

Exit status: 0 done; 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun to resume);
2 bad flag, config or data, a workdir in use by another run, or a checkpoint the disk refused
(`runtime.run` prints these as `error:` lines); 3 non-finite loss or gradient; 4 no intact
checkpoint; 5 another process of a multi-process job was lost (rerun every process to resume).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import checkpoint  # noqa: E402
from mtl_jax import parallel  # noqa: E402
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
  try:
    # Multi-host jobs connect before anything touches a device (a no-op on one host).
    runtime.setup(_CONFIG.value)
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except parallel.LostPeerError as error:
    parallel.exit_lost_peer(error)
  except train.Preempted:
    # The loop has already printed where it stopped and how to resume.
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except train.NonFiniteLossError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(3)
  except checkpoint.CheckpointError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(4)
  except Exception:
    # In a multi-process job a collective fails at once when a peer dies: name it, exit 5.
    parallel.exit_if_peer_lost()
    raise
  if parallel.is_writer():
    print(report.results_table(results))
    print(f"Results written to {os.path.join(_WORKDIR.value, train.RESULTS_FILE)}")


if __name__ == "__main__":
  runtime.run(main)
