r"""Runs (or resumes) the optimizer x method study and writes its tables and figure.

  python experiments/sweep.py --config=configs/sweep_scenes.py --workdir=runs/sweep_scenes
  python experiments/sweep.py --config=configs/sweep_paper.py:nyuv2_segnet \
    --workdir=runs/paper/nyu_segnet
Outputs in the workdir: stl/ and mtl/ run directories, sweep.json / sweep.csv (every run and
its status), delta_m.md/.csv, metrics.md/.csv, pareto.md, parallel_coordinates.png.
Re-running the same command skips finished runs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mtl_jax import parallel  # noqa: E402
from mtl_jax import runtime  # noqa: E402
from mtl_jax.studies import optimizers as sweep  # noqa: E402

_CONFIG = runtime.define_config_file("config", "configs/sweep_scenes.py", "Sweep config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/sweep_scenes", "Directory of the sweep's runs and tables."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    runtime.setup(_CONFIG.value)
    result = sweep.run_sweep(_CONFIG.value, _WORKDIR.value)
  except parallel.LostPeerError as error:
    parallel.exit_lost_peer(error)
  except Exception:
    # In a multi-process job a collective fails at once when a peer dies: name it, exit 5.
    parallel.exit_if_peer_lost()
    raise
  if not parallel.is_writer():
    return
  markdown, _ = sweep.delta_m_table(result.selections)
  print(markdown)
  print()
  print(sweep.pareto_table(result.pareto_counts))
  findings = "\n".join(sweep.findings_lines(result, _CONFIG.value))
  path = os.path.join(_WORKDIR.value, "findings.md")
  with open(path, "w") as file:
    file.write(f"# Findings, each with its interval and verdict\n\n{findings}\n")
  print(f"\n{findings}\nFindings written to {path}")
  print("\n".join(f"{name}: {path}" for name, path in result.files.items()))


if __name__ == "__main__":
  runtime.run(main)
