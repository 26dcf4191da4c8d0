"""The sample-alignment study's keys (mtl_jax/studies/sample_alignment.py); training ignores
them. The runs use the experiment's training keys, so the optimizer study's STL baselines can be
shared."""

import ml_collections

from configs.sections import findings
from configs.sections import optimizers


def add(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds `config.sample_alignment` (and the sweep section it runs through) and returns config."""
  if "sweep" not in config:
    optimizers.add(config)
  config.sample_alignment = ml_collections.ConfigDict(
    dict(
      # Gramian methods, each trained at every level; EW runs beside them at level 'task'.
      # Per-sample levels need model.norm 'group', 'layer' or 'none'.
      methods=("pcgrad", "upgrad", "mgda", "cagrad"),
      levels=("task", "sample", "sample_task"),
      optimizers=("adam", "sgd"),
      lr_grid=(0.05, 0.005),
      seeds=(0, 1, 2),
      # Extra learning rates per (method at a level, optimizer) around the best (sweep.refine_*).
      refine_budget=1,
      # Interleaved rounds of the compiled train steps timed for the step cost ÷ EW.
      timing_repeats=10,
      # The conflict probe in one EW run (every k steps; 0 = no probe run).
      probe_every_steps=4,
    )
  )
  findings.add(config)
  return config
