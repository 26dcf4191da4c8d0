"""Fault injection on checkpoints: truncated, garbled and missing files, partial saves, foreign
configs."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import config_validation
from mtl_jax import train
from tests import reliability_helpers as helpers


def _state(value):
  return {
    "params": {"kernel": jnp.full((64, 32), value, jnp.float32), "bias": jnp.arange(32.0) + value},
    "step": jnp.asarray(int(value), jnp.int32),
  }


def _save_steps(workdir, steps=(1, 2, 3)):
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), max_to_keep=3, asynchronous=False)
  for step in steps:
    checkpointer.save(step, _state(step), {"step": step})
  checkpointer.wait_until_finished()
  checkpointer.close()


def _step_files(workdir, step):
  root = os.path.join(workdir, checkpoint_lib.LATEST, str(step))
  return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)


def _largest_data_file(workdir, step):
  data = [path for path in _step_files(workdir, step) if f"{os.sep}d{os.sep}" in path]
  return max(data, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as file:
    file.truncate(os.path.getsize(path) // 2)


def _restore(workdir):
  return checkpoint_lib.Checkpointer(str(workdir), max_to_keep=3, asynchronous=False).restore(
    _state(0)
  )


def test_intact_checkpoints_restore_the_newest(tmp_path):
  _save_steps(tmp_path)
  state, progress = _restore(tmp_path)
  assert progress == {"step": 3}
  np.testing.assert_array_equal(state["params"]["bias"], np.arange(32.0) + 3)


def test_a_restored_single_device_state_reuses_the_programs_compiled_for_the_saved_one(tmp_path):
  # Orbax gives committed arrays back; a jitted program would compile again for them (the
  # best state's evaluation at the end of every single run did).
  _save_steps(tmp_path)
  total = jax.jit(lambda state: state["params"]["kernel"].sum() + state["params"]["bias"].sum())
  total(_state(0))
  state, _ = _restore(tmp_path)
  assert not any(leaf.committed for leaf in jax.tree_util.tree_leaves(state))
  assert float(total(state)) == pytest.approx(64 * 32 * 3 + np.sum(np.arange(32.0) + 3))
  assert total._cache_size() == 1


@pytest.mark.parametrize(
  "damage",
  [
    "truncate_data",
    "garble_data",
    "delete_data",
    "truncate_array_metadata",
    "garble_progress",
    "delete_progress",
    "empty_state_dir",
  ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
  _save_steps(tmp_path)
  files = _step_files(tmp_path, 3)
  if damage == "truncate_data":
    _truncate(_largest_data_file(tmp_path, 3))
  elif damage == "garble_data":
    helpers.garble(_largest_data_file(tmp_path, 3))
  elif damage == "delete_data":
    os.remove(_largest_data_file(tmp_path, 3))
  elif damage == "truncate_array_metadata":
    _truncate(next(path for path in files if path.endswith(os.path.join("state", "_METADATA"))))
  elif damage == "garble_progress":
    path = next(path for path in files if path.endswith(os.path.join("progress", "metadata")))
    open(path, "w").write('{"step": 3')
  elif damage == "delete_progress":
    os.remove(next(path for path in files if path.endswith(os.path.join("progress", "metadata"))))
  else:
    shutil.rmtree(os.path.join(tmp_path, checkpoint_lib.LATEST, "3", "state"))
  state, progress = _restore(tmp_path)
  assert progress == {"step": 2}
  np.testing.assert_array_equal(state["params"]["kernel"], np.full((64, 32), 2.0))
  output = capsys.readouterr().out
  assert (
    "checkpoint step 3" in output and "damaged" in output and "Restored checkpoint step 2" in output
  )


def test_partially_written_checkpoint_is_never_taken_for_a_complete_one(tmp_path, capsys):
  _save_steps(tmp_path, steps=(1, 2))
  latest = os.path.join(tmp_path, checkpoint_lib.LATEST)
  # What a save killed before its commit leaves: the step's files under a temporary name.
  partial = os.path.join(latest, "7.orbax-checkpoint-tmp-1700000000000000")
  shutil.copytree(os.path.join(latest, "2"), partial)
  os.remove(os.path.join(partial, "commit_success.txt"))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), max_to_keep=3, asynchronous=False)
  assert checkpointer.latest_step() == 2
  state, progress = checkpointer.restore(_state(0))
  assert progress == {"step": 2}
  assert "partially written checkpoint 7.orbax-checkpoint-tmp" in capsys.readouterr().out


def test_no_intact_checkpoint_names_the_directory(tmp_path):
  _save_steps(tmp_path, steps=(1, 2))
  for step in (1, 2):
    _truncate(_largest_data_file(tmp_path, step))
  with pytest.raises(
    checkpoint_lib.CheckpointError,
    match=r"No intact checkpoint in .*checkpoints.*step 2: .*step 1: ",
  ):
    _restore(tmp_path)


def test_state_digest_sees_every_byte_and_the_structure():
  base = checkpoint_lib.state_digest(_state(1))
  assert base == checkpoint_lib.state_digest(_state(1))
  changed = _state(1)
  changed["params"]["bias"] = changed["params"]["bias"].at[5].add(1e-6)
  assert checkpoint_lib.state_digest(changed) != base
  renamed = {"weights" if key == "params" else key: value for key, value in _state(1).items()}
  assert checkpoint_lib.state_digest(renamed) != base


def test_fingerprint_mismatches_name_each_key():
  saved = {
    "model": {"encoder": "small_cnn", "norm": "group"},
    "tasks": ["depth"],
    "method": {"name": "ew"},
  }
  current = {
    "model": {"encoder": "segnet", "norm": "group"},
    "tasks": ["depth"],
    "method": {"name": "uw"},
  }
  assert checkpoint_lib.fingerprint_mismatches(saved, current) == [
    "method.name: checkpoint 'ew' vs config 'uw'",
    "model.encoder: checkpoint 'small_cnn' vs config 'segnet'",
  ]
  assert checkpoint_lib.fingerprint_mismatches(current, current) == []


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
  """A run stopped by SIGINT at step 10 (shared with test_preemption through the helpers' cache)."""
  return helpers.preempted_run(str(tmp_path_factory.mktemp("preempted")))


def test_resume_after_corrupting_the_latest_checkpoint_falls_back_and_equals_uninterrupted(
  tmp_path, preempted_run, capsys
):
  workdir = str(tmp_path / "run")
  shutil.copytree(preempted_run, workdir)
  steps = sorted(
    int(name) for name in os.listdir(os.path.join(workdir, checkpoint_lib.LATEST)) if name.isdigit()
  )
  assert steps[-1] == helpers.STOP_STEP and len(steps) >= 2
  helpers.garble(_largest_data_file(workdir, steps[-1]))
  config = helpers.fault_config()
  train.train_and_evaluate(config, workdir, helpers.dataset())
  output = capsys.readouterr().out
  assert f"checkpoint step {steps[-1]}" in output and f"Resuming from step {steps[-2]}" in output
  helpers.assert_same_state(helpers.final_state(config, workdir), helpers.reference_state())


@pytest.mark.parametrize(
  "section,key,value,expected",
  [
    ("model", "encoder", "mlp", "model.encoder: checkpoint 'small_cnn' vs config 'mlp'"),
    ("model", "norm", "layer", "model.norm: checkpoint 'group' vs config 'layer'"),
    ("optimizer", "name", "sgd", "optimizer.name: checkpoint 'adam' vs config 'sgd'"),
    ("method", "name", "uw", "method.name: checkpoint 'ew' vs config 'uw'"),
  ],
)
def test_checkpoint_from_a_different_config_is_refused_naming_the_keys(
  preempted_run, section, key, value, expected
):
  config = helpers.fault_config()
  config[section][key] = value
  if key == "encoder":
    config.tasks = ("has_sphere",)  # a global encoder needs global tasks
  with pytest.raises(config_validation.ConfigError) as error:
    train.train_and_evaluate(config, preempted_run, helpers.dataset())
  assert expected in str(error.value) and os.path.join(preempted_run, "checkpoints") in str(
    error.value
  )
