"""The label-scarcity study end to end on a tiny grid: runs, paired Δm, verdicts, figure."""

import os

import numpy as np

from configs import test as test_config
from configs.sections import label_scarcity as section
from mtl_jax import config_validation
from mtl_jax import statistics
from mtl_jax.report import markdown
from mtl_jax.studies import label_scarcity
from mtl_jax.studies import reproduce


def _config():
  config = test_config.get_config()
  section.add(config)
  config.unlock()
  config.tasks = ("depth", "segmentation")
  config.dataset.height, config.dataset.width = 8, 16
  config.dataset.num_train, config.dataset.num_validation, config.dataset.num_test = 16, 8, 8
  config.model.features = (4,)
  config.model.head_hidden_channels = 4
  config.training.num_epochs = 1
  config.training.batch_size = config.training.eval_batch_size = 8
  config.training.checkpoint_every_steps = 0
  config.label_scarcity.fractions = (0.25,)
  config.label_scarcity.methods = ("ew",)
  config.label_scarcity.seeds = (0, 1)
  return config.lock()


def test_the_study_compares_mtl_with_stl_as_labels_become_scarce(tmp_path):
  config = _config()
  config_validation.validate_config(config)
  run = label_scarcity.run_config(config, ("depth", "segmentation"), "ew", 0.25, 1)
  assert run.dataset.label_fraction == 0.25 and tuple(run.dataset.label_fraction_tasks) == (
    "depth",
  )
  assert (
    label_scarcity.run_config(config, ("segmentation",), "stl", 0.25, 1).dataset.label_fraction == 1
  )
  result = label_scarcity.run_study(config, str(tmp_path))
  assert set(result.stl) == {
    (task, fraction, seed)
    for seed in (0, 1)
    for task, fraction in (("depth", 0.25), ("segmentation", 1.0))
  }
  scarce = label_scarcity.delta_m(result, "ew", 0.25, only_scarce=True)
  assert len(scarce) == 2 and np.all(np.isfinite(scarce))
  text, figure = label_scarcity.summarise(result, str(tmp_path))
  assert os.path.getsize(figure) > 0 and os.path.exists(tmp_path / "summary.md")
  _, verdicts = label_scarcity.finding_lines(result)
  assert len(verdicts) == 1 and set(verdicts) <= set(statistics.VERDICTS)
  assert "ew, depth labels 0.25" in text
  # The main job's report quotes the study, which runs separately, with its findings and figure.
  report = _report_with_label_scarcity(config, tmp_path / "job", str(tmp_path))
  assert label_scarcity.COMMAND.format(workdir=tmp_path) in report
  (finding,) = [line for line in text.splitlines() if "ew, depth labels 0.25" in line]
  assert finding in report and "# MTL as labels become scarce" not in report
  assert "](../label_scarcity.png)" in report


def _report_with_label_scarcity(config, job_dir, scarcity_dir):
  def other_study(config, workdir):
    return markdown.StudyResult("Other", "another study's body")

  path = reproduce.run(
    config, str(job_dir), registry={"other": other_study}, label_scarcity_workdir=scarcity_dir
  )
  return open(path).read()


def test_the_main_report_says_how_to_run_the_study_before_it_ran(tmp_path):
  missing = str(tmp_path / "label_scarcity")
  report = _report_with_label_scarcity(_config(), tmp_path / "job", missing)
  assert "## " + reproduce.TITLES["label_scarcity"] in report
  assert label_scarcity.COMMAND.format(workdir=missing) in report and "No results yet" in report
