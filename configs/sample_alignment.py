"""The sample-alignment study on the embedded scenes: PCGrad, UPGrad, MGDA and CAGrad at levels
task, sample and sample_task, Adam and SGD, 3 seeds, against EW and STL baselines.

Launch:
  python experiments/sample_alignment.py --config=configs/sample_alignment.py \
    --workdir=runs/sample_alignment
The model and training keys are the main job's (configs/reproduce.py: a small CNN with group
norm, which per-sample levels need); STL baselines are trained in the workdir.
"""

import ml_collections

from configs import reproduce
from configs.sections import sample_alignment


def get_config() -> ml_collections.ConfigDict:
  config = reproduce.get_config()
  if "sample_alignment" not in config:
    sample_alignment.add(config)
  return config
