"""Intervals and verdicts (mtl_jax/statistics.py) on cases whose answers are known."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mtl_jax import statistics


def test_t_quantile_matches_the_textbook_table():
  # Student t table (4 significant digits): t_{0.975} with 2 and 9 degrees of freedom.
  assert statistics.t_quantile(0.975, 2) == pytest.approx(4.303, abs=5e-4)
  assert statistics.t_quantile(0.975, 9) == pytest.approx(2.262, abs=5e-4)
  assert statistics.t_quantile(0.975, 2) == pytest.approx(scipy_stats.t.ppf(0.975, 2), rel=1e-12)


def test_t_interval_matches_scipy_one_sample_t_test():
  values = [1.3, -0.4, 2.9, 0.7, 1.1]
  found = statistics.t_interval(values, 0.95)
  expected = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
  assert found.estimate == pytest.approx(np.mean(values))
  assert (found.low, found.high) == pytest.approx((expected.low, expected.high), rel=1e-12)
  assert found.count == 5 and found.method == "t"


def test_t_interval_by_hand_for_three_seeds():
  # mean 2, s = 1, half width t_{0.975,2} / sqrt(3).
  found = statistics.t_interval([1.0, 2.0, 3.0], 0.95)
  half = scipy_stats.t.ppf(0.975, 2) / math.sqrt(3)
  assert (found.low, found.high) == pytest.approx((2 - half, 2 + half), rel=1e-12)
  assert statistics.verdict(found) == statistics.INCONCLUSIVE  # 2 - 2.48 < 0


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
  rng = np.random.default_rng(0)
  samples = rng.normal(loc=1.5, scale=2.0, size=(4000, 3))
  covered = [
    interval.low <= 1.5 <= interval.high
    for interval in (statistics.t_interval(sample, 0.95) for sample in samples)
  ]
  # Binomial(4000, 0.95): standard deviation 0.0034; 4 of them either side.
  assert abs(np.mean(covered) - 0.95) < 0.014


def test_one_value_has_no_interval_and_is_inconclusive():
  for found in (
    statistics.t_interval([3.0], 0.95),
    statistics.bootstrap_interval([3.0], 0.95, 100, 0),
  ):
    assert found.estimate == 3.0
    assert (found.low, found.high) == (-math.inf, math.inf)
    assert statistics.verdict(found) == statistics.INCONCLUSIVE
    assert "n/a" in found.text()


def test_bootstrap_of_a_constant_sample_is_that_constant():
  found = statistics.bootstrap_interval([0.7] * 6, 0.95, 500, seed=3)
  assert found.estimate == pytest.approx(0.7)
  assert (found.low, found.high) == pytest.approx((0.7, 0.7))
  assert statistics.verdict(found) == statistics.HOLDS
  assert statistics.verdict(found, expected_sign=-1) == statistics.REVERSED


def test_bootstrap_of_a_symmetric_sample_is_symmetric_about_zero_and_inconclusive():
  values = [-3.0, -1.0, -0.5, 0.5, 1.0, 3.0]
  found = statistics.bootstrap_interval(values, 0.95, 4000, seed=0)
  assert found.estimate == pytest.approx(0.0)
  assert found.low < 0 < found.high
  # The resampled means are symmetric in distribution about 0: equal tails up to resampling noise.
  assert abs(found.low + found.high) < 0.1 * (found.high - found.low)
  assert statistics.verdict(found) == statistics.INCONCLUSIVE


def test_bootstrap_is_reproducible_and_its_width_follows_the_confidence():
  values = np.random.default_rng(1).normal(size=20)
  first = statistics.bootstrap_interval(values, 0.95, 1000, seed=5)
  assert first == statistics.bootstrap_interval(values, 0.95, 1000, seed=5)
  narrower = statistics.bootstrap_interval(values, 0.5, 1000, seed=5)
  assert first.low < narrower.low < narrower.high < first.high


def test_verdicts_read_the_side_of_zero():
  def make(low, high):
    return statistics.Interval((low + high) / 2, low, high, 3, "t", 0.95)

  assert statistics.verdict(make(0.5, 2.0)) == statistics.HOLDS
  assert statistics.verdict(make(0.5, 2.0), expected_sign=-1) == statistics.REVERSED
  assert statistics.verdict(make(-2.0, -0.5), expected_sign=-1) == statistics.HOLDS
  assert statistics.verdict(make(-2.0, 0.5)) == statistics.INCONCLUSIVE
  assert statistics.verdict(make(0.0, 0.5)) == statistics.INCONCLUSIVE
  assert "**inconclusive**" in statistics.described(make(-1.0, 1.0))


def test_paired_differences_pair_by_seed_and_drop_unpaired_seeds():
  seeds, differences = statistics.paired_differences({0: 1.0, 1: 2.0, 2: 5.0}, {2: 4.0, 0: 3.0})
  assert seeds == [0, 2]
  np.testing.assert_allclose(differences, [2.0, -1.0])


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="confidence"):
    statistics.t_interval([1.0, 2.0], 1.5)
  with pytest.raises(ValueError, match="finite"):
    statistics.t_interval([1.0, math.inf], 0.95)
  with pytest.raises(ValueError, match="method"):
    statistics.interval([1.0, 2.0], "jackknife", 0.95, 10, 0)
  with pytest.raises(ValueError, match="expected_sign"):
    statistics.verdict(statistics.t_interval([1.0, 2.0], 0.95), expected_sign=0)
