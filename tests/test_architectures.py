"""The architectures beside hard sharing: training steps with every kind of method, their Gramians
against jacrev, the shared / task-specific split, and their config errors."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from mtl_jax import config_validation
from mtl_jax import gramian
from mtl_jax import models
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax import weighting
from mtl_jax.data import registry
from mtl_jax.models import architectures

NEW = tuple(name for name in architectures.ARCHITECTURES if name != "hps")
BATCH = 4
# Test-only: cheaper XLA compilation (compile time dominates these tiny steps on CPU).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SLOW = os.environ.get("MTL_JAX_SLOW_TESTS") == "1"
_SLOW_MARK = pytest.mark.skipif(not SLOW, reason="slow: set MTL_JAX_SLOW_TESTS=1")
# Each (method, architecture) pair compiles its own step (3-6 s cold on 2 CPU cores), so the
# default run trains each architecture once, with methods of the kinds whose step handles the
# architectures' feature pytrees itself: a Gramian weighting at a per-sample level (the fast
# path), GradDrop (feature space), AdaTask (per-task moments), SDMGrad (per-task gradients of
# batch parts) and Auto-Lambda (bilevel). The product of every registered method and every
# architecture runs with MTL_JAX_SLOW_TESTS=1.
DEFAULT_PAIRS = {
  ("mtan", "mgda"),
  ("mmoe", "auto_lambda"),
  ("cgc", "sdmgrad"),
  ("ple", "graddrop"),
  ("cross_stitch", "adatask"),
}
PAIRS = [
  pytest.param(
    architecture,
    method,
    marks=() if (architecture, method) in DEFAULT_PAIRS else _SLOW_MARK,
  )
  for architecture in architectures.ARCHITECTURES
  for method in weighting.method_names()
]


def _config(architecture, method="ew", level="task"):
  argument = f"method={method}" + (",optimizer=sgd,lr=0.01" if method == "mtl_io" else "")
  config = test_config.get_config(argument)
  config.unlock()
  config.training.batch_size = BATCH
  config.model.features = (4,)
  config.model.head_hidden_channels = 4
  config.model.architecture = architecture
  # Two experts make MMoE's gate a real choice; CGC and PLE gate over one shared and one own.
  config.model.num_experts = 2 if architecture == "mmoe" else 1
  config.model.num_levels = 2
  config.tasks = ("depth", "normals")
  config.method.level = level
  return config.lock()


@pytest.fixture(scope="module")
def dataset():
  return registry.load_dataset(_config("hps").dataset)


def _batch(experiment):
  return experiment.dataset.splits["train"].batch(np.arange(BATCH))


@pytest.mark.parametrize("architecture, method", PAIRS)
def test_a_training_step_of_every_method_on_every_architecture(architecture, method, dataset):
  # Gramian methods train at the per-sample level 'sample' where they can (the fast path inside
  # a step), the others at 'task'.
  config = _config(architecture, method)
  built = weighting.get(method, weighting.method_options(config, 1))
  if isinstance(built, weighting.GramianWeighting) and "sample" in built.levels:
    config = _config(architecture, method, "sample")
  level = config.method.level
  config_validation.validate_config(config, dataset, device_count=1)
  experiment = train.build_experiment(config, dataset)
  step = jax.jit(
    train.make_train_step(
      experiment.model, experiment.tasks, experiment.weighting, experiment.optimizer, level=level
    ),
    compiler_options=FAST_COMPILE,
  )
  initial = train.init_state(experiment, 0)
  state, metrics = step(initial, _batch(experiment))
  metrics = jax.device_get(metrics)
  assert int(state.step) == 1
  assert np.isfinite(metrics["loss"]) and np.all(np.isfinite(metrics["task_losses"]))
  assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
  for part in ("encoder", "heads"):
    moved = jax.tree_util.tree_map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params[part], initial.params[part]
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 0, f"{part} did not move"


def _rows(tree, leading: int) -> np.ndarray:
  """Leaves of a Jacobian pytree flattened after `leading` axes, side by side (float64)."""
  leaves = jax.tree_util.tree_leaves(tree)
  shape = np.shape(leaves[0])[:leading]
  return np.concatenate(
    [np.asarray(leaf, np.float64).reshape(*shape, -1) for leaf in leaves], axis=-1
  )


@pytest.mark.parametrize("architecture", NEW)
def test_gramian_of_every_architecture_matches_jacrev_of_the_task_losses(architecture, dataset):
  experiment = train.build_experiment(_config(architecture, "upgrad", "sample"), dataset)
  model, tasks = experiment.model, experiment.tasks
  state = train.init_state(experiment, 0)
  batch = _batch(experiment)
  weights = jnp.linspace(0.5, 2.0, BATCH)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def everything(params):
    def losses(params):  # [B, T], one full-batch forward: independent of the engine's passes.
      predictions = model.apply({"params": params}, batch["image"], train=True)
      return tasks_lib.losses_matrix(tasks, predictions, batch)

    task = gramian.compute(model, params, {}, batch, tasks, "task")
    fast = gramian.compute(model, params, {}, batch, tasks, "sample")
    return (
      task.gramian,
      fast.gramian,
      fast.gradient(weights)["encoder"],
      jax.jacrev(losses)(params),
    )

  task, fast, weighted, jacobian = everything(state.params)
  rows = _rows(jacobian["encoder"], 2)  # [B, T, P]: row (i, t) is ∇_encoder L_t(x_i).
  task_rows = rows.mean(axis=0)
  sample_rows = rows.sum(axis=1) / BATCH
  np.testing.assert_allclose(task, task_rows @ task_rows.T, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(fast, sample_rows @ sample_rows.T, rtol=1e-4, atol=1e-9)
  expected = np.asarray(weights, np.float64) @ sample_rows
  # Entries that vanish in exact arithmetic (a conv bias before group norm) are round-off.
  atol = 1e-5 * np.abs(expected).max()
  np.testing.assert_allclose(_rows(weighted, 0), expected, rtol=1e-4, atol=atol)

  # The split: head t's parameters reach L_t only; every encoder module reaches every task.
  heads = jacobian["heads"]
  for index, task_name in enumerate(t.name for t in tasks):
    per_task = np.abs(_rows(heads[task_name], 2)).sum(axis=(0, 2))
    assert per_task[index] > 0
    assert np.all(np.delete(per_task, index) == 0), f"heads[{task_name}] reaches another task"
  for name, module in jacobian["encoder"].items():
    per_task = np.abs(_rows(module, 2)).sum(axis=(0, 2))
    assert np.all(per_task > 0), f"encoder/{name} is not shared by every task: {per_task}"


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"model.architecture": "tower"}, "config.model.architecture: "),
    ({"model.architecture": "mtan", "model.encoder": "mlp"}, "config.model.architecture: 'mtan'"),
    (
      {"model.architecture": "cross_stitch", "model.encoder": "resnet18"},
      "config.model.architecture: 'cross_stitch'",
    ),
    ({"model.num_experts": 0}, "config.model.num_experts: "),
    ({"model.num_task_experts": -1}, "config.model.num_task_experts: "),
    ({"model.num_levels": 0}, "config.model.num_levels: "),
  ],
)
def test_architecture_config_errors_name_the_key(overrides, message):
  config = config_validation.with_overrides(test_config.get_config(), **overrides)
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate_config(config, device_count=1)
  lines = str(error.value).splitlines()
  assert any(line.startswith(message) for line in lines), lines


def test_the_model_builder_refuses_an_unsupported_encoder():
  config = test_config.get_config().model
  config.unlock()
  config.architecture, config.encoder = "mtan", "mlp"
  with pytest.raises(ValueError, match="model.architecture: 'mtan' is built on the encoders"):
    models.build_model(config, {"a": models.HeadSpec(1, False)})


def test_hps_is_hard_sharing_unchanged():
  config = test_config.get_config().model
  specs = {"depth": models.HeadSpec(1, True), "normals": models.HeadSpec(3, True)}
  model = models.build_model(config, specs)
  assert isinstance(model.encoder, models.SmallCNN) and not model.encoder.stage_outputs
  assert all(isinstance(head, models.DenseHead) for head in model.heads.values())
