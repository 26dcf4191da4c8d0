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
      # Maximum iteration counts of the JAX solvers (MGDA, UPGrad; CAGrad runs up to
      # cagrad_outer_iterations x solver_iterations); they stop earlier, on a certificate of
      # optimality (weighting/solvers.py).
      solver_iterations=1000,
      cagrad_c=0.5,
      cagrad_rescale=1,
      cagrad_outer_iterations=20,
      gradvac_beta=0.5,
      imtl_loss_scaling=True,
      nash_mtl_iterations=50,
      nash_mtl_max_norm=1.0,
      # Added to Nash-MTL's normalised Gramian; 0 solves the published condition.
      nash_mtl_ridge=0.0,
      graddrop_leak=0.0,
      dwa_temperature=2.0,
      gradnorm_alpha=1.5,
      famo_learning_rate=0.025,
      famo_weight_decay=1e-3,
  ))
  # The Gramian engine's self-check (mtl_jax/gramian_check.py), for runs that compute per-sample
  # Gramians on the fast path (Gramian methods at level 'sample'/'sample_task', the conflict probe
  # with path 'fast'): a few rows are compared with the reference path and a disagreement beyond
  # float32 rounding stops the run. -1 = once, at the first such step; 0 = never; k = every k steps.
  config.gramian = ml_collections.ConfigDict(dict(
      verify_every_steps=-1,
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
  # runs differing only in seed/lr train as one group with one compiled program (`vmap`, a
  # historical name: how the group runs is `lane_mode`; mtl_jax/multirun.py).
  config.sweep = ml_collections.ConfigDict(dict(
      methods=("ew", "uw", "rlw", "uw_o"),
      optimizers=("adam", "sgd"),
      lr_grid=(0.05, 0.005, 0.0005),
      stl_lr_grid=(0.005, 0.0005),
      seeds=(0, 1),
      vmap=True,
      # How a group's runs share the program: 'auto' (loop on CPU, vmap on GPU/TPU), 'vmap',
      # 'map' or 'loop'; see mtl_jax.multirun.default_lane_mode.
      lane_mode="auto",
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
  # --- Gradient conflicts (mtl_jax/conflicts.py probe, experiments/conflicts.py, SPEC section 4). ---
  config.conflicts = ml_collections.ConfigDict(dict(
      # Probe every k training steps (0 = no probe; ordinary training is untouched).
      probe_every_steps=0,
      max_samples=8,  # Samples of the batch per probe (0 = all).
      max_tasks=8,  # Tasks per run, a fixed random subset when there are more (0 = all).
      path="fast",  # Gramian path: 'fast' or 'reference'.
      # Per-sample gradients under batch norm: 'error', 'eval' or 'batch_statistics' (reference
      # path only); see mtl_jax/gramian.py. The conflict configs use group norm instead.
      batch_norm="error",
      parameter_ratio=True,  # Also materialise the probed rows for the conflicting-parameter ratio.
      zero_tolerance=1e-12,  # Rows with squared norm <= this x the largest have no direction.
      # Parameter ratio: coordinates with |g| <= this x max |g| of their gradient count as zero.
      sign_tolerance=1e-6,
      # The study (experiments/conflicts.py, mtl_jax/conflict_study.py): settings 'dense' (scenes
      # dense tasks), 'attributes' (12 scene attributes) or 'config' (config.tasks), each trained
      # once per architecture; an architecture overrides config.model with its heads entry.
      settings=("dense", "attributes"),
      architectures=("small_heads", "large_heads"),
      heads=ml_collections.ConfigDict(dict(
          small_heads=ml_collections.ConfigDict(dict(head_hidden_channels=8, head_hidden=())),
          large_heads=ml_collections.ConfigDict(dict(head_hidden_channels=64, head_hidden=(64, 64))),
      )),
  ))
  # --- End of gradient conflicts. ---
  return config
