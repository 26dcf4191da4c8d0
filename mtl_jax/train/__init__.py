"""Training: the train state, the steps of every kind of method, evaluation, and the one loop.

`train_and_evaluate(config, workdir)` trains one run; `train_group(configs, workdirs)` trains
runs that differ only in seed, learning rate and optimizer with one compiled program. Both are
the same loop (`loop.train_lanes`) over a lane strategy (`lanes`).
"""

from mtl_jax.train.guards import NonFiniteLossError
from mtl_jax.train.lanes import LANE_MODES
from mtl_jax.train.lanes import LanePrograms
from mtl_jax.train.lanes import default_lane_mode
from mtl_jax.train.lanes import first_training_batch
from mtl_jax.train.lanes import lane_programs
from mtl_jax.train.lanes import make_multi_train_step
from mtl_jax.train.lanes import stack_states
from mtl_jax.train.lanes import unstack_state
from mtl_jax.train.loop import train_and_evaluate
from mtl_jax.train.loop import train_group
from mtl_jax.train.preemption import PREEMPTED_EXIT_CODE
from mtl_jax.train.preemption import Preempted
from mtl_jax.train.preemption import PreemptionGuard
from mtl_jax.train.results import FAILED_FILE
from mtl_jax.train.results import RESULTS_FILE
from mtl_jax.train.results import write_failure
from mtl_jax.train.state import group_key
from mtl_jax.train.state import Experiment
from mtl_jax.train.state import TrainState
from mtl_jax.train.state import build_experiment
from mtl_jax.train.state import config_fingerprint
from mtl_jax.train.state import init_state
from mtl_jax.train.state import model_initializer
from mtl_jax.train.steps import make_eval_step
from mtl_jax.train.steps import make_train_step
from mtl_jax.train.timing import compiled_train_step
from mtl_jax.train.timing import interleaved_medians

__all__ = [
  "FAILED_FILE",
  "LANE_MODES",
  "NonFiniteLossError",
  "PREEMPTED_EXIT_CODE",
  "Preempted",
  "PreemptionGuard",
  "RESULTS_FILE",
  "Experiment",
  "LanePrograms",
  "TrainState",
  "build_experiment",
  "compiled_train_step",
  "config_fingerprint",
  "default_lane_mode",
  "first_training_batch",
  "group_key",
  "init_state",
  "interleaved_medians",
  "lane_programs",
  "make_eval_step",
  "make_multi_train_step",
  "make_train_step",
  "model_initializer",
  "stack_states",
  "train_and_evaluate",
  "train_group",
  "unstack_state",
  "write_failure",
]
