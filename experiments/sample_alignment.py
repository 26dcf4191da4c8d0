"""The sample-alignment study: gradient-alignment methods at the task, sample and sample_task
levels, with intervals over seeds, Pareto counts, step costs and the probe's conflicts.

  python experiments/sample_alignment.py --config=configs/sample_alignment.py \
    --workdir=runs/sample_alignment
Re-running resumes (finished runs are skipped); writes <workdir>/summary.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import config_validation  # noqa: E402
from mtl_jax import parallel  # noqa: E402
from mtl_jax import runtime  # noqa: E402
from mtl_jax.studies import sample_alignment  # noqa: E402

_CONFIG = runtime.define_config_file(
  "config", "configs/sample_alignment.py", "Sample-alignment config file."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/sample_alignment", "Directory of the study.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  runtime.setup(config)
  # Bad keys fail here, before any run trains, with one line naming each key (`runtime.run`).
  config_validation.validate_config(config)
  result = sample_alignment.run_study(config, _WORKDIR.value)
  text = sample_alignment.report_markdown(result, config)
  path = os.path.join(_WORKDIR.value, "summary.md")
  if parallel.is_writer():
    with open(path, "w") as file:
      file.write("# Gradient alignment across samples\n\n" + text + "\n")
  print(text)
  print(f"Summary written to {path}")


if __name__ == "__main__":
  runtime.run(main)
