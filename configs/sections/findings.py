"""How findings state their uncertainty (mtl_jax/statistics.py) and what counts as a model that
learned: the keys every study's summary and the main job's report read."""

import ml_collections


def add(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds `config.findings` with its defaults (once: every study's section adds it) and returns
  config."""
  if "findings" in config:
    return config
  config.findings = ml_collections.ConfigDict(
    dict(
      # The coverage of every interval, and how the interval of a mean over seeds, corruptions
      # or epochs is computed: 't' (Student t; right for 3 seeds) or 'bootstrap' (percentile).
      confidence=0.95,
      interval_method="t",
      # Percentile bootstrap (Pareto counts over seeds, and interval_method='bootstrap').
      bootstrap_resamples=2000,
      bootstrap_seed=0,
      # A model learned a task when each of the task's test metrics beats the trivial
      # predictor's (majority class, training-mean depth or normal) by at least this many
      # percent, relative; the report flags every model that does not.
      trivial_margin_percent=5.0,
    )
  )
  return config
