"""One process of tests/test_multiprocess.py: trains named cases one after another with the set-up
of experiments/train.py (`runtime.setup`, then `train.train_and_evaluate` for each case).

  python tests/multiprocess_worker.py ROOT NUM_PROCESSES PROCESS_ID PORT CASE [CASE ...]

With NUM_PROCESSES 1 no coordinator is started (the one-process reference; its device count comes
from XLA_FLAGS). Case c trains in ROOT/c. The same case settings, as command-line flags, drive
experiments/train.py and experiments/sweep.py in the tests (`command_line_flags`).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import test as test_config  # noqa: E402
from mtl_jax import config_validation  # noqa: E402
from mtl_jax import parallel  # noqa: E402
from mtl_jax import runtime  # noqa: E402
from mtl_jax import train  # noqa: E402

# 2 epochs of 4 steps (configs/test.py: 64 examples in batches of 16): a signal sent once step 2
# is logged stops the run at step 3 (the first steps, which load the programs, take seconds
# each), so the relaunch that gets SIGKILL still has steps to log. SGD, not Adam:
# Adam turns the round-off (different on 8 devices than on one) of the conv biases before group
# norm, whose exact gradient is zero, into updates of up to its learning rate, and its
# normalisation would hide a gradient counted once per process.
COMMON = {"training.num_epochs": 2, "optimizer.name": "sgd", "optimizer.learning_rate": 0.1}
STEPS = 8
# A Gramian method at level 'sample_task' with the conflict probe on: one run covers both (the
# shard_map Gramian in the step and the probe's full Gramian on the mesh).
CASES = {
  "ew": {},
  "gramian_probe": {
    "method.name": "pcgrad",
    "method.level": "sample_task",
    "conflicts.probe_every_steps": 2,
  },
}
# Small bounds so that a lost process is named within PEER_TIMEOUT_SECONDS + 1 s and nothing waits
# for minutes; the heartbeat (the runtime's abort) stays behind the liveness check, also behind
# the slack test_multiprocess allows it on a loaded machine (LOST_PEER_BOUND_S, 26 s): at 20 s the
# runtime once aborted process 0 before the check had named the lost one (a full suite run).
PEER_TIMEOUT_SECONDS = 10
TIMEOUTS = {
  "sharding.initialization_timeout_seconds": 60,
  "sharding.heartbeat_timeout_seconds": 40,
  "sharding.shutdown_timeout_seconds": 10,
  "sharding.peer_timeout_seconds": PEER_TIMEOUT_SECONDS,
}


def connection(num_processes: int, process_id: int, port: int) -> dict:
  if num_processes == 1:
    return {}
  return {
    "sharding.coordinator_address": f"127.0.0.1:{port}",
    "sharding.num_processes": num_processes,
    "sharding.process_id": process_id,
    **TIMEOUTS,
  }


def overrides(case: str, num_processes: int, process_id: int, port: int) -> dict:
  return {**COMMON, **CASES[case], **connection(num_processes, process_id, port)}


def case_config(case: str, num_processes: int, process_id: int, port: int):
  values = overrides(case, num_processes, process_id, port)
  return config_validation.with_overrides(test_config.get_config(), **values)


def command_line_flags(values: dict) -> list[str]:
  """--config.<key>=<value> flags for an absl entry point."""
  return [f"--config.{key}={value}" for key, value in values.items()]


def main(argv):
  root, num_processes, process_id, port, *cases = argv[1:]
  num_processes, process_id, port = int(num_processes), int(process_id), int(port)
  configs = [case_config(case, num_processes, process_id, port) for case in cases]
  try:
    runtime.setup(configs[0])
    for case, config in zip(cases, configs):
      train.train_and_evaluate(config, os.path.join(root, case))
  except parallel.LostPeerError as error:
    parallel.exit_lost_peer(error)
  except Exception:
    parallel.exit_if_peer_lost()
    raise
  print(f"worker {process_id} done", flush=True)


if __name__ == "__main__":
  main(sys.argv)
