"""Gradient-conflict statistics (SPEC section 4): inter-task vs inter-sample pairs, and a training
probe.

A pair of gradients (g, g') is compared by
  * cosine similarity      S_cos = <g, g'> / (|g| |g'|), a conflict when S_cos < 0;
  * magnitude similarity   S_mag = 2 |g| |g'| / (|g|² + |g'|²), 1 for equal norms, -> 0 when one
                           norm dwarfs the other;
  * the raw dot product    <g, g'>;
  * the ratio of conflicting parameters: the share of coordinates where g and g' have opposite
    signs, counted only over coordinates where both are non-zero. A coordinate counts as zero
    when |g_p| <= sign_tolerance · max_p |g_p| (per gradient): parameters whose exact gradient
    is zero, such as a conv bias right before a normalisation, otherwise carry float rounding
    noise (~1e-7 relative) with random signs that would drag the ratio towards 1/2.
All but the last need only inner products, so they come from the [B, T, B, T] Gramian of the
per-sample, per-task encoder gradients g_{i,t} (`mtl_jax.gramian`). The pair types are

  inter_task             (i, t) vs (i, s), t < s: same sample, different tasks;
  inter_sample           (i, t) vs (j, t), i < j: same task, different samples;
  inter_task_averaged    batch-mean task gradients mean_i g_{i,t} vs mean_i g_{i,s}, t < s;
  inter_sample_averaged  all-task-average sample gradients mean_t g_{i,t} vs mean_t g_{j,t}, i < j.

Rows whose squared norm is at most `zero_tolerance` times the largest squared norm in the same
Gramian have no direction: pairs involving them are excluded from the cosine and magnitude
statistics and counted (`excluded`); their dot products (zero) are kept.

Every statistic of one Gramian is a pure jnp function with fixed-shape outputs (jit-able);
`ConflictAccumulator` pools probes on the host (mean, std, 2.5/97.5 percentiles, conflict rate,
positive/negative split) and `ConflictProbe` runs inside training every k steps.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_jax import gramian as gramian_lib
from mtl_jax.gramian import check as gramian_check
from mtl_jax import metric_writers
from mtl_jax import parallel
from mtl_jax import tasks as tasks_lib

PAIR_TYPES = ("inter_task", "inter_sample", "inter_task_averaged", "inter_sample_averaged")
# Pair types whose gradients are single rows (i, t); the conflicting-parameter ratio needs them.
ROW_PAIR_TYPES = ("inter_task", "inter_sample")
MEASURES = ("cosine", "magnitude", "dot")
PARAMETER_RATIO = "conflicting_parameter_ratio"
PERCENTILES = (2.5, 97.5)
JSONL_FILE = "conflicts.jsonl"
CSV_FILE = "conflicts.csv"
DEFAULT_ZERO_TOLERANCE = 1e-12
DEFAULT_SIGN_TOLERANCE = 1e-6


class PairMeasures(NamedTuple):
  """Per-pair measures of one pair type, all [P] for P pairs.

  Attributes:
    cosine: S_cos (0 where invalid).
    magnitude: S_mag (0 where invalid).
    dot: the raw inner products (defined for every pair).
    valid: bool, False where either gradient is (numerically) zero or unlabelled.
    labelled: bool, False where either row lacks its label (partial labels): such pairs are
      left out of every statistic and count; None when every row is labelled.
  """

  cosine: jax.Array
  magnitude: jax.Array
  dot: jax.Array
  valid: jax.Array
  labelled: Any = None


# ---------------------------------------------------------------------------------------- pairs


def upper_pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
  """All index pairs (a, b) with a < b < count, in row-major order, as two int32 arrays."""
  first, second = np.triu_indices(count, k=1)
  return first.astype(np.int32), second.astype(np.int32)


def inter_task_pairs(num_samples: int, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat row indices (i·T + t, i·T + s), t < s, of every inter-task pair: B·T(T-1)/2 pairs."""
  tasks_first, tasks_second = upper_pairs(num_tasks)
  samples = np.arange(num_samples, dtype=np.int32)[:, None] * num_tasks
  return (samples + tasks_first).reshape(-1), (samples + tasks_second).reshape(-1)


def inter_sample_pairs(num_samples: int, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat row indices (i·T + t, j·T + t), i < j, of every inter-sample pair: T·B(B-1)/2 pairs."""
  samples_first, samples_second = upper_pairs(num_samples)
  tasks = np.arange(num_tasks, dtype=np.int32)[:, None]
  return (samples_first * num_tasks + tasks).reshape(-1), (
    samples_second * num_tasks + tasks
  ).reshape(-1)


# ------------------------------------------------------------------------------- pure measures


def pair_measures(
  rows_gramian: jax.Array,
  first: np.ndarray,
  second: np.ndarray,
  zero_tolerance: float = DEFAULT_ZERO_TOLERANCE,
  row_labelled: jax.Array | None = None,
) -> PairMeasures:
  """Cosine, magnitude similarity and dot products of chosen pairs of rows of a Gramian.

  Args:
    rows_gramian: [R, R] Gramian of R gradients.
    first, second: [P] row indices of the pairs (static numpy arrays).
    zero_tolerance: a row is zero when its squared norm is <= zero_tolerance · max squared norm.
    row_labelled: bool [R], the rows with a label (partial labels); None: all of them.

  Returns:
    `PairMeasures` of shape [P].
  """
  rows_gramian = jnp.asarray(rows_gramian, jnp.float32)
  squared_norms = jnp.diagonal(rows_gramian)
  threshold = zero_tolerance * jnp.max(squared_norms)
  nonzero = squared_norms > jnp.maximum(threshold, 0.0)
  first_squared, second_squared = squared_norms[first], squared_norms[second]
  dot = rows_gramian[first, second]
  valid = nonzero[first] & nonzero[second]
  # Safe denominators keep invalid pairs finite (and their gradients NaN-free) before masking.
  safe_first = jnp.where(valid, first_squared, 1.0)
  safe_second = jnp.where(valid, second_squared, 1.0)
  norm_product = jnp.sqrt(safe_first * safe_second)
  # Rounding can push |cos| a hair past 1 for (nearly) parallel gradients.
  cosine = jnp.where(valid, jnp.clip(dot / norm_product, -1.0, 1.0), 0.0)
  magnitude = jnp.where(valid, 2.0 * norm_product / (safe_first + safe_second), 0.0)
  if row_labelled is None:
    return PairMeasures(cosine, magnitude, dot, valid)
  labelled = row_labelled[first] & row_labelled[second]
  return PairMeasures(cosine, magnitude, dot, valid & labelled, labelled)


def sample_average_gramian(gramian: jax.Array) -> jax.Array:
  """[B, B] Gramian of the all-task-average sample gradients mean_t g_{i,t}, from G [B, T, B, T]."""
  num_tasks = gramian.shape[1]
  return gramian_lib.sample_gramian(gramian) / float(num_tasks * num_tasks)


def conflict_measures(
  gramian: jax.Array,
  zero_tolerance: float = DEFAULT_ZERO_TOLERANCE,
  label_mask: jax.Array | None = None,
) -> dict[str, PairMeasures]:
  """Every pair type's measures from the [B, T, B, T] Gramian (fixed shapes, jit-able).

  Args:
    gramian: G[i, t, j, s] = <g_{i,t}, g_{j,s}>.
    zero_tolerance: see `pair_measures`.
    label_mask: bool [B, T] under partial labels: only labelled rows are paired, and the
      averaged gradients average labelled rows only; None: every row is labelled.

  Returns:
    {pair type: PairMeasures}, with B·T(T-1)/2, T·B(B-1)/2, T(T-1)/2 and B(B-1)/2 pairs for
    inter_task, inter_sample, inter_task_averaged and inter_sample_averaged.
  """
  num_samples, num_tasks = gramian.shape[:2]
  rows = gramian.reshape(num_samples * num_tasks, num_samples * num_tasks)
  if label_mask is None:
    labelled = task_labelled = sample_labelled = None
    task_averaged = gramian_lib.task_gramian(gramian)
    sample_averaged = sample_average_gramian(gramian)
  else:
    mask = jnp.asarray(label_mask) > 0
    labelled, task_labelled, sample_labelled = mask.reshape(-1), mask.any(0), mask.any(1)
    weights = mask.astype(jnp.float32)
    # Means over the labelled samples of a task, and over the labelled tasks of a sample.
    task_averaged = gramian_lib.at_level(
      gramian, "task", weights / jnp.maximum(weights.sum(0, keepdims=True), 1.0)
    )
    sample_averaged = gramian_lib.at_level(
      gramian, "sample", weights / jnp.maximum(weights.sum(1, keepdims=True), 1.0)
    )
  return {
    "inter_task": pair_measures(
      rows, *inter_task_pairs(num_samples, num_tasks), zero_tolerance, labelled
    ),
    "inter_sample": pair_measures(
      rows, *inter_sample_pairs(num_samples, num_tasks), zero_tolerance, labelled
    ),
    "inter_task_averaged": pair_measures(
      task_averaged, *upper_pairs(num_tasks), zero_tolerance, task_labelled
    ),
    "inter_sample_averaged": pair_measures(
      sample_averaged, *upper_pairs(num_samples), zero_tolerance, sample_labelled
    ),
  }


def conflicting_parameter_ratios(
  gradients: jax.Array, sign_tolerance: float = DEFAULT_SIGN_TOLERANCE
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Share of coordinates with opposite signs, for every inter-task and inter-sample pair.

  Coordinates where either gradient is zero are not counted (they have no sign); a coordinate
  is zero when |g_p| <= sign_tolerance · max_p |g_p| of its gradient (0 = exactly zero). The
  counts are Gramians of sign indicators, so no [pairs, P] array is ever formed: with
  P_+ = 1{g > 0} and P_- = 1{g < 0} per row, opposite = P_+ P_-ᵀ + P_- P_+ᵀ and
  both non-zero = (P_+ + P_-)(P_+ + P_-)ᵀ. Counts are exact in float32 up to 2^24 coordinates.

  Args:
    gradients: [n_s, n_t, P] materialised per-sample, per-task gradients.
    sign_tolerance: relative magnitude below which a coordinate counts as zero.

  Returns:
    {'inter_task' | 'inter_sample': (ratio [pairs], valid [pairs])}; a pair with no coordinate
    where both are non-zero is invalid (ratio 0).
  """
  num_samples, num_tasks, num_parameters = gradients.shape
  rows = gradients.reshape(num_samples * num_tasks, num_parameters)
  threshold = sign_tolerance * jnp.max(jnp.abs(rows), axis=1, keepdims=True)
  positive = (rows > threshold).astype(jnp.float32)
  negative = (rows < -threshold).astype(jnp.float32)
  nonzero = positive + negative
  highest = jax.lax.Precision.HIGHEST
  cross = jnp.matmul(positive, negative.T, precision=highest)
  opposite = cross + cross.T
  both = jnp.matmul(nonzero, nonzero.T, precision=highest)
  results = {}
  for name, pairs in (
    ("inter_task", inter_task_pairs(num_samples, num_tasks)),
    ("inter_sample", inter_sample_pairs(num_samples, num_tasks)),
  ):
    counted = both[pairs]
    valid = counted > 0
    results[name] = (jnp.where(valid, opposite[pairs] / jnp.where(valid, counted, 1.0), 0.0), valid)
  return results


# ------------------------------------------------------------------------------ host aggregation


def summarise(values: np.ndarray, cosine: bool = False) -> dict[str, float]:
  """Mean, population std, 2.5/97.5 percentiles (linear interpolation) and count of values.

  With `cosine`, also the conflict rate (share < 0) and the positive (>= 0) / negative (< 0)
  split: counts and means. Empty input gives NaN statistics and count 0.
  """
  values = np.asarray(values, np.float64).reshape(-1)
  nan = float("nan")
  count = values.size
  stats = {
    "mean": float(values.mean()) if count else nan,
    "std": float(values.std()) if count else nan,
    "p2_5": float(np.percentile(values, PERCENTILES[0])) if count else nan,
    "p97_5": float(np.percentile(values, PERCENTILES[1])) if count else nan,
    "count": int(count),
  }
  if cosine:
    negative = values[values < 0]
    positive = values[values >= 0]
    stats.update(
      conflict_rate=float(negative.size / count) if count else nan,
      positive_count=int(positive.size),
      negative_count=int(negative.size),
      positive_mean=float(positive.mean()) if positive.size else nan,
      negative_mean=float(negative.mean()) if negative.size else nan,
    )
  return stats


class ConflictAccumulator:
  """Pools per-pair measures of many probes on the host and summarises them."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.probes = 0
    self._values: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in PAIR_TYPES}
    self._excluded = {name: 0 for name in PAIR_TYPES}
    self._pairs = {name: 0 for name in PAIR_TYPES}

  def _append(self, pair_type: str, measure: str, values: np.ndarray) -> None:
    self._values[pair_type].setdefault(measure, []).append(
      np.asarray(values, np.float64).reshape(-1)
    )

  def add(
    self, measures: Mapping[str, PairMeasures], ratios: Mapping[str, tuple[Any, Any]] | None = None
  ) -> None:
    """Adds one probe: `conflict_measures` output and optionally `conflicting_parameter_ratios`."""
    measures = jax.device_get(measures)
    labelled = {}
    for pair_type, pair in measures.items():
      valid = np.asarray(pair.valid, bool)
      kept = np.ones_like(valid) if pair.labelled is None else np.asarray(pair.labelled, bool)
      labelled[pair_type] = kept
      self._append(pair_type, "cosine", np.asarray(pair.cosine)[valid])
      self._append(pair_type, "magnitude", np.asarray(pair.magnitude)[valid])
      self._append(pair_type, "dot", np.asarray(pair.dot)[kept])
      self._excluded[pair_type] += int(kept.sum() - valid.sum())
      self._pairs[pair_type] += int(kept.sum())
    for pair_type, (ratio, valid) in jax.device_get(dict(ratios or {})).items():
      valid = np.asarray(valid, bool) & labelled.get(pair_type, True)
      self._append(pair_type, PARAMETER_RATIO, np.asarray(ratio)[valid])
    self.probes += 1

  def summary(self) -> dict[str, Any]:
    """{'probes': n, pair type: {measure: statistics, 'pairs': n, 'excluded_zero_norm': n}}."""
    result: dict[str, Any] = {"probes": self.probes}
    for pair_type in PAIR_TYPES:
      entry: dict[str, Any] = {
        "pairs": self._pairs[pair_type],
        "excluded_zero_norm": self._excluded[pair_type],
      }
      for measure, chunks in self._values[pair_type].items():
        entry[measure] = summarise(np.concatenate(chunks), cosine=measure == "cosine")
      result[pair_type] = entry
    return result


def flatten_record(record: Mapping[str, Any]) -> dict[str, float]:
  """{'pair_type/measure/statistic': value} of one epoch record (for scalar writers)."""
  flat = {}
  for pair_type in PAIR_TYPES:
    for measure, stats in record.get(pair_type, {}).items():
      if isinstance(stats, Mapping):
        for key, value in stats.items():
          flat[f"{pair_type}/{measure}/{key}"] = value
      else:
        flat[f"{pair_type}/{measure}"] = stats
  return flat


CSV_COLUMNS = (
  "epoch",
  "step",
  "probes",
  "pair_type",
  "measure",
  "mean",
  "std",
  "p2_5",
  "p97_5",
  "count",
  "conflict_rate",
  "positive_count",
  "negative_count",
  "positive_mean",
  "negative_mean",
)


def csv_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Long-format CSV rows of one epoch record: one row per (pair type, measure)."""
  rows = []
  for pair_type in PAIR_TYPES:
    for measure, stats in record.get(pair_type, {}).items():
      if isinstance(stats, Mapping):
        row = {
          "epoch": record["epoch"],
          "step": record["step"],
          "probes": record["probes"],
          "pair_type": pair_type,
          "measure": measure,
        }
        row.update({key: stats.get(key, "") for key in CSV_COLUMNS[5:]})
        rows.append(row)
  return rows


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The epoch records in `workdir/conflicts.jsonl`, ordered by epoch ([] if absent)."""
  path = os.path.join(workdir, JSONL_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as file:
    records = [json.loads(line) for line in file if line.strip()]
  return sorted(records, key=lambda record: record["epoch"])


def write_records(workdir: str, records: Iterable[Mapping[str, Any]]) -> None:
  """Writes `conflicts.jsonl` and `conflicts.csv` (replaced atomically, one record per epoch), on
  the writing process only (`parallel.is_writer`)."""
  if not parallel.is_writer():
    return
  records = list(records)
  for name, write in ((JSONL_FILE, _write_jsonl), (CSV_FILE, _write_csv)):
    path = os.path.join(workdir, name)
    temporary = path + ".tmp"
    with open(temporary, "w", newline="") as file:
      write(file, records)
    os.replace(temporary, path)


def json_safe(value: Any) -> Any:
  """NaN/inf -> None, recursively, so the JSON is standard (empty pair sets give NaN statistics)."""
  if isinstance(value, Mapping):
    return {key: json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(item) for item in value]
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def _write_jsonl(file, records):
  for record in records:
    file.write(json.dumps(json_safe(record)) + "\n")


def _write_csv(file, records):
  writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
  writer.writeheader()
  for record in records:
    writer.writerows(csv_rows(record))


# ------------------------------------------------------------------------------------ the probe


def _choice(value: Any, valid: Sequence[str], key: str) -> str:
  if value not in valid:
    raise ValueError(f"Unknown {key} {value!r}; valid choices: {', '.join(valid)}.")
  return str(value)


def _limit(count: int, maximum: int) -> int:
  return count if maximum <= 0 else min(count, maximum)


class ConflictProbe:
  """Measures gradient conflicts every k training steps and writes per-epoch statistics.

  Each probe takes the batch about to be trained on, keeps `max_samples` random samples (a
  function of seed and step, so resumed runs probe the same samples) and `max_tasks` tasks
  (drawn once per run from the seed; [choice] a fixed subset keeps one compiled program and a
  consistent time series), computes their Gramian with the engine (`path`, `batch_norm`) at the
  current parameters, and, with `parameter_ratio`, the materialised gradients of the same rows
  for the conflicting-parameter ratio. `end_epoch` summarises the epoch's probes, writes them as
  scalars 'conflicts/<pair type>/<measure>/<statistic>' and rewrites conflicts.jsonl / .csv in
  the workdir (one record per epoch, so a resumed run replaces a repeated epoch; after a resume
  in the middle of an epoch that epoch's record holds only the probes after the resume).

  On a mesh (data-parallel training, `mtl_jax.parallel`) the probe takes the host's copy of
  the batch (every host holds the same global batch) and selects the probed rows there. When
  their count divides the device count and the path is 'fast', the probed rows are split over
  the 'data' axis: the Gramian comes from the sharded engine (`gramian.compute` with the mesh;
  only layer captures and Gramian blocks cross devices), while the few probed rows'
  materialised gradients for the parameter ratio are computed whole on every device. Otherwise
  the one-device computation runs whole on every device (`parallel.replicated_program`). Results
  come back replicated, so every host adds the same values.

  On the 'fast' path the probe checks its Gramian against the reference path (`gramian.check`,
  when `verify_every_steps` says so) and raises `gramian_check.FastPathMismatchError` rather than
  record wrong statistics. With the parameter ratio the check is part of the probe's program
  (the materialised rows' inner products are the reference); without, it is a program of its
  own, run before the probe.
  """

  def __init__(
    self,
    model,
    tasks: Sequence[tasks_lib.Task],
    options: ml_collections.ConfigDict,
    workdir: str | None = None,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    verify_every_steps: int = gramian_check.ONCE,
  ):
    """Args:
    model: the `MultiTaskModel` being trained.
    tasks: all its tasks, in column order.
    options: `config.conflicts` (probe_every_steps, max_samples, max_tasks, path, batch_norm,
      parameter_ratio, zero_tolerance, sign_tolerance).
    workdir: where conflicts.jsonl / conflicts.csv go (None: nowhere).
    seed: the run's seed (sample and task subsets).
    mesh: the training mesh (`parallel.make_mesh`), or None on one device.
    verify_every_steps: `config.gramian.verify_every_steps`, for the fast path's self-check.
    """
    self.every = int(options.probe_every_steps)
    if self.every <= 0:
      raise ValueError(
        f"config.conflicts.probe_every_steps must be positive for a probe, got {self.every}."
      )
    self.max_samples = int(options.max_samples)
    self.path = _choice(options.path, gramian_lib.PATHS, "config.conflicts.path")
    self.batch_norm = _choice(
      options.batch_norm, gramian_lib.BATCH_NORM_MODES, "config.conflicts.batch_norm"
    )
    self.parameter_ratio = bool(options.parameter_ratio)
    self.zero_tolerance = float(options.zero_tolerance)
    self.sign_tolerance = float(options.sign_tolerance)
    self.seed = int(seed)
    self.workdir = workdir
    self.model = model
    self.mesh = mesh
    all_tasks = list(tasks)
    num_tasks = _limit(len(all_tasks), int(options.max_tasks))
    chosen = np.random.default_rng([self.seed, 1]).choice(len(all_tasks), num_tasks, replace=False)
    self.task_indices = tuple(int(index) for index in np.sort(chosen))
    self.tasks = [all_tasks[index] for index in self.task_indices]
    self.accumulator = ConflictAccumulator()
    self.records = read_records(workdir) if workdir else []
    self._compiled: dict[int, Any] = {}
    self.fast_path_check = None
    if self.path == "fast" and verify_every_steps != gramian_check.NEVER:
      self.fast_path_check = gramian_check.FastPathCheck(
        model, self.tasks, verify_every_steps, self.batch_norm, purpose="conflict probe", mesh=mesh
      )

  @property
  def task_names(self) -> list[str]:
    return [task.name for task in self.tasks]

  def sample_indices(self, step: int, batch_size: int) -> np.ndarray:
    """The (sorted) batch positions probed at `step`."""
    count = _limit(batch_size, self.max_samples)
    return np.sort(
      np.random.default_rng([self.seed, 2, int(step)]).choice(batch_size, count, replace=False)
    )

  def splits_rows(self, num_samples: int) -> bool:
    """Whether a probe of `num_samples` rows runs split over the mesh's devices (see the class
    docstring)."""
    return (
      self.mesh is not None
      and self.path == "fast"
      and num_samples % parallel.data_size(self.mesh) == 0
    )

  def _function(self, num_samples: int):
    if num_samples not in self._compiled:
      model, tasks, path, batch_norm, mesh = (
        self.model,
        self.tasks,
        self.path,
        self.batch_norm,
        self.mesh,
      )
      tolerance, sign_tolerance, with_ratio = (
        self.zero_tolerance,
        self.sign_tolerance,
        self.parameter_ratio,
      )
      rows = (tuple(range(num_samples)), tuple(range(len(tasks))))
      split = self.splits_rows(num_samples)
      self_check = self.checks_itself

      def compute(params, batch_stats, batch):
        gramian = gramian_lib.compute(
          model,
          params,
          batch_stats,
          batch,
          tasks,
          gramian_lib.FULL,
          path=path,
          batch_norm=batch_norm,
          mesh=mesh if split else None,
        ).gramian
        if split:
          # [n, T, n, T] is tiny: the measures run replicated rather than on row blocks.
          gramian = jax.lax.with_sharding_constraint(gramian, parallel.replicated(mesh))
        mask = tasks_lib.label_mask(batch)  # already the probed tasks' columns (`measure`)
        outputs = {"measures": conflict_measures(gramian, tolerance, mask)}
        if with_ratio:
          gradients = functools.partial(
            gramian_lib.per_sample_gradients,
            model,
            tasks=tasks,
            sample_indices=rows[0],
            task_indices=rows[1],
            batch_norm=batch_norm,
          )
          if split:
            # Every device materialises all probed rows: split over devices they agree to ~5e-7
            # (rounding), but the sign counts are discontinuous and a coordinate at the
            # threshold flipped (ratio error 7e-4 measured); replicated they are bitwise equal.
            gradients = parallel.replicated_program(gradients, mesh)
          rows_gradients = gradients(params, batch_stats, batch)
          outputs["ratios"] = conflicting_parameter_ratios(rows_gradients, sign_tolerance)
          if self_check:
            # The reference Gramian of the rows materialised anyway, against the fast one of
            # this very program: the fast path's self-check at no extra compilation.
            outputs["discrepancy"] = gramian_check.relative_distance(
              gramian, gramian_check.rows_gramian(rows_gradients)
            )
        return outputs

      if mesh is None:
        self._compiled[num_samples] = jax.jit(compute)
      else:
        # Unsplit, the per-sample gradients must not be left to GSPMD (see mtl_jax/sharding.py).
        function = compute if split else parallel.replicated_program(compute, mesh)
        self._compiled[num_samples] = jax.jit(function, out_shardings=parallel.replicated(mesh))
    return self._compiled[num_samples]

  def measure(self, params, batch_stats, batch: Mapping[str, Any], step: int = 0) -> dict[str, Any]:
    """One probe's per-pair values (device arrays): {'measures': ..., 'ratios': ... (optional)}.

    `batch` is the host's copy of the global batch (numpy, or fully addressable arrays); on a
    mesh the probed rows are placed on its devices here.
    """
    batch_size = int(np.shape(batch["image"])[0])
    indices = self.sample_indices(step, batch_size)
    sub_batch = {key: np.asarray(value)[indices] for key, value in batch.items()}
    if tasks_lib.LABEL_MASK_KEY in sub_batch:  # the probed tasks' columns, in their order
      sub_batch[tasks_lib.LABEL_MASK_KEY] = sub_batch[tasks_lib.LABEL_MASK_KEY][
        :, np.asarray(self.task_indices)
      ]
    if self.fast_path_check is not None and not self.checks_itself:
      self.fast_path_check.maybe_verify(step, params, batch_stats, sub_batch)
    if self.mesh is not None:
      if self.splits_rows(len(indices)):
        sub_batch = parallel.global_batch(sub_batch, self.mesh)
      else:
        sub_batch = parallel.place_state(sub_batch, parallel.state_shardings(sub_batch, self.mesh))
    outputs = dict(self._function(len(indices))(params, batch_stats, sub_batch))
    discrepancy = outputs.pop("discrepancy", None)
    if discrepancy is not None and self.fast_path_check.due(step):
      rows = f"all {len(indices)} probed samples x tasks {self.task_names}"
      self.fast_path_check.judge(step, float(discrepancy), rows, len(indices))
    return outputs

  @property
  def checks_itself(self) -> bool:
    """Whether the probe's own program checks its fast Gramian: with the parameter ratio it
    materialises the probed rows' gradients, whose inner products are the reference Gramian."""
    return self.fast_path_check is not None and self.parameter_ratio

  def maybe_probe(self, step: int, state, batch: Mapping[str, Any]) -> bool:
    """Probes when `step` is a multiple of `probe_every_steps`; returns whether it did."""
    if int(step) % self.every:
      return False
    outputs = self.measure(state.params, state.batch_stats, batch, step)
    self.accumulator.add(outputs["measures"], outputs.get("ratios"))
    return True

  def end_epoch(self, epoch: int, step: int, writer=None) -> dict[str, Any] | None:
    """Summarises and resets the epoch's probes; writes scalars and files. None if no probe ran."""
    if not self.accumulator.probes:
      return None
    record = {
      "epoch": int(epoch),
      "step": int(step),
      "tasks": self.task_names,
      **self.accumulator.summary(),
    }
    self.accumulator.reset()
    self.records = [old for old in self.records if old["epoch"] != record["epoch"]] + [record]
    self.records.sort(key=lambda old: old["epoch"])
    if self.workdir:
      write_records(self.workdir, self.records)
    if writer is not None:
      scalars = {key: value for key, value in flatten_record(record).items() if np.isfinite(value)}
      writer.write_scalars(step, scalars, prefix="conflicts/")
    metric_writers.status(epoch_line(record))
    return record


def epoch_line(record: Mapping[str, Any]) -> str:
  """A one-line console summary of an epoch record."""

  def part(pair_type, measure):
    stats = record[pair_type][measure]
    return f"{stats['mean']:+.3f}±{stats['std']:.3f}"

  return (
    f"conflicts epoch {record['epoch']} ({record['probes']} probes): cosine inter-task "
    f"{part('inter_task', 'cosine')} inter-sample {part('inter_sample', 'cosine')}; magnitude "
    f"inter-task {part('inter_task', 'magnitude')} inter-sample {part('inter_sample', 'magnitude')}"
  )


def make_probe(
  experiment, config, workdir: str | None, mesh: jax.sharding.Mesh | None = None
) -> ConflictProbe | None:
  """The probe a training run asks for (`config.conflicts.probe_every_steps` > 0), else None;
  `mesh`: the run's."""
  options = config.get("conflicts", None)
  if options is None or int(options.probe_every_steps) <= 0:
    return None
  return ConflictProbe(
    experiment.model,
    experiment.tasks,
    options,
    workdir,
    seed=int(config.seed),
    mesh=mesh,
    verify_every_steps=int(config.gramian.verify_every_steps),
  )
