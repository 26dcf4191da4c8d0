r"""Cityscapes x SegNet (MTAN split): 7-class segmentation + inverse depth at 128x256, 300 epochs,
batch 64, lr x0.5 every 100.

Launch (the default is EW + Adam at lr 5e-3, the best EW + Adam lr in SPEC's table where it has one;
the sweep grids are in config.sweep):
  python experiments/train.py --config=configs/cityscapes_segnet.py \
    --workdir=runs/cityscapes_segnet/ew_adam
  python experiments/train.py \
    --config=configs/cityscapes_segnet.py:method=uw,optimizer=sgd,lr=0.05 \
    --workdir=runs/cityscapes_segnet/uw_sgd
  python experiments/train.py --config=configs/cityscapes_segnet.py:task=depth,lr=1e-4 \
    --workdir=runs/cityscapes_segnet/stl_depth
Config argument: as in configs/scenes.py (task=, method=, optimizer=, lr=).
Data: README.md, 'Datasets'.
"""

import ml_collections

from configs import paper


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  return paper.paper_config(
    "cityscapes",
    "segnet",
    ("segmentation", "depth"),
    height=128,
    width=256,
    num_epochs=300,
    batch_size=64,
    lr_decay_every_epochs=100,
    learning_rate=5e-3,
    argument=argument,
  )
