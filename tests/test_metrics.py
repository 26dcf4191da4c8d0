"""Tests of mtl_jax.metrics: Δm, baseline loading and Pareto dominance."""

from __future__ import annotations

import json

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest

from mtl_jax.metrics import (
  DELTA_M_VARIANTS,
  delta_m,
  dominates,
  load_baseline,
  non_dominated_by,
  oriented,
  pareto_mask,
)

BASELINE = {"seg/miou": 0.5, "seg/pixel_accuracy": 0.8, "depth/abs_err": 0.2}
DIRECTIONS = {"seg/miou": True, "seg/pixel_accuracy": True, "depth/abs_err": False}
# mIoU +10 % (better: -10), pixel accuracy -5 % (worse: +5), abs error -10 % (better: -10).
MODEL = {"seg/miou": 0.55, "seg/pixel_accuracy": 0.76, "depth/abs_err": 0.18}


# ----------------------------------------------------------------------------- Δm


def test_delta_m_flat_and_per_task():
  assert DELTA_M_VARIANTS == ("flat", "per_task")
  assert delta_m(MODEL, BASELINE, DIRECTIONS) == pytest.approx((-10 + 5 - 10) / 3)
  assert delta_m(MODEL, BASELINE, DIRECTIONS, "per_task") == pytest.approx(((-10 + 5) / 2 - 10) / 2)


def test_delta_m_signs_and_identity():
  assert delta_m(BASELINE, BASELINE, DIRECTIONS) == 0.0
  # A higher-better metric going up, a lower-better one going down: both improve, Δm < 0.
  assert delta_m({"a/acc": 0.6}, {"a/acc": 0.5}, {"a/acc": True}) == pytest.approx(-20.0)
  assert delta_m({"a/err": 0.6}, {"a/err": 0.5}, {"a/err": False}) == pytest.approx(20.0)


def test_delta_m_ignores_keys_without_direction_or_outside_both():
  model = dict(MODEL, **{"seg/loss": 3.0})
  baseline = dict(BASELINE, **{"seg/loss": 1.0})
  directions = dict(DIRECTIONS, **{"normals/mean_angle": False})
  assert delta_m(model, baseline, directions) == pytest.approx(-5.0)


def test_delta_m_errors():
  with pytest.raises(ValueError, match="depth/abs_err"):
    delta_m(MODEL, {k: v for k, v in BASELINE.items() if k != "depth/abs_err"}, DIRECTIONS)
  with pytest.raises(ValueError, match="seg/miou"):
    delta_m({k: v for k, v in MODEL.items() if k != "seg/miou"}, BASELINE, DIRECTIONS)
  with pytest.raises(ValueError, match="0"):
    delta_m(MODEL, dict(BASELINE, **{"seg/miou": 0.0}), DIRECTIONS)
  with pytest.raises(ValueError, match="per_task"):
    delta_m(MODEL, BASELINE, DIRECTIONS, variant="libmtl")
  with pytest.raises(ValueError, match="no metric in common"):
    delta_m({"x/a": 1.0}, {"x/a": 1.0}, {"y/b": True})


# ----------------------------------------------------------------------------- load_baseline


def _write_results(path, test, validation=None):
  path.write_text(json.dumps({"test": test, "validation": validation or {}}))


def test_load_baseline_merges_files_and_directories(tmp_path):
  segmentation_dir = tmp_path / "stl_seg"
  segmentation_dir.mkdir()
  _write_results(
    segmentation_dir / "results.json",
    {"seg/miou": 0.5, "seg/pixel_accuracy": 0.8},
    {"seg/miou": 0.45},
  )
  depth_file = tmp_path / "depth.json"
  _write_results(depth_file, {"depth/abs_err": 0.2}, {"depth/abs_err": 0.25})
  assert load_baseline([str(segmentation_dir), depth_file]) == BASELINE
  assert load_baseline([segmentation_dir, depth_file], split="validation") == {
    "seg/miou": 0.45,
    "depth/abs_err": 0.25,
  }
  assert load_baseline(str(depth_file)) == {"depth/abs_err": 0.2}
  # The same value twice is not a conflict.
  assert load_baseline([depth_file, depth_file]) == {"depth/abs_err": 0.2}


def test_load_baseline_errors(tmp_path):
  first = tmp_path / "a.json"
  second = tmp_path / "b.json"
  _write_results(first, {"depth/abs_err": 0.2})
  _write_results(second, {"depth/abs_err": 0.3})
  with pytest.raises(ValueError, match="conflicts"):
    load_baseline([first, second])
  missing = tmp_path / "no_such_run"
  with pytest.raises(FileNotFoundError, match="no_such_run") as info:
    load_baseline([first, missing])
  assert "STL run's workdir" in str(info.value)
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  with pytest.raises(FileNotFoundError, match="results.json"):
    load_baseline([empty_dir])
  with pytest.raises(ValueError, match="train"):
    load_baseline([first], split="train")


# ----------------------------------------------------------------------------- Pareto


def test_oriented_and_dominates():
  points = np.array([[0.5, 0.2], [0.6, 0.1]])
  np.testing.assert_array_equal(oriented(points, [True, False]), [[-0.5, 0.2], [-0.6, 0.1]])
  np.testing.assert_array_equal(points, [[0.5, 0.2], [0.6, 0.1]])  # input untouched
  with pytest.raises(ValueError):
    oriented(points, [True])
  assert dominates([1, 2], [1, 3])
  assert not dominates([1, 2], [1, 2])
  assert not dominates([1, 3], [2, 2])
  assert not dominates([2, 2], [1, 3])


def test_pareto_mask_hand_built():
  points = np.array(
    [
      [1.0, 4.0],  # front
      [2.0, 2.0],  # front
      [4.0, 1.0],  # front
      [3.0, 3.0],  # dominated by [2, 2]
      [2.0, 2.0],  # duplicate of a front point: also on the front
      [1.0, 5.0],  # dominated by [1, 4] (equal in one objective)
    ]
  )
  np.testing.assert_array_equal(pareto_mask(points), [True, True, True, False, True, False])
  assert pareto_mask(np.zeros((0, 3))).shape == (0,)
  with pytest.raises(ValueError, match="NaN"):
    pareto_mask(np.array([[1.0, np.nan]]))


def test_pareto_on_oriented_metrics():
  # (miou higher-better, abs_err lower-better): run 0 beats run 1 on both.
  runs = np.array([[0.6, 0.1], [0.5, 0.2], [0.7, 0.3]])
  np.testing.assert_array_equal(pareto_mask(oriented(runs, [True, False])), [True, False, True])


def test_non_dominated_by():
  adam = np.array([[1.0, 1.0], [3.0, 3.0], [0.5, 5.0]])
  sgd = np.array([[2.0, 2.0], [0.5, 5.0]])
  # [3, 3] is dominated by SGD's [2, 2]; [0.5, 5] only ties SGD's copy, which is not dominance.
  np.testing.assert_array_equal(non_dominated_by(adam, sgd), [True, False, True])
  np.testing.assert_array_equal(non_dominated_by(sgd, adam), [False, True])
  np.testing.assert_array_equal(non_dominated_by(adam, np.zeros((0, 2))), [True, True, True])


@st.composite
def _point_sets(draw):
  count = draw(st.integers(0, 12))
  objectives = draw(st.integers(1, 4))
  # Small integers so that ties and duplicates are frequent.
  return draw(hnp.arrays(np.float64, (count, objectives), elements=st.integers(0, 3).map(float)))


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(_point_sets())
def test_pareto_mask_matches_brute_force(points):
  mask = pareto_mask(points)
  count = points.shape[0]
  expected = [
    not any(dominates(points[j], points[i]) for j in range(count) if j != i) for i in range(count)
  ]
  np.testing.assert_array_equal(mask, np.array(expected, dtype=bool))
  front = points[mask]
  for i in np.flatnonzero(~mask):
    assert any(dominates(f, points[i]) for f in front)
  np.testing.assert_array_equal(non_dominated_by(points, points), mask)
