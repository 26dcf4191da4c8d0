r"""Cityscapes x DeepLabV3-ResNet50 (OS 8, ASPP per task): segmentation + inverse depth, 300 epochs,
batch 64, lr x0.5 every 100.

Launch (the default is EW + Adam at lr 1e-3, the best EW + Adam lr in SPEC's table where it has one;
the sweep grids are in config.sweep):
  python experiments/train.py --config=configs/cityscapes_deeplab.py \
    --workdir=runs/cityscapes_deeplab/ew_adam
  python experiments/train.py \
    --config=configs/cityscapes_deeplab.py:method=uw,optimizer=sgd,lr=0.05 \
    --workdir=runs/cityscapes_deeplab/uw_sgd
  python experiments/train.py --config=configs/cityscapes_deeplab.py:task=depth,lr=1e-4 \
    --workdir=runs/cityscapes_deeplab/stl_depth
Config argument: as in configs/scenes.py (task=, method=, optimizer=, lr=).
Data: README.md, 'Datasets'.
"""

import ml_collections

from configs import paper


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  return paper.paper_config(
    "cityscapes",
    "deeplabv3_resnet50",
    ("segmentation", "depth"),
    height=128,
    width=256,
    num_epochs=300,
    batch_size=64,
    lr_decay_every_epochs=100,
    learning_rate=1e-3,
    argument=argument,
  )
