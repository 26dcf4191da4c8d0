"""Shared settings of the paper's benchmark configs (SPEC section 2): grids, seeds, optimizer
defaults.

Not a config itself: cityscapes_*.py, nyuv2_*.py and celeba_resnet18.py build on it.
"""

import ml_collections

from configs import base
from configs.sections import optimizers
from configs import scenes

# SPEC section 2: lr grid of MTL runs, of STL baselines (always Adam), seeds, methods.
LR_GRID = (0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 5e-4, 1e-4, 5e-5, 1e-5)
STL_LR_GRID = (0.01, 0.005, 0.001, 5e-4, 1e-4, 5e-5)
SEEDS = (0, 1, 2)
METHODS = ("ew", "uw", "rlw", "imtl", "pcgrad", "cagrad", "aligned_mtl", "adatask", "mtl_io")
OPTIMIZERS = ("adam", "sgd")


def paper_config(
  dataset: str,
  encoder: str,
  tasks: tuple[str, ...],
  height: int,
  width: int,
  num_epochs: int,
  batch_size: int,
  lr_decay_every_epochs: int,
  learning_rate: float,
  argument: str | None,
) -> ml_collections.ConfigDict:
  """base.py with the paper's dataset, network and schedule; `argument` as in configs/scenes.py."""
  config = optimizers.add(base.get_config())
  config.dataset.name = dataset
  config.dataset.height, config.dataset.width = height, width
  config.tasks = tasks
  config.model.encoder = encoder
  config.model.norm = "batch"
  config.model.width_multiplier = 1.0
  config.model.head_hidden_channels = 64
  config.model.head_hidden = ()
  config.model.resnet_stem = "imagenet"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.b1, config.optimizer.b2, config.optimizer.eps = 0.9, 0.999, 1e-8
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-5
  config.optimizer.decoupled_weight_decay = False
  config.optimizer.lr_decay_every_epochs = lr_decay_every_epochs
  config.optimizer.lr_decay_factor = 0.5
  config.training.num_epochs = num_epochs
  config.training.batch_size = batch_size
  config.training.eval_batch_size = batch_size
  config.training.eval_every_epochs = 1
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.sweep.lr_grid = LR_GRID
  config.sweep.stl_lr_grid = STL_LR_GRID
  config.sweep.seeds = SEEDS
  config.sweep.methods = METHODS
  config.sweep.optimizers = OPTIMIZERS
  return scenes.apply_arguments(config, argument)
