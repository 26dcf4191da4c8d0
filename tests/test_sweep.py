"""Tests of the sweep: grid and naming, resume, lr selection, Pareto counts, multi-run training, the
report."""

import functools
import json
import math
import os
import tempfile

import chex
import jax
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from configs.sections import optimizers as optimizer_sections
from mtl_jax.studies import reproduce
from mtl_jax.studies import optimizers as sweep
from mtl_jax import statistics
from mtl_jax import train
from mtl_jax.data import registry
from mtl_jax.report import markdown
from mtl_jax.train import evaluation

DIRECTIONS = {"a/acc": True, "b/err": False}
SETTINGS = statistics.Settings(0.95, "t", 200, 0)


def _sweep_config(**grid):
  config = optimizer_sections.add(test_config.get_config())
  config.training.num_epochs = 1
  for key, value in grid.items():
    config.sweep[key] = value
  return config.lock()


@pytest.fixture(scope="module")
def dataset():
  return registry.load_dataset(_sweep_config().dataset)


def test_grid_expansion_naming_and_unknown_methods():
  config = _sweep_config(
    methods=("ew", "no_such_method", "adatask"),
    optimizers=("adam", "sgd"),
    lr_grid=(0.01, 0.001),
    stl_lr_grid=(0.005,),
    seeds=(0, 1),
  )
  stl = sweep.stl_grid(config)
  assert len(stl) == len(config.tasks) * 1 * 2
  assert stl[0].path == "stl/segmentation-adam-lr0.005-seed0"
  runs, notes = sweep.mtl_grid(config)
  # ew: 2 optimizers x 2 rates x 2 seeds; adatask is defined for Adam only: 1 x 2 x 2.
  assert len(runs) == 2 * 2 * 2 + 1 * 2 * 2
  assert {run.optimizer for run in runs if run.name == "adatask"} == {"adam"}
  assert any("adatask" in note and "sgd skipped" in note for note in notes)
  assert {run.path for run in runs} >= {"mtl/ew-sgd-lr0.01-seed1", "mtl/ew-adam-lr0.001-seed0"}
  assert len({run.path for run in runs}) == len(runs)
  assert any("no_such_method" in note for note in notes)
  run = sweep.run_config(config, runs[0], baseline=("x",))
  assert (run.method.name, run.optimizer.name, run.seed, tuple(run.delta_m.baseline)) == (
    "ew",
    "adam",
    0,
    ("x",),
  )
  assert tuple(sweep.run_config(config, stl[0]).tasks) == ("segmentation",)
  with pytest.raises(ValueError, match="valid optimizers"):
    sweep.mtl_grid(_sweep_config(optimizers=("adamax",)))


def test_lane_modes():
  assert train.default_lane_mode() == "loop"  # the tests run on CPU
  assert train.default_lane_mode("vmap") == "vmap"
  with pytest.raises(ValueError, match="valid: auto, vmap, map, loop"):
    train.default_lane_mode("pmap")
  with pytest.raises(ValueError, match="Unknown lane mode 'pmap'"):
    sweep.mtl_grid(_sweep_config(lane_mode="pmap"))


def _write_results(workdir, spec, validation, test, delta=None):
  run_dir = os.path.join(workdir, spec.path)
  os.makedirs(run_dir, exist_ok=True)
  results = {"validation": validation, "test": test}
  if delta is not None:
    results["delta_m"] = {"validation": delta[0], "test": delta[1], "variant": "flat"}
  with open(os.path.join(run_dir, "results.json"), "w") as file:
    json.dump(results, file)


def test_stl_choice_uses_mean_validation_loss_and_same_seed(tmp_path):
  workdir = str(tmp_path)
  specs = [sweep.RunSpec("stl", "a", "adam", rate, seed) for rate in (0.1, 0.01) for seed in (0, 1)]
  losses = {(0.1, 0): 1.0, (0.1, 1): 5.0, (0.01, 0): 2.0, (0.01, 1): 2.0}  # means 3.0 vs 2.0
  for spec in specs:
    _write_results(workdir, spec, {"a/loss": losses[(spec.learning_rate, spec.seed)]}, {})
  choices, baselines = sweep.choose_stl(workdir, specs)
  assert choices["a"].learning_rate == 0.01
  assert baselines[1] == [os.path.join(workdir, "stl/a-adam-lr0.01-seed1")]
  # An MTL seed without an STL run of its own falls back to the first STL seed.
  assert sweep.baseline_for(baselines, 7) == baselines[0]


def test_best_lr_selection_and_mean_std():
  def record(rate, seed, validation, test_delta, acc):
    return sweep.RunSpec("mtl", "ew", "adam", rate, seed), {
      "delta_m": {"validation": validation, "test": test_delta},
      "test": {"a/acc": acc, "b/err": 1.0},
    }

  records = dict(
    [
      record(0.1, 0, 1.0, 10.0, 0.5),
      record(0.1, 1, 3.0, 12.0, 0.7),  # mean validation 2.0
      record(0.01, 0, 2.0, 20.0, 0.1),
      record(0.01, 1, 2.5, 22.0, 0.2),  # mean 2.25
    ]
  )
  records[sweep.RunSpec("mtl", "ew", "adam", 0.5, 0)] = None  # diverged: never chosen
  records[sweep.RunSpec("mtl", "ew", "adam", 0.5, 1)] = {
    "delta_m": {"validation": -99.0, "test": 0.0},
    "test": {"a/acc": 1.0, "b/err": 0.0},
  }
  (selection,) = sweep.select_best(records)
  assert selection.learning_rate == 0.1
  assert math.isinf(selection.validation_delta_m[0.5])
  assert selection.mean_std("delta_m") == pytest.approx((11.0, 1.0))
  assert selection.mean_std("a/acc") == pytest.approx((0.6, 0.1))
  table, table_csv = sweep.delta_m_table([selection])
  assert "11.00 ± 1.00 (0.1)" in table
  assert table_csv.splitlines()[1].startswith("ew,adam,0.1,11.0,1.0,2")
  metric_markdown, _ = sweep.metric_table([selection], DIRECTIONS)
  assert "0.6000 ± 0.1000" in metric_markdown


def test_pareto_counts_match_a_hand_count():
  def selection(optimizer, method, points):
    return sweep.Selection(
      method,
      optimizer,
      0.1,
      {0.1: 0.0},
      seeds=list(range(len(points))),
      test=[{"a/acc": acc, "b/err": err} for acc, err in points],
      test_delta_m=[0.0] * len(points),
    )

  # acc higher-better, err lower-better.
  adam = selection("adam", "ew", [(0.9, 0.3), (0.5, 0.1), (0.4, 0.5)])
  sgd = selection("sgd", "ew", [(0.8, 0.2), (0.3, 0.6)])
  # By hand: front = adam (0.9,0.3), adam (0.5,0.1), sgd (0.8,0.2). adam (0.4,0.5) is dominated by
  # sgd (0.8,0.2); no sgd run dominates the other two adam runs. sgd (0.8,0.2) is not dominated
  # by any adam run; sgd (0.3,0.6) is.
  points, counts = sweep.pareto_analysis([adam, sgd], DIRECTIONS)
  assert counts == {
    "adam": {"runs": 3, "po_full": 2, "po_other": 2},
    "sgd": {"runs": 2, "po_full": 1, "po_other": 1},
  }
  assert [point.on_front for point in points] == [True, True, False, True, False]
  findings = markdown.optimizer_findings([adam, sgd], counts, SETTINGS)
  assert any("2/3" in line for line in findings)


def test_best_lr_at_the_grid_edge_is_flagged():
  grid = {0.5: 3.0, 0.05: 1.0, 0.005: 2.0}
  inside = sweep.Selection("ew", "adam", 0.05, grid)
  largest = sweep.Selection("ew", "sgd", 0.5, {0.5: 1.0, 0.05: 2.0, 0.005: 3.0})
  smallest = sweep.Selection("uw", "sgd", 0.005, {0.5: 3.0, 0.05: 2.0, 0.005: 1.0})
  diverged = sweep.Selection("rlw", "sgd", None, {0.5: math.inf})
  findings = markdown.grid_edge_findings([inside, largest, smallest, diverged])
  assert len(findings) == 1
  assert "for sgd" in findings[0] and "ew (largest), uw (smallest)" in findings[0]


def _group_configs(rates_and_seeds):
  configs = []
  for rate, seed in rates_and_seeds:
    config = test_config.get_config()
    config.seed = seed
    config.optimizer.learning_rate = rate
    config.optimizer.lr_decay_every_epochs = 1  # the step-decay schedule must survive the rescaling
    config.training.num_epochs = 2
    configs.append(config.lock())
  return configs


@functools.lru_cache(maxsize=None)
def _sequential_results(index):
  config = _group_configs([(1e-3, 0), (3e-3, 1)])[index]
  dataset = registry.load_dataset(config.dataset)
  return train.train_and_evaluate(config, tempfile.mkdtemp(prefix="mtl_sequential_"), dataset)


@pytest.mark.parametrize("lane_mode", ["vmap", "loop"])
def test_train_group_writes_the_same_results_as_sequential_runs(tmp_path, dataset, lane_mode):
  configs = _group_configs([(1e-3, 0), (3e-3, 1)])
  grouped = train.train_group(
    configs, [str(tmp_path / f"group{i}") for i in range(2)], dataset, lane_mode=lane_mode
  )
  for index, config in enumerate(configs):
    sequential = _sequential_results(index)
    assert grouped[index]["fingerprint"] == sequential["fingerprint"]
    assert grouped[index]["best_step"] == sequential["best_step"]
    for split in ("validation", "test"):
      for key, value in sequential[split].items():
        assert grouped[index][split][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, key)
    # A grouped run's results are reused by the sequential trainer (interchangeable formats).
    reused = train.train_and_evaluate(config, str(tmp_path / f"group{index}"), dataset)
    assert reused["test"] == grouped[index]["test"]


@pytest.mark.parametrize("method, optimizer", [("adatask", "adam"), ("mtl_io", "sgd")])
def test_methods_with_their_own_optimizer_train_in_groups_as_alone(
  tmp_path, dataset, method, optimizer
):
  # AdaTask's and MTL-IO's optimizers replace the configured one; a group's step must build
  # theirs too (it built the plain one, whose state did not fit: a crash).
  configs = []
  for config in _group_configs([(2e-3, 0), (1e-3, 1)]):
    config = ml_collections.ConfigDict(config.to_dict())
    config.method.name, config.optimizer.name = method, optimizer
    config.training.num_epochs = 1
    configs.append(config)
  grouped = train.train_group(
    configs, [str(tmp_path / f"g{i}") for i in range(2)], dataset, lane_mode="loop"
  )
  alone = train.train_and_evaluate(configs[1], str(tmp_path / "alone"), dataset)
  for key, value in alone["test"].items():
    assert grouped[1]["test"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("lane_mode", ["loop", "vmap"])
def test_a_group_of_adam_and_sgd_runs_trains_each_as_alone(tmp_path, dataset, lane_mode):
  # Runs that differ in their optimizer share one program (each lane runs its own optimizer
  # through `optim.switched`) and give what each run gives alone.
  configs = []
  for (rate, seed), name in zip([(2e-3, 0), (0.05, 1)], ["adam", "sgd"]):
    config = ml_collections.ConfigDict(_group_configs([(rate, seed)])[0].to_dict())
    config.optimizer.name, config.training.num_epochs = name, 1
    configs.append(config)
  assert train.group_key(configs[0]) == train.group_key(configs[1])
  grouped = train.train_group(
    configs, [str(tmp_path / f"g{i}") for i in range(2)], dataset, lane_mode=lane_mode
  )
  for index, config in enumerate(configs):
    alone = _alone(config)
    for key, value in alone["test"].items():
      assert grouped[index]["test"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@functools.lru_cache(maxsize=None)
def _alone_cached(config_json):
  config = ml_collections.ConfigDict(json.loads(config_json))
  dataset = registry.load_dataset(config.dataset)
  return train.train_and_evaluate(config, tempfile.mkdtemp(prefix="mtl_alone_"), dataset)


def _alone(config):
  return _alone_cached(config.to_json())


def test_loop_groups_of_any_size_share_one_compiled_step(tmp_path, dataset):
  # A refinement round trains groups of another size than the coarse grid's: the loop lanes'
  # one-run step must not compile again for them.
  first, second = _group_configs([(2e-3, 0), (4e-3, 1)]), _group_configs([(5e-3, 2)] * 3)
  train.train_group(first, [str(tmp_path / f"a{i}") for i in range(2)], dataset, lane_mode="loop")
  experiment = train.build_experiment(first[0], dataset)
  programs = train.lane_programs(experiment, skip_non_finite=False)
  assert programs.step._cache_size() == 1
  train.train_group(second, [str(tmp_path / f"b{i}") for i in range(3)], dataset, lane_mode="loop")
  assert train.lane_programs(experiment, skip_non_finite=False) is programs
  assert programs.step._cache_size() == 1 and programs.evaluate._cache_size() >= 1


def test_every_method_and_optimizer_of_one_model_shares_its_compiled_initialisation(dataset):
  # A sweep initialises runs of many (method, optimizer) pairs: the model's variables compile
  # once, and a seed gives every pair the same initial parameters.
  config = _group_configs([(1e-3, 0)])[0]
  other = ml_collections.ConfigDict(config.to_dict())
  other.method.name, other.optimizer.name = "pcgrad", "sgd"
  first, second = (train.build_experiment(each, dataset) for each in (config, other))
  assert train.model_initializer(first) is train.model_initializer(second)
  states = [train.init_state(experiment, 3) for experiment in (first, second)]
  assert train.model_initializer(first)._cache_size() == 1
  chex.assert_trees_all_equal(states[0].params, states[1].params)
  assert jax.tree_util.tree_structure(states[0].opt_state) != jax.tree_util.tree_structure(
    states[1].opt_state
  )


def test_tiny_end_to_end_sweep_and_resume(tmp_path, dataset, monkeypatch):
  config = _sweep_config(
    methods=("ew",),
    optimizers=("adam", "sgd"),
    lr_grid=(0.01,),
    stl_lr_grid=(0.005,),
    seeds=(0,),
    group_runs=True,
    refine_budget=0,
  )
  config.unlock()
  config.tasks = ("segmentation", "depth")
  config.lock()
  result = sweep.run_sweep(config, str(tmp_path), dataset)
  assert [(s.method, s.optimizer, s.learning_rate) for s in result.selections] == [
    ("ew", "adam", 0.01),
    ("ew", "sgd", 0.01),
  ]
  assert all(np.isfinite(s.mean_std("delta_m")[0]) for s in result.selections)
  assert sum(count["runs"] for count in result.pareto_counts.values()) == 2
  for name in (
    "sweep.json",
    "sweep.csv",
    "delta_m.md",
    "delta_m.csv",
    "metrics.csv",
    "parallel_coordinates.png",
  ):
    assert os.path.getsize(os.path.join(str(tmp_path), name)) > 0
  index = json.load(open(tmp_path / "sweep.json"))
  assert len(index) == 4 and all(entry["status"] == "finished" for entry in index)
  mtl_run = json.load(open(tmp_path / "mtl/ew-adam-lr0.01-seed0/results.json"))
  assert mtl_run["config"]["delta_m"]["baseline"] == [
    str(tmp_path / "stl/segmentation-adam-lr0.005-seed0"),
    str(tmp_path / "stl/depth-adam-lr0.005-seed0"),
  ]

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(train, "train_group", no_training)
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  again = sweep.run_sweep(config, str(tmp_path), dataset)
  assert [s.test_delta_m for s in again.selections] == [s.test_delta_m for s in result.selections]


def test_report_assembly_with_a_failing_study(tmp_path, monkeypatch):
  def fake_optimizers(config, workdir):
    figure = os.path.join(workdir, "figure.png")
    os.makedirs(workdir, exist_ok=True)
    open(figure, "w").close()
    return markdown.StudyResult("Optimizers", "Adam beat SGD on Δm for 1 of 1 methods.", [figure])

  def broken(config, workdir):
    raise RuntimeError("boom")

  registry_ = {"optimizers": fake_optimizers, "broken": broken}
  with pytest.raises(RuntimeError, match="boom"):
    reproduce.run(_sweep_config(), str(tmp_path), registry=registry_)
  text = open(tmp_path / "report.md").read()
  assert "Adam beat SGD on Δm for 1 of 1 methods." in text
  assert "](optimizers/figure.png)" in text
  assert "RuntimeError: boom" in text
  with pytest.raises(ValueError, match="Unknown studies"):
    reproduce.run(_sweep_config(), str(tmp_path), studies=["nope"], registry=registry_)


def test_next_rates_refine_inside_and_extend_at_the_edge():
  inside = sweep.next_rates({0.5: 3.0, 0.05: 1.0, 0.005: 2.0}, 10**0.5, budget_left=5)
  assert inside == [(0.1581, "refined"), (0.01581, "refined")]
  edge = sweep.next_rates({0.5: 1.0, 0.05: 2.0}, 10**0.5, budget_left=5)
  assert edge == [(1.581, "extended"), (0.1581, "refined")]
  assert sweep.next_rates({0.5: 1.0, 0.05: 2.0}, 10**0.5, budget_left=1) == [(1.581, "extended")]
  assert sweep.next_rates({0.5: math.inf}, 10**0.5, budget_left=3) == []
  assert sweep.next_rates({0.5: 1.0}, 10**0.5, budget_left=0) == []


def test_search_grid_extends_until_the_best_lies_inside(tmp_path, monkeypatch):
  # A validation score whose minimum is at lr 0.5, beyond the coarse grid's largest rate.
  def score(rate):
    return abs(math.log10(rate / 0.5))

  def fake_group(runs, dirs, dataset, **kwargs):
    for run, run_dir in zip(runs, dirs):
      os.makedirs(run_dir)
      rate = run.optimizer.learning_rate
      with open(os.path.join(run_dir, "results.json"), "w") as file:
        json.dump({"validation": {"loss": score(rate) + 0.01 * run.seed}, "test": {}}, file)

  monkeypatch.setattr(train, "train_group", fake_group)
  config = _sweep_config(seeds=(0, 1), refine_budget=3, group_runs=True)
  coarse = [
    sweep.RunSpec("mtl", "ew", "adam", rate, seed) for rate in (0.1, 0.01) for seed in (0, 1)
  ]
  specs, searches = sweep.search_grid(
    config,
    str(tmp_path),
    coarse,
    None,
    sweep.JobProgress(len(coarse)),
    lambda spec, results: results["validation"]["loss"],
    lambda spec: sweep.run_config(config, spec),
    budget=3,
    factor=10**0.5,
  )
  search = searches[("ew", "adam")]
  # Round 1: best 0.1 on the edge -> 0.3162 (extended) and 0.03162 (refined); round 2: best
  # 0.3162 on the edge -> 0.9999 (extended; rates keep 4 digits); round 3: 0.3162 is inside
  # and both its neighbours are tried.
  assert search.coarse == [0.1, 0.01]
  assert search.refined == [0.03162] and search.extended == [0.3162, 0.9999]
  assert search.best == 0.3162 and not search.at_edge
  assert len(specs) == 2 * 5
  lines = markdown.grid_search_findings(searches, "method")
  assert "+0.03162, +0.3162 (ext.), +0.9999 (ext.) → lr 0.3162" in lines[0]
  assert "still at the grid's edge" not in lines[0]


def _selection(optimizer, delta_m, method="ew"):
  return sweep.Selection(
    method,
    optimizer,
    0.1,
    {0.1: 0.0},
    seeds=list(range(len(delta_m))),
    test=[{"a/acc": 0.5, "b/err": 0.5}] * len(delta_m),
    test_delta_m=list(delta_m),
  )


def test_optimizer_findings_carry_paired_intervals_and_verdicts():
  # ew: sgd − adam = 2.0, 2.1, 1.9 per seed: holds. uw: 3, −3, 0.5: inconclusive. rlw: −2 each
  # (constant): reversed.
  selections = [
    _selection("adam", [1.0, 2.0, 3.0]),
    _selection("sgd", [3.0, 4.1, 4.9]),
    _selection("adam", [0.0, 0.0, 0.0], "uw"),
    _selection("sgd", [3.0, -3.0, 0.5], "uw"),
    _selection("adam", [5.0, 6.0, 7.0], "rlw"),
    _selection("sgd", [3.0, 4.0, 5.0], "rlw"),
  ]
  _, counts = sweep.pareto_analysis(selections, DIRECTIONS)
  findings = markdown.optimizer_findings(selections, counts, SETTINGS)
  text = "\n".join(findings)
  assert "holds for 1, reversed for 1, inconclusive for 1 of 3 methods" in text
  ew_line = next(line for line in findings if line.strip().startswith("- ew:"))
  expected = statistics.t_interval([2.0, 2.1, 1.9], 0.95)
  assert f"+2.00 [{expected.low:+.2f}, {expected.high:+.2f}] (95% t, n=3): **holds**" in ew_line
  assert "**inconclusive**" in next(line for line in findings if "- uw:" in line)
  assert "**reversed**" in next(line for line in findings if "- rlw:" in line)


def test_pareto_bootstrap_of_identical_seeds_has_no_spread():
  # Every seed gives the same points, so every resample gives the sample's counts.
  adam = _selection("adam", [0.0] * 3)
  adam.test = [{"a/acc": 0.9, "b/err": 0.1}] * 3
  sgd = _selection("sgd", [0.0] * 3)
  sgd.test = [{"a/acc": 0.5, "b/err": 0.5}] * 3
  spread = sweep.pareto_bootstrap([adam, sgd], DIRECTIONS, SETTINGS)
  assert (spread["adam"]["po_full"].low, spread["adam"]["po_full"].high) == (3, 3)
  assert (spread["sgd"]["po_full"].low, spread["sgd"]["po_full"].high) == (0, 0)
  assert spread["difference"].estimate == 1.0
  assert statistics.verdict(spread["difference"]) == statistics.HOLDS


def test_models_that_do_not_beat_the_trivial_predictor_are_flagged():
  trivial = {"a/acc": 0.5, "b/err": 1.0}
  rows = [("good", {"a/acc": 0.6, "b/err": 0.5}), ("flat", {"a/acc": 0.51, "b/err": 0.5})]
  table, flags = markdown.learned_check(rows, trivial, DIRECTIONS, margin_percent=5.0)
  assert "| good | acc +20.0% | err +50.0% | yes |" in table
  assert "| flat | acc +2.0% **no** | err +50.0% | **NO** |" in table
  assert len(flags) == 1 and "flat" in flags[0] and "a (acc +2.0%)" in flags[0]


def test_trivial_predictors_against_numpy(dataset):
  tasks = dataset.select_tasks(["segmentation", "depth"])
  found = evaluation.trivial_metrics(tasks, dataset.splits["train"], dataset.splits["test"], 16)
  train_split = dataset.splits["train"].batch(np.arange(len(dataset.splits["train"])))
  test_split = dataset.splits["test"].batch(np.arange(len(dataset.splits["test"])))
  segmentation, depth = tasks
  train_depth = np.asarray(train_split[depth.target_key], np.float64)
  mean_depth = train_depth[train_depth > 0].mean()
  test_depth = np.asarray(test_split[depth.target_key], np.float64)
  valid = test_depth > 0
  assert found["depth/abs_err"] == pytest.approx(np.abs(test_depth[valid] - mean_depth).mean())
  labels = np.asarray(train_split[segmentation.target_key]).reshape(-1)
  labels = labels[(labels >= 0) & (labels < segmentation.num_classes)]
  majority = np.bincount(labels, minlength=segmentation.num_classes).argmax()
  test_labels = np.asarray(test_split[segmentation.target_key]).reshape(-1)
  test_labels = test_labels[(test_labels >= 0) & (test_labels < segmentation.num_classes)]
  assert found["segmentation/pixel_accuracy"] == pytest.approx(np.mean(test_labels == majority))
