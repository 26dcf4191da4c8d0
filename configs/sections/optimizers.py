"""The optimizer x method study's grid (experiments/sweep.py, mtl_jax/studies/optimizers.py)."""

import ml_collections

from configs.sections import findings


def add(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds `config.sweep` with its defaults and returns config."""
  config.sweep = ml_collections.ConfigDict(
    dict(
      methods=("ew", "uw", "rlw", "uw_o"),
      optimizers=("adam", "sgd"),
      lr_grid=(0.05, 0.005, 0.0005),
      stl_lr_grid=(0.005, 0.0005),
      seeds=(0, 1),
      # Runs that differ only in seed, learning rate and optimizer train as one group, one
      # compiled program.
      group_runs=True,
      # How a group's runs share the program: 'auto' (loop on CPU, vmap on GPU/TPU), 'vmap',
      # 'map' or 'loop'; see mtl_jax.train.lanes.
      lane_mode="auto",
      # After the coarse grid, each (method, optimizer)'s best lr (and each STL task's) is
      # refined: best x refine_factor and best / refine_factor are tried where not tried yet, an
      # extension beyond the grid when the best sits on its edge; up to refine_budget extra
      # learning rates per pair (all seeds each), round after round. 0 = the coarse grid only.
      refine_budget=2,
      refine_factor=10**0.5,
    )
  )
  findings.add(config)
  return config
