r"""NYUv2 x SegNet (MTAN split): 13-class segmentation + depth + normals at 288x384, 200 epochs,
batch 8, lr x0.5 every 100.

Launch (the default is EW + Adam at lr 1e-4, the best EW + Adam lr in SPEC's table where it has one;
the sweep grids are in config.sweep):
  python experiments/train.py --config=configs/nyuv2_segnet.py --workdir=runs/nyuv2_segnet/ew_adam
  python experiments/train.py --config=configs/nyuv2_segnet.py:method=uw,optimizer=sgd,lr=0.05 \
    --workdir=runs/nyuv2_segnet/uw_sgd
  python experiments/train.py --config=configs/nyuv2_segnet.py:task=depth,lr=1e-4 \
    --workdir=runs/nyuv2_segnet/stl_depth
Config argument: as in configs/scenes.py (task=, method=, optimizer=, lr=).
Data: README.md, 'Datasets'.
"""

import ml_collections

from configs import paper


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  return paper.paper_config(
    "nyuv2",
    "segnet",
    ("segmentation", "depth", "normals"),
    height=288,
    width=384,
    num_epochs=200,
    batch_size=8,
    lr_decay_every_epochs=100,
    learning_rate=1e-4,
    argument=argument,
  )
