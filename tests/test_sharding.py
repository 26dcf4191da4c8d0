"""Tests for mtl_jax.sharding on 8 emulated CPU devices, each sharded result against one device.

The emulated device count is fixed when JAX starts, so the computations run in subprocesses
(tests/sharding_worker.py) with XLA_FLAGS set before JAX is imported: one device (a checkpoint,
the real methods' steps and a training run) side by side with eight devices (every check
below); then this process restores the 8-device checkpoint on one device. The processes run
once per session; each test reads one result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import sharding_worker

RELATIVE_TOLERANCE = 1e-5
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_worker.py")


def _start(mode: str, directory: str, devices: int) -> tuple[subprocess.Popen, str]:
  """Starts a worker process; its output goes to a log file beside the results."""
  environment = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
  }
  log_path = os.path.join(directory, f"{mode}_{devices}_{len(os.listdir(directory))}.log")
  with open(log_path, "w") as log:
    process = subprocess.Popen(
      [sys.executable, _WORKER, mode, directory],
      env=environment,
      stdout=log,
      stderr=subprocess.STDOUT,
      text=True,
    )
  return process, log_path


def _finish(started: tuple[subprocess.Popen, str], devices: int) -> dict:
  """Waits for a worker and returns its results (printed as one 'RESULTS <json>' line)."""
  process, log_path = started
  try:
    process.wait(timeout=600)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
  with open(log_path) as log:
    output = log.read()
  lines = [line for line in output.splitlines() if line.startswith("RESULTS ")]
  assert process.returncode == 0 and lines, f"{log_path} worker failed:\n{output[-8000:]}"
  results = json.loads(lines[-1][len("RESULTS ") :])
  assert results["device_count"] == devices
  return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sharding"))
  # The one-device process writes what the 8-device one compares with, while the latter works.
  single = _start("single", directory, 1)
  sharded = _start("sharded", directory, 8)
  try:
    _finish(single, 1)
  except AssertionError:
    sharded[0].kill()
    sharded[0].wait()
    raise
  return _finish(sharded, 8), sharding_worker.restore_checks(directory)


@pytest.mark.parametrize("key", ["ew_step", "gramian_step_shard_map"])
def test_train_steps_match_one_device(results, key):
  # ew_step: GSPMD-jitted make_train_step, SGD (an n-fold gradient would show);
  # gramian_step_shard_map: a 1/||g_t||-weighted method on the engine's per-sample ('full')
  # Gramian and weighted gradient, computed by its shard_map path.
  assert results[0][key] < RELATIVE_TOLERANCE, results[0]


@pytest.mark.parametrize(
  "key",
  [
    "method_upgrad_task",
    "method_graddrop_task",
    "method_famo_task",
    "method_adatask_task",
    "method_mtl_io_task",
  ],
)
def test_real_method_steps_match_one_device(results, key):
  # train.make_train_step for the mesh through sharding.shard_training, as the training loop
  # builds it, against the one-device step: two steps (SGD; AdaTask on its per-task Adam),
  # parameter changes, loss, weighting state.
  assert results[0][key] < RELATIVE_TOLERANCE, results[0]


@pytest.mark.parametrize("key", ["run_test", "run_params", "run_conflicts"])
def test_training_run_matches_one_device(results, key):
  # A whole FSDP training run of PCGrad at level 'sample_task' with the conflict probe against
  # a one-device run: test metrics, trained parameters (a step built without the method's level
  # would differ here), and every statistic of conflicts.jsonl.
  assert results[0][key] < RELATIVE_TOLERANCE, results[0]


def test_training_run_wrote_conflict_records(results):
  sharded, single = results[0]["run_conflict_records"]
  assert sharded == single > 0


@pytest.mark.parametrize(
  "key",
  [
    "probe_split_measures",
    "probe_split_ratios",
    "probe_replicated_measures",
    "probe_replicated_ratios",
  ],
)
def test_conflict_probe_matches_one_device(results, key):
  # 8 probed rows split over 8 devices (shard_map Gramian), and computed whole on each of 3.
  assert results[0][key] < RELATIVE_TOLERANCE, results[0]


@pytest.mark.parametrize(
  "key",
  [
    "gramian",
    "task_gramian",
    "conflicts",
    "rows_gramian",
    "masked_rows_gramian",
    "ghost_gramian_mlp",
    "ghost_gramian_small_cnn",
  ],
)
def test_gramians_match_one_device(results, key):
  assert results[0][key] < RELATIVE_TOLERANCE, results[0]


def test_level_gramians_come_back_replicated(results):
  # Every device must compute the same weights from them.
  assert results[0]["rows_gramian_sharding"] == ["P()"]


def test_gramian_stays_row_sharded(results):
  assert results[0]["gramian_sharding"] == "P('data',)"


def test_fsdp_splits_large_leaves(results):
  specs = results[0]["fsdp_specs"]
  assert "P()" in specs and any("'data'" in spec for spec in specs)


def test_process_local_batch_assembles_the_global_batch(results):
  assert results[0]["process_local_batch"] == 0.0


def test_indivisible_batch_is_a_clear_error(results):
  message = results[0]["indivisible_error"]
  assert message is not None
  assert "config.training.batch_size: 12 is not divisible by the device count (8)" in message
  assert "8 or 16" in message


def test_checkpoints_cross_device_counts(results):
  sharded, single = results
  assert sharded["restore_from_single"] < 1e-12 and sharded["restored_changed"] < 1e-6
  assert sharded["restored_sharding_kept"]
  assert single["restore_from_sharded"] < 1e-12 and single["restored_changed"] < 1e-6
  assert single["restored_devices"] == [1]
