"""The three kinds of MTL method, each with one fixed signature, and the one registry of them all.

* `LossWeighting`: the task losses [T] -> the scalar the optimizer descends (EW, UW, DWA, ...).
* `GramianWeighting`: the Gramian G [R, R] of the rows' gradients -> weights w [R]; the step
  descends Σ_r w_r ∇L_r on the shared parameters (PCGrad, MGDA, UPGrad, ...).
* `JacobianMethod`: needs the task gradients' coordinates, not just their inner products
  (GradDrop in feature space; AdaTask and MTL-IO through their own optimizers; DB-MTL, MoCo and
  ExcessMTL keep state in the coordinates of the encoder's task gradients; SDMGrad and MoDo
  combine the task gradients of disjoint parts of the batch).

Every method is built by a factory `options -> method` registered under its name; `options`
is `config.method` (plus `steps_per_epoch`), and every default lives in configs/base.py only.
Trainable parameters (UW's log-variances) are trained by the model's optimizer; state (DWA's
epoch means, GradVac's targets) is a NamedTuple kept in the train state and checkpointed with it.
`initial_state` is the one place that calls a method's `init`.

Two extensions serve methods whose step needs more than one set of losses or gradients:
* Jacobian mode 'task_gradients': the step hands the method each task's encoder gradient
  (coordinates, [T, ...] per leaf) and the task losses, of the whole batch or, with
  `batch_parts` = K > 1, of K disjoint parts of it (stochastic estimators that need independent
  samples: SDMGrad, MoDo); the method returns the encoder direction and a scale per head. Its
  `init` also receives the encoder parameters, to allocate state of their shape.
* `LossWeighting.bilevel`: the step splits the batch in two halves, lets the method update its
  state from the task losses of both (Auto-Lambda's virtual step on the first half, meta-loss
  on the held-out second half), then descends the method's scalar on the first half only.

Partial labels (a batch whose label mask leaves a task without any labelled example, or a
(sample, task) pair unlabelled): every method runs on the present tasks / rows only
(`present.py`): it sees a smaller problem, exactly as if the absent rows did not exist, gives
them weight 0, and leaves their entries of per-row parameters and state untouched. Per method:
* EW, UW, UW-O, RLW, IMTL-L, GLS, STCH, GO4Align, Auto-Lambda's combine, FAMO: sums, softmaxes,
  logs and normalisations run over the present tasks (no log or division of an absent task's
  zero loss); UW's and IMTL-L's scales of an absent task get no gradient that step.
* DWA's and STCH's records are per task: a task's epoch means average its own labelled steps
  and it closes an epoch at its first labelled step of a later one (DWA's softmax waits until
  every present task has closed two). STCH's nadir, GradNorm's L_t(0) and ExcessMTL's baseline
  are taken at each task's first labelled step (STCH: its first after warm-up, from its own
  warm-up steps, or its loss then when warm-up never labelled it). CR-MOGM's moving average and
  GradVac's targets advance only for present rows.
* Gramian solvers (MGDA, UPGrad, DualProj, CAGrad, Nash-MTL, FairGrad, IMTL-G, Aligned-MTL,
  ConFIG, PCGrad, ...): solved on the present rows' Gramian, so means run over present rows and
  no zero row attracts a min-norm point or breaks a bargaining condition.
* Auto-Lambda's bilevel update: the virtual step and λ's Adam moments cover the tasks present
  in the first half; the meta loss sums every task's held-out loss.
* 'task_gradients' methods (DB-MTL, MoCo, ExcessMTL, SDMGrad, MoDo): run on the present tasks'
  gradients, losses and state rows (presence in the whole batch: with `batch_parts` > 1 a task
  labelled in the batch but not in one part still shows a zero gradient in that part).
* AdaTask: an absent task's Adam moments do not move and it adds no update; MTL-IO: an absent
  task takes no optimizer step. GradDrop needs nothing: a zero row changes neither the sign
  purity nor the cotangent.
* Shared counters (Adam's step count inside Auto-Lambda, DB-MTL's and MoCo's step counts) count
  every step that labels some task, not each task's own steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import ml_collections
import optax

from mtl_jax import optim

# What the rows of a Gramian are: 'task' (one row per task, the batch-mean loss L_t), 'sample'
# (one row per sample, its loss summed over tasks, divided by B) or 'sample_task' (one row per
# (sample, task), L_it / B). Each level's rows sum to the EW objective Σ_t L_t, so a
# sum-convention method without conflicts reproduces EW's step at every level.
LEVELS = ("task", "sample", "sample_task")

# How a Jacobian method uses coordinates: 'features' (combine maps the per-task gradients with
# respect to the shared features to one feature cotangent), 'per_task_optimizer' (the per-task
# gradients of the shared parameters go, stacked, to the optimizer from `make_optimizer`),
# 'sequential' (one optimizer step per task in turn, each on a fresh gradient).
# 'task_gradients' (combine maps the encoder's per-task gradients and losses, of the batch or of
# `batch_parts` disjoint parts of it, to the encoder direction and per-head scales).
JACOBIAN_MODES = ("features", "per_task_optimizer", "sequential", "task_gradients")

Init = Callable[..., tuple[Any, Any]]


class TaskGradients(NamedTuple):
  """What a 'task_gradients' Jacobian method receives for one part of the batch.

  Attributes:
    losses: [T] the part's batch-mean task losses L_t.
    encoder: a pytree like the encoder's parameters whose leaves have a leading [T] axis: row t
      is ∇_encoder L_t.
  """

  losses: jax.Array
  encoder: Any


class NoState(NamedTuple):
  """The state of a method that keeps none."""


def no_parameters(size: int) -> tuple[dict, NoState]:
  """`init` of a method without trainable parameters or state."""
  del size
  return {}, NoState()


@dataclasses.dataclass(frozen=True)
class LossWeighting:
  """A scalar of the task losses.

  Attributes:
    name: registry name.
    init: num_tasks -> (trainable parameters, state).
    combine: (task_losses [T], params, state, rng, step) -> (total loss, new state, aux); aux
      is a dict of metrics, 'weights' [T] is logged as the task weights.
    description: one line shown in listings and reports.
    after_update: when set, (task losses after the update on the same batch [T], state) ->
      new state; the train step runs one more forward pass for it (FAMO).
    bilevel: when set, (train_losses, meta_losses, model params, state, step) -> new state,
      run before `combine`: `train_losses(model params)` and `meta_losses(model params)` are the
      task losses [T] on the two halves of the batch, differentiable in the model parameters;
      `combine` then sees the first half's losses only (Auto-Lambda).
  """

  name: str
  init: Init
  combine: Callable[..., tuple[Any, Any, dict]]
  description: str = ""
  after_update: Callable[[Any, Any], Any] | None = None
  bilevel: Callable[..., Any] | None = None


@dataclasses.dataclass(frozen=True)
class GramianWeighting:
  """Weights of the rows from their Gramian.

  Attributes:
    name: registry name.
    init: the number of rows R -> (trainable parameters, state).
    weigh: (gramian [R, R], task_losses [T], params, state, rng, step) -> (weights [R], new
      state, aux). aux may hold 'weighting_loss', a scalar differentiable in params that the
      optimizer minimises for the method's own parameters, and 'weights' to log.
    description: one line shown in listings and reports.
    levels: the levels of rows the method is defined for (see LEVELS).
  """

  name: str
  init: Init
  weigh: Callable[..., tuple[Any, Any, dict]]
  description: str = ""
  levels: tuple[str, ...] = LEVELS


@dataclasses.dataclass(frozen=True)
class JacobianMethod:
  """A method that needs the coordinates of the task gradients (task level only).

  Attributes:
    name: registry name.
    mode: one of JACOBIAN_MODES.
    init: num_tasks -> (trainable parameters, state); in mode 'task_gradients',
      (num_tasks, encoder parameters) -> (trainable parameters, state).
    combine: for mode 'features', (feature_gradients [T, *features.shape], features, params,
      state, rng, step) -> (feature cotangent, new state, aux); for mode 'task_gradients',
      (parts: a tuple of `batch_parts` TaskGradients, params, state, rng, step) -> (encoder
      direction (a pytree like the encoder's parameters), head scales [T], new state, aux):
      head t descends head_scales[t] times its plain gradient of L_t (averaged over the parts);
      None otherwise.
    make_optimizer: for the optimizer modes, (optimizer config, steps_per_epoch, task names,
      learning_rate=None) -> the optax transformation that replaces `optim.make_optimizer`
      (`learning_rate` overrides the config's schedule, as there).
    description: one line shown in listings and reports.
    levels: always ('task',): the rows are tasks.
    batch_parts: mode 'task_gradients': the number of disjoint parts the batch is split into
      (as equal as the batch size allows), each with its own task gradients.
  """

  name: str
  mode: str
  init: Init = no_parameters
  combine: Callable[..., tuple[Any, ...]] | None = None
  make_optimizer: Callable[..., Any] | None = None
  description: str = ""
  levels: tuple[str, ...] = ("task",)
  batch_parts: int = 1

  def __post_init__(self):
    if self.mode not in JACOBIAN_MODES:
      raise ValueError(
        f"Method {self.name!r}: unknown mode {self.mode!r}; valid: {JACOBIAN_MODES}."
      )
    combines = self.mode in ("features", "task_gradients")
    if combines != (self.combine is not None):
      raise ValueError(
        f"Method {self.name!r}: modes 'features' and 'task_gradients' need combine, the "
        "others do not."
      )
    if combines == (self.make_optimizer is not None):
      raise ValueError(f"Method {self.name!r}: the optimizer modes need make_optimizer.")
    if self.batch_parts < 1 or (self.batch_parts > 1 and self.mode != "task_gradients"):
      raise ValueError(f"Method {self.name!r}: batch_parts > 1 needs mode 'task_gradients'.")


Method = LossWeighting | GramianWeighting | JacobianMethod
Factory = Callable[[ml_collections.ConfigDict], Method]
_REGISTRY: dict[str, Factory] = {}


def check_level(level: str) -> str:
  """Returns level, or raises a ValueError naming config.method.level and the valid levels."""
  if level not in LEVELS:
    raise ValueError(f"Unknown config.method.level {level!r}; valid levels: {', '.join(LEVELS)}.")
  return level


def check_method_level(method: Method, level: str) -> None:
  """Raises a ValueError when a gradient method is not defined at this level of rows."""
  check_level(level)
  if isinstance(method, LossWeighting) or level in method.levels:
    return
  raise ValueError(
    f"Method {method.name!r} works on task gradients; config.method.level must be "
    f"{' or '.join(repr(value) for value in method.levels)}, got {level!r}."
  )


def num_rows(level: str, num_tasks: int, batch_size: int) -> int:
  """The number of Gramian rows R at a level."""
  rows = {"task": num_tasks, "sample": batch_size, "sample_task": batch_size * num_tasks}
  return rows[check_level(level)]


def state_size(method: Method, level: str, num_tasks: int, batch_size: int) -> int:
  """What `method.init` takes: the Gramian's row count at `level`, or the task count."""
  if isinstance(method, GramianWeighting):
    return num_rows(level, num_tasks, batch_size)
  return num_tasks


def initial_state(
  method: Method, level: str, num_tasks: int, batch_size: int, model_params: Any
) -> tuple[Any, Any]:
  """(trainable parameters, state) of a method at the start of a run.

  Args:
    method: any method.
    level: the rows of a Gramian weighting (see LEVELS).
    num_tasks, batch_size: T and B, which size the state (`state_size`).
    model_params: {'encoder': ..., 'heads': ...}; the encoder's shapes size the state of a
      'task_gradients' Jacobian method (per-task copies of the encoder's coordinates).
  """
  size = state_size(method, level, num_tasks, batch_size)
  if isinstance(method, JacobianMethod) and method.mode == "task_gradients":
    return method.init(size, model_params["encoder"])
  return method.init(size)


def batch_parts(method: Method) -> int:
  """How many disjoint parts a method's train step splits each batch into (1: none)."""
  if isinstance(method, JacobianMethod):
    return method.batch_parts
  if isinstance(method, LossWeighting) and method.bilevel is not None:
    return 2
  return 1


def register(name: str) -> Callable[[Factory], Factory]:
  """Decorator adding a factory `options -> method` to the registry under name."""

  def decorate(factory: Factory) -> Factory:
    if name in _REGISTRY:
      raise ValueError(f"Method {name!r} is registered twice.")
    _REGISTRY[name] = factory
    return factory

  return decorate


def gramian_method(name: str, description: str = "", levels: tuple[str, ...] = LEVELS):
  """Registers `weights_of(gramian, options) -> weights [R]` as a stateless Gramian weighting.

  The whole of a new method whose weights depend on the Gramian alone::

      @weighting.gramian_method("mean", "the mean of the rows' gradients")
      def mean_weights(gramian, options):
        return jnp.full(gramian.shape[0], 1.0 / gramian.shape[0])
  """

  def decorate(weights_of: Callable[[jax.Array, ml_collections.ConfigDict], jax.Array]):
    def factory(options: ml_collections.ConfigDict) -> GramianWeighting:
      def weigh(gramian, task_losses, params, state, rng, step):
        del task_losses, params, rng, step
        weights = weights_of(gramian, options)
        return weights, state, {"weights": weights}

      return GramianWeighting(name, no_parameters, weigh, description, levels)

    register(name)(factory)
    return weights_of

  return decorate


def method_names() -> tuple[str, ...]:
  """The registered method names, sorted."""
  return tuple(sorted(_REGISTRY))


def get(name: str, options: Mapping[str, Any] | ml_collections.ConfigDict) -> Method:
  """Builds the method registered under name from its options (config.method).

  Raises:
    ValueError: for an unknown name, listing the valid ones.
    KeyError: (from the factory) an option the method needs is missing.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(method_names())}.")
  if not isinstance(options, ml_collections.ConfigDict):
    options = ml_collections.ConfigDict(dict(options))
  return _REGISTRY[name](options)


def method_options(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> ml_collections.ConfigDict:
  """A method's options: config.method, plus the epoch length epoch-based methods (DWA, STCH)
  need and the optimizer's section (Auto-Lambda's virtual step follows its learning rate)."""
  options = ml_collections.ConfigDict(config.method.to_dict())
  options.steps_per_epoch = int(steps_per_epoch)
  options.optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
  return options


def brings_own_optimizer(method: Method) -> bool:
  """Whether the method replaces the configured optimizer with its own (AdaTask, MTL-IO)."""
  return isinstance(method, JacobianMethod) and method.make_optimizer is not None


def make_optimizer(
  method: Method,
  optimizer_config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  task_names,
  learning_rate: Any = None,
) -> optax.GradientTransformation:
  """The optimizer of a run: the method's own (AdaTask, MTL-IO) or `optim.make_optimizer`'s;
  `learning_rate` (a float or an optax schedule) overrides the config's schedule when given."""
  if brings_own_optimizer(method):
    return method.make_optimizer(
      optimizer_config, steps_per_epoch, list(task_names), learning_rate=learning_rate
    )
  return optim.make_optimizer(optimizer_config, steps_per_epoch, learning_rate)
