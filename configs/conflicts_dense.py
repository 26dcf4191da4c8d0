"""Gradient-conflict study (SPEC section 4) on the dense scenes tasks: segmentation, depth, normals.

Launch:
  python experiments/conflicts.py --config=configs/conflicts_dense.py --workdir=runs/conflicts_dense
Config argument: '' (both head architectures), 'small_heads' or 'large_heads' (dense heads:
hidden width config.conflicts.heads.<architecture>.head_hidden_channels). Settings shared with
the other conflict configs are in configs/conflicts.py.
"""

import ml_collections

from configs import conflicts


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  config = conflicts.get_config(argument)
  config.conflicts.settings = ("dense",)
  config.model.features = (16, 16)  # Full-resolution blocks: narrower than the pooled encoder.
  return config
