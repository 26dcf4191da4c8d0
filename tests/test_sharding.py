"""Tests for mtl_jax.sharding on 8 emulated CPU devices, each sharded result against one device.

The emulated device count is fixed when JAX starts, so the computations run in subprocesses
(tests/sharding_worker.py) with XLA_FLAGS set before JAX is imported: one device (a checkpoint
and a training run), eight devices (every check below), one device again (the 8-device
checkpoint restored). The three processes run once per session; each test reads one result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

RELATIVE_TOLERANCE = 1e-5
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_worker.py")


def _run(mode: str, directory: str, devices: int) -> dict:
  environment = {**os.environ, "JAX_PLATFORMS": "cpu",
                 "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  completed = subprocess.run([sys.executable, _WORKER, mode, directory], env=environment, capture_output=True,
                             text=True, timeout=600, check=False)
  lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULTS ")]
  assert completed.returncode == 0 and lines, f"{mode} worker failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
  results = json.loads(lines[-1][len("RESULTS "):])
  assert results["device_count"] == devices
  return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sharding"))
  _run("single", directory, 1)
  sharded = _run("sharded", directory, 8)
  return sharded, _run("single", directory, 1)


@pytest.mark.parametrize("key", ["ew_step", "gramian_step_shard_map", "gramian_step_gspmd", "run_test"])
def test_train_steps_match_one_device(results, key):
  # ew_step: GSPMD-jitted make_train_step, SGD (an n-fold gradient would show); the Gramian
  # steps: 1/||g_t||-weighted method on the shard_map engine and on the plain engine under
  # GSPMD; run_test: test metrics of a whole FSDP training run against a one-device run.
  assert results[0][key] < RELATIVE_TOLERANCE, results[0]


@pytest.mark.parametrize("key", ["gramian", "task_gramian", "conflicts"])
def test_gramians_match_one_device(results, key):
  assert results[0][key] < RELATIVE_TOLERANCE, results[0]


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
