"""One training process per run directory: an OS advisory lock held while a run trains.

`hold(workdirs)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `<workdir>/.lock` for each run
directory and keeps it until the run ends; a second process asking for a directory in use fails
at once with `WorkdirInUseError`, naming the directory and the holder. The kernel releases the
lock when its process ends in any way, SIGKILL and crashes included, so a dead run never leaves a
directory locked (a pid file would). The file's text (pid, host, start time) only names the
holder in the message; the file itself stays, unlocked, after the run.

The processes of one multi-host job share their run directories: only process 0
(`jax.process_index() == 0`) takes the lock, and the others rely on it. flock locks are held per
open file, so a second `hold` of the same directory in one process is refused as well. On NFS,
Linux emulates flock with POSIX record locks, which the server keeps across clients.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from typing import Iterator, Sequence

import jax

LOCK_FILE = ".lock"


class WorkdirInUseError(RuntimeError):
  """Another process is training in this run directory; the message names it and the holder."""


def _holder(path: str) -> str:
  try:
    with open(path) as file:
      text = file.read().strip()
  except OSError:
    text = ""
  return text or "an unknown process"


def acquire(workdir: str):
  """Locks one run directory (created if needed); returns the open lock file, which holds the lock
  until it is closed.

  Raises:
    WorkdirInUseError: another process (or another `acquire` in this one) holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  # Kept open: the lock lives as long as this open file.
  file = open(path, "a+")
  try:
    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    file.close()
    raise WorkdirInUseError(
      f"workdir {workdir} is in use by {_holder(path)} (lock {path}); wait for that run to end, "
      "stop it, or choose another --workdir."
    ) from None
  file.seek(0)
  file.truncate()
  started = datetime.datetime.now().isoformat(timespec="seconds")
  file.write(f"process {os.getpid()} on {socket.gethostname()} since {started}\n")
  file.flush()
  return file


@contextlib.contextmanager
def hold(workdirs: Sequence[str]) -> Iterator[None]:
  """Holds the lock of every run directory in workdirs (process 0 only) for the block's duration.

  Raises:
    WorkdirInUseError: a directory is in use; the ones already taken are released.
  """
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      for workdir in workdirs:
        stack.enter_context(acquire(workdir))
    yield
