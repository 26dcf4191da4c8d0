"""The label-scarcity study's keys (mtl_jax/studies/label_scarcity.py); training ignores them."""

import ml_collections

from configs.sections import findings


def add(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds `config.label_scarcity` (and `config.findings`) and returns config."""
  config.label_scarcity = ml_collections.ConfigDict(
    dict(
      # The task whose training labels become scarce; the other tasks keep all of theirs.
      task="depth",
      # Fractions of the training examples that keep the scarce task's label.
      fractions=(1.0, 0.5, 0.2, 0.05),
      # MTL methods compared with STL (each trained at every fraction and seed).
      methods=("ew", "pcgrad", "upgrad"),
      seeds=(0, 1, 2),
    )
  )
  findings.add(config)
  return config
