"""Gradient-conflict study (SPEC section 4) on the dense scenes tasks: segmentation, depth, normals.

Launch:
  python experiments/conflicts.py --config=configs/conflicts_dense.py --workdir=runs/conflicts_dense
Config argument: '' (both head architectures), 'small_heads' or 'large_heads', e.g.
  --config=configs/conflicts_dense.py:large_heads
The sizes are small enough for a CPU (about half a minute per architecture on 2 cores); scale up
with --config.dataset.num_train=..., --config.training.num_epochs=..., --config.model.features=...
The heads come from config.conflicts.heads[<architecture>]: dense heads differ in their hidden
width (head_hidden_channels); global heads in their hidden MLP (head_hidden).
"""

import ml_collections

from configs import base

ARCHITECTURES = ("small_heads", "large_heads")


def apply_study_settings(config: ml_collections.ConfigDict, argument: str | None) -> ml_collections.ConfigDict:
  """The settings both conflict configs share: small CPU sizes, EW + Adam, group norm, the probe."""
  if argument and argument not in ARCHITECTURES:
    raise ValueError(f"Bad config argument {argument!r} for a conflicts config; valid: "
                     f"{', '.join(ARCHITECTURES)} or none (both).")
  config.dataset.height, config.dataset.width = 16, 32
  config.dataset.num_train, config.dataset.num_validation, config.dataset.num_test = 256, 32, 32
  # [choice] Group norm keeps samples independent, so each per-sample gradient is the gradient of
  # the single-sample loss (batch norm would need batch_norm='eval', see mtl_jax/gramian.py).
  config.model.norm = "group"
  config.method.name = "ew"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.training.num_epochs = 4
  config.training.batch_size = 16
  # The study needs no per-epoch model selection: evaluate (and checkpoint) once, at the end.
  config.training.eval_every_epochs = config.training.num_epochs
  config.training.eval_batch_size = 32
  config.training.log_every_steps = 16
  config.training.checkpoint_every_steps = 0
  config.training.async_checkpoints = False
  config.conflicts.probe_every_steps = 5
  config.conflicts.architectures = (argument,) if argument else ARCHITECTURES
  return config


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.tasks = ("segmentation", "depth", "normals")
  config.model.encoder = "small_cnn"  # Dense (full-resolution) output because the heads are dense.
  config.model.features = (16, 16)
  return apply_study_settings(config, argument)
