r"""The robustness study (SPEC section 5): head fine-tuning on corrupted scenes, δ, linear probes.

Launch:
  python experiments/robustness.py --config=configs/robustness.py --workdir=runs/robustness
  python experiments/robustness.py --config=configs/robustness.py:figure \
    --config.robustness.figure_path=docs/corruptions.png
With no run directories given it first trains the STL models (one per task) and the MTL models
(one per method in robustness.prepare_methods) into <workdir>/runs/, using the training keys of
this config (the scenes defaults). To study existing runs instead:
  --config.robustness.mtl_runs="('runs/ew','runs/uw')" \
  --config.robustness.stl_runs="('runs/stl_seg','runs/stl_depth','runs/stl_normals')"
Their config.json must use the same dataset settings and tasks as this config.
Config argument: 'figure' (draw the corruption figure only) or empty.
"""

import ml_collections

from configs import base
from configs.sections import robustness

# [choice] SPEC gives no fine-tuning schedule: 2 epochs of Adam at 1e-3 on the heads only.
FINETUNE_EPOCHS = 2
FINETUNE_LEARNING_RATE = 1e-3


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  config = robustness.add(base.get_config())
  config.robustness.finetune_epochs = FINETUNE_EPOCHS
  config.robustness.finetune_learning_rate = FINETUNE_LEARNING_RATE
  if argument == "figure":
    config.robustness.mode = "figure"
  elif argument:
    raise ValueError(
      f"Bad config argument {argument!r} for configs/robustness.py; valid: 'figure' or none."
    )
  return config
