"""Reliability: a damaged final checkpoint, user errors at the command line, one process per
workdir, and checkpoint writes the disk refuses."""

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from etils import epath
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import runtime
from mtl_jax import train
from mtl_jax.train import workdir_lock
from tests import reliability_helpers as helpers

# Two epochs of 4 steps: evaluations (and best candidates) at steps 4 and 8, latest checkpoints
# every 2 steps (the newest two kept).
FINAL_STEP = 8


def _config(**training):
  config = test_config.get_config()
  config.unlock()
  config.training.update(dict(num_epochs=2, checkpoint_every_steps=2, log_every_steps=4))
  config.training.update(training)
  return config.lock()


@functools.lru_cache(maxsize=None)
def _finished_run() -> str:
  """A finished run of _config() (trained once per test process)."""
  workdir = os.path.join(tempfile.mkdtemp(prefix="mtl_finished_"), "run")
  train.train_and_evaluate(_config(), workdir, helpers.dataset())
  return workdir


def _results(workdir):
  with open(os.path.join(workdir, train.RESULTS_FILE)) as file:
    return json.load(file)


def _largest_file(directory):
  files = [os.path.join(folder, name) for folder, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


# ------------------------------------------------------------------ 1. damaged final checkpoint


@pytest.mark.parametrize("damaged", [("checkpoints",), ("checkpoints", "best")])
def test_damaged_final_checkpoint_is_moved_aside_and_the_rerun_writes_results(
  tmp_path, capsys, damaged
):
  """The issue's scenario: the final step's progress record truncated to 100 bytes (and the best
  slot's arrays garbled), results.json deleted; the rerun resumes from the step before, writes
  that step again and the results, and a further rerun finds them."""
  workdir = str(tmp_path / "run")
  shutil.copytree(_finished_run(), workdir)
  final = os.path.join(workdir, checkpoint_lib.LATEST, str(FINAL_STEP))
  os.truncate(os.path.join(final, "progress", "metadata"), 100)
  if "best" in damaged:
    helpers.garble(
      _largest_file(os.path.join(workdir, checkpoint_lib.BEST, str(FINAL_STEP), "state"))
    )
  os.remove(os.path.join(workdir, train.RESULTS_FILE))
  results = train.train_and_evaluate(_config(), workdir, helpers.dataset())
  output = capsys.readouterr().out
  assert f"Resuming from step {FINAL_STEP - 2}" in output, output
  for slot in damaged:
    assert os.path.isdir(os.path.join(workdir, slot, f"{FINAL_STEP}.damaged")), slot
    assert os.path.isdir(os.path.join(workdir, slot, str(FINAL_STEP))), slot
  expected = _results(_finished_run())
  assert results["best_step"] == expected["best_step"] == FINAL_STEP
  assert results["test"] == expected["test"] and _results(workdir)["test"] == expected["test"]
  train.train_and_evaluate(_config(), workdir, helpers.dataset())
  assert "finished run found" in capsys.readouterr().out


def _state(value):
  return {"kernel": jnp.full((8, 4), float(value)), "step": jnp.asarray(value, jnp.int32)}


def _save_best(workdir, steps):
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), asynchronous=False)
  for step in steps:
    checkpointer.save(step, _state(step), {"best_step": step}, best=True)
  return checkpointer


def test_settle_best_keeps_the_recorded_best_and_drops_the_abandoned_one(tmp_path):
  checkpointer = _save_best(tmp_path, (4, 8))
  assert checkpointer.settle_best((6, _state(6)), {"best_step": 4}, _state(0))
  assert checkpointer.best_steps() == [4]


def test_settle_best_resaves_a_damaged_best_of_the_resumed_step(tmp_path):
  checkpointer = _save_best(tmp_path, (4, 6))
  helpers.garble(_largest_file(os.path.join(tmp_path, checkpoint_lib.BEST, "6", "state")))
  assert checkpointer.settle_best((6, _state(6)), {"best_step": 6}, _state(0))
  assert checkpointer.best_steps() == [4, 6]
  assert os.path.isdir(os.path.join(tmp_path, checkpoint_lib.BEST, "6.damaged"))
  state, _ = checkpointer.restore(_state(0), best=True)
  np.testing.assert_array_equal(state["kernel"], np.full((8, 4), 6.0))


def test_settle_best_reports_a_lost_best_and_empties_the_slot(tmp_path):
  checkpointer = _save_best(tmp_path, (2, 4))
  helpers.garble(_largest_file(os.path.join(tmp_path, checkpoint_lib.BEST, "4", "state")))
  assert not checkpointer.settle_best((6, _state(6)), {"best_step": 4}, _state(0))
  assert checkpointer.best_steps() == []


# ---------------------------------------------------------------------- 5. refused writes


def _refuse_writes(monkeypatch, directory, code, name):
  """Makes every write of a file whose path contains name, under directory, fail with
  OSError(code): the disk refusing a write, whoever runs the test (chmod does not stop root)."""
  path_type = type(epath.Path(directory))
  write_text = path_type.write_text

  def refusing(self, *args, **kwargs):
    path = os.fspath(self)
    if path.startswith(str(directory)) and name in path:
      raise OSError(code, os.strerror(code), path)
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(path_type, "write_text", refusing)


@pytest.mark.parametrize("asynchronous,code", [(False, errno.ENOSPC), (True, errno.EROFS)])
def test_a_refused_checkpoint_write_names_the_path_and_keeps_the_previous_one(
  tmp_path, monkeypatch, asynchronous, code
):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=asynchronous)
  for step in (1, 2):
    checkpointer.save(step, _state(step), {"step": step})
  checkpointer.wait_until_finished()
  _refuse_writes(monkeypatch, tmp_path, code, f"{os.sep}progress")
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as error:
    checkpointer.save(3, _state(3), {"step": 3})
    # An asynchronous save fails in the background: the next save (or a wait) reports it.
    checkpointer.save(4, _state(4), {"step": 4})
  message = str(error.value)
  assert f"could not write checkpoint step 3 in {tmp_path / checkpoint_lib.LATEST}" in message
  assert os.strerror(code) in message and "the previous checkpoint (step 2 in " in message
  checkpointer.close()
  monkeypatch.undo()
  state, progress = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False).restore(
    _state(0)
  )
  assert progress == {"step": 2} and int(state["step"]) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_checkpoint_directory_names_the_path(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False)
  checkpointer.save(1, _state(1), {"step": 1})
  os.chmod(tmp_path / checkpoint_lib.LATEST, 0o555)
  try:
    with pytest.raises(
      checkpoint_lib.CheckpointWriteError, match=r"step 2 .* \(step 1 in .*\) is intact"
    ):
      checkpointer.save(2, _state(2), {"step": 2})
  finally:
    os.chmod(tmp_path / checkpoint_lib.LATEST, 0o755)


def test_training_stops_on_a_refused_write_and_the_rerun_finishes(tmp_path, monkeypatch):
  """Asynchronous checkpoints (the default): the error surfaces at the next save, names the path;
  the workdir is unlocked and keeps the last good checkpoint, from which a rerun finishes."""
  workdir = tmp_path / "run"
  config = _config(async_checkpoints=True)
  real_save = checkpoint_lib.Checkpointer.save

  def save(self, step, state, progress, best=False):
    if step == 4:  # From the first evaluation on, the disk is full.
      # Step 2's background save ends first: the disk fills after it, not during it.
      self.wait_until_finished()
      # The commit marker is written last, so no write of the failed step is still going on
      # when the rerun (in this process) writes that step again.
      _refuse_writes(monkeypatch, workdir, errno.ENOSPC, "commit_success")
    return real_save(self, step, state, progress, best)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as error:
    train.train_and_evaluate(config, str(workdir), helpers.dataset())
  assert str(workdir) in str(error.value) and "No space left on device" in str(error.value)
  assert "the previous checkpoint (step 2 in " in str(error.value)
  assert runtime.is_user_error(error.value)
  monkeypatch.undo()
  workdir_lock.acquire(str(workdir)).close()
  results = train.train_and_evaluate(config, str(workdir), helpers.dataset())
  assert results["test"] == _results(_finished_run())["test"]


# ---------------------------------------------------------------------- 4. one run per workdir


def test_a_workdir_in_use_is_refused_at_once_and_released_after(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock.hold([workdir]):
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f"workdir {workdir} is in use by "):
      workdir_lock.acquire(workdir)
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f"process {os.getpid()} on "):
      train.train_and_evaluate(_config(), workdir, helpers.dataset())
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # Refused before anything.
  workdir_lock.acquire(workdir).close()


def test_the_lock_of_a_killed_process_is_released(tmp_path):
  workdir = str(tmp_path / "run")
  child = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time\n"
      "from mtl_jax.train import workdir_lock\n"
      "lock = workdir_lock.acquire(sys.argv[1])\n"
      "print('locked', flush=True)\n"
      "time.sleep(120)\n",
      workdir,
    ],
    cwd=helpers.ROOT,
    env=helpers.subprocess_environment(PYTHONPATH=helpers.ROOT),
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f"process {child.pid} on "):
      workdir_lock.acquire(workdir)
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
  workdir_lock.acquire(workdir).close()


# ------------------------------------------------------------------ 2 and 3. the command line


def _command(script, *arguments):
  return [sys.executable, os.path.join(helpers.ROOT, "experiments", script), *arguments]


def _train(workdir, *overrides):
  return _command(
    "train.py",
    "--config=configs/test.py",
    "--config.training.num_epochs=1",
    *overrides,
    f"--workdir={workdir}",
  )


def _command_line_cases(tmp_path):
  """(name, command, what the error line must contain): each a user mistake."""
  not_prepared = tmp_path / "tfds"
  not_prepared.mkdir()
  locked = str(tmp_path / "locked")
  return [
    (
      "unprepared dataset",
      _train(
        tmp_path / "a",
        "--config.dataset.name=cityscapes",
        f"--config.dataset.data_dir={not_prepared}",
      ),
      f"is not prepared in array_record format in {not_prepared}",
    ),
    ("height", _train(tmp_path / "b", "--config.dataset.height=3"), "config.dataset.height: "),
    (
      "batch larger than the split",
      _train(tmp_path / "c", "--config.training.batch_size=100000"),
      "config.training.batch_size: 100000 is larger than the training split",
    ),
    (
      "per-sample level under batch norm",
      _train(
        tmp_path / "d",
        "--config.method.name=upgrad",
        "--config.method.level=sample",
        "--config.model.norm=batch",
      ),
      "config.method.level: 'sample' needs per-sample gradients",
    ),
    (
      "unknown key",
      _train(tmp_path / "e", "--config.nonexistent=1"),
      "--config.nonexistent=1: config key config.nonexistent does not exist",
    ),
    (
      "level pixel with EW",
      _train(tmp_path / "f", "--config.method.level=pixel"),
      "config.method.level: unknown value 'pixel'",
    ),
    ("workdir in use", _train(locked), f"workdir {locked} is in use by process {os.getpid()}"),
    (
      "unknown key without --config (parsed at import)",
      _command("sweep.py", "--config.sweep.bogus=1", f"--workdir={tmp_path / 'g'}"),
      "--config.sweep.bogus=1: config key config.sweep.bogus does not exist",
    ),
    (
      "missing manual files",
      _command(
        "prepare_data.py",
        "--dataset=nyuv2",
        f"--manual_dir={tmp_path / 'none'}",
        f"--data_dir={not_prepared}",
      ),
      f"--manual_dir '{tmp_path / 'none'}' is not a directory",
    ),
  ]


def test_user_errors_exit_2_with_one_error_line_and_no_traceback(tmp_path):
  cases = _command_line_cases(tmp_path)
  environment = helpers.subprocess_environment()
  with workdir_lock.hold([str(tmp_path / "locked")]):
    # Started together: most of each one's time is importing, which overlaps.
    processes = [
      subprocess.Popen(
        command,
        cwd=helpers.ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for _, command, _ in cases
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
  for (name, _, expected), process, (_, stderr) in zip(cases, processes, outputs):
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert process.returncode == 2, (name, stderr[-3000:])
    assert len(errors) == 1 and expected in errors[0], (name, errors, stderr[-3000:])
    assert "Traceback" not in stderr, (name, stderr[-3000:])


def test_every_entry_point_runs_through_the_shared_error_handling():
  for name in sorted(os.listdir(os.path.join(helpers.ROOT, "experiments"))):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(helpers.ROOT, "experiments", name)) as file:
      source = file.read()
    assert source.rstrip().endswith('if __name__ == "__main__":\n  runtime.run(main)'), name
    assert "app.run(" not in source and "config_flags.DEFINE" not in source, name
