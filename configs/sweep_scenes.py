"""The optimizer x method sweep on the embedded scenes, small enough for a CPU.

Launch:
  python experiments/sweep.py --config=configs/sweep_scenes.py --workdir=runs/sweep_scenes
Re-running the command skips finished runs. Override the grid with e.g.
  --config.sweep.methods="('ew','uw')" --config.sweep.lr_grid="(0.01,0.001)"
"""

import ml_collections

from configs import base
from configs.sections import optimizers


def get_config() -> ml_collections.ConfigDict:
  config = optimizers.add(base.get_config())
  config.training.num_epochs = 4
  config.training.checkpoint_every_steps = 0
  config.sweep.methods = ("ew", "uw", "rlw", "uw_o")
  config.sweep.optimizers = ("adam", "sgd")
  config.sweep.lr_grid = (0.05, 0.005, 0.0005)
  config.sweep.stl_lr_grid = (0.005, 0.0005)
  config.sweep.seeds = (0, 1)
  config.sweep.group_runs = True
  return config
