"""The main job: a small version of all four studies on the embedded data, written to report.md.

  python experiments/reproduce.py --workdir=runs/reproduce
Progress lines say which study and run is going, how far, and the ETA; re-running resumes
(finished runs are skipped).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import runtime  # noqa: E402
from mtl_jax.studies import reproduce  # noqa: E402

_CONFIG = runtime.define_config_file("config", "configs/reproduce.py", "Reproduce config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/reproduce", "Directory of all studies and report.md."
)
_STUDIES = flags.DEFINE_list(
  "studies", None, f"Studies to run (default all): {', '.join(reproduce.STUDIES)}."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.setup(_CONFIG.value)
  path = reproduce.run(_CONFIG.value, _WORKDIR.value, _STUDIES.value)
  print(f"Report: {path}")


if __name__ == "__main__":
  runtime.run(main)
