"""Gradient-conflict study (SPEC section 4): dense scenes tasks and the 12 scene attributes, small
vs large heads.

Launch:
  python experiments/conflicts.py --config=configs/conflicts.py --workdir=runs/conflicts
Config argument: '' (both head architectures), 'small_heads' or 'large_heads', e.g.
  --config=configs/conflicts.py:large_heads
One setting only: configs/conflicts_dense.py, configs/conflicts_attributes.py, or
--config.conflicts.settings="('dense',)". The sizes are small enough for a CPU (the 4 runs take
about 1.5 minutes from a cold compilation cache on 2 shared cores); scale up with
--config.dataset.num_train=..., --config.training.num_epochs=..., --config.model.features=...
The heads come from config.conflicts.heads[<architecture>]: dense heads differ in their hidden
width (head_hidden_channels), global heads in their hidden MLP (head_hidden).
"""

import ml_collections

from configs import base
from configs.sections import conflicts

ARCHITECTURES = ("small_heads", "large_heads")


def apply_study_settings(
  config: ml_collections.ConfigDict, argument: str | None
) -> ml_collections.ConfigDict:
  """The settings all conflict configs share: small CPU sizes, EW + Adam, group norm, the probe."""
  if argument and argument not in ARCHITECTURES:
    raise ValueError(
      f"Bad config argument {argument!r} for a conflicts config; valid: "
      f"{', '.join(ARCHITECTURES)} or none (both)."
    )
  config.dataset.height, config.dataset.width = 16, 32
  config.dataset.num_train, config.dataset.num_validation, config.dataset.num_test = 256, 32, 32
  # A small CNN: global-average-pooled output for the attribute setting, full-resolution
  # (dense) output when the heads are per-pixel.
  config.model.encoder = "small_cnn"
  config.model.features = (16, 32)
  # [choice] Group norm keeps samples independent, so each per-sample gradient is the gradient of
  # the single-sample loss (batch norm would need batch_norm='eval', see mtl_jax/gramian.py).
  config.model.norm = "group"
  # [choice] SPEC probes "the best EW configuration": EW with Adam at its default rate here.
  config.method.name = "ew"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.training.num_epochs = 4
  config.training.batch_size = 16
  config.training.eval_batch_size = 32
  config.training.log_every_steps = 16
  config.training.checkpoint_every_steps = 0
  config.training.async_checkpoints = False
  config.conflicts.study_probe_every_steps = 5
  config.conflicts.settings = ("dense", "attributes")
  config.conflicts.architectures = (argument,) if argument else ARCHITECTURES
  return config


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  return apply_study_settings(conflicts.add(base.get_config()), argument)
