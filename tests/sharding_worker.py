"""Subprocess body of tests/test_sharding.py: sharded computations against one device, printed as
JSON.

Run as `python tests/sharding_worker.py <mode> <directory>` with XLA_FLAGS setting the host
device count before JAX starts (the emulated device count is fixed at backend start-up, so
it cannot be changed inside a pytest process). Modes: 'single' (1 device) and 'sharded'
(8 devices: every equivalence check, checkpoints across device counts, a training run compared
with the single one) side by side; then the test process restores the sharded checkpoint on one
device (`restore_checks`). The 'single' process writes what the 'sharded' one compares with (a
checkpoint, the real methods' one-device steps, a training run) into the shared directory, and the
'sharded' one waits for each file where it needs it: on two cores the two processes' compiles
overlap.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import test as test_config  # noqa: E402
from mtl_jax import checkpoint as checkpoint_lib  # noqa: E402
from mtl_jax import config_validation  # noqa: E402
from mtl_jax import conflicts  # noqa: E402
from mtl_jax import gramian  # noqa: E402
from mtl_jax import models  # noqa: E402
from mtl_jax import parallel as sharding  # noqa: E402
from mtl_jax import runtime  # noqa: E402
from mtl_jax import tasks as tasks_lib  # noqa: E402
from mtl_jax import train  # noqa: E402
from mtl_jax import weighting as weighting_lib  # noqa: E402
from mtl_jax.gramian import blocks  # noqa: E402
from mtl_jax.gramian import capture  # noqa: E402

# The real methods checked step by step on the mesh: a Gramian method at task level, a Jacobian
# method, a loss weighting with state (FAMO's extra pass), and the two methods that bring their
# own optimizers (AdaTask, MTL-IO). A Gramian method at a per-sample level is the end-to-end run's
# (RUN_METHOD at RUN_LEVEL), and the per-sample levels' Gramians are checked on their own.
METHOD_CASES = (
  ("upgrad", "task"),
  ("graddrop", "task"),
  ("famo", "task"),
  ("adatask", "task"),
  ("mtl_io", "task"),
)
# Methods that bring their own optimizer, and the base optimizer each runs on (AdaTask: per-task
# Adam; MTL-IO: one SGD per task, stepped in turn), with option overrides. Adam's eps is raised
# to the gradients' scale (1e-3 to 1e-1) for two reasons: at eps=1e-8 Adam turns the float
# round-off (~1e-9, different on 8 devices than on one) of the conv biases before group norm,
# whose exact gradient is zero, into updates of up to lr (a 0.2 relative "error" that is no
# error), and amplifies small gradients' round-off (1.8e-5 at eps=1e-3); and an eps that is not
# negligible makes the update depend on the gradient's scale, so a gradient counted once per
# device would show, which Adam's normalisation would otherwise hide.
METHOD_OPTIMIZERS = {"adatask": ("adam", {"eps": 1e-2}), "mtl_io": ("sgd", {})}
# The end-to-end runs: a per-sample-level method, so a step built without config.method.level
# on the mesh would train a different method; the conflict probe every 2 of the 4 steps.
RUN_METHOD, RUN_LEVEL, RUN_PROBE_EVERY = "pcgrad", "sample_task", 2
_STARTED = time.monotonic()


def progress(phase: str) -> None:
  """One log line per finished phase, with the seconds since start (where the time goes)."""
  print(f"[{time.monotonic() - _STARTED:7.1f} s] {phase}", flush=True)


# Written by the first 'single' process once its checkpoint is complete.
SINGLE_CHECKPOINT_SAVED = "from_single.saved"


def relative_error(sharded, single) -> float:
  """max |a - b| / max |b| over all leaves of two pytrees together.

  Per-leaf ratios would be meaningless for leaves whose exact value is 0 (a conv bias before
  group norm has gradient 0 up to rounding).
  """
  pairs = zip(
    jax.tree_util.tree_leaves(jax.device_get(sharded)),
    jax.tree_util.tree_leaves(jax.device_get(single)),
  )
  difference, scale = 0.0, 1e-30
  for a, b in pairs:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
      return float("inf")
    difference = max(difference, float(np.max(np.abs(a - b), initial=0.0)))
    scale = max(scale, float(np.max(np.abs(b), initial=0.0)))
  return difference / scale


def experiment_and_state(optimizer_name: str = "sgd"):
  """The tiny test experiment (small CNN, group norm, 3 dense tasks) and its initial state.

  SGD by default: Adam's normalisation would hide a gradient counted n times over the devices.
  """
  config = test_config.get_config()
  config.optimizer.name = optimizer_name
  # Large enough that parameter changes (~1e-2) dwarf a float32 ulp of the parameters (~3e-8):
  # at 1e-3, one-ulp differences alone gave relative errors ~2e-5 in the encoder's changes.
  config.optimizer.learning_rate = 0.2
  config.optimizer.weight_decay = 0.0
  experiment = train.build_experiment(config)
  return config, experiment, train.init_state(experiment, 0)


def change(new_state, state) -> dict:
  """What training changed: parameter updates (an n-fold gradient shows here even under a tiny lr).

  Either argument may be a train state or its parameters.
  """
  new, old = (getattr(value, "params", value) for value in (new_state, state))
  return jax.tree_util.tree_map(
    lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
    jax.device_get(new),
    jax.device_get(old),
  )


def wait_for(path: str, timeout: float = 600.0) -> str:
  """Returns `path` once the other worker process has written it (the two run side by side)."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(
        f"{path} was not written within {timeout:g} s; did the 'single' worker fail?"
      )
    time.sleep(0.2)
  return path


def write_atomically(path: str, value) -> None:
  """Pickles `value` (numpy pytrees) to `path` in one rename, so `wait_for` never sees half a
  file."""
  with open(path + ".tmp", "wb") as file:
    pickle.dump(value, file)
  os.replace(path + ".tmp", path)


def run_config(config):
  """The end-to-end training run's config, the same in the one-device and the 8-device process."""
  config.training.num_epochs = 1
  config.method.name, config.method.level = RUN_METHOD, RUN_LEVEL
  config.conflicts.probe_every_steps = RUN_PROBE_EVERY
  return config


def record_values(records) -> dict:
  """Every number of conflicts.jsonl records as {(epoch, pair type, measure): [values]}, for
  comparisons."""
  values = {}
  for record in records:
    for pair_type in conflicts.PAIR_TYPES:
      for measure, stats in record[pair_type].items():
        if isinstance(stats, dict):
          values[(record["epoch"], pair_type, measure)] = [
            np.nan if stats[key] is None else float(stats[key]) for key in sorted(stats)
          ]
  return values


def method_state(experiment, weighting, optimizer, state, level: str):
  """`state` with a method's weighting parameters, state and optimizer state (no new init
  compile)."""
  rows = weighting_lib.state_size(
    weighting, level, len(experiment.tasks), int(experiment.config.training.batch_size)
  )
  weighting_params, weighting_state = weighting.init(rows)
  trainable = {"model": state.params, "weighting": weighting_params}
  return state.replace(
    weighting_params=weighting_params,
    weighting_state=weighting_state,
    opt_state=optimizer.init(trainable),
  )


def method_case(config, experiment, state, name: str, level: str):
  """(weighting, optimizer, start state) of one of METHOD_CASES, built as `train.build_experiment`
  does (a method with its own optimizer gets it, on the base optimizer METHOD_OPTIMIZERS names)."""
  options = weighting_lib.method_options(config, experiment.steps_per_epoch)
  options.level = level
  weighting = weighting_lib.get(name, options)
  optimizer = experiment.optimizer
  if getattr(weighting, "make_optimizer", None) is not None:
    optimizer_config = config.optimizer.copy_and_resolve_references()
    optimizer_config.name, overrides = METHOD_OPTIMIZERS[name]
    optimizer_config.update(overrides)
    optimizer = weighting.make_optimizer(
      optimizer_config, experiment.steps_per_epoch, [task.name for task in experiment.tasks]
    )
  return weighting, optimizer, method_state(experiment, weighting, optimizer, state, level)


def reference_path(directory: str, name: str, level: str) -> str:
  return os.path.join(directory, f"reference_{name}_{level}.pickle")


def method_references(config, experiment, state, batch, directory: str) -> None:
  """The one-device side of `method_checks`: two steps of each of METHOD_CASES, jitted on one
  device, saved as (parameters, loss, weighting state) for the 'sharded' process."""
  for name, level in METHOD_CASES:
    weighting, optimizer, reference = method_case(config, experiment, state, name, level)
    step = jax.jit(
      train.make_train_step(experiment.model, experiment.tasks, weighting, optimizer, level)
    )
    for _ in range(2):
      reference, metrics = step(reference, batch)
    write_atomically(
      reference_path(directory, name, level),
      jax.device_get((reference.params, metrics["loss"], reference.weighting_state)),
    )


def method_checks(config, experiment, state, mesh, batch, directory: str) -> dict:
  """Each of METHOD_CASES as the training loop builds it: `train.make_train_step` at its level
  for the mesh through `sharding.shard_training`, against the same step on one device (from
  `method_references`). Two steps (SGD, or the optimizer the method brings); the errors cover
  parameter changes, loss and the weighting's state."""
  results = {}
  for name, level in METHOD_CASES:
    weighting, optimizer, start = method_case(config, experiment, state, name, level)
    sharded_step, sharded = sharding.shard_training(
      config,
      mesh,
      train.make_train_step(
        experiment.model, experiment.tasks, weighting, optimizer, level, mesh=mesh
      ),
      start,
    )
    for _ in range(2):
      sharded, metrics = sharded_step(sharded, sharding.global_batch(batch, mesh))
    with open(wait_for(reference_path(directory, name, level)), "rb") as file:
      reference_params, reference_loss, reference_weighting_state = pickle.load(file)
    results[f"method_{name}_{level}"] = update_error(
      sharded,
      reference_params,
      start,
      metrics["loss"],
      reference_loss,
      sharded.weighting_state,
      reference_weighting_state,
    )
  return results


def config_options(section, **overrides):
  """A copy of a config section with overrides."""
  section = ml_collections.ConfigDict(section.to_dict())
  section.update(overrides)
  return section


def probe_checks(config, experiment, state, mesh, batch) -> dict:
  """The conflict probe on a mesh against one device, 8 probed rows: on the 8-device mesh they
  are split over the devices; on a 3-device mesh (8 rows do not split) each device computes
  them whole. Measures and parameter ratios."""
  results = {}
  options = config_options(config.conflicts, probe_every_steps=1, max_samples=8)
  expected = conflicts.ConflictProbe(
    experiment.model, experiment.tasks, options, None, seed=0
  ).measure(state.params, state.batch_stats, batch, step=3)
  for probe_mesh in (mesh, sharding.make_mesh(data_axis_size=3)):
    placed = sharding.place_state(state, sharding.state_shardings(state, probe_mesh))
    probe = conflicts.ConflictProbe(
      experiment.model, experiment.tasks, options, None, seed=0, mesh=probe_mesh
    )
    measured = probe.measure(placed.params, placed.batch_stats, batch, step=3)
    name = "split" if probe.splits_rows(8) else "replicated"
    results[f"probe_{name}_measures"] = relative_error(measured["measures"], expected["measures"])
    results[f"probe_{name}_ratios"] = relative_error(measured["ratios"], expected["ratios"])
  return results


def update_error(new_state, reference_state, start, *others) -> float:
  """relative_error of the parameter changes from `start` (and of `others`, pairs of values).

  Also the encoder's changes alone: the heads get each task's plain gradient under every
  method, and their (larger) changes would otherwise set the scale that hides an encoder error.
  """
  sharded, reference = change(new_state, start), change(reference_state, start)
  pairs = list(zip(others[::2], others[1::2]))
  return max(
    relative_error((sharded, [a for a, _ in pairs]), (reference, [b for _, b in pairs])),
    relative_error(sharded["encoder"], reference["encoder"]),
  )


def first_batch(experiment, size: int):
  return experiment.dataset.splits["train"].batch(np.arange(size))


def norm_weights(task_gramian_values):
  """A Gramian method for the tests: each task's mean loss weighted by 1 / its gradient norm."""
  return 1.0 / jnp.sqrt(jnp.diagonal(task_gramian_values) + 1e-12)


def conflict_statistics(task_gramian, full_gramian) -> dict:
  """Task cosines, and the fraction of sample pairs (i != j) whose row gradients conflict."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(task_gramian), 1e-30))
  batch = full_gramian.shape[0]
  off_diagonal = 1.0 - jnp.eye(batch)
  negative = (full_gramian < 0).astype(jnp.float32) * off_diagonal[:, None, :, None]
  return {
    "task_cosine": task_gramian / (norms[:, None] * norms[None, :]),
    "sample_conflict_fraction": jnp.sum(negative, axis=(0, 2)) / (batch * (batch - 1)),
  }


def gramian_step(model, tasks, optimizer, mesh=None):
  """A Gramian-method train step on the per-sample ('full') Gramian of the engine, on one device
  or on the mesh's shard_map engine: rows weighted by 1 / their task's batch gradient norm."""

  def step(state, batch):
    result = gramian.compute(
      model, state.params, state.batch_stats, batch, tasks, gramian.FULL, mesh=mesh
    )
    full = result.gramian
    if mesh is not None:
      full = jax.lax.with_sharding_constraint(full, sharding.replicated(mesh))
    task_weights = norm_weights(gramian.task_gramian(full))
    batch_size = full.shape[0]
    row_weights = jnp.broadcast_to(task_weights[None, :] / batch_size, (batch_size, len(tasks)))
    grads = {"model": result.gradient(row_weights), "weighting": state.weighting_params}
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    loss = jnp.sum(task_weights * result.task_losses)
    return state.replace(step=state.step + 1, params=trainable["model"], opt_state=opt_state), loss

  return step


# Encoders whose dense or conv layers take the ghost form (`gramian.layer_strategy`) at batch
# 16 with 3 tasks, so their sharded Gramian blocks gather raw inputs and output gradients: an
# MLP (dense layers, one position) and a small CNN on 4x4 images (its second conv, 16
# positions).
GHOST_CASES = {
  "mlp": ({"encoder": "mlp", "norm": "group", "hidden": (64, 32)}, (8, 8, 3)),
  "small_cnn": ({"encoder": "small_cnn", "norm": "group", "features": (4, 4)}, (4, 4, 3)),
}


def ghost_form_checks(mesh) -> dict:
  """The full Gramian of each GHOST_CASES encoder on the mesh against one device."""
  results = {}
  tasks = (
    tasks_lib.Classification(name="digit", num_classes=10),
    tasks_lib.BinaryAttribute(name="smiling", index=0),
    tasks_lib.BinaryAttribute(name="glasses", index=1),
  )
  for name, (encoder, image_shape) in GHOST_CASES.items():
    model = models.build_model(
      ml_collections.ConfigDict(encoder),
      {task.name: models.HeadSpec(task.output_channels, dense=False) for task in tasks},
    )
    params = models.init_model(model, jax.random.PRNGKey(0), (1, *image_shape))["params"]
    generator = np.random.default_rng(1)
    batch = {
      "image": generator.standard_normal((16, *image_shape), dtype=np.float32),
      "attributes": (generator.uniform(size=(16, 2)) > 0.5).astype(np.float32),
      "label": generator.integers(0, 10, size=16).astype(np.int32),
    }
    ghost_layers = []

    def count_ghost_layers(p, b, model=model, ghost_layers=ghost_layers):
      # Traced only (shapes decide each layer's form): an eager capture costs seconds.
      captured = capture.capture(model, p, {}, b, tasks)
      ghost_layers.extend(
        path
        for path, info in captured.infos.items()
        if not blocks.is_materialised(info, captured.inputs[path], captured.output_gradients[path])
      )
      return captured.losses

    jax.eval_shape(count_ghost_layers, params, batch)
    single = jax.jit(lambda p, b, model=model: gramian.compute(model, p, {}, b, tasks).gramian)(
      params, batch
    )
    sharded = jax.jit(
      lambda p, b, model=model: gramian.compute(model, p, {}, b, tasks, mesh=mesh).gramian
    )(params, sharding.shard_batch(batch, mesh))
    # No ghost-form layer would make the check vacuous: report it as a failure.
    results[f"ghost_gramian_{name}"] = (
      relative_error(sharded, single) if ghost_layers else float("inf")
    )
  return results


def sharded_checks(directory: str) -> dict:
  results = {"device_count": jax.device_count()}
  config, experiment, state = experiment_and_state("sgd")
  model, tasks = experiment.model, experiment.tasks
  mesh = sharding.make_mesh(config)
  batch = first_batch(experiment, 16)
  single = jax.devices()[0]

  # The plain (EW) train step, replicated and FSDP, against one device; two steps so the
  # second sees the first's updates.
  step = train.make_train_step(model, tasks, experiment.weighting, experiment.optimizer)
  reference_state = state
  single_step = jax.jit(step)
  for _ in range(2):
    reference_state, reference_metrics = single_step(reference_state, jax.device_put(batch, single))
  shardings = sharding.state_shardings(state, mesh)
  sharded_state = sharding.place_state(state, shardings)
  sharded_step = sharding.shard_train_step(step, mesh, shardings)
  for _ in range(2):
    sharded_state, metrics = sharded_step(sharded_state, sharding.shard_batch(batch, mesh))
  results["ew_step"] = update_error(
    sharded_state, reference_state, state, metrics["loss"], reference_metrics["loss"]
  )
  progress("ew step")
  fsdp = sharding.state_shardings(state, mesh, fsdp=True, fsdp_min_size=64)
  results["fsdp_specs"] = sorted({str(leaf.spec) for leaf in jax.tree_util.tree_leaves(fsdp)})
  # The multi-host input path (process-local rows -> global array), exercised on one process.
  results["process_local_batch"] = relative_error(
    sharding.shard_batch(batch, mesh, process_local=True), batch
  )

  # Gramians: the full per-row Gramian, the task-level Gramian, conflict statistics.
  params, stats = state.params, state.batch_stats
  placed = sharding.shard_batch(batch, mesh)
  full_single = jax.jit(lambda p, b: gramian.compute(model, p, stats, b, tasks).gramian)(
    params, batch
  )
  full_sharded = jax.jit(
    lambda p, b: gramian.compute(model, p, stats, b, tasks, mesh=mesh).gramian
  )(params, placed)
  results["gramian"] = relative_error(full_sharded, full_single)
  results["gramian_sharding"] = str(full_sharded.sharding.spec)
  # The reference is the full Gramian's reduction (independent of the task-rows computation).
  task_single = gramian.task_gramian(full_single)
  losses_single = jnp.mean(gramian.per_sample_losses(model, params, stats, batch, tasks), axis=0)
  task_result = jax.jit(
    lambda p, b: gramian.compute(model, p, stats, b, tasks, "task", mesh=mesh)[:2]
  )
  task_sharded, losses_sharded = task_result(params, placed)
  results["task_gramian"] = relative_error(
    (task_sharded, losses_sharded), (task_single, losses_single)
  )
  results["conflicts"] = relative_error(
    conflict_statistics(task_sharded, full_sharded), conflict_statistics(task_single, full_single)
  )
  # The per-sample levels' Gramians as the Gramian methods' mesh steps get them (replicated).
  levels = ("sample", "sample_task")
  rows_sharded = jax.jit(
    lambda p, b: [
      gramian.compute(model, p, stats, b, tasks, level, mesh=mesh)[:2] for level in levels
    ]
  )(params, placed)
  results["rows_gramian"] = relative_error(
    [(rows, task_losses) for rows, task_losses in rows_sharded],
    [(gramian.at_level(full_single, level), losses_single) for level in levels],
  )
  results["rows_gramian_sharding"] = sorted(
    {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(rows_sharded)}
  )
  # Partial labels: the same levels and masked task losses with a label mask in the batch.
  labelled = np.random.default_rng(0).random((len(batch["image"]), len(tasks))) < 0.6
  masked = {**batch, tasks_lib.LABEL_MASK_KEY: labelled}

  def masked_rows(p, b, mesh):
    return [gramian.compute(model, p, stats, b, tasks, level, mesh=mesh)[:2] for level in levels]

  results["masked_rows_gramian"] = relative_error(
    jax.jit(lambda p, b: masked_rows(p, b, mesh))(params, sharding.shard_batch(masked, mesh)),
    jax.jit(lambda p, b: masked_rows(p, b, None))(params, masked),
  )
  results.update(ghost_form_checks(mesh))
  progress("gramians")

  # A Gramian method's step on the shard_map engine's per-sample Gramian and weighted gradient,
  # against the engine on one device.
  reference = jax.jit(gramian_step(model, tasks, experiment.optimizer))
  reference_state, reference_loss = state, None
  for _ in range(2):
    reference_state, reference_loss = reference(reference_state, batch)
  shardings = sharding.state_shardings(state, mesh)
  sharded_step = sharding.shard_train_step(
    gramian_step(model, tasks, experiment.optimizer, mesh), mesh, shardings
  )
  sharded_state = sharding.place_state(state, shardings)
  for _ in range(2):
    sharded_state, loss = sharded_step(sharded_state, placed)
  results["gramian_step_shard_map"] = update_error(
    sharded_state, reference_state, state, loss, reference_loss
  )

  progress("gramian step")
  results.update(method_checks(config, experiment, state, mesh, batch, directory))
  progress("method checks")
  results.update(probe_checks(config, experiment, state, mesh, batch))
  progress("probe checks")

  # A batch the devices cannot split.
  try:
    sharding.shard_batch(first_batch(experiment, 12), mesh)
    results["indivisible_error"] = None
  except config_validation.ConfigError as error:
    results["indivisible_error"] = str(error)

  # Checkpoints: restore the 1-device one onto this mesh (FSDP), save an FSDP-sharded one.
  wait_for(os.path.join(directory, SINGLE_CHECKPOINT_SAVED))
  shardings = sharding.state_shardings(state, mesh, fsdp=True, fsdp_min_size=64)
  target = sharding.place_state(jax.tree_util.tree_map(jnp.zeros_like, state), shardings)
  restored, _ = checkpoint_lib.Checkpointer(
    os.path.join(directory, "from_single"), asynchronous=False
  ).restore(target)
  results["restore_from_single"] = relative_error(restored, reference_state)
  results["restored_changed"] = relative_error(
    change(restored, state), change(reference_state, state)
  )
  results["restored_sharding_kept"] = all(
    leaf.sharding == sharding_
    for leaf, sharding_ in zip(
      jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(shardings)
    )
  )
  saver = checkpoint_lib.Checkpointer(os.path.join(directory, "from_sharded"), asynchronous=False)
  saver.save(2, sharding.place_state(reference_state, shardings), {"note": "sharded"})
  saver.close()
  progress("checkpoints")

  # The training loop end to end on the mesh (FSDP), against the one-device run of the same
  # config by the 'single' process: test metrics, conflicts.jsonl and the trained parameters.
  config = run_config(config)
  config.sharding.fsdp, config.sharding.fsdp_min_size = True, 64
  sharded_directory, single_directory = (
    os.path.join(directory, "run_sharded"),
    os.path.join(directory, "run_single"),
  )
  sharded_run = train.train_and_evaluate(config, sharded_directory)["test"]
  progress("training run")
  with open(wait_for(os.path.join(single_directory, train.RESULTS_FILE))) as file:
    single_run = json.load(file)["test"]
  results["run_test"] = relative_error(
    [sharded_run[key] for key in sorted(single_run)],
    [single_run[key] for key in sorted(single_run)],
  )
  sharded_records = record_values(conflicts.read_records(sharded_directory))
  single_records = record_values(conflicts.read_records(single_directory))
  results["run_conflict_records"] = [len(sharded_records), len(single_records)]
  # Measure by measure: dot products and cosines have different scales.
  results["run_conflicts"] = max(
    (
      relative_error(np.nan_to_num(sharded_records.get(key, [np.inf])), np.nan_to_num(values))
      for key, values in single_records.items()
    ),
    default=float("inf"),
  )
  experiment = train.build_experiment(config, experiment.dataset)
  target = method_state(experiment, experiment.weighting, experiment.optimizer, state, RUN_LEVEL)
  finals = [
    checkpoint_lib.Checkpointer(path, asynchronous=False).restore(target)[0]
    for path in (sharded_directory, single_directory)
  ]
  results["run_params"] = update_error(finals[0], finals[1], state)
  progress("run compared")
  return results


def restore_checks(directory: str) -> dict:
  """After the 'sharded' process: its FSDP-sharded checkpoint restored on one device and compared
  with the state the 'single' process saved (the very state it saved). Runs in the test process
  (any device count: the target lives on one device)."""
  _, _, state = experiment_and_state("sgd")
  target = jax.tree_util.tree_map(jnp.zeros_like, state)
  restored, _ = checkpoint_lib.Checkpointer(
    os.path.join(directory, "from_sharded"), asynchronous=False
  ).restore(target)
  expected, _ = checkpoint_lib.Checkpointer(
    os.path.join(directory, "from_single"), asynchronous=False
  ).restore(target)
  return {
    "restore_from_sharded": relative_error(restored, expected),
    "restored_changed": relative_error(change(restored, state), change(expected, state)),
    "restored_devices": sorted(
      {len(leaf.sharding.device_set) for leaf in jax.tree_util.tree_leaves(restored)}
    ),
  }


def single_checks(directory: str) -> dict:
  """One device: a Gramian-method state saved, the real methods' steps, and a training run."""
  config, experiment, state = experiment_and_state("sgd")
  results = {"device_count": jax.device_count()}
  step = jax.jit(gramian_step(experiment.model, experiment.tasks, experiment.optimizer))
  batch = first_batch(experiment, 16)
  for _ in range(2):
    state, _ = step(state, batch)
  saver = checkpoint_lib.Checkpointer(os.path.join(directory, "from_single"), asynchronous=False)
  saver.save(2, state, {"note": "single"})
  saver.close()
  progress("single checkpoint")
  with open(os.path.join(directory, SINGLE_CHECKPOINT_SAVED), "w"):
    pass
  method_references(config, experiment, train.init_state(experiment, 0), batch, directory)
  progress("method references")
  train.train_and_evaluate(run_config(config), os.path.join(directory, "run_single"))
  progress("single training run")
  return results


if __name__ == "__main__":
  # The suite's compilation cache: programs the test process or another test compiled are reused.
  runtime.enable_compilation_cache()
  mode, workdir = sys.argv[1], sys.argv[2]
  output = sharded_checks(workdir) if mode == "sharded" else single_checks(workdir)
  print("RESULTS " + json.dumps(output))
