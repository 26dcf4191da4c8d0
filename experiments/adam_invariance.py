r"""Adam's partial loss-scale invariance: exact check, the paper's App. A2 runs, method
classification.

  python experiments/adam_invariance.py --config=configs/adam_invariance.py:check
  python experiments/adam_invariance.py --config=configs/adam_invariance.py:app_a2 \
    --workdir=runs/adam_invariance
  python experiments/adam_invariance.py --config=configs/adam_invariance.py:classify \
    --workdir=runs/adam_invariance
  python experiments/adam_invariance.py --config=configs/adam_invariance.py:all \
    --workdir=runs/adam_invariance
The `check` mode exits with status 1 when a predicted equality fails.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import runtime  # noqa: E402
from mtl_jax.studies import invariance  # noqa: E402

_CONFIG = runtime.define_config_file(
  "config", "configs/adam_invariance.py", "Config file (argument = mode)."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/adam_invariance", "Directory for tables, figures and results."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  runtime.setup(config)
  os.makedirs(workdir, exist_ok=True)
  results, failed = {}, False
  if config.mode in ("check", "all"):
    print("Exact check (float64): loss weights alpha vs 1")
    check = invariance.run_invariance_check(config)
    print(check["markdown"])
    failed = not check["equalities_ok"]
    if not check["all_ok"]:
      print("Some prediction failed: see the rows marked NO.")
    results["check"] = check
  if config.mode in ("app_a2", "all"):
    print("App. A2 runs")
    a2 = invariance.run_app_a2(config, workdir)
    print("Figures: " + ", ".join(a2["figures"]))
    results["app_a2"] = {"summary": a2["summary"], "figures": a2["figures"]}
  if config.mode in ("classify", "all"):
    print("Scale-invariance classification of every registered method")
    table = invariance.classify_methods(config)
    print(table["markdown"])
    with open(os.path.join(workdir, "classification.md"), "w") as file:
      file.write(table["markdown"] + "\n")
    results["classify"] = table
  with open(os.path.join(workdir, f"results_{config.mode}.json"), "w") as file:
    json.dump(results, file, indent=2, default=str)
  if failed:
    print("error: a predicted equality failed.", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  runtime.run(main)
