"""The run-time self-check of the fast Gramian path: schedule, pass on a correct model, clear stop
on a wrong one."""

import pytest

import gramian_cases
from configs import test as test_config
from mtl_jax import train
from mtl_jax import weighting
from mtl_jax.gramian import blocks
from mtl_jax.gramian import check as gramian_check
from mtl_jax.train import session


def _wrong_fast_path(monkeypatch):
  """Makes every fast Gramian 1% too large: ten times the check's tolerance."""
  original = blocks.fast_gramian_from_capture

  def perturbed(captured, rows=None):
    return 1.01 * original(captured, rows)

  monkeypatch.setattr(blocks, "fast_gramian_from_capture", perturbed)


def test_checked_tasks_spread_over_the_tasks_with_the_last_included():
  assert gramian_check.checked_tasks(1) == (0,)
  assert gramian_check.checked_tasks(3) == (0, 1, 2)
  assert gramian_check.checked_tasks(10) == (0, 3, 6, 9)


def test_schedule_once_never_and_every_k_steps():
  def steps_checked(every_steps, steps):
    check = gramian_check.FastPathCheck(None, [], every_steps)
    checked = []
    for step in steps:
      if check.due(step):
        check.last_step = step
        checked.append(step)
    return checked

  steps = [5, 6, 7, 8, 9, 10, 11, 12]  # A resumed run starts anywhere.
  assert steps_checked(gramian_check.ONCE, steps) == [5]
  assert steps_checked(gramian_check.NEVER, steps) == []
  assert steps_checked(3, steps) == [5, 8, 11]
  assert steps_checked(3, [0, 2, 4, 6, 8]) == [
    0,
    4,
    8,
  ]  # A probe every 2 steps, checked every >= 3.
  with pytest.raises(
    ValueError, match="verify_every_steps must be -1 .once., 0 .never. or a positive"
  ):
    gramian_check.FastPathCheck(None, [], -2)


def test_verify_every_steps_defaults_to_once():
  assert test_config.get_config().gramian.verify_every_steps == gramian_check.ONCE


def test_check_passes_on_a_correct_model_and_stops_on_a_wrong_fast_path(monkeypatch):
  case = gramian_cases.make_case("small_cnn", "layer", seed=0)
  check = gramian_check.FastPathCheck(case.model, case.tasks, purpose="test")
  assert check.maybe_verify(4, case.params, {}, case.batch) < 1e-5
  assert check.maybe_verify(5, case.params, {}, case.batch) is None  # Once: done.

  _wrong_fast_path(monkeypatch)
  check = gramian_check.FastPathCheck(case.model, case.tasks, purpose="conflict probe")
  with pytest.raises(gramian_check.FastPathMismatchError) as error:
    check.maybe_verify(0, case.params, {}, case.batch)
  message = str(error.value)
  assert "encoder SmallCNN(features=(4, 4)) with norm 'layer'" in message
  assert "relative discrepancy" in message and "> tolerance 0.001" in message
  assert (
    "tasks ['segmentation', 'depth', 'normals', 'attribute']" in message
    and "conflict probe" in message
  )
  assert "config.gramian.verify_every_steps=0" in message


def _training_config(**values):
  config = test_config.get_config()
  config.unlock()
  config.method.name = "upgrad"
  config.method.level = "sample"
  config.training.num_epochs = 1
  for dotted, value in values.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config.lock()


def test_training_checks_per_sample_gramian_steps_only():
  config = _training_config()
  experiment = train.build_experiment(config)
  check = session.fast_path_check(experiment)
  assert (
    check is not None
    and check.every_steps == gramian_check.ONCE
    and "level 'sample'" in check.purpose
  )
  for values in ({"method.level": "task"}, {"gramian.verify_every_steps": 0}):
    other = _training_config(**values)
    assert session.fast_path_check(train.build_experiment(other, experiment.dataset)) is None
  loss_method = train.build_experiment(test_config.get_config(), experiment.dataset)
  assert isinstance(loss_method.weighting, weighting.LossWeighting)
  assert session.fast_path_check(loss_method) is None


def test_training_stops_before_the_first_step_when_the_fast_path_is_wrong(monkeypatch, tmp_path):
  _wrong_fast_path(monkeypatch)
  config = _training_config()
  with pytest.raises(
    gramian_check.FastPathMismatchError,
    match=r"encoder SmallCNN\(features=\(8, 8\)\) with norm "
    r"'group'.*train step at level 'sample', step 0",
  ):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "results.json").exists()


def test_check_of_a_batch_norm_model_in_evaluation_mode():
  # The conflict probe's batch_norm='eval': both paths use the running statistics.
  case = gramian_cases.make_case("mlp", "batch", seed=1)
  check = gramian_check.FastPathCheck(case.model, case.tasks, batch_norm="eval")
  value = check.verify(0, case.params, case.batch_stats, case.batch)
  assert isinstance(value, float) and value < 1e-5
