"""Every training key, with its default: variants override these; each study adds its section.

Launch (any variant): python experiments/train.py --config=configs/scenes.py --workdir=runs/scenes
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = ml_collections.ConfigDict(
    dict(
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
      # Partial labels (mtl_jax/data/labels.py): the fraction of examples that keep their
      # label for each task of label_fraction_tasks (empty: every task); 1.0 keeps all.
      label_fraction=1.0,
      label_fraction_tasks=(),
      # One fraction per task, "depth=0.2,normals=0.5"; it overrides label_fraction for the
      # tasks it names ("": none).
      label_fractions="",
      # The splits whose labels the fractions hide; validation and test keep all by default.
      label_fraction_splits=("train",),
    )
  )
  # The training input pipeline (mtl_jax/data/loader.py); the batches never depend on it.
  config.data = ml_collections.ConfigDict(
    dict(
      workers=0,  # grain worker processes reading batches (0: the training process reads).
      prefetch=0,  # batches read ahead: by one thread (workers=0) or by each worker (>= 1).
      # Where the augmentation's pixel work runs: 'device' (inside the jitted step; the host
      # reads uint8 images and draws the crops) or 'host' (NumPy, in the reading process).
      augment_on="device",
    )
  )
  config.tasks = ("segmentation", "depth", "normals")
  config.model = ml_collections.ConfigDict(
    dict(
      encoder="segnet",
      norm="batch",
      width_multiplier=0.125,
      hidden=(256, 256),
      features=(16, 32, 32),
      head_hidden_channels=16,
      head_hidden=(),
      resnet_stem="cifar",
      # How the tasks share the network (mtl_jax/models/architectures.py): 'hps' (hard
      # sharing), 'mtan', 'mmoe', 'cgc', 'ple' or 'cross_stitch'.
      architecture="hps",
      num_experts=3,  # mmoe: experts; cgc / ple: shared experts per level.
      num_task_experts=1,  # cgc / ple: each task's own experts per level.
      num_levels=2,  # ple: extraction levels (1 is cgc).
      # A local .npz / .msgpack of encoder variables to start from ('' = random init).
      pretrained_backbone="",
      # Activations and matmuls: 'float32' or 'bfloat16' (parameters, optimizer state, losses,
      # Gramians and their weightings stay float32).
      dtype="float32",
    )
  )
  config.method = ml_collections.ConfigDict(
    dict(
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
      # The catalogue's methods (defaults of the authors' code or LibMTL; README, 'Methods').
      # ConFIG: eigenvalues of the cosine matrix below this x the largest count as zero.
      config_eigenvalue_cutoff=1e-6,
      fairgrad_alpha=1.0,  # the official default (its run scripts use 2.0 on QM9, CelebA)
      fairgrad_iterations=20,  # Newton steps
      cr_mogm_base="mgda",  # the Gramian weighting whose weights are averaged
      cr_mogm_alpha=0.9,
      db_mtl_beta=0.9,
      db_mtl_beta_sigma=0.0,
      moco_beta=0.5,
      moco_beta_sigma=0.5,
      moco_gamma=0.1,
      moco_gamma_sigma=0.5,
      moco_rho=0.0,
      moco_weight_map="simplex",  # 'simplex' (the paper) or 'softmax' (LibMTL)
      moco_gradient_scale="loss",  # 'loss' (norm L_t, LibMTL) or 'none'
      excess_mtl_step_size=1e-2,
      sdmgrad_lambda=0.3,
      sdmgrad_learning_rate=10.0,
      sdmgrad_momentum=0.5,
      sdmgrad_iterations=20,
      modo_gamma=1e-3,
      modo_rho=0.1,
      stch_mu=1.0,
      stch_warmup_epochs=4,
      go4align_step_size=1e-4,
      go4align_groups=1,  # the released code's default; the paper's K per benchmark is not stated
      auto_lambda_initial_weight=0.1,
      auto_lambda_learning_rate=1e-4,
    )
  )
  # The Gramian engine's self-check (mtl_jax/gramian/check.py), for runs that compute per-sample
  # Gramians on the fast path (Gramian methods at level 'sample'/'sample_task', the conflict probe
  # with path 'fast'): a few rows are compared with the reference path and a disagreement beyond
  # float32 rounding stops the run. -1 = once, at the first such step; 0 = never; k = every k steps.
  config.gramian = ml_collections.ConfigDict(
    dict(
      verify_every_steps=-1,
    )
  )
  config.optimizer = ml_collections.ConfigDict(
    dict(
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
    )
  )
  config.training = ml_collections.ConfigDict(
    dict(
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
    )
  )
  config.delta_m = ml_collections.ConfigDict(
    dict(
      # STL run directories (or their results.json files) whose metrics are the Δm baseline.
      baseline=(),
      variant="flat",
    )
  )
  # Scaling out (mtl_jax/parallel.py): the batch split over a 'data' mesh axis.
  config.sharding = ml_collections.ConfigDict(
    dict(
      data_axis_size=-1,  # devices on the 'data' axis; -1 = all. Used only with > 1 device.
      fsdp=False,  # split large parameters and optimizer moments over 'data' (big encoders).
      fsdp_min_size=2**14,  # leaves with fewer elements stay replicated under fsdp.
      # 'auto': jax.distributed.initialize() when the environment names several hosts
      # (TPU pod slice, SLURM, JAX_COORDINATOR_ADDRESS) or coordinator_address is set; 'on'
      # always; 'off' never.
      distributed="auto",
      # A multi-process job started by hand (e.g. several processes on one machine): process 0's
      # 'host:port', the number of processes and this one's index; all three or none ('' / -1:
      # detected from the environment).
      coordinator_address="",
      num_processes=-1,
      process_id=-1,
      # Bounds on waiting for the other processes, in seconds: connecting at start-up; a silent
      # peer before the JAX runtime aborts; the barrier at exit; and the liveness check that
      # names a lost process and stops this one with an error (exit status 5). The check must
      # fire before the heartbeat abort: peer_timeout_seconds < heartbeat_timeout_seconds.
      initialization_timeout_seconds=300,
      heartbeat_timeout_seconds=100,
      shutdown_timeout_seconds=300,
      peer_timeout_seconds=60,
    )
  )
  # The gradient-conflict probe (mtl_jax/conflicts.py), run inside training every k steps.
  config.conflicts = ml_collections.ConfigDict(
    dict(
      # Probe every k training steps (0 = no probe; ordinary training is untouched).
      probe_every_steps=0,
      max_samples=8,  # Samples of the batch per probe (0 = all).
      max_tasks=8,  # Tasks per run, a fixed random subset when there are more (0 = all).
      path="fast",  # Gramian path: 'fast' or 'reference'.
      # Per-sample gradients under batch norm: 'error', 'eval' or 'batch_statistics' (reference
      # path only); see mtl_jax/gramian/modes.py. The conflict configs use group norm instead.
      batch_norm="error",
      parameter_ratio=True,  # Also materialise the probed rows for the conflicting-parameter ratio.
      zero_tolerance=1e-12,  # Rows with squared norm <= this x the largest have no direction.
      # Parameter ratio: coordinates with |g| <= this x max |g| of their gradient count as zero.
      sign_tolerance=1e-6,
    )
  )
  return config
