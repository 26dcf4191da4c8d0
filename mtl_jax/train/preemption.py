"""Preemption-safe stopping: SIGTERM/SIGINT set a flag that the training loop checks between steps.

A preempted TPU VM, a batch scheduler (Slurm, Kubernetes) or a user pressing Ctrl-C sends
SIGTERM or SIGINT. Killing training mid-step, or mid-checkpoint, would lose everything since the
last checkpoint; instead `PreemptionGuard` turns the signal into a flag, and the loop in
`mtl_jax.train` finishes the current step, writes a checkpoint of exactly that step, waits for
asynchronous saves to land, prints where it stopped, and raises `Preempted`.
`experiments/train.py` maps that exception to exit status `PREEMPTED_EXIT_CODE` (75,
EX_TEMPFAIL: "try again later"), so a job script can tell "preempted, resubmit" from success (0)
and from failure (anything else). Re-running the same command resumes at that step exactly.

A second SIGINT (Ctrl-C pressed twice) raises KeyboardInterrupt at once, for a user who does
not want to wait for the step and the checkpoint.

Reuse in a sweep (or any driver of several runs):

    with preemption.PreemptionGuard() as guard:
      for config, workdir in runs:
        if guard.requested:          # between runs: stop before starting the next one
          raise preemption.Preempted(...)
        train.train_and_evaluate(config, workdir, dataset, preemption=guard)  # within a run

One guard spans the whole sweep, so a signal that arrives between runs, or during a run's final
evaluation, is not lost; finished runs keep their results.json and are skipped on the rerun,
and the interrupted run resumes from its checkpoint. Guards nest: an inner guard hands a
received signal on to the enclosing one when it exits.

Multi-host TPU: every host must stop at the same step, or the collective checkpoint save
hangs. With more than one JAX process the guard therefore does not decide from its local flag;
`should_stop(step)` asks `jax.experimental.multihost_utils.reached_preemption_sync_point(step)`,
which JAX's preemption service (started by `jax.distributed.initialize`, notified of SIGTERM by
the runtime) answers identically on every host. Orbax's `CheckpointManager.reached_preemption`
is a thin wrapper around the same call; we call it directly because our Checkpointer holds two
managers and the decision belongs to the loop, not to one of them. In that mode only SIGINT is
handled here, so the runtime's own SIGTERM notifier is left in place.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: the job did not fail, it should be retried.
PREEMPTED_EXIT_CODE = 75

_ACTIVE: list["PreemptionGuard"] = []


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint; rerunning the command resumes it.

  Attributes:
    step: the step the run stopped at (the checkpoint holds the state after `step` steps).
    workdir: the run directory.
    signal_name: the signal received, e.g. 'SIGTERM'.
  """

  def __init__(
    self,
    message: str,
    step: int | None = None,
    workdir: str | None = None,
    signal_name: str | None = None,
  ):
    super().__init__(message)
    self.step, self.workdir, self.signal_name = step, workdir, signal_name


class PreemptionGuard:
  """Context manager that records SIGTERM/SIGINT instead of dying; check `requested` or
  `should_stop`.

  Handlers can only be installed from the main thread; elsewhere the guard still works as a flag
  that `request()` sets (used by tests and by drivers that receive the signal themselves).
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self.signal_name: str | None = None

  @property
  def requested(self) -> bool:
    """True once a stop signal has been received (locally)."""
    return self.signal_name is not None

  def request(self, signal_name: str = "request") -> None:
    """Marks the guard as stopped, as a signal would."""
    if self.signal_name is None:
      self.signal_name = signal_name

  def should_stop(self, step: int) -> bool:
    """Whether the loop should checkpoint and stop now; all hosts agree in multi-host runs.

    Args:
      step: the number of steps completed; every host must call this with the same steps.
    """
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.request("SIGTERM")
          return True
      except RuntimeError:
        # The preemption service is off (jax.distributed not initialised with it); a local
        # flag would let hosts disagree, so SIGINT alone cannot stop a multi-host run.
        pass
      return False
    return self.requested

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
    self.request(name)
    # The loop prints a line when it stops; this one says the signal arrived at all.
    logging.warning(
      "Received %s: finishing the current step, then saving a checkpoint and exiting.", name
    )

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      signals = self._signals
      if jax.process_count() > 1:
        signals = tuple(value for value in signals if value != signal.SIGTERM)
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    _ACTIVE.append(self)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
    _ACTIVE.remove(self)
    if self.requested and _ACTIVE:
      _ACTIVE[-1].request(self.signal_name)


def active_guard() -> PreemptionGuard | None:
  """The innermost guard currently entered in this process, if any."""
  return _ACTIVE[-1] if _ACTIVE else None
