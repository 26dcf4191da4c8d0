"""Multi-process runs for real: 2 JAX processes x 4 emulated CPU devices on 127.0.0.1, through the
real entry points, each against 1 process x 8 devices.

What runs (every process a subprocess with its own log file and process group, killed as a group
when its deadline passes, so the suite cannot hang; the persistent compilation cache is shared
through MTL_JAX_COMPILATION_CACHE):
* the cases of tests/multiprocess_worker.py (EW; PCGrad at level 'sample_task' with the conflict
  probe on), once on 2 processes and once on 1 process with 8 devices, side by side;
* an interrupted 2-process run of experiments/train.py (the EW case): SIGTERM to process 1 only
  (both stop at one step, save it, exit 75), a relaunch, SIGKILL to process 1 (process 0 names it
  and exits 5 within the peer timeout), a relaunch to the end, compared with the uninterrupted
  EW case;
* a 2-process sweep (experiments/sweep.py on configs/sweep_test.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mtl_jax import checkpoint as checkpoint_lib
from mtl_jax import parallel
from mtl_jax import train
from mtl_jax.data import registry
from tests import multiprocess_worker as worker
from tests import reliability_helpers

RELATIVE_TOLERANCE = 1e-5
PROCESSES, LOCAL_DEVICES = 2, 4
# Hard wall-clock bound of one job (all its processes); generous for a loaded 2-core machine.
JOB_DEADLINE_S = 420
# Process 0 must name a killed peer within the peer timeout plus one check interval; the margin
# covers scheduling delays on a loaded machine.
LOST_PEER_BOUND_S = worker.PEER_TIMEOUT_SECONDS + parallel.PEER_CHECK_INTERVAL_SECONDS + 15
_PORT_TAKEN = "Failed to start RPC server"


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


_JOBS: list["Job"] = []


@pytest.fixture(scope="module", autouse=True)
def _kill_leftover_processes():
  """Whatever a failed or interrupted test left running is killed with the module."""
  yield
  for job in _JOBS:
    job.kill()


class Job:
  """The processes of one launch: logs in files (no pipe can fill up), one process group each.

  `commands(port)` gives each process's arguments; a job whose process 0 could not bind the port
  (taken between `_free_port` and the bind) is restarted once on a new one.
  """

  def __init__(self, name: str, directory: str, commands, devices: int):
    self.name, self.directory, self.commands, self.devices = name, directory, commands, devices
    self.deadline = time.monotonic() + JOB_DEADLINE_S
    self.restarted = False
    _JOBS.append(self)
    self._start()

  def _start(self) -> None:
    environment = reliability_helpers.subprocess_environment(
      JAX_PLATFORMS="cpu",
      PYTHONUNBUFFERED="1",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={self.devices}",
    )
    self.logs = [os.path.join(self.directory, f"{self.name}_p{index}.log") for index in range(2)]
    self.processes = []
    for index, command in enumerate(self.commands(_free_port())):
      with open(self.logs[index], "w") as log:
        self.processes.append(
          subprocess.Popen(
            [sys.executable, *command],
            cwd=worker.ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
          )
        )

  def output(self, index: int = 0) -> str:
    with open(self.logs[index]) as log:
      return log.read()

  def _restart_if_port_taken(self) -> bool:
    first = self.processes[0]
    if self.restarted or first.poll() in (None, 0) or _PORT_TAKEN not in self.output(0):
      return False
    self.kill()
    self.restarted = True
    self._start()
    return True

  def wait_for(self, pattern: str, index: int = 0) -> re.Match:
    """Waits until process `index` prints a line matching `pattern`; fails if the job ends or
    its deadline passes first."""
    while time.monotonic() < self.deadline:
      found = re.search(pattern, self.output(index))
      if found:
        return found
      if self._restart_if_port_taken():
        continue
      if any(process.poll() is not None for process in self.processes):
        break
      time.sleep(0.1)
    self.kill()
    pytest.fail(f"{self.name}: no line matching {pattern!r} from process {index}.\n{self.tail()}")

  def wait(self, seconds: float | None = None) -> list[int | None]:
    """Exit statuses once every process ended, or None for those still running at the deadline
    (or after `seconds`), which are killed."""
    deadline = self.deadline if seconds is None else min(self.deadline, time.monotonic() + seconds)
    while time.monotonic() < deadline:
      if self._restart_if_port_taken():
        continue
      if all(process.poll() is not None for process in self.processes):
        break
      time.sleep(0.1)
    codes = [process.poll() for process in self.processes]
    self.kill()
    return codes

  def wait_for_exit(self, index: int, seconds: float) -> tuple[int | None, float]:
    """(exit status or None, seconds waited) of process `index`, waiting at most `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds and self.processes[index].poll() is None:
      time.sleep(0.05)
    return self.processes[index].poll(), time.monotonic() - start

  def signal(self, index: int, signum: int) -> None:
    os.kill(self.processes[index].pid, signum)

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
      process.wait()

  def tail(self) -> str:
    return "\n".join(
      f"--- {self.logs[index]}:\n" + _without_noise(self.output(index))[-4000:]
      for index in range(len(self.processes))
    )


def _without_noise(text: str) -> str:
  return "\n".join(line for line in text.splitlines() if not line.startswith("[Gloo]"))


def _connection_flags(process_id: int, port: int) -> list[str]:
  return worker.command_line_flags(worker.connection(PROCESSES, process_id, port))


def _worker_job(name: str, directory: str, processes: int) -> Job:
  def commands(port):
    script = os.path.join("tests", "multiprocess_worker.py")
    root = os.path.join(directory, name)
    return [
      [script, root, str(processes), str(index), str(port), *worker.CASES]
      for index in range(processes)
    ]

  return Job(name, directory, commands, PROCESSES * LOCAL_DEVICES // processes)


def _train_job(name: str, directory: str, workdir: str) -> Job:
  """The EW case through experiments/train.py on 2 processes."""
  case = worker.command_line_flags({**worker.COMMON, **worker.CASES["ew"]})

  def commands(port):
    return [
      [
        os.path.join("experiments", "train.py"),
        "--config=configs/test.py",
        f"--workdir={workdir}",
        *case,
        *_connection_flags(index, port),
      ]
      for index in range(PROCESSES)
    ]

  return Job(name, directory, commands, LOCAL_DEVICES)


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("multiprocess"))


@pytest.fixture(scope="module")
def cases(directory):
  """The worker's cases trained on 2 processes x 4 devices and on 1 process x 8, side by side;
  returns {'two': root, 'one': root}."""
  two = _worker_job("two", directory, PROCESSES)
  one = _worker_job("one", directory, 1)
  codes = {"two": two.wait(), "one": one.wait()}
  for name, job in (("two", two), ("one", one)):
    assert all(code == 0 for code in codes[name]), f"{name}: exit {codes[name]}\n{job.tail()}"
  return {name: os.path.join(directory, name) for name in ("two", "one")}


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, train.RESULTS_FILE)) as file:
    return json.load(file)


def _experiment_and_start(case: str):
  config = worker.case_config(case, 1, 0, 0)
  experiment = train.build_experiment(config, registry.load_dataset(config.dataset))
  return experiment, train.init_state(experiment, int(config.seed))


def _trained_parameters(case: str, workdir: str):
  """The parameters of a run's latest checkpoint, restored on this (one-device) process."""
  _, target = _experiment_and_start(case)
  restored = checkpoint_lib.Checkpointer(workdir, asynchronous=False).restore(target)
  assert restored is not None, f"no checkpoint in {workdir}"
  return restored[0].params


def _relative_difference(left, right) -> float:
  """max |a - b| / max |b| over all leaves of two pytrees together (per-leaf ratios would be
  meaningless for leaves whose exact value is 0)."""
  difference, scale = 0.0, 1e-30
  for first, second in zip(jax.tree_util.tree_leaves(left), jax.tree_util.tree_leaves(right)):
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    difference = max(difference, float(np.max(np.abs(first - second), initial=0.0)))
    scale = max(scale, float(np.max(np.abs(second), initial=0.0)))
  return difference / scale


def _change(case: str, workdir: str):
  """What training changed: trained minus initial parameters."""
  _, start = _experiment_and_start(case)
  return jax.tree_util.tree_map(np.subtract, _trained_parameters(case, workdir), start.params)


def _assert_metrics_close(left: dict, right: dict, tolerance: float) -> None:
  assert left.keys() == right.keys()
  for key in left:
    assert abs(left[key] - right[key]) <= tolerance * max(abs(right[key]), 1e-12), (
      key,
      left[key],
      right[key],
    )


@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_processes_train_as_one_process_with_eight_devices(cases, case):
  two, one = os.path.join(cases["two"], case), os.path.join(cases["one"], case)
  _assert_metrics_close(_results(two)["test"], _results(one)["test"], RELATIVE_TOLERANCE)
  # The parameter change, not the parameters: a wrong gradient shows at its own scale.
  difference = _relative_difference(_change(case, two), _change(case, one))
  assert difference <= RELATIVE_TOLERANCE, difference
  if "conflicts.probe_every_steps" in worker.CASES[case]:
    with open(os.path.join(two, "conflicts.jsonl")) as file:
      two_records = [json.loads(line) for line in file]
    with open(os.path.join(one, "conflicts.jsonl")) as file:
      one_records = [json.loads(line) for line in file]
    assert [record["epoch"] for record in two_records] == [1, 2]
    cosine = [record["inter_task"]["cosine"]["mean"] for record in two_records]
    reference = [record["inter_task"]["cosine"]["mean"] for record in one_records]
    np.testing.assert_allclose(cosine, reference, rtol=RELATIVE_TOLERANCE, atol=1e-6)


def test_files_are_written_once_into_the_shared_workdir(cases, directory):
  for case in worker.CASES:
    workdir = os.path.join(cases["two"], case)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
      records = [json.loads(line) for line in file]
    logged = [(record["step"], tuple(sorted(record))) for record in records]
    assert len(logged) == len(set(logged)), f"{case}: a metrics record written twice"
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert _results(workdir)["best_step"] is not None
    # One checkpoint set, to which both processes contributed their shards.
    latest = os.path.join(workdir, checkpoint_lib.LATEST)
    steps = sorted(int(name) for name in os.listdir(latest) if name.isdigit())
    assert steps[-1] == worker.STEPS, steps
    shards = os.listdir(os.path.join(latest, str(steps[-1]), "state", "array_metadatas"))
    assert sorted(shards) == ["process_0", "process_1"]
  # Process 1 prints nothing of its own: no status lines, no results table.
  with open(os.path.join(directory, "two_p1.log")) as log:
    printed = _without_noise(log.read())
  assert "training SmallCNN" not in printed and "Results" not in printed, printed[-2000:]


def _checkpoint_steps(workdir: str) -> list[int]:
  """The finalized steps in a run's latest-checkpoint directory."""
  latest = os.path.join(workdir, checkpoint_lib.LATEST)
  return sorted(int(name) for name in os.listdir(latest) if name.isdigit())


def _saved_by(workdir: str, step: int) -> list[str]:
  """The processes whose shards the checkpoint of `step` holds."""
  path = os.path.join(workdir, checkpoint_lib.LATEST, str(step), "state", "array_metadatas")
  return sorted(os.listdir(path))


def _sigterm_phase(directory: str, workdir: str) -> dict:
  """SIGTERM to process 1 only, once process 0 has logged step 2."""
  job = _train_job("sigterm", directory, workdir)
  job.wait_for(rf"step 2/{worker.STEPS}")
  job.signal(1, signal.SIGTERM)
  codes = job.wait()
  stopped = re.search(rf"stopped by SIGTERM after (\d+) of {worker.STEPS} steps", job.output(0))
  step = int(stopped.group(1)) if stopped else None
  saved = _saved_by(workdir, step) if step in _checkpoint_steps(workdir) else []
  notified = "SIGTERM caught" in job.output(1)
  return dict(codes=codes, step=step, saved_by=saved, notified=notified, log=job.tail())


def _sigkill_phase(directory: str, workdir: str) -> dict:
  """A relaunch; SIGKILL to process 1 once process 0 logs a step after the one it resumed at."""
  job = _train_job("sigkill", directory, workdir)
  found = job.wait_for(rf"Resuming from step (\d+)[\s\S]*?step (\d+)/{worker.STEPS}")
  job.signal(1, signal.SIGKILL)
  code, seconds = job.wait_for_exit(0, LOST_PEER_BOUND_S + 30)
  codes = [code, job.wait(5)[1]]
  return dict(
    resumed=int(found.group(1)),
    killed_after=int(found.group(2)),
    codes=codes,
    seconds=seconds,
    output=job.output(0),
    complete=_checkpoint_steps(workdir),
    log=job.tail(),
  )


def _final_phase(directory: str, workdir: str) -> dict:
  job = _train_job("final", directory, workdir)
  codes = job.wait()
  resumed = re.search(r"Resuming from step (\d+)", job.output(0))
  return dict(codes=codes, resumed=int(resumed.group(1)) if resumed else None, log=job.tail())


@pytest.fixture(scope="module")
def interrupted(directory):
  """The EW case through experiments/train.py on 2 processes, stopped by SIGTERM, relaunched,
  stopped by SIGKILL, relaunched to the end: {phase: what happened}, and the workdir."""
  workdir = os.path.join(directory, "interrupted")
  phases = {"sigterm": _sigterm_phase(directory, workdir)}
  assert phases["sigterm"]["codes"] == [75, 75], phases["sigterm"]["log"]
  phases["sigkill"] = _sigkill_phase(directory, workdir)
  phases["final"] = _final_phase(directory, workdir)
  return phases, workdir


def test_sigterm_to_one_process_stops_both_at_one_saved_step(interrupted):
  sigterm = interrupted[0]["sigterm"]
  assert sigterm["notified"], sigterm["log"]
  # Mid-run: after the step that was logged, before the end.
  assert sigterm["step"] is not None and 2 <= sigterm["step"] < worker.STEPS, sigterm["log"]
  # Orbax's save is collective: both processes wrote their shards of that one step.
  assert sigterm["saved_by"] == ["process_0", "process_1"], sigterm["log"]


def test_sigkill_names_the_lost_process_within_the_peer_timeout(interrupted):
  sigkill = interrupted[0]["sigkill"]
  assert sigkill["codes"] == [parallel.LOST_PEER_EXIT_CODE, -signal.SIGKILL], sigkill["log"]
  assert "error: lost process 1 of 2" in sigkill["output"], sigkill["log"]
  # The failed collective waits for the liveness check's verdict: no traceback, no abort.
  assert "Traceback" not in sigkill["output"], sigkill["log"]
  assert sigkill["seconds"] <= LOST_PEER_BOUND_S, sigkill["seconds"]
  assert sigkill["resumed"] == interrupted[0]["sigterm"]["step"]


def test_relaunch_resumes_from_the_last_complete_checkpoint_exactly(interrupted, cases):
  phases, workdir = interrupted
  assert phases["final"]["codes"] == [0, 0], phases["final"]["log"]
  assert phases["final"]["resumed"] == phases["sigkill"]["complete"][-1], phases["final"]["log"]
  uninterrupted = os.path.join(cases["two"], "ew")
  assert _results(workdir)["test"] == _results(uninterrupted)["test"]
  difference = _relative_difference(
    _trained_parameters("ew", workdir), _trained_parameters("ew", uninterrupted)
  )
  assert difference == 0.0, difference


def test_sweep_splits_each_run_across_two_processes(directory):
  workdir = os.path.join(directory, "sweep")

  def commands(port):
    return [
      [
        os.path.join("experiments", "sweep.py"),
        "--config=configs/sweep_test.py",
        f"--workdir={workdir}",
        *_connection_flags(index, port),
      ]
      for index in range(PROCESSES)
    ]

  job = Job("sweep", directory, commands, LOCAL_DEVICES)
  codes = job.wait()
  assert codes == [0, 0], job.tail()
  printed = job.output(0)
  assert "runs train one by one" in printed
  assert printed.count("batch split over 8 devices in 2 processes") == 3, job.tail()
  with open(os.path.join(workdir, "sweep.json")) as file:
    index = json.load(file)
  assert [entry["status"] for entry in index] == ["finished"] * 3, index
  for name in ("sweep.csv", "delta_m.md", "metrics.md", "pareto.md"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert "|" not in _without_noise(job.output(1)), "process 1 printed the tables too"


# Every library module an entry point imports before `runtime.setup` connects the processes.
_IMPORTED_BEFORE_SETUP = "mtl_jax.runtime, mtl_jax.train, mtl_jax.studies.reproduce"


def test_importing_the_library_starts_no_jax_backend():
  # jax.distributed.initialize must come before any backend starts; a JAX array made at import
  # (a module-level jnp constant) would start one and break every multi-process run.
  program = (
    "import jax._src.xla_bridge as bridge\n"
    "def started(*arguments, **keywords):\n"
    "  raise SystemExit('a JAX backend started while importing the library')\n"
    "bridge.backends = started\n"
    f"import {_IMPORTED_BEFORE_SETUP}\n"
  )
  process = subprocess.run(
    [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
  )
  assert process.returncode == 0, process.stderr[-4000:]


# Both processes connect and run a few liveness checks; process 0 stays a little longer, so its
# check is blocked in a barrier that process 1 will never reach when JAX's exit handler shuts the
# distributed client down under it. From then on JAX must not be asked anything from the check's
# thread (it would start a new backend against a stopped coordinator and abort the process), so
# here any such call from another thread ends the process with status 3.
_LEAVE_WHILE_CHECKING = """
import sys, threading, time
sys.path.insert(0, {root!r})
import jax
from mtl_jax import parallel, config_validation
from configs import test as test_config
from tests import multiprocess_worker as worker
process_id, port = int(sys.argv[1]), int(sys.argv[2])
config = config_validation.with_overrides(
  test_config.get_config(), **worker.connection(2, process_id, port)
)
parallel.initialize_distributed(config)

def main_thread_only(function):
  def guarded(*arguments, **keywords):
    if threading.current_thread() is not threading.main_thread():
      print(f"{{function.__name__}} called from {{threading.current_thread().name}}", flush=True)
      import os; os._exit(3)
    return function(*arguments, **keywords)
  return guarded

jax.process_count = main_thread_only(jax.process_count)
jax.process_index = main_thread_only(jax.process_index)
time.sleep((3 + 2 * (process_id == 0)) * parallel.PEER_CHECK_INTERVAL_SECONDS)
print("leaving", flush=True)
"""


def test_the_liveness_check_never_asks_jax_so_a_normal_exit_is_clean(directory):
  program = _LEAVE_WHILE_CHECKING.format(root=worker.ROOT)

  def commands(port):
    return [["-c", program, str(index), str(port)] for index in range(PROCESSES)]

  job = Job("leave", directory, commands, LOCAL_DEVICES)
  codes = job.wait(seconds=120)
  assert codes == [0, 0], job.tail()
  assert "leaving" in job.output(0) and "leaving" in job.output(1)
