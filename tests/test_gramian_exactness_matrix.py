"""The jitted fast Gramian and jitted Gramian train steps against an eager per-sample loop of
jax.grad.

Every encoder x every norm, four tasks (dense and global heads on dense encoders), parameters
away from their initialisation, several seeds. The expected values never go through a compiled
program: each row (i, t) is `jax.grad` of sample i's task-t loss, run op by op, so a compiler
fault in the fused programs (see `gramian.stacked_vjp`) cannot hide in both sides. One compiled
program per encoder and norm holds the fast Gramian and the train steps at every level; the
seeds reuse it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gramian_cases
from mtl_jax import gramian
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax import weighting as weighting_lib
from mtl_jax.models import layers

SEEDS = (0, 1, 2)
# On 2 CPU cores a cold run of the small encoders' cases takes under a minute (two seeds); each
# case of the large encoders compiles for a minute or more (SegNet's 26 layers, and the eager
# loop compiles every operation it meets once). They and the third seed run with
# MTL_JAX_SLOW_TESTS=1, as test_gramian.py's SegNet case does.
FAST_ENCODERS = ("mlp", "small_cnn")
FAST_SEEDS = SEEDS[:2]
SLOW = os.environ.get("MTL_JAX_SLOW_TESTS") == "1"
_SLOW_MARK = pytest.mark.skipif(not SLOW, reason="slow: set MTL_JAX_SLOW_TESTS=1")
CASES = [
  pytest.param(encoder, norm, marks=() if encoder in FAST_ENCODERS else _SLOW_MARK)
  for encoder in gramian_cases.ENCODERS
  for norm in layers.NORM_KINDS
]
# Relative Frobenius error allowed (float32 sums over up to 10^5 terms; faults gave 0.3-4).
TOLERANCE = 1e-4
# Training-mode batch norm over 3 samples divides by tiny variances: jit(grad) of the same
# batch-mean loss differs from eager grad by 4e-4 there, with no Gramian code involved.
BATCH_NORM_STEP_TOLERANCE = 2e-3
# Test-only: cheaper XLA compilation. It keeps the HLO passes, so the fused programs (and the
# known fault, checked in test_xla_cpu_faults.py) are the ones a default compilation gets.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
PROBE_VECTOR_SEED = 5


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _mixing_weights(gramian: jax.Array) -> jax.Array:
  """Weights linear in every Gramian entry, w = G u / mean(diag G): any wrong entry moves them."""
  count = gramian.shape[0]
  direction = jnp.asarray(
    np.random.default_rng(PROBE_VECTOR_SEED).uniform(0.5, 1.5, count), jnp.float32
  )
  return gramian @ direction / jnp.mean(jnp.diagonal(gramian))


MIXING = weighting_lib.GramianWeighting(
  "mixing",
  weighting_lib.no_parameters,
  lambda gramian, losses, params, state, rng, step: (_mixing_weights(gramian), state, {}),
)


def _levels(norm: str) -> tuple[str, ...]:
  """The step levels checked: per-sample levels refuse train-mode batch norm (its statistics
  couple the samples), and its task-level step needs an eager loop over the whole batch, whose
  compilation doubles the time of a case; test_gramian.py pins that step for every run too."""
  if norm == "batch":
    return ("task",) if SLOW else ()
  return weighting_lib.LEVELS


def _step_gradient(model, tasks, level, params, batch_stats, batch):
  """The encoder gradient a jitted train step descends: SGD with learning rate 1, old - new."""
  sgd = optax.sgd(1.0)
  num_rows = weighting_lib.num_rows(level, len(tasks), batch["image"].shape[0])
  weighting_params, weighting_state = MIXING.init(num_rows)
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    weighting_params=weighting_params,
    weighting_state=weighting_state,
    opt_state=sgd.init({"model": params, "weighting": weighting_params}),
    rng=jax.random.PRNGKey(0),
  )
  new_state, _ = train.make_train_step(model, tasks, MIXING, sgd, level=level)(state, batch)
  return jax.tree_util.tree_map(
    lambda old, new: old - new, params["encoder"], new_state.params["encoder"]
  )


@functools.lru_cache(maxsize=None)
def _compiled(encoder: str, norm: str):
  """(model, tasks, size, one jitted program: fast Gramian and every level's step gradient)."""
  model, tasks, size = gramian_cases.build(encoder, norm)
  mode = "eval" if norm == "batch" else "error"

  def program(params, batch_stats, batch):
    fast = gramian.compute(
      model, params, batch_stats, batch, tasks, gramian.FULL, batch_norm=mode
    ).gramian
    steps = {
      level: _step_gradient(model, tasks, level, params, batch_stats, batch)
      for level in _levels(norm)
    }
    return fast, steps

  return model, tasks, size, jax.jit(program, compiler_options=FAST_COMPILE)


def _eager_task_rows(case) -> np.ndarray:
  """[T, P]: encoder gradients of the batch-mean task losses in training mode (batch statistics),
  eager."""

  def loss(encoder_params, index):
    variables = {
      "params": {**case.params, "encoder": encoder_params},
      "batch_stats": case.batch_stats,
    }
    predictions, _ = case.model.apply(
      variables, case.batch["image"], train=True, mutable=["batch_stats"]
    )
    return jnp.mean(tasks_lib.losses_matrix(case.tasks, predictions, case.batch)[:, index])

  with jax.disable_jit():
    return np.stack(
      [
        gramian_cases.flat(jax.grad(loss)(case.params["encoder"], index))
        for index in range(len(case.tasks))
      ]
    )


def _level_rows(rows: np.ndarray, level: str) -> np.ndarray:
  """The rows a step at `level` weighs, from per-sample rows [B, T, P] (see weighting.LEVELS)."""
  batch_size = rows.shape[0]
  if level == "task":
    return rows.mean(axis=0)
  if level == "sample":
    return rows.sum(axis=1) / batch_size
  return rows.reshape(-1, rows.shape[-1]) / batch_size


def _expected_step(rows: np.ndarray) -> np.ndarray:
  gramian_of_rows = rows @ rows.T
  weights = np.asarray(_mixing_weights(jnp.asarray(gramian_of_rows, jnp.float32)), np.float64)
  return weights @ rows


@pytest.mark.parametrize("encoder,norm", CASES)
def test_jitted_fast_gramian_and_steps_equal_an_eager_per_sample_loop(encoder, norm):
  model, tasks, size, program = _compiled(encoder, norm)
  for seed in SEEDS if SLOW else FAST_SEEDS:
    case = gramian_cases.make_case(encoder, norm, seed, (model, tasks, size))
    fast, steps = jax.device_get(program(case.params, case.batch_stats, case.batch))
    rows = gramian_cases.eager_rows(case, train=norm != "batch")
    label = f"{encoder}/{norm} seed {seed}"
    assert relative_error(fast, np.einsum("itp,jsp->itjs", rows, rows)) < TOLERANCE, label
    for level, gradient in steps.items():
      level_rows = _eager_task_rows(case) if norm == "batch" else _level_rows(rows, level)
      error = relative_error(gramian_cases.flat(gradient), _expected_step(level_rows))
      assert error < (BATCH_NORM_STEP_TOLERANCE if norm == "batch" else TOLERANCE), (
        f"{label}, step at level {level!r}: {error:.3g}"
      )
