"""Preemption: SIGTERM/SIGINT finish the step, checkpoint it, exit with status 75; rerunning resumes
exactly."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax.train import preemption
from mtl_jax import train
from tests import reliability_helpers as helpers


def test_guard_turns_signals_into_a_flag_and_restores_the_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as outer:
    with preemption.PreemptionGuard() as inner:
      assert preemption.active_guard() is inner
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)
      assert inner.requested and inner.signal_name == "SIGTERM" and inner.should_stop(0)
      assert not outer.requested
    # A sweep's guard learns of a signal that a run's own guard received.
    assert outer.requested and outer.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before
  assert preemption.active_guard() is None
  with preemption.PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert guard.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C does not wait for the step
      time.sleep(0.05)


def test_signal_mid_run_checkpoints_that_step_and_resume_equals_uninterrupted(tmp_path, capsys):
  workdir = helpers.preempted_run(str(tmp_path / "run"))
  assert "stopped by SIGINT after 10 of 24 steps" in helpers.preempted_output()
  checkpointer = checkpoint_lib.Checkpointer(workdir, asynchronous=False)
  assert checkpointer.latest_step() == helpers.STOP_STEP
  assert not os.path.exists(os.path.join(workdir, train.RESULTS_FILE))
  assert not checkpoint_lib.partial_checkpoints(os.path.join(workdir, checkpoint_lib.LATEST))
  train.train_and_evaluate(helpers.fault_config(), workdir, helpers.dataset())
  assert f"Resuming from step {helpers.STOP_STEP}" in capsys.readouterr().out
  helpers.assert_same_state(
    helpers.final_state(helpers.fault_config(), workdir), helpers.reference_state()
  )


def test_sigterm_to_the_command_exits_75_and_the_same_command_resumes_exactly(tmp_path):
  workdir = tmp_path / "run"
  command = [
    sys.executable,
    os.path.join(helpers.ROOT, "experiments", "train.py"),
    *helpers.command_line_flags(),
    f"--workdir={workdir}",
  ]
  environment = helpers.subprocess_environment()
  process = subprocess.Popen(
    command,
    cwd=helpers.ROOT,
    env=environment,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  checkpoints = workdir / checkpoint_lib.LATEST
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(name.isdigit() for name in os.listdir(checkpoints)):
      break
    time.sleep(0.01)
  assert process.poll() is None, (
    "training finished before the signal could be sent:\n" + process.stdout.read()
  )
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=240)[0]
  assert process.returncode == preemption.PREEMPTED_EXIT_CODE, output[-3000:]
  stopped_line = next(line for line in output.splitlines() if "stopped by SIGTERM" in line)
  step = int(stopped_line.split("after ")[1].split(" of")[0])
  assert 0 < step < helpers.EPOCHS * 4
  assert checkpoint_lib.Checkpointer(str(workdir), asynchronous=False).latest_step() == step
  resumed = subprocess.run(
    command, cwd=helpers.ROOT, env=environment, capture_output=True, text=True, timeout=240
  )
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
  assert f"Resuming from step {step}" in resumed.stdout
  helpers.assert_same_state(
    helpers.final_state(helpers.fault_config(), str(workdir)), helpers.reference_state()
  )
