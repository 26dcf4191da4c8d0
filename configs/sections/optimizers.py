"""The optimizer x method study's grid (experiments/sweep.py, mtl_jax/studies/optimizers.py)."""

import ml_collections


def add(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds `config.sweep` with its defaults and returns config."""
  config.sweep = ml_collections.ConfigDict(
    dict(
      methods=("ew", "uw", "rlw", "uw_o"),
      optimizers=("adam", "sgd"),
      lr_grid=(0.05, 0.005, 0.0005),
      stl_lr_grid=(0.005, 0.0005),
      seeds=(0, 1),
      # Runs that differ only in seed and learning rate train as one group, one compiled program.
      group_runs=True,
      # How a group's runs share the program: 'auto' (loop on CPU, vmap on GPU/TPU), 'vmap',
      # 'map' or 'loop'; see mtl_jax.train.lanes.
      lane_mode="auto",
    )
  )
  return config
