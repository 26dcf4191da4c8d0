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
_LABEL_SCARCITY_WORKDIR = flags.DEFINE_string(
  "label_scarcity_workdir",
  "runs/label_scarcity",
  "Where experiments/label_scarcity.py (run separately) wrote; the report quotes its findings.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.setup(_CONFIG.value)
  path = reproduce.run(
    _CONFIG.value,
    _WORKDIR.value,
    _STUDIES.value,
    label_scarcity_workdir=_LABEL_SCARCITY_WORKDIR.value,
  )
  print(f"Report: {path}")


if __name__ == "__main__":
  runtime.run(main)
