"""Run-time self-check of the fast Gramian path: a few of its rows against the reference path.

The fast path assembles per-sample Gramians from captured layer inputs and output gradients;
the reference path differentiates each sample's loss directly (vmap(grad)). Both compute the
same numbers through different compiled programs, and a compiler has miscompiled the fast
path's before (XLA:CPU's YNNPACK reduce fusion, docs/xla_cpu_faults.md). Compilers differ
between CPU, GPU and TPU and between versions, so a run checks its own: the fast Gramian of the
whole batch (the shapes the run uses) is computed, its block of a few rows is compared with the
inner products of those rows' reference gradients, and the run stops with a
`FastPathMismatchError` naming the encoder, its norm and the discrepancy when they differ by
more than a float32 tolerance.

`config.gramian.verify_every_steps` says when: -1 (the default) once, at the first step that
computes a fast-path Gramian; 0 never; k > 0 at the first such step and then at such steps at
least k steps after the previous check. The check costs one fast Gramian of the batch and the
reference gradients of a few rows (`benchmarks/gramian.py` reports it), mostly their compilation.
On a mesh it checks the one-device engine, run whole on every device.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import parallel
from mtl_jax import tasks as tasks_lib
from mtl_jax.gramian import engine
from mtl_jax.gramian import levels
from mtl_jax.gramian import reference as reference_lib

ONCE = -1
NEVER = 0
# Relative Frobenius discrepancy allowed between the two paths. Both accumulate in float32 and
# agree to 1e-7..1e-5 on XLA:CPU; the faults this check exists for gave 0.5-4. The margin
# leaves room for reduced-precision convolutions (TF32) in the model's own forward and backward.
TOLERANCE = 1e-3
# A bfloat16 model's two paths round differently: the fast path multiplies the captured bfloat16
# activations and output gradients in float32, the reference differentiates through bfloat16
# products (5.5e-3 measured on configs/test.py); still far below the faults' 0.5.
BFLOAT16_TOLERANCE = 5e-2
# Rows compared: the first SAMPLES samples times up to MAX_TASKS tasks (reference memory rows·P).
SAMPLES = 2
MAX_TASKS = 4


class FastPathMismatchError(RuntimeError):
  """The fast Gramian path disagrees with the reference path on this model and compiler."""


def checked_tasks(num_tasks: int, max_tasks: int = MAX_TASKS) -> tuple[int, ...]:
  """Up to `max_tasks` task indices spread over the tasks, the first and the last included.

  The known fault returned the first tile of the task axis right and later tiles wrong, so the
  later tasks are the ones to look at.
  """
  count = min(num_tasks, max_tasks)
  return tuple(sorted({int(round(value)) for value in np.linspace(0, num_tasks - 1, count)}))


def discrepancy(
  model,
  params: Any,
  batch_stats: Any,
  batch: Mapping[str, jax.Array],
  tasks: Sequence[tasks_lib.Task],
  sample_indices: Sequence[int],
  task_indices: Sequence[int],
  batch_norm: str = "error",
) -> jax.Array:
  """Relative Frobenius distance between the fast and reference Gramians of the chosen rows
  (jit-able).

  The fast Gramian is of the whole batch, so it runs the shapes a training step runs; only
  its block of rows (sample_indices x task_indices) is compared. The reference rows are the
  materialised per-sample gradients of those rows (`reference.per_sample_gradients`).

  Returns:
    float32 scalar ||F - R|| / max(||F||, ||R||) (0 when both are zero).
  """
  fast = engine.compute(
    model, params, batch_stats, batch, tasks, levels.FULL, path="fast", batch_norm=batch_norm
  ).gramian
  samples, columns = np.asarray(sample_indices), np.asarray(task_indices)
  block = fast[samples][:, columns][:, :, samples][:, :, :, columns]
  rows = reference_lib.per_sample_gradients(
    model, params, batch_stats, batch, tasks, sample_indices, task_indices, batch_norm
  )
  return relative_distance(block, rows_gramian(rows))


def rows_gramian(rows: jax.Array) -> jax.Array:
  """[n_s, n_t, n_s, n_t] inner products of materialised rows [n_s, n_t, P] (the reference)."""
  return jnp.einsum("itp,jsp->itjs", rows, rows, precision=jax.lax.Precision.HIGHEST)


def relative_distance(fast: jax.Array, reference: jax.Array) -> jax.Array:
  """||F - R|| / max(||F||, ||R||) in the Frobenius norm (0 when both are zero); jit-able."""
  scale = jnp.maximum(
    jnp.maximum(jnp.linalg.norm(fast), jnp.linalg.norm(reference)), jnp.finfo(jnp.float32).tiny
  )
  return jnp.linalg.norm(fast - reference) / scale


def describe_encoder(model) -> tuple[str, str]:
  """(the encoder's class and sizes, its norm) for messages."""
  encoder = getattr(model, "encoder", model)
  sizes = [
    f"{name}={getattr(encoder, name)!r}"
    for name in ("width_multiplier", "hidden", "features")
    if hasattr(encoder, name)
  ]
  return f"{type(encoder).__name__}({', '.join(sizes)})", str(getattr(encoder, "norm", "unknown"))


class FastPathCheck:
  """Compares the fast Gramian with the reference path when due (see the module docstring)."""

  def __init__(
    self,
    model,
    tasks: Sequence[tasks_lib.Task],
    every_steps: int = ONCE,
    batch_norm: str = "error",
    purpose: str = "",
    mesh: jax.sharding.Mesh | None = None,
    tolerance: float = TOLERANCE,
  ):
    """Args:
    model: the `MultiTaskModel`.
    tasks: the tasks whose Gramian the caller computes, in column order.
    every_steps: ONCE, NEVER or k > 0 (see the module docstring).
    batch_norm: the caller's `batch_norm` mode for both paths.
    purpose: what computes the Gramian, for the message (e.g. "train step at level 'sample'").
    mesh: the run's mesh, or None on one device.
    tolerance: the largest relative discrepancy accepted (at least BFLOAT16_TOLERANCE for a
      bfloat16 model).
    """
    if not isinstance(every_steps, int) or every_steps < ONCE:
      raise ValueError(
        f"config.gramian.verify_every_steps must be -1 (once), 0 (never) or a positive step "
        f"count; got {every_steps!r}."
      )
    self.every_steps = every_steps
    self.model, self.tasks, self.batch_norm = model, list(tasks), batch_norm
    self.purpose, self.mesh, self.tolerance = purpose, mesh, float(tolerance)
    if getattr(model, "dtype", "float32") == "bfloat16":
      self.tolerance = max(self.tolerance, BFLOAT16_TOLERANCE)
    self.last_step: int | None = None
    self.task_indices = checked_tasks(len(self.tasks))
    self._compiled: dict[int, Any] = {}

  def due(self, step: int) -> bool:
    """Whether a Gramian computed at `step` is to be checked (see the module docstring)."""
    if self.every_steps == NEVER:
      return False
    if self.last_step is None:
      return True
    return self.every_steps > 0 and int(step) - self.last_step >= self.every_steps

  def _function(self, batch_size: int):
    if batch_size not in self._compiled:
      samples = tuple(range(min(SAMPLES, batch_size)))

      def compute(params, batch_stats, batch):
        return discrepancy(
          self.model,
          params,
          batch_stats,
          batch,
          self.tasks,
          samples,
          self.task_indices,
          self.batch_norm,
        )

      if self.mesh is None:
        self._compiled[batch_size] = jax.jit(compute)
      else:
        self._compiled[batch_size] = jax.jit(
          parallel.replicated_program(compute, self.mesh),
          out_shardings=parallel.replicated(self.mesh),
        )
    return self._compiled[batch_size]

  def verify(self, step: int, params: Any, batch_stats: Any, batch: Mapping[str, Any]) -> float:
    """Runs the comparison on `batch` (a host copy); returns the discrepancy or raises
    FastPathMismatchError."""
    batch_size = int(np.shape(batch["image"])[0])
    if self.mesh is not None:
      batch = parallel.place_state(batch, parallel.state_shardings(batch, self.mesh))
    value = float(self._function(batch_size)(params, batch_stats, batch))
    task_names = [self.tasks[index].name for index in self.task_indices]
    rows = f"samples {list(range(min(SAMPLES, batch_size)))} x tasks {task_names}"
    return self.judge(step, value, rows, batch_size)

  def judge(self, step: int, value: float, rows: str, batch_size: int) -> float:
    """Records a check made at `step` (`value`: the relative discrepancy `rows` of a batch of
    `batch_size` showed); returns it, or raises FastPathMismatchError above the tolerance.

    A caller whose own compiled program already computes the fast Gramian and the reference
    rows (the conflict probe, for its parameter ratio) measures the discrepancy there, in the
    very program it runs, and hands it here.
    """
    self.last_step = int(step)
    encoder, norm = describe_encoder(self.model)
    # A NaN comes from non-finite gradients, which the training loop reports by step and task.
    if np.isfinite(value) and value > self.tolerance:
      raise FastPathMismatchError(
        f"The fast Gramian path disagrees with the reference path for encoder {encoder} with norm "
        f"{norm!r}: relative discrepancy {value:.3g} > tolerance {self.tolerance:g} on rows {rows} "
        f"of a batch of {batch_size} ({self.purpose or 'Gramian'}, step {step}, "
        f"{jax.default_backend()} backend, jax {jax.__version__}). A compiled program computes "
        "wrong per-sample gradients (a compiler fault, or an engine bug), so this run's per-sample "
        "Gramians would be wrong. Use config.method.level='task' or "
        "config.conflicts.path='reference', or another jax/jaxlib version; "
        "config.gramian.verify_every_steps=0 skips this check."
      )
    logging.info(
      "Fast Gramian path agrees with the reference path (%s, %s norm %s): %.2g",
      self.purpose,
      encoder,
      norm,
      value,
    )
    return value

  def maybe_verify(
    self, step: int, params: Any, batch_stats: Any, batch: Mapping[str, Any]
  ) -> float | None:
    """`verify` when due at `step`, else None."""
    if not self.due(step):
      return None
    return self.verify(step, params, batch_stats, batch)
