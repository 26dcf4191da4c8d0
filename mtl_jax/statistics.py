"""Uncertainty of findings: 95% intervals over seeds, corruptions or epochs, and the verdict they
allow.

A finding compares two things over repeated measurements (seeds, corruptions, epochs): its
numbers are the per-measurement differences, and `t_interval` or `bootstrap_interval` turns them
into an interval of the mean difference. `verdict` reads a claim off the interval: 'holds' when
the interval lies entirely on the claimed side of zero, 'reversed' when it lies entirely on the
other side, 'inconclusive' whenever it contains zero (or there are too few measurements to
have an interval at all).

* t interval: mean ± t_{(1+c)/2, n-1} · s / √n with the sample standard deviation s (ddof=1);
  exact for normal measurements, and the honest choice for 3 seeds, where a bootstrap has only
  10 distinct resamples and is far too narrow.
* Percentile bootstrap: the (1-c)/2 and (1+c)/2 quantiles of the statistic over resamples drawn
  with replacement; used for statistics without a t form, such as Pareto counts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import special

HOLDS, REVERSED, INCONCLUSIVE = "holds", "reversed", "inconclusive"
VERDICTS = (HOLDS, REVERSED, INCONCLUSIVE)
METHODS = ("t", "bootstrap")


@dataclasses.dataclass(frozen=True)
class Interval:
  """An estimate with its interval.

  Attributes:
    estimate: the statistic of the measurements (their mean for `t_interval`).
    low, high: the interval's ends; -inf / +inf when it cannot be computed (fewer than two
      measurements), so that such a finding is always inconclusive.
    count: the number of measurements.
    method: 't' or 'bootstrap'.
    confidence: the coverage asked for, e.g. 0.95.
  """

  estimate: float
  low: float
  high: float
  count: int
  method: str
  confidence: float

  @property
  def contains_zero(self) -> bool:
    return not (self.low > 0 or self.high < 0)

  def text(self, digits: int = 2, signed: bool = True) -> str:
    """'+1.23 [−0.50, +2.96]' (the interval 'n/a' when it cannot be computed)."""
    style = f"{'+' if signed else ''}.{digits}f"
    if not math.isfinite(self.estimate):
      return "n/a"
    if not (math.isfinite(self.low) and math.isfinite(self.high)):
      return f"{self.estimate:{style}} [n/a: {self.count} value(s)]"
    return f"{self.estimate:{style}} [{self.low:{style}}, {self.high:{style}}]"


def _values(values: Sequence[float]) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64).reshape(-1)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"Intervals need finite values; got {array.tolist()}.")
  return array


def _check_confidence(confidence: float) -> float:
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  return float(confidence)


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
  """The `probability` quantile of Student's t distribution with the given degrees of freedom."""
  return float(special.stdtrit(degrees_of_freedom, probability))


def t_interval(values: Sequence[float], confidence: float) -> Interval:
  """The Student t interval of the mean of `values` (ddof=1 standard deviation).

  Args:
    values: finite measurements, e.g. per-seed paired differences.
    confidence: the coverage, e.g. 0.95.

  Returns:
    The interval around the mean; with fewer than two values its ends are -inf and +inf.
  """
  confidence = _check_confidence(confidence)
  array = _values(values)
  count = array.size
  mean = float(array.mean()) if count else math.nan
  if count < 2:
    return Interval(mean, -math.inf, math.inf, count, "t", confidence)
  half_width = t_quantile((1 + confidence) / 2, count - 1) * array.std(ddof=1) / math.sqrt(count)
  return Interval(mean, mean - half_width, mean + half_width, count, "t", confidence)


def resample_indices(count: int, resamples: int, seed: int) -> np.ndarray:
  """[resamples, count] indices drawn with replacement from range(count), reproducibly."""
  if count < 1 or resamples < 1:
    raise ValueError(f"Bootstrap needs count >= 1 and resamples >= 1, got {count}, {resamples}.")
  return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def percentile_interval(
  estimate: float, draws: Sequence[float], count: int, confidence: float
) -> Interval:
  """The percentile interval of bootstrap `draws` of a statistic whose value on the sample is
  `estimate`; with fewer than two measurements the ends are -inf and +inf."""
  confidence = _check_confidence(confidence)
  if count < 2:
    return Interval(float(estimate), -math.inf, math.inf, count, "bootstrap", confidence)
  low, high = np.quantile(
    np.asarray(draws, np.float64), [(1 - confidence) / 2, (1 + confidence) / 2]
  )
  return Interval(float(estimate), float(low), float(high), count, "bootstrap", confidence)


def bootstrap_interval(
  values: Sequence[float],
  confidence: float,
  resamples: int,
  seed: int,
  statistic: Callable[[np.ndarray], np.ndarray] = lambda sample: sample.mean(axis=-1),
) -> Interval:
  """The percentile bootstrap interval of `statistic` (the mean by default).

  Args:
    values: finite measurements.
    confidence: the coverage, e.g. 0.95.
    resamples: how many resamples to draw.
    seed: the resampling seed (the interval is reproducible).
    statistic: maps [..., n] samples to [...] values along the last axis.

  Returns:
    The interval around statistic(values).
  """
  array = _values(values)
  if array.size == 0:
    return Interval(math.nan, -math.inf, math.inf, 0, "bootstrap", _check_confidence(confidence))
  draws = statistic(array[resample_indices(array.size, resamples, seed)])
  return percentile_interval(float(statistic(array)), draws, array.size, confidence)


def interval(
  values: Sequence[float], method: str, confidence: float, resamples: int, seed: int
) -> Interval:
  """The interval of the mean of `values` by `method` ('t' or 'bootstrap')."""
  if method == "t":
    return t_interval(values, confidence)
  if method == "bootstrap":
    return bootstrap_interval(values, confidence, resamples, seed)
  raise ValueError(f"Unknown interval method {method!r}; valid: {', '.join(METHODS)}.")


def paired_differences(
  first: Mapping[int, float], second: Mapping[int, float]
) -> tuple[list[int], np.ndarray]:
  """second − first for every key (seed) both have, in sorted key order.

  Pairing by seed removes what two runs of the same seed share (initialisation, data order) from
  the comparison; unpaired keys are left out.
  """
  keys = sorted(set(first) & set(second))
  return keys, np.array([float(second[key]) - float(first[key]) for key in keys], np.float64)


def verdict(found: Interval, expected_sign: int = 1) -> str:
  """'holds' if the interval excludes zero on the side of `expected_sign` (+1: the claim is that
  the quantity is positive, -1: negative), 'reversed' if it excludes zero on the other side,
  'inconclusive' if it contains zero."""
  if expected_sign not in (1, -1):
    raise ValueError(f"expected_sign must be +1 or -1, got {expected_sign}.")
  if found.contains_zero or not math.isfinite(found.estimate):
    return INCONCLUSIVE
  return HOLDS if (found.low > 0) == (expected_sign > 0) else REVERSED


def described(found: Interval, expected_sign: int = 1, digits: int = 2) -> str:
  """'+1.23 [−0.50, +2.96] (95% t, n=3): **inconclusive**', the form every finding uses."""
  return (
    f"{found.text(digits)} ({100 * found.confidence:g}% {found.method}, n={found.count}): "
    f"**{verdict(found, expected_sign)}**"
  )


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a study computes its intervals (from `config.findings`, configs/sections/findings.py)."""

  confidence: float
  method: str
  resamples: int
  seed: int

  @classmethod
  def from_config(cls, options) -> "Settings":
    return cls(
      float(options.confidence),
      str(options.interval_method),
      int(options.bootstrap_resamples),
      int(options.bootstrap_seed),
    )

  def interval(self, values: Sequence[float]) -> Interval:
    return interval(values, self.method, self.confidence, self.resamples, self.seed)

  def bootstrap(self, values: Sequence[float]) -> Interval:
    return bootstrap_interval(values, self.confidence, self.resamples, self.seed)
