"""Gradient-conflict study (SPEC section 4) on the 12 binary scene attributes (a CelebA-like setting).

Launch:
  python experiments/conflicts.py --config=configs/conflicts_attributes.py --workdir=runs/conflicts_attributes
Config argument: '' (both head architectures), 'small_heads' or 'large_heads'. Each probe uses
8 of the 12 attribute tasks (config.conflicts.max_tasks, a fixed random subset per run), as the
paper subsamples CelebA's 40. The encoder pools its features globally; the heads are linear
(small_heads) or a 2-layer MLP (large_heads), from config.conflicts.heads.
"""

import ml_collections

from configs import base
from configs import conflicts_dense


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.tasks = ("attributes",)
  config.model.encoder = "small_cnn"  # Global-average-pooled [B, C] output: every task is per-image.
  config.model.features = (16, 32)
  return conflicts_dense.apply_study_settings(config, argument)
