"""Shared pieces of the fault-injection tests: one small config, a reference run, a preempted run.

Runs are cached per test process, so the uninterrupted reference run (and the run stopped by a
signal) are trained once and compared against by test_preemption.py and test_checkpoint_faults.py.
"""

import contextlib
import functools
import io
import os
import shutil
import signal
import tempfile

import jax
import numpy as np
import pytest

from configs import test as test_config
from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import runtime
from mtl_jax.train import preemption
from mtl_jax import train
from mtl_jax.data import pipeline
from mtl_jax.data import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fault tests train the same small model many times, in this process and in subprocesses;
# the persistent compilation cache (shared through its environment variable) makes every run
# after the first skip XLA compilation.
COMPILATION_CACHE = runtime.enable_compilation_cache()


def subprocess_environment(**extra):
  """The environment for a training subprocess, sharing the compilation cache."""
  return {**os.environ, runtime.CACHE_VARIABLE: COMPILATION_CACHE or "", **extra}


EPOCHS = 6
# The in-process preempted run stops here (mid-epoch: steps_per_epoch is 4).
STOP_STEP = 10
# Overrides that both the in-process runs and the command-line runs use.
OVERRIDES = {"num_epochs": EPOCHS, "checkpoint_every_steps": 3, "log_every_steps": 4}


def fault_config():
  """The test config with OVERRIDES applied (unlocked copy, locked again)."""
  config = test_config.get_config()
  config.unlock()
  for key, value in OVERRIDES.items():
    config.training[key] = value
  return config.lock()


def command_line_flags():
  return ["--config=configs/test.py"] + [
    f"--config.training.{key}={value}" for key, value in OVERRIDES.items()
  ]


@functools.lru_cache(maxsize=None)
def dataset():
  return registry.load_dataset(fault_config().dataset)


def final_state(config, workdir):
  """The newest checkpointed train state of a run directory."""
  experiment = train.build_experiment(config, dataset())
  restored = checkpoint_lib.Checkpointer(workdir, asynchronous=False).restore(
    train.init_state(experiment, int(config.seed))
  )
  assert restored is not None, f"no checkpoint in {workdir}"
  return restored[0]


@functools.lru_cache(maxsize=None)
def _reference_workdir():
  workdir = os.path.join(tempfile.mkdtemp(prefix="mtl_reference_"), "run")
  train.train_and_evaluate(fault_config(), workdir, dataset())
  return workdir


def reference_state():
  """The final state of an uninterrupted run of fault_config() (trained once per process)."""
  return final_state(fault_config(), _reference_workdir())


def assert_same_state(left, right):
  assert int(left.step) == int(right.step) == EPOCHS * 4
  for (path, first), second in zip(
    jax.tree_util.tree_flatten_with_path(left)[0], jax.tree_util.tree_leaves(right)
  ):
    np.testing.assert_array_equal(
      np.asarray(first), np.asarray(second), err_msg=jax.tree_util.keystr(path)
    )


class SignallingSource:
  """Training data that sends this process a signal while the batch of one step is read."""

  def __init__(self, source, step, signum, batch_size=16, seed=0):
    self.source, self.step, self.signum, self.batch_size, self.seed = (
      source,
      step,
      signum,
      batch_size,
      seed,
    )

  def __len__(self):
    return len(self.source)

  def batch(self, indices):
    if np.array_equal(
      indices, pipeline.train_indices(len(self.source), self.batch_size, self.seed, self.step)
    ):
      os.kill(os.getpid(), self.signum)
    return self.source.batch(indices)


def signalling_dataset(step, signum):
  base = dataset()
  splits = dict(base.splits)
  splits["train"] = SignallingSource(base.splits["train"], step, signum)
  return registry.Dataset(base.name, splits, base.tasks, base.attribute_tasks, base.augment)


@functools.lru_cache(maxsize=None)
def _preempted_workdir():
  """(workdir, printed output) of the run stopped by SIGINT; trained once per process."""
  workdir = os.path.join(tempfile.mkdtemp(prefix="mtl_preempted_"), "run")
  printed = io.StringIO()
  # Captured here because whichever test asks first triggers the run, and the others still check
  # what it said.
  with contextlib.redirect_stdout(printed), pytest.raises(preemption.Preempted) as stopped:
    train.train_and_evaluate(fault_config(), workdir, signalling_dataset(STOP_STEP, signal.SIGINT))
  assert stopped.value.step == STOP_STEP and stopped.value.signal_name == "SIGINT"
  return workdir, printed.getvalue()


def preempted_run(destination):
  """A copy (at destination) of a run stopped by SIGINT after STOP_STEP steps; returns its path."""
  shutil.rmtree(destination, ignore_errors=True)
  shutil.copytree(_preempted_workdir()[0], destination)
  return destination


def preempted_output():
  """What the run behind preempted_run() printed while it was stopped."""
  return _preempted_workdir()[1]


def garble(path):
  """Flips 16 bytes in the middle of a file (a damaged checkpoint whose size is unchanged)."""
  with open(path, "r+b") as file:
    content = bytearray(file.read())
    middle = len(content) // 2
    content[middle : middle + 16] = bytes(byte ^ 0xFF for byte in content[middle : middle + 16])
    file.seek(0)
    file.write(content)
