r"""Gradient-conflict study (SPEC section 4) on the 12 binary scene attributes (a CelebA-like
setting).

Launch:
  python experiments/conflicts.py --config=configs/conflicts_attributes.py \
    --workdir=runs/conflicts_attributes
Config argument: '' (both head architectures), 'small_heads' or 'large_heads'. Each probe uses
8 of the 12 attribute tasks (config.conflicts.max_tasks, a fixed random subset per run), as the
paper subsamples CelebA's 40. The encoder pools its features globally; the heads are linear
(small_heads) or a 2-layer MLP (large_heads), from config.conflicts.heads.
"""

import ml_collections

from configs import conflicts


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  config = conflicts.get_config(argument)
  config.conflicts.settings = ("attributes",)
  return config
