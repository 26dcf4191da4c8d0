"""Subprocess body of tests/test_sharding.py: sharded computations against one device, printed as JSON.

Run as `python tests/sharding_worker.py <mode> <directory>` with XLA_FLAGS setting the host
device count before JAX starts (the emulated device count is fixed at backend start-up, so
it cannot be changed inside a pytest process). Modes: 'single' (1 device) then 'sharded'
(8 devices: every equivalence check, checkpoints across device counts, a training run compared
with the single one) then 'single' again (restores the sharded checkpoint on one device).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import test as test_config  # noqa: E402
from mtl_jax import checkpoint as checkpoint_lib  # noqa: E402
from mtl_jax import config_validation  # noqa: E402
from mtl_jax import gramian  # noqa: E402
from mtl_jax import sharding  # noqa: E402
from mtl_jax import train  # noqa: E402


def relative_error(sharded, single) -> float:
  """max |a - b| / max |b| over all leaves of two pytrees together.

  Per-leaf ratios would be meaningless for leaves whose exact value is 0 (a conv bias before
  group norm has gradient 0 up to rounding).
  """
  pairs = zip(jax.tree_util.tree_leaves(jax.device_get(sharded)), jax.tree_util.tree_leaves(jax.device_get(single)))
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
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.0
  experiment = train.build_experiment(config)
  return config, experiment, train.init_state(experiment, 0)


def change(new_state, state) -> dict:
  """What training changed: parameter updates (an n-fold gradient shows here even under a tiny lr)."""
  return jax.tree_util.tree_map(lambda new, old: np.asarray(new, np.float64) - np.asarray(old, np.float64),
                                jax.device_get(new_state.params), jax.device_get(state.params))


def first_batch(experiment, size: int):
  return experiment.dataset.splits["train"].batch(np.arange(size))


def norm_weights(task_gramian_values):
  """A Gramian method for the tests: each task's mean loss weighted by 1 / its gradient norm."""
  return 1.0 / jnp.sqrt(jnp.diagonal(task_gramian_values) + 1e-12)


def weights_fn(full_gramian, losses):
  del losses
  return norm_weights(gramian.task_gramian(full_gramian))


def gramian_step(grads_fn, optimizer):
  """A Gramian-method train step around a `(params, batch_stats, batch) -> LossGradsGramian`."""

  def step(state, batch):
    result = grads_fn(state.params, state.batch_stats, batch)
    grads = {"model": result.grads, "weighting": state.weighting_params}
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return state.replace(step=state.step + 1, params=trainable["model"], opt_state=opt_state), result.loss

  return step


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
  results["ew_step"] = relative_error((change(sharded_state, state), metrics["loss"]),
                                      (change(reference_state, state), reference_metrics["loss"]))
  fsdp = sharding.state_shardings(state, mesh, fsdp=True, fsdp_min_size=64)
  results["fsdp_specs"] = sorted({str(leaf.spec) for leaf in jax.tree_util.tree_leaves(fsdp)})
  # The multi-host input path (process-local rows -> global array), exercised on one process.
  results["process_local_batch"] = relative_error(sharding.shard_batch(batch, mesh, process_local=True), batch)

  # Gramians: the full per-row Gramian, the task-level Gramian, conflict statistics.
  params, stats = state.params, state.batch_stats
  placed = sharding.shard_batch(batch, mesh)
  full_single = jax.jit(lambda p, b: gramian.compute_gramian(model, p, stats, b, tasks))(params, batch)
  full_sharded = jax.jit(lambda p, b: sharding.sharded_gramian(model, p, stats, b, tasks, mesh))(params, placed)
  results["gramian"] = relative_error(full_sharded, full_single)
  results["gramian_sharding"] = str(full_sharded.sharding.spec)
  # The reference is the full Gramian's reduction: jit(gramian.task_level_gramian) on one CPU
  # device was measured to disagree with its own eager value (normals task), see the report.
  task_single = gramian.task_gramian(full_single)
  losses_single = jnp.mean(gramian.per_sample_losses(model, params, stats, batch, tasks), axis=0)
  task_sharded, losses_sharded = jax.jit(
      lambda p, b: sharding.sharded_task_gramian(model, p, stats, b, tasks, mesh))(params, placed)
  results["task_gramian"] = relative_error((task_sharded, losses_sharded), (task_single, losses_single))
  results["conflicts"] = relative_error(sharding.conflict_statistics(task_sharded, full_sharded),
                                        sharding.conflict_statistics(task_single, full_single))

  # A Gramian method's train step: shard_map engine, and the single-device engine under GSPMD.
  single_engine = lambda p, s, b: gramian.loss_grads_and_gramian(model, p, s, b, tasks, weights_fn=weights_fn)
  reference = jax.jit(gramian_step(single_engine, experiment.optimizer))
  reference_state, reference_loss = state, None
  for _ in range(2):
    reference_state, reference_loss = reference(reference_state, batch)
  shardings = sharding.state_shardings(state, mesh)
  engines = {
      "gramian_step_shard_map": sharding.sharded_loss_grads_and_gramian(model, tasks, mesh, weights_fn),
      "gramian_step_gspmd": single_engine,
  }
  for name, engine in engines.items():
    sharded_step = sharding.shard_train_step(gramian_step(engine, experiment.optimizer), mesh, shardings)
    sharded_state = sharding.place_state(state, shardings)
    for _ in range(2):
      sharded_state, loss = sharded_step(sharded_state, placed)
    results[name] = relative_error((change(sharded_state, state), loss), (change(reference_state, state), reference_loss))

  # A batch the devices cannot split.
  try:
    sharding.shard_batch(first_batch(experiment, 12), mesh)
    results["indivisible_error"] = None
  except config_validation.ConfigError as error:
    results["indivisible_error"] = str(error)

  # Checkpoints: restore the 1-device one onto this mesh (FSDP), save an FSDP-sharded one.
  shardings = sharding.state_shardings(state, mesh, fsdp=True, fsdp_min_size=64)
  target = sharding.place_state(jax.tree_util.tree_map(jnp.zeros_like, state), shardings)
  restored, _ = checkpoint_lib.Checkpointer(os.path.join(directory, "from_single"), asynchronous=False).restore(target)
  results["restore_from_single"] = relative_error(restored, reference_state)
  results["restored_changed"] = relative_error(change(restored, state), change(reference_state, state))
  results["restored_sharding_kept"] = all(
      leaf.sharding == sharding_ for leaf, sharding_ in zip(jax.tree_util.tree_leaves(restored),
                                                           jax.tree_util.tree_leaves(shardings)))
  saver = checkpoint_lib.Checkpointer(os.path.join(directory, "from_sharded"), asynchronous=False)
  saver.save(2, sharding.place_state(reference_state, shardings), {"note": "sharded"})
  saver.close()

  # The training loop end to end on the mesh (FSDP): its test metrics are compared with a
  # one-device run of the same config by the 'single' process.
  config.training.num_epochs = 1
  config.sharding.fsdp, config.sharding.fsdp_min_size = True, 64
  sharded_run = train.train_and_evaluate(config, os.path.join(directory, "run_sharded"))["test"]
  with open(os.path.join(directory, "run_single", train.RESULTS_FILE)) as file:
    single_run = json.load(file)["test"]
  results["run_test"] = relative_error([sharded_run[key] for key in sorted(single_run)],
                                       [single_run[key] for key in sorted(single_run)])
  return results


def single_checks(directory: str) -> dict:
  """One device. First call: a Gramian-method state saved, and a training run. Second call (after
  the sharded process): its FSDP-sharded checkpoint restored here and compared with the first."""
  config, experiment, state = experiment_and_state("sgd")
  results = {"device_count": jax.device_count()}
  sharded_path = os.path.join(directory, "from_sharded")
  if os.path.isdir(sharded_path):
    # The sharded process saved the very state the first call saved from one device.
    target = jax.tree_util.tree_map(jnp.zeros_like, state)
    restored, _ = checkpoint_lib.Checkpointer(sharded_path, asynchronous=False).restore(target)
    expected, _ = checkpoint_lib.Checkpointer(os.path.join(directory, "from_single"), asynchronous=False).restore(target)
    results["restore_from_sharded"] = relative_error(restored, expected)
    results["restored_changed"] = relative_error(change(restored, state), change(expected, state))
    results["restored_devices"] = sorted({len(leaf.sharding.device_set) for leaf in jax.tree_util.tree_leaves(restored)})
    return results
  engine = lambda p, s, b: gramian.loss_grads_and_gramian(experiment.model, p, s, b, experiment.tasks,
                                                          weights_fn=weights_fn)
  step = jax.jit(gramian_step(engine, experiment.optimizer))
  batch = first_batch(experiment, 16)
  for _ in range(2):
    state, _ = step(state, batch)
  saver = checkpoint_lib.Checkpointer(os.path.join(directory, "from_single"), asynchronous=False)
  saver.save(2, state, {"note": "single"})
  saver.close()
  config.training.num_epochs = 1
  train.train_and_evaluate(config, os.path.join(directory, "run_single"))
  return results


if __name__ == "__main__":
  mode, workdir = sys.argv[1], sys.argv[2]
  output = sharded_checks(workdir) if mode == "sharded" else single_checks(workdir)
  print("RESULTS " + json.dumps(output))
