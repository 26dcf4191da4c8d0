"""The conflict study's keys (experiments/conflicts.py): its settings and head architectures.

The probe's own keys (`config.conflicts.probe_every_steps`, ...) are training keys and live in
configs/base.py; this adds the study's to the same section.
"""

import ml_collections

from configs.sections import findings


def add(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the study's keys to `config.conflicts` and returns config."""
  # Settings: 'dense' (scenes dense tasks), 'attributes' (12 scene attributes) or 'config'
  # (config.tasks), each trained once per architecture; an architecture overrides
  # config.model with its heads entry.
  config.conflicts.settings = ("dense", "attributes")
  # The probe interval of the study's runs (config.conflicts.probe_every_steps, 0 = off, is the
  # interval of ordinary training runs, so one config can serve every study).
  config.conflicts.study_probe_every_steps = 5
  config.conflicts.architectures = ("small_heads", "large_heads")
  config.conflicts.heads = ml_collections.ConfigDict(
    dict(
      small_heads=ml_collections.ConfigDict(dict(head_hidden_channels=8, head_hidden=())),
      large_heads=ml_collections.ConfigDict(dict(head_hidden_channels=64, head_hidden=(64, 64))),
    )
  )
  findings.add(config)
  return config
