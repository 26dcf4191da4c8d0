"""Adam's partial loss-scale invariance (paper Sec. 3 / App. A2): exact checks, toy runs, method
table.

Three entry points, all callable from Python:

* `run_invariance_check(config)`: a random two-task model trained K steps with task loss
  weights alpha vs 1, in float64, and every prediction of docs/adam_invariance.md checked:
  equalities to float precision, and differences where the theory predicts them.
* `run_app_a2(config, workdir)`: the paper's App. A2 runs (scalar regression, two heads, L1,
  100 epochs) for EW+SGD, EW+Adam, UW-O+SGD and EW+per-task Adam, frozen and trainable
  backbone, unscaled vs scaled losses; figures of loss, scaled loss, gradient and update norms.
* `classify_methods(config)`: every registered weighting, trained a few steps through
  `mtl_jax.train.make_train_step` with one task's loss multiplied by c, classified as invariant
  / invariant on the heads under Adam only / not invariant.

The tiny model here has parameter groups {'backbone', 'head_0', 'head_1'}; each run is a
`jax.lax.scan` over steps, and the settings that share an optimiser are one `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtl_jax import gramian as gramian_lib
from mtl_jax import optim
from mtl_jax import tasks as tasks_lib
from mtl_jax import train as train_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.models import apply as apply_lib

GROUPS = ("backbone", "head_0", "head_1")
# 'switch' chooses by traced flags (use_adam, use_uw_o), so one compiled program covers them all.
OPTIMIZERS = ("sgd", "adam", "per_task_adam", "switch")
WEIGHTINGS = ("ew", "uw_o", "switch")


class TinyMultiTask(nn.Module):
  """Scalar input -> shared LeakyReLU MLP backbone -> one small MLP head per task (scalar out)."""

  width: int = 20
  backbone_layers: int = 2
  head_layers: int = 2
  num_tasks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, 1] -> predictions [B, T]."""
    features = x
    for index in range(self.backbone_layers):
      features = nn.leaky_relu(nn.Dense(self.width, name=f"backbone_{index}")(features))
    outputs = []
    for task in range(self.num_tasks):
      hidden = features
      for index in range(self.head_layers - 1):
        hidden = nn.leaky_relu(nn.Dense(self.width, name=f"head_{task}_{index}")(hidden))
      outputs.append(nn.Dense(1, name=f"head_{task}_out")(hidden)[:, 0])
    return jnp.stack(outputs, axis=1)


def group_of(name: str) -> str:
  """The parameter group ('backbone' or 'head_t') of a top-level layer name."""
  return "backbone" if name.startswith("backbone") else "_".join(name.split("_")[:2])


def _group_norms(tree) -> jax.Array:
  """[3] Euclidean norms of a params-shaped tree per group, in GROUPS order."""
  squares = {group: 0.0 for group in GROUPS}
  for name, layer in tree.items():
    squares[group_of(name)] += sum(
      jnp.sum(leaf * leaf) for leaf in jax.tree_util.tree_leaves(layer)
    )
  return jnp.sqrt(jnp.stack([squares[group] for group in GROUPS]))


def _group_vectors(tree) -> dict[str, jax.Array]:
  """Flattened parameters per group."""
  parts = {group: [] for group in GROUPS}
  for name in sorted(tree):
    parts[group_of(name)].extend(jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree[name]))
  return {group: jnp.concatenate(vectors) for group, vectors in parts.items()}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The static part of a run: what is compiled (settings vary inside one vmap)."""

  optimizer: str
  weighting: str = "ew"
  b1: float = 0.9
  b2: float = 0.999
  momentum: float = 0.0
  uw_o_epsilon: float = 1e-8
  record_params: bool = False


def _mask_backbone(tree, train_backbone):
  """`tree` ({layer: params}) with the backbone layers zeroed unless train_backbone > 0."""
  return {
    name: jax.tree_util.tree_map(
      lambda leaf, name=name: (
        jnp.where(train_backbone > 0, leaf, jnp.zeros_like(leaf))
        if name.startswith("backbone")
        else leaf
      ),
      layer,
    )
    for name, layer in tree.items()
  }


def _simulated_optimizer(recipe: Recipe, num_tasks: int, eps) -> optax.GradientTransformation:
  """The direction-making part of a recipe's optimizer (the learning rate is applied after)."""
  if recipe.optimizer == "per_task_adam":
    return optim.scale_by_per_task_adam(num_tasks, recipe.b1, recipe.b2, eps)
  if recipe.optimizer in ("adam", "switch"):
    return optax.scale_by_adam(recipe.b1, recipe.b2, eps)
  return optax.trace(recipe.momentum) if recipe.momentum else optax.identity()


def make_simulator(model: TinyMultiTask, recipe: Recipe, targets_scale: Sequence[float]):
  """Returns `simulate(params, inputs [K, B, 1], alphas [T], train_backbone, lr, eps, use_adam=0,
  use_uw_o=0) -> records`; the two flags matter only for the 'switch' optimizer / weighting
  (SGD without momentum vs Adam; EW vs UW-O).

  The objective of task t is alpha_t L_t (EW) or alpha_t L_t / (sg[alpha_t L_t] + epsilon)
  (UW-O), with L_t the L1 loss against the target scale_t x. Per-task gradients come from one
  `jax.jacrev`; SGD and Adam use their sum, per-task Adam keeps them apart. With
  train_backbone = 0 the backbone is frozen (its gradient and update are zeroed).

  Records per step: 'loss' [T] (unscaled L_t), 'scaled_loss' [T], 'grad_norm' [3] and
  'update_norm' [3] per group (GROUPS order), and, when recipe.record_params, 'params'
  {group: [P_group]} after the step.
  """
  if recipe.optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {recipe.optimizer!r}; valid: {', '.join(OPTIMIZERS)}.")
  if recipe.weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown weighting {recipe.weighting!r}; valid: {', '.join(WEIGHTINGS)}.")
  scales = jnp.asarray(targets_scale)
  num_tasks = model.num_tasks

  def task_losses(params, inputs):
    predictions = model.apply({"params": params}, inputs)
    return jnp.mean(jnp.abs(predictions - inputs * scales), axis=0)

  def objectives(params, inputs, alphas, use_uw_o):
    scaled = alphas * task_losses(params, inputs)
    normalised = scaled / (jax.lax.stop_gradient(scaled) + recipe.uw_o_epsilon)
    if recipe.weighting == "uw_o":
      return normalised
    if recipe.weighting == "switch":
      return jnp.where(use_uw_o > 0, normalised, scaled)
    return scaled

  def simulate(
    params, inputs, alphas, train_backbone, learning_rate, eps, use_adam=0.0, use_uw_o=0.0
  ):
    def mask(tree):
      return _mask_backbone(tree, train_backbone)

    optimizer = _simulated_optimizer(recipe, num_tasks, eps)

    def step(carry, batch):
      params, opt_state = carry
      losses = task_losses(params, batch)
      per_task = jax.jacrev(objectives)(params, batch, alphas, use_uw_o)  # leaves [T, ...]
      per_task = jax.vmap(mask)(per_task)
      total = jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), per_task)
      direction, opt_state = optimizer.update(
        per_task if recipe.optimizer == "per_task_adam" else total, opt_state, params
      )
      if recipe.optimizer == "switch":
        direction = jax.tree_util.tree_map(
          lambda a, g: jnp.where(use_adam > 0, a, g), direction, total
        )
      updates = mask(jax.tree_util.tree_map(lambda leaf: -learning_rate * leaf, direction))
      params = optax.apply_updates(params, updates)
      record = {
        "loss": losses,
        "scaled_loss": alphas * losses,
        "grad_norm": _group_norms(total),
        "update_norm": _group_norms(updates),
      }
      if recipe.record_params:
        record["params"] = _group_vectors(params)
      return (params, opt_state), record

    _, records = jax.lax.scan(step, (params, optimizer.init(params)), inputs)
    return records

  return simulate


def _relative(a, b, reference) -> float:
  """max_k |a_k - b_k| / |reference_k| over steps k (rows)."""
  a, b, reference = (np.asarray(v, np.float64).reshape(len(v), -1) for v in (a, b, reference))
  return float(
    np.max(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-300))
  )


def _declare_runs(check, alphas, ones) -> tuple[list[tuple], dict[str, Any]]:
  """Every run of the check, declared before any is executed: (declared runs, named indices).

  A run is (per-task Adam?, (loss scales, train backbone, lr, eps, use Adam, use UW-O)); the
  names index the runs (or pairs, lists of runs) the predictions compare.
  """
  declared: list[tuple] = []
  lr, tiny, eps = float(check.learning_rate), float(check.tiny_eps), float(check.adam_eps)

  def declare(alphas_, train, lr_, eps_, use_adam=0.0, use_uw_o=0.0, per_task=False):
    declared.append((per_task, (alphas_, train, lr_, eps_, use_adam, use_uw_o)))
    return len(declared) - 1

  names = {
    "sgd_scaled": declare(alphas, 0.0, lr, eps),
    "sgd_unscaled": declare(ones, 0.0, lr, eps),
    "sgd_per_lr": [declare(ones, 0.0, lr * float(a), eps) for a in check.alphas],
    "adam_tiny": (declare(alphas, 0.0, lr, tiny, 1.0), declare(ones, 0.0, lr, tiny, 1.0)),
    "adam_eps": (declare(alphas, 0.0, lr, eps, 1.0), declare(ones, 0.0, lr, eps, 1.0)),
    "adam_effective": [declare(ones, 0.0, lr, eps / float(a), 1.0) for a in check.alphas],
    "adam_trainable": (declare(alphas, 1.0, lr, tiny, 1.0), declare(ones, 1.0, lr, tiny, 1.0)),
    "uw_o_sgd": (declare(alphas, 1.0, lr, eps, 0.0, 1.0), declare(ones, 1.0, lr, eps, 0.0, 1.0)),
    "uw_o_adam": (declare(alphas, 1.0, lr, eps, 1.0, 1.0), declare(ones, 1.0, lr, eps, 1.0, 1.0)),
    "per_task": (
      declare(alphas, 1.0, lr, tiny, per_task=True),
      declare(ones, 1.0, lr, tiny, per_task=True),
    ),
  }
  return declared, names


def _run_declared(model, declared, params, inputs, scales) -> dict[int, Any]:
  """Executes the declared runs in two compiled programs: the SGD/Adam x EW/UW-O family (flags
  traced) and one Adam per task; returns {run index: its records}."""
  done: dict[int, Any] = {}
  families = [
    (False, Recipe("switch", "switch", uw_o_epsilon=0.0)),
    (True, Recipe("per_task_adam")),
  ]
  for per_task, recipe in families:
    indices = [index for index, (kind, _) in enumerate(declared) if kind == per_task]
    simulate = make_simulator(model, dataclasses.replace(recipe, record_params=True), scales)
    stacked = [
      jnp.stack([jnp.asarray(declared[index][1][k], jnp.float64) for index in indices])
      for k in range(6)
    ]
    batched = jax.jit(jax.vmap(simulate, in_axes=(None, None, 0, 0, 0, 0, 0, 0)))
    records = jax.device_get(batched(params, inputs, *stacked))
    for position, index in enumerate(indices):
      done[index] = jax.tree_util.tree_map(lambda leaf, p=position: leaf[p], records)
  return done


class _Predictions:
  """The rows of the check: each prediction's measured relative difference and verdict."""

  def __init__(self, check, done, initial):
    self.check, self.done, self.initial = check, done, initial
    self.rows: list[dict[str, Any]] = []

  def displacement(self, index, group):
    return self.done[index]["params"][group] - self.initial[group][None]

  def add(self, setting, group, compared, predicted, a, b, reference):
    value = _relative(a, b, reference)
    if predicted == "equal":
      ok = value < float(self.check.equal_tolerance)
    else:
      ok = value > float(self.check.differ_threshold)
    self.rows.append(
      dict(
        setting=setting,
        group=group,
        compared=compared,
        predicted=predicted,
        relative_difference=value,
        ok=bool(ok),
      )
    )

  def compare(self, setting, group, compared, predicted, a, b):
    a, b = self.displacement(a, group), self.displacement(b, group)
    self.add(setting, group, compared, predicted, a, b, b)


_SAME = "trajectory(alpha) vs trajectory(1)"


def _predictions(check, done, initial, names) -> list[dict[str, Any]]:
  """One row per prediction: the measured relative difference and whether it came out as
  predicted."""
  table = _Predictions(check, done, initial)
  tiny, eps = float(check.tiny_eps), float(check.adam_eps)
  heads = [group for group in GROUPS if group.startswith("head")]
  # SGD with a frozen backbone: weights are per-task learning rates.
  for t, head in enumerate(heads):
    setting = "SGD, frozen backbone"
    first_unscaled = float(check.alphas[t]) * table.displacement(names["sgd_unscaled"], head)[:1]
    first_scaled = table.displacement(names["sgd_scaled"], head)[:1]
    compared = "first update(alpha) vs alpha * first update(1)"
    table.add(setting, head, compared, "equal", first_scaled, first_unscaled, first_unscaled)
    compared = "trajectory(alpha, lr) vs trajectory(1, alpha_t lr)"
    table.compare(setting, head, compared, "equal", names["sgd_scaled"], names["sgd_per_lr"][t])
    table.compare(setting, head, _SAME, "differ", names["sgd_scaled"], names["sgd_unscaled"])
  # Adam with a frozen backbone: the scale cancels except through eps (effective eps / alpha_t).
  for t, head in enumerate(heads):
    table.compare(f"Adam, frozen backbone, eps={tiny:g}", head, _SAME, "equal", *names["adam_tiny"])
    setting = f"Adam, frozen backbone, eps={eps:g}"
    table.compare(setting, head, _SAME, "differ", *names["adam_eps"])
    compared = "trajectory(alpha, eps) vs trajectory(1, eps/alpha_t)"
    pair = (names["adam_eps"][0], names["adam_effective"][t])
    table.compare(setting, head, compared, "equal", *pair)
  # Adam with a trainable backbone: nothing cancels.
  for group in GROUPS:
    setting = f"Adam, trainable backbone, eps={tiny:g}"
    table.compare(setting, group, _SAME, "differ", *names["adam_trainable"])
  # Fully invariant recipes: UW-O (with SGD and with Adam) and one Adam per task.
  for label, pair in (
    ("UW-O + SGD", names["uw_o_sgd"]),
    ("UW-O + Adam", names["uw_o_adam"]),
    (f"EW + per-task Adam, eps={tiny:g}", names["per_task"]),
  ):
    for group in GROUPS:
      table.compare(f"{label}, trainable backbone", group, _SAME, "equal", *pair)
  return table.rows


def run_invariance_check(config: ml_collections.ConfigDict) -> dict:
  """The exact numerical check of every prediction (float64).

  Args:
    config: configs/adam_invariance.py (the `check` section is used).

  Returns:
    dict with 'rows' (list of dicts: setting, group, compared, predicted 'equal'|'differ',
    relative_difference, ok), 'all_ok', 'markdown' (the table) and 'alphas'.
  """
  check = config.check
  with jax.enable_x64(True):
    model = TinyMultiTask(width=int(config.model.width))
    init_rng, data_rng = jax.random.split(jax.random.PRNGKey(int(check.seed)))
    inputs = jax.random.uniform(data_rng, (int(check.steps), int(check.batch_size), 1), jnp.float64)
    params = jax.tree_util.tree_map(
      lambda leaf: leaf.astype(jnp.float64), model.init(init_rng, inputs[0])["params"]
    )
    alphas = jnp.asarray(check.alphas, jnp.float64)
    declared, names = _declare_runs(check, alphas, jnp.ones_like(alphas))
    done = _run_declared(model, declared, params, inputs, tuple(config.targets_scale))
    rows = _predictions(check, done, jax.device_get(_group_vectors(params)), names)
  header = (
    "| setting | group | compared | predicted | max relative difference | ok |\n"
    "|---|---|---|---|---|---|"
  )
  lines = [header] + [
    f"| {r['setting']} | {r['group']} | {r['compared']} | {r['predicted']} | "
    f"{r['relative_difference']:.2e} | {'yes' if r['ok'] else 'NO'} |"
    for r in rows
  ]
  return {
    "rows": rows,
    "all_ok": all(r["ok"] for r in rows),
    "equalities_ok": all(r["ok"] for r in rows if r["predicted"] == "equal"),
    "markdown": "\n".join(lines),
    "alphas": list(check.alphas),
  }


# ---------------------------------------------------------------------------------------------
# Classification of every registered weighting through the library's train step.

CLASSES = ("invariant", "invariant on heads under Adam only", "not invariant")


class _ScaledTask:
  """A task whose per-sample loss is multiplied by batch['loss_scale'][index] (a traced input,
  so every scale shares one compiled step)."""

  def __init__(self, task, index: int):
    self._task, self._index = task, index

  def __getattr__(self, name):
    return getattr(self._task, name)

  def loss(self, prediction, batch):
    return batch["loss_scale"][self._index] * self._task.loss(prediction, batch)


class _SwitchState(NamedTuple):
  inner: Any
  use_adam: jax.Array
  train_encoder: jax.Array


def _switchable(
  adam: optax.GradientTransformation, sgd_learning_rate: float, per_task: bool = False
):
  """Adam or plain SGD, encoder trained or frozen, chosen by flags in the optimizer state.

  The flags are traced values, so one compiled train step serves all four combinations (the
  compile, not the steps, dominates the cost of this classification). Frozen means the
  encoder's update is zero; Adam's moments still see its gradient, which changes nothing else.
  """

  def init(params):
    return _SwitchState(adam.init(params), jnp.ones((), jnp.float32), jnp.ones((), jnp.float32))

  def update(gradients, state, params=None):
    adam_updates, inner = adam.update(gradients, state.inner, params)
    if per_task:
      updates = adam_updates
    else:
      updates = jax.tree_util.tree_map(
        lambda a, g: jnp.where(state.use_adam > 0, a, -sgd_learning_rate * g),
        adam_updates,
        gradients,
      )
    model = updates["model"] if "model" in updates else updates
    model = {
      key: (
        jax.tree_util.tree_map(lambda leaf: leaf * state.train_encoder, value)
        if key == "encoder"
        else value
      )
      for key, value in model.items()
    }
    updates = {**updates, "model": model} if "model" in updates else model
    return updates, state._replace(inner=inner)

  return optax.GradientTransformation(init, update)


def _model_groups(params) -> dict[str, jax.Array]:
  """Flattened model parameters: 'backbone' (the encoder) and 'heads' (all heads)."""

  def flatten(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])

  return {"backbone": flatten(params["encoder"]), "heads": flatten(params["heads"])}


def _per_task_adam_step(experiment, tasks, optimizer):
  """A train step with one Adam per task on all parameters (per-task gradients, one VJP each)."""

  def step(state, batch):
    def task_losses(params):
      predictions, _ = apply_lib.predict(
        experiment.model, params, state.batch_stats, batch["image"], True
      )
      return jnp.mean(tasks_lib.losses_matrix(tasks, predictions, batch), axis=0)

    per_task = gramian_lib.jacobian_rows(task_losses, state.params)
    updates, opt_state = optimizer.update(per_task, state.opt_state, state.params)
    return state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    ), {}

  return step


def _to_float64(tree):
  return jax.tree_util.tree_map(
    lambda leaf: leaf.astype(jnp.float64) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf,
    tree,
  )


class _Classifier:
  """Trains one method's trajectories at every loss scale and classifies its invariance."""

  def __init__(self, settings, experiment, tasks, batches, scaled_task: int):
    self.settings, self.experiment, self.tasks = settings, experiment, tasks
    self.batches, self.scaled_task = batches, scaled_task
    self.scales = [1.0] + [float(c) for c in settings.scales]
    self.num_tasks = len(tasks)
    self.sgd_learning_rate = float(settings.sgd_learning_rate)
    self.adam = optax.chain(
      optax.scale_by_adam(eps=float(settings.adam_eps)),
      optax.scale_by_learning_rate(float(settings.adam_learning_rate)),
    )
    train_config = settings.train
    self.seed = int(train_config.seed)
    self.options = weighting_lib.method_options(train_config, experiment.steps_per_epoch)

  def trajectories(self, step_fn, state):
    """{scale: {group: [steps, P]}} for every scale, one compiled step for all."""
    result = {}
    for scale in self.scales:
      loss_scale = np.ones(self.num_tasks, np.float32)
      loss_scale[self.scaled_task] = scale
      current, snapshots = state, []
      for batch in self.batches:
        current, _ = step_fn(current, {**batch, "loss_scale": loss_scale})
        snapshots.append(jax.device_get(_model_groups(current.params)))
      result[scale] = {group: np.stack([s[group] for s in snapshots]) for group in snapshots[0]}
    return result

  def worst(self, result, groups, initial) -> float:
    return max(
      _relative(result[c][g] - initial[g], result[1.0][g] - initial[g], result[1.0][g] - initial[g])
      for c in self.scales[1:]
      for g in groups
    )

  def _initial_state(self, weighting, optimizer):
    sub = dataclasses.replace(self.experiment, weighting=weighting, optimizer=optax.identity())
    with jax.enable_x64(False):
      state = train_lib.init_state(sub, self.seed)
    return state.replace(
      params=_to_float64(state.params), weighting_params=_to_float64(state.weighting_params)
    )

  def run(self, name: str):
    """(jitted step, initial state, (optimizer, frozen encoder) combinations) of a method."""
    if name == "per_task_adam":
      per_task = optax.chain(
        optim.scale_by_per_task_adam(self.num_tasks, eps=float(self.settings.adam_eps)),
        optax.scale_by_learning_rate(float(self.settings.adam_learning_rate)),
      )
      optimizer = _switchable(per_task, self.sgd_learning_rate, per_task=True)
      state = self._initial_state(weighting_lib.get("ew", self.options), optimizer)
      state = state.replace(opt_state=optimizer.init(state.params))
      step_fn = _per_task_adam_step(self.experiment, self.tasks, optimizer)
      # One Adam per task has no SGD counterpart.
      return jax.jit(step_fn), state, [("adam", True), ("adam", False)]
    weighting = weighting_lib.get(name, self.options)
    if weighting_lib.brings_own_optimizer(weighting):
      # Caught by classify_methods, which lists the method as skipped with this reason.
      raise ValueError(
        f"it brings its own optimizer (mode {weighting.mode!r}), and the classification "
        "compares Adam with SGD on one step function; one Adam per task is 'per_task_adam'"
      )
    optimizer = _switchable(self.adam, self.sgd_learning_rate)
    state = self._initial_state(weighting, optimizer)
    state = state.replace(opt_state=optimizer.init(state.trainable))
    step_fn = train_lib.make_train_step(self.experiment.model, self.tasks, weighting, optimizer)
    return jax.jit(step_fn), state, [(o, f) for o in ("adam", "sgd") for f in (True, False)]

  def differences(self, name: str) -> dict[str, float]:
    """{'<optimizer>_heads' or '<optimizer>_all': the worst relative trajectory difference}."""
    step_fn, state, combinations = self.run(name)
    initial = jax.device_get(_model_groups(state.params))
    differences = {}
    for optimizer_name, frozen in combinations:
      flags = state.opt_state._replace(
        use_adam=jnp.float32(optimizer_name == "adam"), train_encoder=jnp.float32(not frozen)
      )
      result = self.trajectories(step_fn, state.replace(opt_state=flags))
      groups = ("heads",) if frozen else ("backbone", "heads")
      key = f"{optimizer_name}_{'heads' if frozen else 'all'}"
      differences[key] = self.worst(result, groups, initial)
    return differences

  def label(self, differences: dict[str, float]) -> str:
    tolerance = float(self.settings.tolerance)
    same = {key: value < tolerance for key, value in differences.items()}
    sgd_all, sgd_heads = same.get("sgd_all"), same.get("sgd_heads")
    if same["adam_all"] and sgd_all in (True, None):
      return CLASSES[0]
    if same["adam_heads"] and not sgd_heads:
      return CLASSES[1]
    if same["adam_heads"]:
      return "invariant on heads (Adam and SGD)"
    return CLASSES[2]


def classify_methods(config: ml_collections.ConfigDict, dataset=None, progress=print) -> dict:
  """Classifies every registered weighting (plus one Adam per task) by loss-scale invariance.

  For each method and optimizer (Adam, SGD without momentum), the same initial state and
  batches are trained `steps` steps with task `scaled_task`'s loss multiplied by 1 and by each
  c in `scales`, once with a frozen and once with a trainable encoder. A group (heads with a
  frozen encoder; encoder and heads with a trainable one) counts as invariant when its
  displacement from the initial parameters differs by less than `tolerance` (relative, max
  over steps and scales). Adam uses eps = `adam_eps`: with a tiny eps, float32 rounding noise
  in near-zero gradient entries is blown up to full-size Adam steps and hides the effect.

  Args:
    config: configs/adam_invariance.py (the `classify` section is used; `classify.train` is the
      train-step config whose model, data and method options are used).
    dataset: an already loaded dataset for `classify.train`.
    progress: called with one line per method.

  Returns:
    dict with 'rows' (method, class, and the relative differences adam_heads, adam_all,
    sgd_heads, sgd_all), 'skipped' {method: reason} and 'markdown'.
  """
  settings = config.classify
  experiment = train_lib.build_experiment(settings.train, dataset)
  num_tasks = len(experiment.tasks)
  scaled_task = int(settings.scaled_task)
  if not 0 <= scaled_task < num_tasks:
    raise ValueError(f"config.classify.scaled_task must be in [0, {num_tasks}), got {scaled_task}.")
  tasks = [_ScaledTask(task, index) for index, task in enumerate(experiment.tasks)]
  source = experiment.dataset.splits["train"]
  batch_size = int(settings.train.training.batch_size)
  indices = [np.arange(k * batch_size, (k + 1) * batch_size) for k in range(int(settings.steps))]
  names = list(settings.methods) or list(weighting_lib.method_names())
  candidates = names + (["per_task_adam"] if settings.include_per_task_adam else [])
  rows, skipped = [], {}
  # float64 throughout: in float32, Adam blows the rounding noise of near-zero gradient
  # entries up to full-size steps, which would hide the exact invariances being classified.
  with jax.enable_x64(True):
    batches = [_to_float64(source.batch(index % len(source))) for index in indices]
    classifier = _Classifier(settings, experiment, tasks, batches, scaled_task)
    for name in candidates:
      try:
        differences = classifier.differences(name)
      except ValueError as error:
        skipped[name] = str(error)
        progress(f"  {name}: skipped ({error})")
        continue
      label = classifier.label(differences)
      rows.append({"method": name, "class": label, **differences})
      progress(f"  {name}: {label}  " + "  ".join(f"{k}={v:.1e}" for k, v in differences.items()))
  return {
    "rows": rows,
    "skipped": skipped,
    "markdown": _classification_table(rows),
    "scales": classifier.scales[1:],
    "tolerance": float(settings.tolerance),
    "steps": int(settings.steps),
  }


def _classification_table(rows) -> str:
  columns = ("adam_heads", "adam_all", "sgd_heads", "sgd_all")
  lines = ["| method | class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
  for row in rows:
    lines.append(
      f"| {row['method']} | {row['class']} | "
      + " | ".join(f"{row[c]:.1e}" if c in row else "n/a" for c in columns)
      + " |"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The paper's App. A2 runs.

_A2_RECIPES = {
  "ew+sgd": Recipe("sgd"),
  "ew+adam": Recipe("adam"),
  "uw_o+sgd": Recipe("sgd", "uw_o"),
  "ew+per_task_adam": Recipe("per_task_adam"),
}


def run_app_a2(
  config: ml_collections.ConfigDict, workdir: str | None = None, progress=print
) -> dict:
  """The App. A2 runs: 4 recipes x {frozen, trainable backbone} x {unscaled, scaled losses}.

  Each recipe is one compiled program: a scan over all steps, vmapped over the 4 settings.

  Args:
    config: configs/adam_invariance.py (the `app_a2` section is used).
    workdir: where figures go (None: no figures).
    progress: called with one line per recipe.

  Returns:
    dict with 'records' {run: {setting: {metric: array [steps, ...]}}} (numpy), 'summary'
    {run: {setting: final unscaled task losses}}, 'figures' (paths) and 'settings'.
  """
  a2 = config.app_a2
  for run in a2.runs:
    if run not in _A2_RECIPES:
      raise ValueError(f"config.app_a2.runs has unknown {run!r}; valid: {', '.join(_A2_RECIPES)}.")
  model = TinyMultiTask(width=int(config.model.width))
  data_rng, init_rng, order_rng = jax.random.split(jax.random.PRNGKey(int(a2.seed)), 3)
  samples = jax.random.uniform(data_rng, (int(a2.num_samples), 1))
  per_epoch = int(a2.num_samples) // int(a2.batch_size)
  orders = jax.vmap(
    lambda key: jax.random.permutation(key, int(a2.num_samples))[: per_epoch * int(a2.batch_size)]
  )(jax.random.split(order_rng, int(a2.num_epochs)))
  inputs = samples[orders.reshape(-1, int(a2.batch_size))]  # [steps, B, 1]
  params = model.init(init_rng, inputs[0])["params"]
  alphas = jnp.asarray(a2.alphas, jnp.float32)
  settings = {
    "frozen, unscaled": (jnp.ones_like(alphas), 0.0),
    "frozen, scaled": (alphas, 0.0),
    "trainable, unscaled": (jnp.ones_like(alphas), 1.0),
    "trainable, scaled": (alphas, 1.0),
  }
  stacked_alphas = jnp.stack([value[0] for value in settings.values()])
  stacked_train = jnp.asarray([value[1] for value in settings.values()], jnp.float32)
  records, summary = {}, {}
  for run in a2.runs:
    recipe = _A2_RECIPES[run]
    lr = float(a2.sgd_learning_rate if recipe.optimizer == "sgd" else a2.adam_learning_rate)
    simulate = make_simulator(model, recipe, tuple(config.targets_scale))
    batched = jax.jit(jax.vmap(simulate, in_axes=(None, None, 0, 0, None, None)))
    output = jax.device_get(
      batched(params, inputs, stacked_alphas, stacked_train, lr, float(a2.adam_eps))
    )
    records[run] = {
      name: {key: value[i] for key, value in output.items()} for i, name in enumerate(settings)
    }
    summary[run] = {
      name: [float(v) for v in records[run][name]["loss"][-per_epoch:].mean(0)] for name in settings
    }
    progress(
      f"  {run}: final-epoch task losses "
      + "; ".join(
        f"{name}: " + ", ".join(f"{v:.4f}" for v in losses) for name, losses in summary[run].items()
      )
    )
  figures = plot_app_a2(records, workdir, per_epoch) if workdir else []
  return {"records": records, "summary": summary, "figures": figures, "settings": list(settings)}


def plot_app_a2(records: dict, workdir: str, per_epoch: int) -> list[str]:
  """One figure per backbone mode (rows: runs; columns: loss, scaled loss, gradient norm,
  update norm; solid = unscaled, dashed = scaled), plus the key update-norm figure."""
  import matplotlib  # noqa: PLC0415  (plotting is optional at import time)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  metrics = ("loss", "scaled_loss", "grad_norm", "update_norm")
  colours = {"backbone": "black", "head_0": "tab:blue", "head_1": "tab:orange"}
  paths = []

  def smooth(values):
    # Per-epoch means: the per-step curves of L1 losses are too noisy to compare by eye.
    steps = (len(values) // per_epoch) * per_epoch
    return values[:steps].reshape(-1, per_epoch, *values.shape[1:]).mean(1)

  for mode in ("frozen", "trainable"):
    figure, axes = plt.subplots(
      len(records), len(metrics), figsize=(4 * len(metrics), 2.6 * len(records)), squeeze=False
    )
    for row, (run, by_setting) in enumerate(records.items()):
      for column, metric in enumerate(metrics):
        panel = axes[row, column]
        for scaled, style in (("unscaled", "-"), ("scaled", "--")):
          values = smooth(by_setting[f"{mode}, {scaled}"][metric])
          groups = GROUPS[1:] if metric in ("loss", "scaled_loss") else GROUPS
          for index, group in enumerate(groups):
            if mode == "frozen" and group == "backbone":
              continue
            series = (
              values[:, index]
              if metric in ("loss", "scaled_loss")
              else values[:, GROUPS.index(group)]
            )
            panel.plot(series, style, color=colours[group], lw=1, label=f"{group} ({scaled})")
        panel.set_yscale("log")
        panel.set_title(f"{run}: {metric.replace('_', ' ')}", fontsize=9)
        panel.set_xlabel("epoch", fontsize=8)
    axes[0, -1].legend(fontsize=6)
    figure.suptitle(f"App. A2, {mode} backbone (solid: unscaled, dashed: scaled losses)")
    figure.tight_layout()
    path = os.path.join(workdir, f"app_a2_{mode}.png")
    figure.savefig(path, dpi=70)
    plt.close(figure)
    paths.append(path)
  # The key figure: update norms per group, frozen vs trainable, for every run.
  figure, axes = plt.subplots(1, len(records), figsize=(3.2 * len(records), 2.8), squeeze=False)
  for column, (run, by_setting) in enumerate(records.items()):
    panel = axes[0, column]
    for mode, groups in (("frozen", GROUPS[1:]), ("trainable", GROUPS)):
      for scaled, style in (("unscaled", "-"), ("scaled", "--")):
        values = smooth(by_setting[f"{mode}, {scaled}"]["update_norm"])
        for group in groups:
          if mode == "frozen" and group != "head_1":
            continue  # Frozen: show head_1 (loss x alphas[1]) only, to keep the panel readable.
          label = f"{mode} {group}"
          panel.plot(
            values[:, GROUPS.index(group)],
            style,
            lw=1,
            label=f"{label} ({scaled})",
            color={
              "frozen head_1": "tab:green",
              "trainable backbone": "black",
              "trainable head_0": "tab:blue",
              "trainable head_1": "tab:orange",
            }[label],
          )
    panel.set_yscale("log")
    panel.set_title(f"{run}: update norm", fontsize=9)
    panel.set_xlabel("epoch", fontsize=8)
  axes[0, -1].legend(fontsize=5)
  figure.tight_layout()
  path = os.path.join(workdir, "app_a2_update_norms.png")
  figure.savefig(path, dpi=70)
  plt.close(figure)
  paths.append(path)
  return paths
