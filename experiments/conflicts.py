"""The gradient-conflict study (SPEC section 4): inter-task vs inter-sample cosine and magnitude
similarity.

  python experiments/conflicts.py --workdir=runs/conflicts
runs both settings (dense scenes tasks, 12 scene attributes; configs/conflicts.py) with both head
architectures and writes runs/conflicts/summary.md plus figures per setting. One setting, or one
architecture:
  python experiments/conflicts.py --config=configs/conflicts_dense.py --workdir=runs/conflicts_dense
  python experiments/conflicts.py --config=configs/conflicts_attributes.py:large_heads --workdir=...
Any key can be overridden with --config.<key>=<value>; --config.conflicts.settings="('config',)"
studies the config's own tasks (e.g. --config=configs/nyuv2_segnet.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import runtime  # noqa: E402
from mtl_jax.studies import conflicts as conflict_study  # noqa: E402

_CONFIG = runtime.define_config_file("config", "configs/conflicts.py", "A conflicts config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/conflicts", "Directory for the runs, figures and summary.md."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.setup(_CONFIG.value)
  results = conflict_study.run_conflicts(_CONFIG.value, _WORKDIR.value)
  print(results["summary"])
  print(
    f"Summary written to {os.path.join(_WORKDIR.value, conflict_study.SUMMARY_FILE)}; figures: "
    f"{', '.join(results['figures'])}"
  )


if __name__ == "__main__":
  runtime.run(main)
