r"""CelebA x ResNet-18 (one linear head per attribute): 40 binary attributes at 64x64, 100 epochs,
batch 512, lr x0.5 every 30.

Launch (the default is EW + Adam at lr 1e-3, the best EW + Adam lr in SPEC's table where it has one;
the sweep grids are in config.sweep):
  python experiments/train.py --config=configs/celeba_resnet18.py \
    --workdir=runs/celeba_resnet18/ew_adam
  python experiments/train.py --config=configs/celeba_resnet18.py:method=uw,optimizer=sgd,lr=0.05 \
    --workdir=runs/celeba_resnet18/uw_sgd
  python experiments/train.py --config=configs/celeba_resnet18.py:task=Smiling,lr=1e-3 \
    --workdir=runs/celeba_resnet18/stl_smiling
Config argument: as in configs/scenes.py (task=, method=, optimizer=, lr=).
Data: README.md, 'Datasets'.
"""

import ml_collections

from configs import paper


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  return paper.paper_config(
    "celeb_a",
    "resnet18",
    ("attributes",),
    height=64,
    width=64,
    num_epochs=100,
    batch_size=512,
    lr_decay_every_epochs=30,
    learning_rate=1e-3,
    argument=argument,
  )
