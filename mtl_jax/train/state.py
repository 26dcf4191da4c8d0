"""What a run is made of: the train state pytree and the experiment's static pieces, built from a
config."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtl_jax import config_validation
from mtl_jax import optim
from mtl_jax import models as models_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import labels
from mtl_jax.data import pipeline
from mtl_jax.data import registry as data_registry
from mtl_jax.data import validation as data_validation


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  weighting_params: Any
  weighting_state: Any
  opt_state: Any
  rng: jax.Array

  @property
  def trainable(self) -> dict[str, Any]:
    """The pytree the optimizer updates: model parameters and weighting parameters."""
    return {"model": self.params, "weighting": self.weighting_params}

  def apply_gradients(
    self,
    optimizer: optax.GradientTransformation,
    grads: Any,
    batch_stats: Any,
    weighting_state: Any,
    rng: jax.Array,
    **update_args: Any,
  ) -> "TrainState":
    """The state after one optimizer update of `trainable` with `grads` (same tree);
    `update_args` go to the optimizer's update (an optax GradientTransformationExtraArgs)."""
    updates, opt_state = optimizer.update(grads, self.opt_state, self.trainable, **update_args)
    trainable = optax.apply_updates(self.trainable, updates)
    return self.replace(
      step=self.step + 1,
      params=trainable["model"],
      batch_stats=batch_stats,
      weighting_params=trainable["weighting"],
      weighting_state=weighting_state,
      opt_state=opt_state,
      rng=rng,
    )


@dataclasses.dataclass
class Experiment:
  """The static pieces of a run, built once from the config."""

  config: ml_collections.ConfigDict
  dataset: data_registry.Dataset
  tasks: list[tasks_lib.Task]
  model: models_lib.MultiTaskModel
  weighting: weighting_lib.Method
  optimizer: optax.GradientTransformation
  steps_per_epoch: int
  total_steps: int
  # The compiled `(model variables, seed) -> initial state` program, built on first use by
  # `init_state`.
  initializer: Callable[[Any, jax.Array], "TrainState"] | None = None
  # The optimizers of a group whose runs differ in `config.optimizer.name`, in the order of
  # their `choice` (`build_group_experiment`); empty for one optimizer.
  optimizer_names: tuple[str, ...] = ()

  @property
  def task_names(self) -> list[str]:
    return [task.name for task in self.tasks]

  @property
  def input_shape(self) -> tuple[int, ...]:
    example = self.dataset.splits["train"].batch(np.arange(1))["image"]
    return tuple(example.shape[1:])

  @property
  def level(self) -> str:
    """The rows of a gradient method's Gramian (config.method.level)."""
    return str(self.config.method.level)


def build_experiment(
  config: ml_collections.ConfigDict, dataset: data_registry.Dataset | None = None
) -> Experiment:
  """Builds dataset, tasks, model, weighting and optimizer from a config.

  The config is validated before the dataset is loaded and again with it, and the dataset's
  first batches are checked against the tasks, so a bad value fails before anything is built.

  Args:
    config: an experiment config (see configs/base.py).
    dataset: an already loaded dataset to reuse (sweeps load it once).

  Raises:
    config_validation.ConfigError: a bad config value (names the key and the valid choices).
    data_validation.DataError: the dataset's first batches do not fit the tasks.
  """
  config_validation.validate_config(config, dataset)
  if dataset is None:
    dataset = data_registry.load_dataset(config.dataset)
    config_validation.validate_config(config, dataset)
  tasks = dataset.select_tasks(list(config.tasks))
  data_validation.check_dataset(dataset, tasks)
  dataset = labels.with_label_masks(dataset, tasks, config.dataset)
  head_specs = {
    task.name: models_lib.HeadSpec(output_channels=task.output_channels, dense=task.dense)
    for task in tasks
  }
  model = models_lib.build_model(config.model, head_specs)
  per_epoch = pipeline.steps_per_epoch(
    len(dataset.splits["train"]), int(config.training.batch_size)
  )
  total_steps = int(config.training.num_epochs) * per_epoch
  method = weighting_lib.get(config.method.name, weighting_lib.method_options(config, per_epoch))
  optimizer = weighting_lib.make_optimizer(
    method, config.optimizer, per_epoch, [t.name for t in tasks]
  )
  return Experiment(config, dataset, tasks, model, method, optimizer, per_epoch, total_steps)


# Compiled `seed -> model variables` programs, one per model (its config, heads and input shape):
# every method and optimizer of a sweep draws the same initial parameters from a seed, so they
# share one program instead of compiling the model's initialisation each. The oldest goes first
# beyond _MODEL_INITIALIZERS_KEPT.
_MODEL_INITIALIZERS: dict[str, Callable[[jax.Array], Any]] = {}
_MODEL_INITIALIZERS_KEPT = 32


def model_initializer(experiment: Experiment) -> Callable[[jax.Array], Any]:
  """The compiled `seed -> variables` program of the experiment's model.

  Parameters are drawn with an 'rbg' key: XLA compiles its generator about 5x faster than
  threefry's on a CPU (4 s vs 22 s for a small CNN here). Its bits are deterministic for a given
  seed and backend but may differ between CPU and accelerators.
  """
  heads = [(task.name, task.output_channels, task.dense) for task in experiment.tasks]
  shape = experiment.input_shape
  key = json.dumps([experiment.config.model.to_dict(), heads, shape], sort_keys=True, default=str)
  if key not in _MODEL_INITIALIZERS:
    model = experiment.model

    def initialize(seed):
      images = jnp.zeros((1, *shape), jnp.float32)
      return model.init(jax.random.key(seed, impl="rbg"), images, train=False)

    _MODEL_INITIALIZERS[key] = jax.jit(initialize)
    while len(_MODEL_INITIALIZERS) > _MODEL_INITIALIZERS_KEPT:
      _MODEL_INITIALIZERS.pop(next(iter(_MODEL_INITIALIZERS)))
  return _MODEL_INITIALIZERS[key]


def build_group_experiment(
  configs: Sequence[ml_collections.ConfigDict], dataset: data_registry.Dataset | None = None
) -> Experiment:
  """The experiment of a group of runs (configs with one `group_key`): the first config's,
  with, when the runs' optimizers differ, an optimizer holding all of them (`optim.switched`;
  a lane's choice is the index of its name in `optimizer_names`)."""
  experiment = build_experiment(configs[0], dataset)
  names = tuple(dict.fromkeys(str(config.optimizer.name) for config in configs))
  if len(names) == 1:
    return experiment
  section = configs[0].optimizer
  optimizers = [
    optim.make_optimizer(optim.renamed(section, name), experiment.steps_per_epoch) for name in names
  ]
  return dataclasses.replace(
    experiment, optimizer=optim.switched(optimizers, 0), optimizer_names=names
  )


def optimizer_choice(experiment: Experiment, config: ml_collections.ConfigDict) -> int:
  """The index of a run's optimizer in a group's `optimizer_names` (0 with one optimizer)."""
  names = experiment.optimizer_names
  return names.index(str(config.optimizer.name)) if names else 0


def _training_state(experiment: Experiment, variables: Any, seed: jax.Array) -> TrainState:
  """The initial state around the model's variables: weighting parameters and state, optimizer
  state, and the training RNG (a threefry key: RLW draws, PCGrad orders, ...)."""
  train_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  weighting_params, weighting_state = weighting_lib.initial_state(
    experiment.weighting,
    experiment.level,
    len(experiment.tasks),
    int(experiment.config.training.batch_size),
    variables["params"],
  )
  trainable = {"model": variables["params"], "weighting": weighting_params}
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats=variables.get("batch_stats", {}),
    weighting_params=weighting_params,
    weighting_state=weighting_state,
    opt_state=experiment.optimizer.init(trainable),
    rng=train_rng,
  )


def init_state(experiment: Experiment, seed: int) -> TrainState:
  """Initial train state: model and weighting parameters, optimizer state, RNG.

  The initialisation is two compiled programs with the seed as an argument (run eagerly, every
  parameter shape and optimizer leaf would compile its own small kernel: tens of seconds on a
  CPU): the model's variables, shared by every experiment of the same model, and the rest of the
  state, per experiment. Every seed of a sweep reuses both. `config.model.pretrained_backbone`
  then replaces the encoder's random weights (and the optimizer state is rebuilt for them).
  """
  if experiment.initializer is None:
    experiment.initializer = jax.jit(functools.partial(_training_state, experiment))
  seed = jnp.asarray(seed, jnp.uint32)
  state = experiment.initializer(model_initializer(experiment)(seed), seed)
  pretrained = experiment.config.model.get("pretrained_backbone", "")
  if not pretrained:
    return state
  variables = models_lib.load_backbone(
    {"params": state.params, "batch_stats": state.batch_stats}, pretrained
  )
  trainable = {"model": variables["params"], "weighting": state.weighting_params}
  return state.replace(
    params=variables["params"],
    batch_stats=variables.get("batch_stats", {}),
    opt_state=experiment.optimizer.init(trainable),
  )


# Keys that may differ between the runs of one group; everything else must agree. The optimizer's
# name may differ too unless the method brings its own optimizer (AdaTask, MTL-IO).
PER_RUN_KEYS = ("seed", "optimizer.learning_rate", "delta_m.baseline")
OPTIMIZER_KEY = "optimizer.name"


def group_key(config: ml_collections.ConfigDict) -> str:
  """A string equal for configs that can be trained together (all but PER_RUN_KEYS, the
  optimizer's name (see PER_RUN_KEYS) and the sweep section)."""
  settings = json.loads(config.to_json_best_effort())
  method = weighting_lib.get(config.method.name, weighting_lib.method_options(config, 1))
  own_optimizer = weighting_lib.brings_own_optimizer(method)
  per_run = PER_RUN_KEYS if own_optimizer else PER_RUN_KEYS + (OPTIMIZER_KEY,)
  for key in per_run + ("sweep",):
    *parents, name = key.split(".")
    section = settings
    for parent in parents:
      section = section.get(parent, {})
    section.pop(name, None)
  return json.dumps(settings, sort_keys=True)


def config_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings a checkpoint must agree with to be resumed (JSON-able).

  Everything that changes the trajectory of a run is in it (training length, logging and
  checkpoint cadence are not: a run may be extended or resumed with other cadences; nor is the
  input pipeline's `config.data`: the worker count never changes the batches, and the
  augmentation's placement changes them by float rounding at most, in the image and depth).
  """
  model = config.model.to_dict()
  # float32 is what every run did before the key existed: left out, older runs still resume.
  if model.get("dtype") == "float32":
    del model["dtype"]
  # Likewise hard sharing, which every run was before architectures existed; the expert and
  # level counts only shape the other architectures.
  if model.get("architecture") == "hps":
    for key in ("architecture", "num_experts", "num_task_experts", "num_levels"):
      model.pop(key, None)
  # Likewise every label kept: older runs, which had no partial labels, still resume.
  dataset = config.dataset.to_dict()
  if dataset.get("label_fraction") == 1.0:
    dataset.pop("label_fraction")
    dataset.pop("label_fraction_tasks", None)
  if dataset.get("label_fractions") == "":
    dataset.pop("label_fractions")
  if tuple(dataset.get("label_fraction_splits", ())) == ("train",):
    dataset.pop("label_fraction_splits")
  return json.loads(
    json.dumps(
      {
        "seed": config.seed,
        "dataset": dataset,
        "tasks": list(config.tasks),
        "model": model,
        "method": config.method.to_dict(),
        "optimizer": config.optimizer.to_dict(),
        "batch_size": config.training.batch_size,
      },
      default=str,
    )
  )
