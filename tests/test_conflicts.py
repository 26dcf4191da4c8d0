"""Tests of the gradient-conflict statistics, the training probe and the conflict study."""

import csv
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from configs import conflicts_attributes
from configs import conflicts_dense
from configs import test as test_config
from configs.sections import conflicts as conflict_sections
from mtl_jax import config_validation
from mtl_jax import conflicts
from mtl_jax import gramian as gramian_lib
from mtl_jax import statistics
from mtl_jax import train
from mtl_jax.data import registry
from mtl_jax.gramian import blocks
from mtl_jax.gramian import check as gramian_check
from mtl_jax.studies import conflicts as conflict_study
from tests.options import conflict_options

# Jitted once per shape: eager jnp runs compile every small op separately.
_MEASURES = jax.jit(conflicts.conflict_measures)


def _gramian_of(jacobian: np.ndarray) -> jnp.ndarray:
  """[B, T, B, T] Gramian J Jᵀ of hand-built gradients [B, T, P]."""
  return jnp.einsum("itp,jsp->itjs", jacobian, jacobian, precision=jax.lax.Precision.HIGHEST)


def _planar(angles: np.ndarray, radii: np.ndarray) -> np.ndarray:
  """Gradients r (cos a, sin a, 0): pairwise cosine cos(a - a'), norms r."""
  return np.stack([radii * np.cos(angles), radii * np.sin(angles), np.zeros_like(angles)], axis=-1)


def test_pair_sets_are_the_documented_rows():
  first, second = conflicts.inter_task_pairs(2, 3)
  assert list(zip(first, second)) == [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]
  first, second = conflicts.inter_sample_pairs(3, 2)
  assert list(zip(first, second)) == [(0, 2), (0, 4), (2, 4), (1, 3), (1, 5), (3, 5)]
  for batch, tasks in ((8, 8), (5, 3), (4, 1)):
    assert conflicts.inter_task_pairs(batch, tasks)[0].size == batch * tasks * (tasks - 1) // 2
    assert conflicts.inter_sample_pairs(batch, tasks)[0].size == tasks * batch * (batch - 1) // 2


def test_cosine_and_magnitude_of_hand_built_gradients():
  # 3 samples x 2 tasks in a plane: known angles and norms give closed-form measures.
  angles = np.array([[0.0, 2.0], [0.5, 0.5 + np.pi], [1.2, -1.0]])
  radii = np.array([[1.0, 3.0], [2.0, 0.5], [4.0, 4.0]])
  measures = jax.jit(conflicts.conflict_measures)(_gramian_of(_planar(angles, radii)))
  # Inter-task: (i, 0) vs (i, 1) for each sample.
  np.testing.assert_allclose(
    measures["inter_task"].cosine, np.cos(angles[:, 0] - angles[:, 1]), atol=1e-6
  )
  np.testing.assert_allclose(
    measures["inter_task"].magnitude,
    2 * radii[:, 0] * radii[:, 1] / (radii[:, 0] ** 2 + radii[:, 1] ** 2),
    atol=1e-6,
  )
  np.testing.assert_allclose(
    measures["inter_task"].dot,
    radii[:, 0] * radii[:, 1] * np.cos(angles[:, 0] - angles[:, 1]),
    atol=1e-5,
  )
  # Inter-sample, task 0 first: (0,1), (0,2), (1,2); then task 1.
  expected_cosine, expected_magnitude = [], []
  for task in range(2):
    for i, j in ((0, 1), (0, 2), (1, 2)):
      expected_cosine.append(np.cos(angles[i, task] - angles[j, task]))
      a, b = radii[i, task], radii[j, task]
      expected_magnitude.append(2 * a * b / (a * a + b * b))
  np.testing.assert_allclose(measures["inter_sample"].cosine, expected_cosine, atol=1e-6)
  np.testing.assert_allclose(measures["inter_sample"].magnitude, expected_magnitude, atol=1e-6)
  assert np.all(measures["inter_sample"].valid) and np.all(measures["inter_task"].valid)
  # Equal norms give magnitude similarity 1; antiparallel gradients give cosine -1.
  assert np.isclose(measures["inter_task"].magnitude[2], 1.0)
  assert np.isclose(measures["inter_task"].cosine[1], -1.0, atol=1e-6)


def test_averaged_variants_use_batch_mean_and_task_mean_gradients():
  jacobian = np.random.default_rng(0).normal(size=(4, 3, 7))
  measures = _MEASURES(_gramian_of(jacobian))
  task_means, sample_means = jacobian.mean(axis=0), jacobian.mean(axis=1)

  def cosines(vectors):
    return [
      vectors[a] @ vectors[b] / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b])
      for a, b in itertools.combinations(range(len(vectors)), 2)
    ]

  np.testing.assert_allclose(measures["inter_task_averaged"].cosine, cosines(task_means), atol=1e-5)
  np.testing.assert_allclose(
    measures["inter_sample_averaged"].cosine, cosines(sample_means), atol=1e-5
  )
  np.testing.assert_allclose(
    measures["inter_sample_averaged"].dot,
    [sample_means[a] @ sample_means[b] for a, b in itertools.combinations(range(4), 2)],
    atol=1e-5,
  )


def test_zero_norm_rows_are_excluded_and_counted():
  jacobian = np.random.default_rng(1).normal(size=(3, 2, 5))
  jacobian[1, 0] = 0.0
  measures = _MEASURES(_gramian_of(jacobian))
  # Row (1, 0) is in one inter-task pair and two inter-sample pairs.
  assert list(measures["inter_task"].valid) == [True, False, True]
  assert int(np.sum(~np.asarray(measures["inter_sample"].valid))) == 2
  assert np.all(np.isfinite(measures["inter_sample"].cosine))
  accumulator = conflicts.ConflictAccumulator()
  accumulator.add(measures)
  summary = accumulator.summary()
  assert (
    summary["inter_task"]["excluded_zero_norm"] == 1
    and summary["inter_task"]["cosine"]["count"] == 2
  )
  assert (
    summary["inter_sample"]["excluded_zero_norm"] == 2
    and summary["inter_sample"]["magnitude"]["count"] == 4
  )
  # Dot products of a zero gradient are zero and are kept.
  assert summary["inter_task"]["dot"]["count"] == 3


def test_conflicting_parameter_ratio_counts_opposite_signs_over_nonzero_coordinates():
  gradients = np.array([[[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 3.0, -1.0]]])  # 1 sample, 2 tasks.
  ratios = conflicts.conflicting_parameter_ratios(jnp.asarray(gradients))
  ratio, valid = ratios["inter_task"]
  np.testing.assert_allclose(ratio, [2.0 / 3.0])
  np.testing.assert_array_equal(valid, [True])
  assert ratios["inter_sample"][0].shape == (0,)
  rng = np.random.default_rng(2)
  gradients = rng.normal(size=(4, 3, 50)) * (rng.random((4, 3, 50)) < 0.7)
  ratios = conflicts.conflicting_parameter_ratios(jnp.asarray(gradients, jnp.float32))
  rows = gradients.reshape(12, 50)
  for pair_type, pairs in (
    ("inter_task", conflicts.inter_task_pairs(4, 3)),
    ("inter_sample", conflicts.inter_sample_pairs(4, 3)),
  ):
    expected = [
      np.mean(
        rows[a][(rows[a] != 0) & (rows[b] != 0)] * rows[b][(rows[a] != 0) & (rows[b] != 0)] < 0
      )
      for a, b in zip(*pairs)
    ]
    np.testing.assert_allclose(ratios[pair_type][0], expected, atol=1e-6)
  # Rounding noise far below a gradient's scale has no sign: it is not counted.
  noisy = jnp.asarray([[[1.0, 1e-9, -2.0], [1.0, -1e-9, -1.0]]])
  np.testing.assert_allclose(conflicts.conflicting_parameter_ratios(noisy)["inter_task"][0], [0.0])
  np.testing.assert_allclose(
    conflicts.conflicting_parameter_ratios(noisy, 0.0)["inter_task"][0], [1.0 / 3.0]
  )


def test_accumulator_statistics_match_numpy_over_pooled_probes():
  rng = np.random.default_rng(3)
  accumulator = conflicts.ConflictAccumulator()
  jacobians = [rng.normal(size=(5, 3, 4)) for _ in range(2)]
  pooled = {"cosine": [], "magnitude": []}
  for jacobian in jacobians:
    measures = _MEASURES(_gramian_of(jacobian))
    accumulator.add(measures)
    pooled["cosine"].append(np.asarray(measures["inter_sample"].cosine))
    pooled["magnitude"].append(np.asarray(measures["inter_sample"].magnitude))
  summary = accumulator.summary()
  assert summary["probes"] == 2
  for measure, chunks in pooled.items():
    values = np.concatenate(chunks)
    stats = summary["inter_sample"][measure]
    assert stats["count"] == values.size == 2 * 3 * 10
    np.testing.assert_allclose(
      [stats["mean"], stats["std"], stats["p2_5"], stats["p97_5"]],
      [values.mean(), values.std(), np.percentile(values, 2.5), np.percentile(values, 97.5)],
      rtol=1e-6,
    )
  cosine, stats = np.concatenate(pooled["cosine"]), summary["inter_sample"]["cosine"]
  assert np.isclose(stats["conflict_rate"], np.mean(cosine < 0))
  assert stats["negative_count"] + stats["positive_count"] == cosine.size
  assert np.isclose(stats["negative_mean"], cosine[cosine < 0].mean())
  assert np.isclose(stats["positive_mean"], cosine[cosine >= 0].mean())
  empty = conflicts.summarise(np.zeros(0), cosine=True)
  assert empty["count"] == 0 and np.isnan(empty["mean"]) and np.isnan(empty["conflict_rate"])


class _Writer:
  def __init__(self):
    self.written = []

  def write_scalars(self, step, scalars, prefix=""):
    self.written.append((step, {prefix + key: value for key, value in scalars.items()}))


@pytest.fixture(scope="module")
def tiny():
  config = test_config.get_config()
  dataset = registry.load_dataset(config.dataset)
  experiment = train.build_experiment(config, dataset)
  return config, dataset, experiment, train.init_state(experiment, 0)


def _reference_statistics(experiment, state, batches, probe):
  """Pooled statistics of the probed rows computed from reference (vmap/jacrev) gradients in
  numpy."""
  values = {
    pair: {"cosine": [], "magnitude": [], conflicts.PARAMETER_RATIO: []}
    for pair in conflicts.ROW_PAIR_TYPES
  }
  gradients_of = jax.jit(
    lambda params, sub_batch: gramian_lib.per_sample_gradients(
      experiment.model, params, {}, sub_batch, experiment.tasks, range(4), probe.task_indices
    )
  )
  for step, batch in batches:
    samples = probe.sample_indices(step, len(batch["image"]))
    sub_batch = {key: np.asarray(value)[samples] for key, value in batch.items()}
    gradients = np.asarray(gradients_of(state.params, sub_batch), np.float64)
    num_samples, num_tasks = gradients.shape[:2]
    rows = gradients.reshape(num_samples * num_tasks, -1)
    for pair_type, pairs in (
      ("inter_task", conflicts.inter_task_pairs(num_samples, num_tasks)),
      ("inter_sample", conflicts.inter_sample_pairs(num_samples, num_tasks)),
    ):
      for a, b in zip(*pairs):
        norm_a, norm_b = np.linalg.norm(rows[a]), np.linalg.norm(rows[b])
        values[pair_type]["cosine"].append(rows[a] @ rows[b] / (norm_a * norm_b))
        values[pair_type]["magnitude"].append(2 * norm_a * norm_b / (norm_a**2 + norm_b**2))
        # The same zero rule as the probe: rounding noise below 1e-6 x the largest coordinate.
        nonzero = np.abs(rows) > probe.sign_tolerance * np.abs(rows).max(axis=1, keepdims=True)
        both = nonzero[a] & nonzero[b]
        values[pair_type][conflicts.PARAMETER_RATIO].append(
          np.mean(rows[a][both] * rows[b][both] < 0)
        )
  return values


def test_probe_equals_statistics_of_reference_per_sample_gradients(tiny, tmp_path):
  config, dataset, experiment, state = tiny
  options = conflict_options(probe_every_steps=3, max_samples=4, max_tasks=2)
  probe = conflicts.ConflictProbe(
    experiment.model, experiment.tasks, options, str(tmp_path), seed=7
  )
  assert len(probe.task_indices) == 2 and probe.path == "fast"
  source = dataset.splits["train"]
  batches = [
    (step, source.batch(np.arange(8 * step, 8 * step + 8) % len(source))) for step in range(4)
  ]
  probed = [step for step, batch in batches if probe.maybe_probe(step, state, batch)]
  assert probed == [0, 3]
  writer = _Writer()
  record = probe.end_epoch(1, 4, writer)
  expected = _reference_statistics(experiment, state, [batches[0], batches[3]], probe)
  for pair_type, measures in expected.items():
    for measure, pooled in measures.items():
      stats = record[pair_type][measure]
      assert stats["count"] == len(pooled)
      np.testing.assert_allclose(
        [stats["mean"], stats["std"], stats["p2_5"], stats["p97_5"]],
        [np.mean(pooled), np.std(pooled), np.percentile(pooled, 2.5), np.percentile(pooled, 97.5)],
        rtol=2e-4,
        atol=2e-5,
        err_msg=f"{pair_type} {measure}",
      )
  assert record["probes"] == 2 and record["tasks"] == probe.task_names
  # Scalars, JSONL and CSV carry the same numbers; the accumulator starts the next epoch empty.
  ((step, scalars),) = writer.written
  assert (
    step == 4
    and scalars["conflicts/inter_task/cosine/mean"] == record["inter_task"]["cosine"]["mean"]
  )
  assert conflicts.read_records(str(tmp_path))[0]["inter_sample"]["magnitude"][
    "mean"
  ] == pytest.approx(record["inter_sample"]["magnitude"]["mean"])
  with open(tmp_path / conflicts.CSV_FILE) as file:
    rows = list(csv.DictReader(file))
  row = next(row for row in rows if row["pair_type"] == "inter_task" and row["measure"] == "cosine")
  assert float(row["conflict_rate"]) == pytest.approx(
    record["inter_task"]["cosine"]["conflict_rate"]
  )
  assert probe.end_epoch(2, 8, writer) is None


@pytest.mark.parametrize("parameter_ratio", [False, True])
def test_fast_probe_checks_its_gramian_against_the_reference_path(
  tiny, monkeypatch, parameter_ratio
):
  # Without the ratio the check is a program of its own, run first; with it, the probe's own
  # program compares its fast Gramian with the materialised rows' inner products.
  config, dataset, experiment, state = tiny
  options = conflict_options(
    probe_every_steps=1, max_samples=4, max_tasks=3, parameter_ratio=parameter_ratio
  )
  assert (
    conflicts.ConflictProbe(
      experiment.model, experiment.tasks, conflict_options(**{**options, "path": "reference"})
    ).fast_path_check
    is None
  )
  assert (
    conflicts.ConflictProbe(
      experiment.model, experiment.tasks, options, verify_every_steps=0
    ).fast_path_check
    is None
  )
  assert (
    conflicts.make_probe(
      experiment,
      config_validation.with_overrides(config, **{"conflicts.probe_every_steps": 2}),
      None,
    ).fast_path_check.every_steps
    == gramian_check.ONCE
  )
  original = blocks.fast_gramian_from_capture
  monkeypatch.setattr(
    blocks, "fast_gramian_from_capture", lambda captured, rows=None: 1.01 * original(captured, rows)
  )
  probe = conflicts.ConflictProbe(experiment.model, experiment.tasks, options)
  assert probe.checks_itself == parameter_ratio
  with pytest.raises(
    gramian_check.FastPathMismatchError, match=r"SmallCNN.*norm 'group'.*conflict probe, step 0"
  ):
    probe.maybe_probe(0, state, dataset.splits["train"].batch(np.arange(8)))
  assert probe.accumulator.probes == 0
  monkeypatch.setattr(blocks, "fast_gramian_from_capture", original)
  probe = conflicts.ConflictProbe(experiment.model, experiment.tasks, options)
  assert probe.maybe_probe(0, state, dataset.splits["train"].batch(np.arange(8)))
  assert probe.fast_path_check.last_step == 0 and probe.accumulator.probes == 1


def test_probe_refuses_training_mode_batch_norm_by_default(tiny):
  config, dataset, _, _ = tiny
  config = config_validation.with_overrides(config, **{"model.norm": "batch"})
  experiment = train.build_experiment(config, dataset)
  state = train.init_state(experiment, 0)
  probe = conflicts.ConflictProbe(
    experiment.model, experiment.tasks, conflict_options(probe_every_steps=1), None
  )
  with pytest.raises(ValueError, match="batch_norm='eval'"):
    probe.maybe_probe(0, state, dataset.splits["train"].batch(np.arange(4)))
  with pytest.raises(ValueError, match="valid choices: reference, fast"):
    conflicts.ConflictProbe(
      experiment.model, experiment.tasks, conflict_options(probe_every_steps=1, path="ghost"), None
    )


def _record(epoch, task_width, sample_width, task_magnitude, sample_magnitude, std=0.2):
  def entry(width, magnitude):
    return {
      "cosine": {
        "mean": 0.0,
        "std": std,
        "p2_5": -width / 2,
        "p97_5": width / 2,
        "conflict_rate": 0.5,
        "positive_mean": 0.1,
        "negative_mean": -0.1,
      },
      "magnitude": {"mean": magnitude, "std": 0.1, "p2_5": 0.0, "p97_5": 1.0},
      "pairs": 4,
      "excluded_zero_norm": 0,
    }

  record = {
    "epoch": epoch,
    "step": epoch,
    "probes": 1,
    "tasks": ["a", "b"],
    "inter_task": entry(task_width, task_magnitude),
    "inter_sample": entry(sample_width, sample_magnitude),
  }
  record["inter_task_averaged"], record["inter_sample_averaged"] = (
    record["inter_task"],
    record["inter_sample"],
  )
  return record


def test_findings_follow_the_numbers_with_intervals_over_epochs():
  runs = {
    # Spread: inter-sample − inter-task width 0.4, 0.4, 0.45 per epoch; magnitude 0.5, 0.4, 0.45.
    "small_heads": [
      _record(1, 0.5, 0.9, 0.4, 0.9),
      _record(2, 0.6, 1.0, 0.5, 0.9),
      _record(3, 0.5, 0.95, 0.45, 0.9),
    ],
    # Spread −0.4, −0.4, −0.3: reversed; magnitude −0.05, 0.1, 0.4: mean 0.15, interval wide.
    "large_heads": [
      _record(1, 0.9, 0.5, 0.95, 0.9, std=0.1),
      _record(2, 0.9, 0.5, 0.8, 0.9, std=0.1),
      _record(3, 0.8, 0.5, 0.5, 0.9, std=0.1),
    ],
  }
  found = conflict_study.findings(runs, statistics.Settings(0.95, "t", 100, 0))
  small, large = found["small_heads"], found["large_heads"]
  assert small["cosine_spread"]["verdict"] == statistics.HOLDS
  spread = small["cosine_spread"]["interval"]
  expected = scipy_stats.ttest_1samp([0.4, 0.4, 0.45], 0.0).confidence_interval(0.95)
  assert (spread.low, spread.high) == pytest.approx((expected.low, expected.high), rel=1e-9)
  assert small["magnitude"]["verdict"] == statistics.HOLDS
  assert large["cosine_spread"]["verdict"] == statistics.REVERSED
  assert large["magnitude"]["verdict"] == statistics.INCONCLUSIVE
  assert large["magnitude"]["holds"] and large["magnitude"]["epochs_holding"] == 2
  # Cosine std 0.2 (small heads) vs 0.1 (large) in every epoch: a constant difference of 0.1.
  assert found["heads"]["inter_task"]["verdict"] == statistics.HOLDS
  assert found["heads"]["inter_task"]["interval"].estimate == pytest.approx(0.1)
  config = conflicts_dense.get_config()
  summary = conflict_study.summary_markdown(config, runs, found, [], "synthetic")
  assert "**reversed**; held in 0/3 epochs" in summary
  assert "**inconclusive**; held in 2/3 epochs" in summary
  assert "(95% t, n=3)" in summary


def test_config_arguments_settings_and_architectures_are_checked():
  assert conflicts_attributes.get_config("large_heads").conflicts.architectures == ("large_heads",)
  assert conflicts_dense.get_config().conflicts.architectures == ("small_heads", "large_heads")
  with pytest.raises(ValueError, match="small_heads, large_heads"):
    conflicts_dense.get_config("huge_heads")
  with pytest.raises(ValueError, match="valid: large_heads, small_heads"):
    conflict_study.architecture_config(conflicts_dense.get_config(), "medium")
  # Any config with the study's section works (the reproduce job passes its own): the study's runs
  # probe every study_probe_every_steps, whatever ordinary runs do.
  config = conflict_sections.add(test_config.get_config())
  assert config.conflicts.probe_every_steps == 0
  setting = conflict_study.setting_config(config, "attributes")
  assert setting.tasks == ("attributes",) and setting.conflicts.probe_every_steps == 5
  assert conflict_study.setting_config(config, "config").tasks == config.tasks
  with pytest.raises(ValueError, match="valid: dense, attributes, config"):
    conflict_study.setting_config(config, "celeba")


def test_run_conflicts_end_to_end(tmp_path):
  config = config_validation.with_overrides(
    conflicts_dense.get_config("small_heads"),
    **{
      "dataset.num_train": 64,
      "dataset.num_validation": 16,
      "dataset.num_test": 16,
      "model.features": (8, 8),
      "training.num_epochs": 2,
      "training.eval_batch_size": 16,
      "conflicts.study_probe_every_steps": 2,
      "conflicts.max_samples": 4,
    },
  )
  # The entry point the reproduce job looks up.
  results = conflict_study.run_conflicts(config, str(tmp_path))
  records = results["settings"]["dense"]["records"]["small_heads"]
  # 4 steps per epoch, a probe every 2 steps: 2 probes per epoch, 4 samples x 3 tasks each.
  assert [record["epoch"] for record in records] == [1, 2]
  assert all(
    record["probes"] == 2 and record["inter_task"]["pairs"] == 2 * 4 * 3 for record in records
  )
  assert all(
    -1 <= record["inter_sample"]["cosine"]["p2_5"] <= record["inter_sample"]["cosine"]["p97_5"] <= 1
    for record in records
  )
  assert len(results["figures"]) == 2
  for path in results["figures"]:
    assert os.path.getsize(path) > 1000
  summary = open(tmp_path / conflict_study.SUMMARY_FILE).read()
  assert summary == results["summary"] and "group normalisation" in summary
  assert "### Gradient conflicts: dense" in results["markdown"] and "](" not in results["markdown"]
  assert (
    "inter-sample cosine spread > inter-task spread; per-epoch difference" in summary
    and "(95% t, n=2): **" in summary
    and "](dense/conflicts.png)" in summary
  )
  metrics = [
    json.loads(line) for line in open(tmp_path / "dense" / "small_heads" / "metrics.jsonl")
  ]
  assert any("conflicts/inter_sample/cosine/mean" in line for line in metrics)
  saved = json.load(open(tmp_path / "dense" / conflict_study.RESULTS_FILE))
  assert saved["findings"]["small_heads"]["epochs"] == 2
