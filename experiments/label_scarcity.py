"""The label-scarcity study: MTL (EW, PCGrad, UPGrad) vs STL as one task's labels become scarce.

  python experiments/label_scarcity.py --config=configs/label_scarcity.py \
    --workdir=runs/label_scarcity
Runs outside the main job. Re-running resumes (finished runs are read, not trained); writes
<workdir>/summary.md and <workdir>/label_scarcity.png.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import config_validation  # noqa: E402
from mtl_jax import parallel  # noqa: E402
from mtl_jax import runtime  # noqa: E402
from mtl_jax.studies import label_scarcity  # noqa: E402

_CONFIG = runtime.define_config_file(
  "config", "configs/label_scarcity.py", "Label-scarcity config file."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/label_scarcity", "Directory of the study.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  runtime.setup(config)
  # Bad keys fail here, before any run trains, with one line naming each key (`runtime.run`).
  config_validation.validate_config(config)
  result = label_scarcity.run_study(config, _WORKDIR.value)
  if parallel.is_writer():
    text, path = label_scarcity.summarise(result, _WORKDIR.value)
    print(text)
    print(f"Summary written to {os.path.join(_WORKDIR.value, 'summary.md')}, figure to {path}")


if __name__ == "__main__":
  runtime.run(main)
