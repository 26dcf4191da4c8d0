r"""Adam's partial loss-scale invariance (paper Sec. 3, App. A2) and the method classification.

Launch (the mode is the config argument after the colon):
  python experiments/adam_invariance.py --config=configs/adam_invariance.py:check
  python experiments/adam_invariance.py --config=configs/adam_invariance.py:app_a2 \
    --workdir=runs/adam_invariance
  python experiments/adam_invariance.py --config=configs/adam_invariance.py:classify \
    --workdir=runs/adam_invariance
  python experiments/adam_invariance.py --config=configs/adam_invariance.py:all \
    --workdir=runs/adam_invariance
This study trains its own tiny model, so it has its own config rather than an override of base.py.
"""

import ml_collections

from configs import test

MODES = ("check", "app_a2", "classify", "all")


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  mode = argument or "all"
  if mode not in MODES:
    raise ValueError(
      f"Unknown configs/adam_invariance.py mode {mode!r}; valid: {', '.join(MODES)}."
    )
  config = ml_collections.ConfigDict()
  config.mode = mode
  config.model = ml_collections.ConfigDict(dict(width=20))
  # Task t's target is targets_scale[t] * x ("the same depth in different units").
  config.targets_scale = (1.0, 2.0)
  config.check = ml_collections.ConfigDict(
    dict(
      seed=0,
      steps=20,
      batch_size=16,
      alphas=(10.0, 0.01),
      learning_rate=1e-2,
      sgd_momentum=0.0,
      adam_eps=1e-8,
      # Stands for eps -> 0 (exactly 0 would make 0/0 on frozen or untouched parameters).
      tiny_eps=1e-30,
      # float64: 'equal' means below equal_tolerance, 'differ' means above differ_threshold.
      equal_tolerance=1e-8,
      differ_threshold=1e-6,
    )
  )
  config.app_a2 = ml_collections.ConfigDict(
    dict(
      seed=0,
      num_samples=1024,
      batch_size=32,
      num_epochs=100,
      # The paper's runs: one task's loss x10, the other x0.01.
      alphas=(10.0, 0.01),
      sgd_learning_rate=1e-2,
      adam_learning_rate=1e-3,
      adam_eps=1e-8,
      runs=("ew+sgd", "ew+adam", "uw_o+sgd", "ew+per_task_adam"),
    )
  )
  train = test.get_config()
  train.optimizer.weight_decay = 0.0
  config.classify = ml_collections.ConfigDict(
    dict(
      # The train-step config whose model, data and method options are used.
      train=train,
      steps=4,
      scales=(0.01, 100.0),
      scaled_task=0,
      sgd_learning_rate=1e-2,
      adam_learning_rate=1e-3,
      # float64 runs. eps far below the gradients makes the eps / c term negligible, but not
      # 0: normalisation layers leave gradient entries that are pure rounding noise (~1e-18),
      # which Adam with eps -> 0 would turn into full-size random steps.
      adam_eps=1e-12,
      # Relative trajectory difference below which two runs count as the same.
      tolerance=1e-4,
      # Methods to classify; empty = every registered method.
      methods=(),
      # Also classify one Adam per task (not a registry method; costs one more compile).
      include_per_task_adam=True,
    )
  )
  return config
