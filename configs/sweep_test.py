"""A tiny CPU sweep for tests: configs/test.py with a one-point grid (2 STL runs, 1 MTL run).

Launch:
  python experiments/sweep.py --config=configs/sweep_test.py --workdir=runs/sweep_test
"""

import ml_collections

from configs import test
from configs.sections import optimizers


def get_config() -> ml_collections.ConfigDict:
  config = optimizers.add(test.get_config())
  config.tasks = ("segmentation", "depth")
  config.training.num_epochs = 1
  config.training.checkpoint_every_steps = 0
  config.sweep.methods = ("ew",)
  config.sweep.optimizers = ("adam",)
  config.sweep.lr_grid = (0.001,)
  config.sweep.stl_lr_grid = (0.001,)
  config.sweep.seeds = (0,)
  # No refinement around the one point: the test counts the three runs.
  config.sweep.refine_budget = 0
  return config
