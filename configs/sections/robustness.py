"""The robustness study's keys (experiments/robustness.py, SPEC section 5); training ignores
them."""

import ml_collections

from configs.sections import findings


def add(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds `config.robustness` with its defaults and returns config."""
  config.robustness = ml_collections.ConfigDict(
    dict(
      # 'study' runs the study; 'figure' draws every corruption of one test image.
      mode="study",
      # experiments/train.py run directories. MTL runs must have config.tasks; STL runs one task
      # each, covering config.tasks. Both empty: train them first in <workdir>/runs/.
      mtl_runs=(),
      stl_runs=(),
      prepare_methods=("ew",),
      corruptions=(),  # () = all 15, in the standard order.
      severities=(1, 2, 3, 4, 5),
      corruption_seed=0,
      finetune_epochs=2,
      finetune_learning_rate=1e-3,
      max_test_examples=0,  # 0 = the whole test split.
      probe_task="has_red_object",
      probe_steps=300,
      probe_learning_rate=0.05,
      figure_path="",  # '' = <workdir>/corruptions.png
    )
  )
  findings.add(config)
  return config
