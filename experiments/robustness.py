r"""The robustness study (SPEC section 5), or the figure of every corruption of one scenes image.

  python experiments/robustness.py --config=configs/robustness.py --workdir=runs/robustness
  python experiments/robustness.py --config=configs/robustness.py:figure \
    --config.robustness.figure_path=docs/corruptions.png
See configs/robustness.py for studying existing runs instead of training new ones.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from mtl_jax import config_validation  # noqa: E402
from mtl_jax import runtime  # noqa: E402
from mtl_jax.data import registry  # noqa: E402
from mtl_jax.studies import robustness  # noqa: E402

_CONFIG = runtime.define_config_file("config", "configs/robustness.py", "Robustness config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/robustness", "Directory for the prepared runs and the results."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  runtime.setup(config)
  config_validation.validate_config(config)
  mode = config.robustness.mode
  if mode == "figure":
    path = config.robustness.figure_path or os.path.join(_WORKDIR.value, "corruptions.png")
    dataset = registry.load_dataset(config.dataset)
    image = dataset.splits["test"].batch(np.arange(1))["image"][0]
    robustness.corruption_figure(image, path, seed=int(config.robustness.corruption_seed))
    print(f"Corruption figure written to {path}")
    return
  if mode != "study":
    raise app.UsageError(f"Unknown robustness.mode {mode!r}; valid: study, figure.")
  results = robustness.run_robustness(config, _WORKDIR.value)
  print(robustness.report_markdown(results))
  print(f"Results written to {os.path.join(_WORKDIR.value, robustness.RESULTS_FILE)}")


if __name__ == "__main__":
  runtime.run(main)
