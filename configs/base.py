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
      # Gradient methods: the rows of the Gramian, 'task' | 'sample' | 'sample_task'
      # (per-sample levels need norm group/layer/none).
      level="task",
      # Fixed iteration counts of the JAX solvers (MGDA, UPGrad, CAGrad's inner QP).
      solver_iterations=1000,
      cagrad_c=0.5,
      cagrad_rescale=1,
      cagrad_outer_iterations=20,
      gradvac_beta=0.5,
      imtl_loss_scaling=True,
      nash_mtl_iterations=50,
      nash_mtl_max_norm=1.0,
      graddrop_leak=0.0,
      dwa_temperature=2.0,
      gradnorm_alpha=1.5,
      famo_learning_rate=0.025,
      famo_weight_decay=1e-3,
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
  return config
