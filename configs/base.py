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
      # TFDS datasets (celeb_a, cityscapes, nyuv2): validation hold-out from 'train'
      # (-1 = the dataset's default: 595 Cityscapes, 159 NYUv2), its seed, and augmentation.
      validation_size=-1,
      validation_seed=0,
      augment=True,
      scales=(1.0, 1.2, 1.5),
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
      # A local .npz / .msgpack of encoder variables to start from ('' = random init).
      pretrained_backbone="",
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
  # The optimizer x method study (mtl_jax/sweep.py, experiments/sweep.py): the grid, and whether
  # runs differing only in seed/lr train as one vmapped program (mtl_jax/multirun.py).
  config.sweep = ml_collections.ConfigDict(dict(
      methods=("ew", "uw", "rlw", "uw_o"),
      optimizers=("adam", "sgd"),
      lr_grid=(0.05, 0.005, 0.0005),
      stl_lr_grid=(0.005, 0.0005),
      seeds=(0, 1),
      vmap=True,
  ))
  # --- Scaling out (mtl_jax/sharding.py): the batch split over a 'data' mesh axis. ---
  config.sharding = ml_collections.ConfigDict(dict(
      data_axis_size=-1,  # devices on the 'data' axis; -1 = all. Used only with > 1 device.
      fsdp=False,  # split large parameters and optimizer moments over 'data' (big encoders).
      fsdp_min_size=2**14,  # leaves with fewer elements stay replicated under fsdp.
      # 'auto': jax.distributed.initialize() when the environment names several hosts
      # (TPU pod slice, SLURM, JAX_COORDINATOR_ADDRESS); 'on' always; 'off' never.
      distributed="auto",
  ))
  return config
