r"""The paper's full optimizer x method sweep (SPEC section 2) on the real datasets, for GPU/TPU.

Launch (one process per host; the sweep resumes, so it can be re-launched after preemption):
  python experiments/sweep.py --config=configs/sweep_paper.py:cityscapes_segnet \
    --workdir=runs/paper/cs_segnet
Config argument: cityscapes_segnet | cityscapes_deeplab | nyuv2_segnet | nyuv2_deeplab.

Size: 9 methods x 2 optimizers x 10 lr x 3 seeds (minus the single-optimizer methods) = 486 MTL
runs + STL (tasks x 6 lr x 3 seeds) per dataset/network, each the paper's full schedule. With
`sweep.group_runs=True` the 3 seeds x 10 lr of one (method, optimizer) train as one program: 30
SegNets fit easily on one 80 GB accelerator at the paper's batch sizes; for DeepLabV3/ResNet-50
set `--config.sweep.group_runs=False` (or shrink the grid per launch) unless memory allows.
The dataset settings come from configs/<dataset>_<network>.py when that file exists (it sets
the data directory, image size, epochs, batch size and lr decay of SPEC section 2); otherwise
the settings below are applied on top of configs/base.py.
"""

import importlib

import ml_collections

from configs import base
from configs.sections import optimizers

_VARIANTS = {
  # name: (dataset, tasks, encoder, height, width, epochs, batch size, lr decay every epochs)
  "cityscapes_segnet": ("cityscapes", ("segmentation", "depth"), "segnet", 128, 256, 300, 64, 100),
  "cityscapes_deeplab": (
    "cityscapes",
    ("segmentation", "depth"),
    "deeplabv3",
    128,
    256,
    300,
    64,
    100,
  ),
  "nyuv2_segnet": ("nyuv2", ("segmentation", "depth", "normals"), "segnet", 288, 384, 200, 8, 100),
  "nyuv2_deeplab": (
    "nyuv2",
    ("segmentation", "depth", "normals"),
    "deeplabv3",
    288,
    384,
    200,
    8,
    100,
  ),
}


def _dataset_config(variant: str) -> ml_collections.ConfigDict:
  """configs/<variant>.py if present in this build, else base.py with the SPEC settings."""
  try:
    module = importlib.import_module(f"configs.{variant}")
  except ModuleNotFoundError as error:
    if error.name != f"configs.{variant}":
      raise
  else:
    return module.get_config()
  name, tasks, encoder, height, width, epochs, batch_size, decay = _VARIANTS[variant]
  config = base.get_config()
  config.dataset.name = name
  config.dataset.height, config.dataset.width = height, width
  config.tasks = tasks
  config.model.encoder = encoder
  config.model.width_multiplier = 1.0
  config.training.num_epochs = epochs
  config.training.batch_size = batch_size
  config.optimizer.lr_decay_every_epochs = decay
  config.optimizer.lr_decay_factor = 0.5
  config.optimizer.weight_decay = 1e-5
  return config


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  variant = argument or "cityscapes_segnet"
  if variant not in _VARIANTS:
    raise ValueError(f"Unknown sweep_paper variant {variant!r}; valid: {', '.join(_VARIANTS)}.")
  config = _dataset_config(variant)
  if "sweep" not in config:
    optimizers.add(config)
  config.training.early_stopping_patience = 0
  config.sweep.methods = (
    "ew",
    "uw",
    "rlw",
    "imtl",
    "pcgrad",
    "cagrad",
    "aligned_mtl",
    "adatask",
    "mtl_io",
  )
  config.sweep.optimizers = ("adam", "sgd")
  config.sweep.lr_grid = (0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 5e-4, 1e-4, 5e-5, 1e-5)
  config.sweep.stl_lr_grid = (0.01, 0.005, 0.001, 5e-4, 1e-4, 5e-5)
  config.sweep.seeds = (0, 1, 2)
  config.sweep.group_runs = True
  return config
