"""Tests of the training loop: results, determinism, exact resume after SIGKILL (with and without
data worker processes), non-finite stops."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import test as test_config
from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import train
from mtl_jax.data import pipeline
from mtl_jax.data import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(argument=None, **training):
  config = test_config.get_config(argument)
  config.unlock()
  for key, value in training.items():
    config.training[key] = value
  return config.lock()


@pytest.fixture(scope="module")
def dataset():
  return registry.load_dataset(_config().dataset)


def _final_state(config, workdir, dataset):
  experiment = train.build_experiment(config, dataset)
  target = train.init_state(experiment, int(config.seed))
  restored = checkpoint_lib.Checkpointer(workdir, asynchronous=False).restore(target)
  assert restored is not None
  return restored[0]


def test_training_writes_results_checkpoints_and_logs(tmp_path, dataset):
  config = _config()
  results = train.train_and_evaluate(config, str(tmp_path), dataset)
  assert set(results["test"]) >= {"segmentation/miou", "depth/abs_err", "normals/mean_angle"}
  assert all(np.isfinite(value) for value in results["test"].values())
  assert os.path.exists(tmp_path / "results.json")
  assert os.listdir(tmp_path / "checkpoints") and os.listdir(tmp_path / "best")
  assert os.listdir(tmp_path / "tensorboard")
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [line["train/loss"] for line in lines if "train/loss" in line]
  assert losses[-1] < losses[0], "training loss did not decrease"
  # Running the same command on a finished run re-reads its results instead of training.
  assert train.train_and_evaluate(config, str(tmp_path), dataset) == json.load(
    open(tmp_path / "results.json")
  )


def test_same_seed_gives_identical_metrics(tmp_path, dataset):
  first = train.train_and_evaluate(_config(), str(tmp_path / "a"), dataset)
  second = train.train_and_evaluate(_config(), str(tmp_path / "b"), dataset)
  assert first["test"] == second["test"]
  config = _config()
  config.unlock()
  config.seed = 1
  third = train.train_and_evaluate(config.lock(), str(tmp_path / "c"), dataset)
  assert third["test"] != first["test"]


_KILL_EPOCHS = 4


@pytest.fixture(scope="module")
def uninterrupted_kill_run(tmp_path_factory, dataset):
  """The final state of the kill test's run trained straight through, here with 0 workers."""
  config = _config(num_epochs=_KILL_EPOCHS, checkpoint_every_steps=1)
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(config, workdir, dataset)
  return _final_state(config, workdir, dataset)


def _children(pid):
  """Process ids whose parent is `pid` (from /proc)."""
  children = []
  for name in os.listdir("/proc"):
    try:
      with open(f"/proc/{name}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if name.isdigit() and int(fields[1]) == pid:
      children.append(int(name))
  return children


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as file:
      return file.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


# With worker processes (the harder case: the pipeline's processes die with the run); the slow tier
# also runs it with the reader thread, whose resume the preemption and checkpoint-fault tests cover.
@pytest.mark.parametrize("workers", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_sigkill_then_resume_equals_uninterrupted_run(
  tmp_path, dataset, uninterrupted_kill_run, workers
):
  command = [
    sys.executable,
    os.path.join(ROOT, "experiments", "train.py"),
    "--config=configs/test.py",
    f"--config.training.num_epochs={_KILL_EPOCHS}",
    "--config.training.checkpoint_every_steps=1",
    f"--config.data.workers={workers}",
    f"--config.data.prefetch={workers}",
  ]
  killed_dir = tmp_path / "killed"
  process = subprocess.Popen(
    command + [f"--workdir={killed_dir}"],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 180
  checkpoints = killed_dir / "checkpoints"
  while time.time() < deadline:
    steps = [
      int(name)
      for name in (os.listdir(checkpoints) if checkpoints.exists() else [])
      if name.isdigit()
    ]
    if steps and max(steps) >= 3:
      break
    if process.poll() is not None:
      pytest.fail("training finished before it could be killed")
    time.sleep(0.02)
  readers = _children(process.pid)
  if workers:
    assert len(readers) >= workers, "the data workers should be running"
  process.send_signal(signal.SIGKILL)
  process.wait()
  # The data workers notice that the trainer is gone and exit (they poll once a second).
  deadline = time.time() + 15
  while time.time() < deadline and any(_alive(pid) for pid in readers):
    time.sleep(0.1)
  assert not [pid for pid in readers if _alive(pid)], "data workers outlived the killed trainer"
  assert not (killed_dir / "results.json").exists()
  resumed = subprocess.run(
    command + [f"--workdir={killed_dir}"], cwd=ROOT, capture_output=True, text=True
  )
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resuming from step" in resumed.stdout

  config = _config(num_epochs=_KILL_EPOCHS, checkpoint_every_steps=1)
  interrupted = _final_state(config, str(killed_dir), dataset)
  assert int(interrupted.step) == int(uninterrupted_kill_run.step) == _KILL_EPOCHS * 4
  for left, right in zip(
    jax.tree_util.tree_leaves(interrupted), jax.tree_util.tree_leaves(uninterrupted_kill_run)
  ):
    np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


class _PoisonedSource:
  """Training data whose depth targets turn infinite in the batch of one step."""

  def __init__(self, source, poisoned_step, batch_size):
    self.source, self.poisoned_step, self.batch_size = source, poisoned_step, batch_size

  def __len__(self):
    return len(self.source)

  def batch(self, indices):
    batch = self.source.batch(indices)
    expected = pipeline.train_indices(len(self.source), self.batch_size, 0, self.poisoned_step)
    if np.array_equal(indices, expected):
      batch["depth"] = np.where(batch["depth"] > 0, np.inf, batch["depth"]).astype(np.float32)
    return batch


def _poisoned(dataset, step):
  splits = dict(dataset.splits)
  splits["train"] = _PoisonedSource(dataset.splits["train"], step, 16)
  return registry.Dataset(dataset.name, splits, dataset.tasks, dataset.attribute_tasks)


def test_non_finite_loss_stops_naming_step_and_task_and_keeps_last_checkpoint(tmp_path, dataset):
  config = _config()
  with pytest.raises(
    train.NonFiniteLossError, match=r"step 5 in task\(s\) depth .*last good checkpoint \(step 4\)"
  ):
    train.train_and_evaluate(config, str(tmp_path), _poisoned(dataset, 5))
  experiment = train.build_experiment(config, dataset)
  state, _ = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False).restore(
    train.init_state(experiment, 0)
  )
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state.params))
  assert not (tmp_path / "results.json").exists()


def test_non_finite_step_can_be_skipped_and_counted(tmp_path, dataset):
  results = train.train_and_evaluate(
    _config(on_non_finite="skip"), str(tmp_path), _poisoned(dataset, 5)
  )
  assert results["skipped_steps"] == 1
  assert all(np.isfinite(value) for value in results["test"].values())


@pytest.mark.parametrize(
  "section,key,value,message",
  [
    ("method", "name", "pcgradd", "valid methods:"),
    ("optimizer", "name", "rmsprop", "valid optimizers: adam, sgd, signsgd, adamw"),
    ("model", "encoder", "vgg", "valid"),
    ("model", "norm", "instance", "valid norms: batch, group, layer, none"),
    ("dataset", "name", "imagenet", "valid datasets: .*scenes"),
  ],
)
def test_unknown_names_list_the_valid_ones(section, key, value, message):
  config = _config()
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    experiment = train.build_experiment(config)
    train.init_state(experiment, 0)


def test_unknown_task_lists_the_valid_ones(dataset):
  config = _config("task=depthh")
  with pytest.raises(
    ValueError, match=r"Unknown task\(s\) \['depthh'\].*valid tasks: segmentation, depth, normals"
  ):
    train.build_experiment(config, dataset)


def test_misspelt_config_key_is_rejected():
  result = subprocess.run(
    [
      sys.executable,
      "experiments/train.py",
      "--config=configs/test.py",
      "--config.training.num_epoch=1",
      "--workdir=/tmp/unused",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode != 0
  assert "num_epoch" in result.stderr


def test_delta_m_against_a_baseline_equal_to_the_run_itself_is_zero(tmp_path, dataset):
  first = train.train_and_evaluate(_config(), str(tmp_path / "reference"), dataset)
  assert "delta_m" not in first
  config = _config()
  config.delta_m.baseline = (str(tmp_path / "reference"),)
  second = train.train_and_evaluate(config, str(tmp_path / "compared"), dataset)
  assert second["selection"]["criterion"] == "validation_delta_m"
  assert second["delta_m"]["test"] == pytest.approx(0.0, abs=1e-9)
  assert second["delta_m"]["validation"] == pytest.approx(0.0, abs=1e-9)


def test_single_task_run_has_one_head(tmp_path, dataset):
  results = train.train_and_evaluate(_config("task=depth"), str(tmp_path), dataset)
  assert results["tasks"] == ["depth"]
  assert set(results["test"]) == {"depth/abs_err", "depth/rel_err", "depth/loss"}
  assert results["selection"]["criterion"] == "validation_loss"
