"""The label-scarcity study: MTL (EW, PCGrad, UPGrad) vs STL as the depth labels of the scenes
become scarce (1.0, 0.5, 0.2, 0.05 of the training examples), 3 seeds. It runs outside the main
job (configs/reproduce.py): 3 methods x 4 fractions x 3 seeds MTL runs, plus the STL runs.

Launch:
  python experiments/label_scarcity.py --config=configs/label_scarcity.py \
    --workdir=runs/label_scarcity
The model and training keys are the main job's (a small CNN with group norm on 16x32 scenes).
"""

import ml_collections

from configs import base
from configs import reproduce
from configs.sections import label_scarcity


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.tasks = ("segmentation", "depth", "normals")
  reproduce.apply_small_scenes(config)
  config.optimizer.learning_rate = 0.005
  label_scarcity.add(config)
  return config
