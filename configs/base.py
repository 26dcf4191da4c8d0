"""Every config key an experiment understands, with its default: variants override these.

Launch (any variant): python experiments/train.py --config=configs/scenes.py --workdir=runs/scenes
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = ml_collections.ConfigDict(dict(
      name="scenes",
      height=32,
      width=64,
      num_train=1024,
      num_validation=256,
      num_test=256,
      seed=0,
      max_objects=5,
      data_dir="",
  ))
  config.tasks = ("segmentation", "depth", "normals")
  config.model = ml_collections.ConfigDict(dict(
      encoder="segnet",
      norm="batch",
      width_multiplier=0.125,
      hidden=(256, 256),
      features=(16, 32, 32),
      head_hidden_channels=16,
      head_hidden=(),
      resnet_stem="cifar",
  ))
  config.method = ml_collections.ConfigDict(dict(
      name="ew",
      uw_initial_log_variance=-0.5,
      uw_o_epsilon=1e-8,
  ))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam",
      learning_rate=1e-3,
      momentum=0.9,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=1e-5,
      decoupled_weight_decay=False,
      lr_decay_every_epochs=0,
      lr_decay_factor=0.5,
  ))
  config.training = ml_collections.ConfigDict(dict(
      num_epochs=8,
      batch_size=32,
      eval_batch_size=128,
      eval_every_epochs=1,
      log_every_steps=16,
      checkpoint_every_steps=32,
      early_stopping_patience=0,
      # 'stop' raises on a non-finite loss or gradient; 'skip' drops the step and counts it.
      on_non_finite="stop",
      async_checkpoints=True,
  ))
  config.delta_m = ml_collections.ConfigDict(dict(
      # STL run directories (or their results.json files) whose metrics are the Δm baseline.
      baseline=(),
      variant="flat",
  ))
  # --- Robustness study (experiments/robustness.py, SPEC section 5); ignored by training. ---
  config.robustness = ml_collections.ConfigDict(dict(
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
  ))
  return config
