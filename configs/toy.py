"""The 2-D two-objective toy (paper Table 1): GD vs Adam x EW / PCGrad / CAGrad x nine learning
rates.

Launch:
  python experiments/toy.py --config=configs/toy.py --workdir=runs/toy
Config argument (after a colon): 'quick' runs 2,000 iterations only (for a smoke test).
This experiment has its own small config (it trains no network), not an override of base.py.
"""

import ml_collections


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.starts = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
  config.optimizers = ("gd", "adam")
  config.methods = ("ew", "pcgrad", "cagrad")
  config.learning_rates = (10.0, 5.0, 1.0, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001)
  config.cagrad_c = 0.5
  config.max_iterations = 100_000
  # The runs' precision: float64 (as PyTorch's float64 toy would be; x64 is enabled only while
  # the toy runs) or float32.
  config.dtype = "float64"
  # Sensitivity of each cell: the grid again from starts moved by `perturbation` in random
  # directions (`perturbed_starts` times) and in the other precision; a cell is reproducible
  # when every variant is within `reproducible_spread` (relative) of it.
  config.perturbed_starts = 2
  config.perturbation = 1e-6
  config.perturbation_seed = 0
  config.compare_precisions = True
  config.reproducible_spread = 0.1
  # A run has reached the minimum at the first iteration where either criterion holds.
  config.distance_tolerance = 1e-2
  config.loss_gap_tolerance = 1e-4
  # PyTorch's Adam defaults, as in the CAGrad toy script.
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  # Trajectories: every iteration for the first `dense_iterations`, then every `record_every`.
  config.dense_iterations = 2000
  config.record_every = 100
  config.plot = True
  if argument == "quick":
    config.max_iterations = 2000
    config.dense_iterations = 1000
  elif argument:
    raise ValueError(f"Unknown configs/toy.py argument {argument!r}; valid: 'quick' or none.")
  return config
