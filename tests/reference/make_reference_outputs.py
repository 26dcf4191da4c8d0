#!/usr/bin/env python3
"""Reference outputs of TorchJD 0.18.0 (and LibMTL 1.1.5) on fixed inputs, for testing mtl_jax.

This script is a *throwaway generator*: torch, torchjd and LibMTL are NOT dependencies of mtl_jax.
It builds ~50 fixed float64 Jacobians J [m, n] and ~12 positive loss vectors from a fixed numpy
seed, runs every TorchJD 0.18.0 aggregator / weighting / scalarizer on them (and the LibMTL 1.1.5
weightings that can be driven without a trainer), and saves one compressed ``.npz``.

What it needs (install in a venv OUTSIDE the repo)::

    python3 -m venv /tmp/refvenv && . /tmp/refvenv/bin/activate
    pip install torch --index-url https://download.pytorch.org/whl/cpu   # any CPU torch >= 2.3
    pip install torchjd==0.18.0 numpy scipy
    # optional solver extras of torchjd (UPGrad/DualProj: quadprog+qpsolvers;
    # CAGrad: cvxpy+clarabel; NashMTL: cvxpy+ecos; FairGrad: scipy):
    pip install "quadprog!=0.1.10,>=0.1.9" "qpsolvers>=1.0.1" "cvxpy>=1.3.0" "ecos>=2.0.14"
    # optional LibMTL 1.1.5 (its torchvision dependency is not needed here):
    pip install --no-deps libmtl==1.1.5

How to run (about 80 s on one CPU core), from the mtl_jax repository root, in that venv::

    python tests/reference/make_reference_outputs.py --out tests/reference/reference_outputs.npz

tests/test_weighting_reference.py compares mtl_jax's methods with the arrays; tests/reference/
NOTES.md describes every record and the conventions of each library.

Output layout (every array float64 unless stated; ``<case>`` = a Jacobian case name,
``<lcase>`` = a loss case name, ``<seq>`` = a sequence name, ``<t>`` = step index):

    metadata                                  0-d unicode array: one JSON document (versions,
                                              case descriptions, constructor args, conventions,
                                              state protocols, failures). json.loads(str(a)).
    inputs/J/<case>                           [m, n] Jacobian (rows = per-task gradients)
    inputs/losses_for_J/<case>                [m] positive losses paired with J (LibMTL methods
                                              that look at loss values: MGDA 'loss'/'loss+',
                                              GradNorm)
    inputs/const_weights/<case>               [m] weights used for torchjd Constant
    inputs/losses/<lcase>                     [m] positive loss vector
    inputs/pref/<lcase>                       [m] preference vector on the simplex
    inputs/reference/<lcase>                  [m] reference point (elementwise < losses)
    inputs/log_param/<lcase>                  [m] fixed value for UW log_var / IMTLL log_scale
    inputs/seq/<seq>/J/<t>, .../J2/<t>        sequences of Jacobians for stateful methods;
    inputs/seq/<seq>/A/<t>                    A = J @ J2.T (cross "Gramian" for MoDo/SDMGrad)
    inputs/dwa/<lcase>/e<e>b<b>               [m] loss values of batch b of epoch e (DWA protocol)
    inputs/famo/<lcase>/before/<t>, after/<t> [m] FAMO protocol losses
    torchjd/<Method>/vector/<case>            [n] aggregator(J)
    torchjd/<Method>/weights/<case>           [m] weights w with vector == w @ J (captured from
                                              the aggregator's own weighting during that call)
    torchjd/<Method>/perms/<case>             int, RNG permutations consumed (PCGrad, GradVac)
    torchjd/<Method>/U/<case>, randn/<case>   RNG draws consumed (GradDrop, Random)
    torchjd_seq/<Method>/{vector,weights}/<seq>/<t>   stateful methods, fresh instance per seq
    torchjd_scalar/<Name>/value/<lcase>       scalar (0-d)
    torchjd_scalar/<Name>/grad/<lcase>        [m] d value / d losses (= effective loss weights)
    torchjd_scalar/<Name>/param_grad/<lcase>  [m] d value / d parameter (UW, IMTLL)
    torchjd_scalar/DWA/{value,grad}/<lcase>/e<e>b<b>
    torchjd_scalar/FAMO/{value,grad,z_after_update}/<lcase>/<t>
    libmtl/<Method>/vector/<case>             [n] the shared-parameter gradient LibMTL writes
    libmtl/<Method>/returned/<case>           what LibMTL's backward() returns (often weights)
    libmtl/<Method>/orders/<case>             int [m, k] python random.shuffle results consumed
    libmtl/{GradNorm,GradNorm_param,IMTL}/loss_scale_grad/<case>   grad of LibMTL's loss_scale
    libmtl_seq/GradVac/{vector,returned,orders,rho_T}/<seq>/<t>    LibMTL GradVac sequences
    libmtl_loss/<Method>/{weights,returned}/<lcase>   loss-based LibMTL methods (J = identity)
    libmtl_loss/UW/loss_scale_grad/<lcase>
    torchjd_scalar/Random/randn/<lcase>       randn draw consumed by the Random scalarizer
    derived/min_norm/vector/<case>            [n] exact min-norm point of conv(rows of J)
                                              (computed here with numpy by support enumeration;
                                              NOT from a library; ground truth for exact MGDA)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as im
import importlib.util
import itertools
import json
import platform
import random
import re
import signal
import sys
import time
import traceback
import types
import warnings

import numpy as np

SEED = 20240611  # numpy seed for all inputs
TORCH_SEED_BASE = 1000  # torch.manual_seed(TORCH_SEED_BASE + case_index) before random methods
PY_SEED_BASE = 2000  # random.seed(PY_SEED_BASE + case_index) before LibMTL random methods
MGDA_MATMUL_CAP = 5000  # iteration cap imposed on LibMTL 1.1.5 MGDA (see matmul_call_cap)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def build_jacobian_cases(rng: np.random.Generator) -> tuple[dict, dict]:
  """Returns ({name: J}, {name: description})."""
  cases: dict[str, np.ndarray] = {}
  desc: dict[str, str] = {}

  def add(name, J, d):
    assert name not in cases
    cases[name] = np.asarray(J, dtype=np.float64)
    desc[name] = d

  # 1. random well-conditioned (iid N(0,1) entries; m < n so full row rank)
  for m, n in [
    (2, 5),
    (2, 12),
    (3, 7),
    (3, 20),
    (4, 10),
    (5, 8),
    (5, 25),
    (6, 15),
    (7, 30),
    (8, 12),
    (9, 20),
    (10, 30),
    (10, 12),
  ]:
    add(f"rand_m{m}_n{n}", rng.standard_normal((m, n)), "iid N(0,1) entries, full row rank")

  # 2. row norms spread over 0.1 .. 10 (log-spaced), random directions
  for m, n in [(2, 6), (3, 9), (4, 14), (6, 10), (8, 24), (10, 16)]:
    D = rng.standard_normal((m, n))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    norms = np.logspace(-1, 1, m)
    rng.shuffle(norms)
    add(
      f"spread_m{m}_n{n}",
      D * norms[:, None],
      "random unit rows scaled by a shuffled logspace(-1, 1, m): row norms 0.1 .. 10",
    )

  # 3. rank deficient: J = A @ B with inner dimension r < m
  for m, r, n in [(3, 2, 8), (4, 2, 10), (5, 3, 12), (6, 1, 6), (8, 4, 15), (10, 5, 20)]:
    add(
      f"rankdef_m{m}_r{r}_n{n}",
      rng.standard_normal((m, r)) @ rng.standard_normal((r, n)),
      f"rank {r} < m = {m} (product of N(0,1) factors)",
    )

  # 4. duplicate rows
  J = rng.standard_normal((3, 8))
  J[1] = J[0]
  add("dup_m3_n8", J, "row 1 == row 0")
  J = rng.standard_normal((4, 10))
  J[2] = J[0]
  J[3] = J[1]
  add("dup2pairs_m4_n10", J, "rows 2,3 == rows 0,1")
  J = rng.standard_normal((5, 6))
  J[4] = J[0]
  add("dup_m5_n6", J, "row 4 == row 0")
  g = rng.standard_normal(9)
  add("allsame_m4_n9", np.tile(g, (4, 1)), "all 4 rows identical")

  # 5. nearly opposite rows: g1 = -g0 + 1e-3 noise
  for m, n in [(2, 5), (2, 10), (2, 20), (3, 12), (4, 8)]:
    J = rng.standard_normal((m, n))
    J[1] = -J[0] + 1e-3 * rng.standard_normal(n)
    add(f"opp_m{m}_n{n}", J, "row 1 = -row 0 + 1e-3 N(0,1) noise; other rows N(0,1)")

  # 6. zero rows
  for m, n, zero_rows in [(2, 5, [1]), (3, 7, [0]), (5, 11, [2]), (4, 9, [1, 3])]:
    J = rng.standard_normal((m, n))
    J[zero_rows] = 0.0
    add(f"zero_m{m}_n{n}", J, f"rows {zero_rows} are exactly zero; others N(0,1)")

  # 7. all positively correlated rows: common direction + small noise, all pairwise cos > 0
  for m, n in [(2, 6), (3, 10), (5, 12), (8, 18), (10, 25)]:
    base = rng.standard_normal(n)
    J = base[None, :] * rng.uniform(0.5, 2.0, size=(m, 1)) + 0.3 * rng.standard_normal((m, n))
    G = J @ J.T
    assert (G > 0).all()
    add(
      f"poscorr_m{m}_n{n}",
      J,
      "common direction scaled by U(0.5,2) + 0.3 N(0,1) noise; all pairwise inner products > 0",
    )

  # 8. extras
  Q, _ = np.linalg.qr(rng.standard_normal((5, 3)))
  add(
    "orth_m3_n5",
    (Q.T * np.array([1.0, 2.0, 0.5])[:, None]),
    "mutually orthogonal rows with norms 1, 2, 0.5",
  )
  g = rng.standard_normal(7)
  add(
    "collinear_m3_n7",
    np.stack([g, 3.0 * g, 0.2 * g]),
    "positive multiples (1, 3, 0.2) of one vector",
  )
  J = rng.standard_normal((4, 12))
  J[3] = -0.5 * J[:3].sum(axis=0) + 0.1 * rng.standard_normal(12)
  add("oneconflict_m4_n12", J, "row 3 conflicts with the sum of rows 0..2")
  add("tiny_m3_n6", 1e-3 * rng.standard_normal((3, 6)), "all entries 1e-3 N(0,1) (tiny norms)")
  add("large_m3_n6", 1e2 * rng.standard_normal((3, 6)), "all entries 1e2 N(0,1) (large norms)")
  ang = np.deg2rad([0.0, 120.0, 240.0])
  J = np.zeros((3, 5))
  J[:, 0] = np.cos(ang)
  J[:, 1] = np.sin(ang)
  add("symconflict_m3_n5", J, "three unit vectors at 120 degrees in a 2D subspace (sum = 0)")
  return cases, desc


def build_loss_cases(rng: np.random.Generator) -> tuple[dict, dict]:
  cases, desc = {}, {}

  def add(name, v, d):
    cases[name] = np.asarray(v, dtype=np.float64)
    desc[name] = d

  add("l_m2_a", [1.0, 2.0], "hand-picked")
  add("l_m3_equal", [0.7, 0.7, 0.7], "all equal")
  add("l_m3_spread", [0.01, 1.0, 100.0], "four decades")
  add("l_m3_large", [50.0, 200.0, 1000.0], "large")
  add("l_m2_small", [1e-4, 2e-4], "tiny")
  for m in [4, 5, 6, 8, 10]:
    add(f"l_m{m}_unif", rng.uniform(0.1, 5.0, m), "U(0.1, 5)")
  add("l_m7_lognormal", np.exp(rng.standard_normal(7)), "exp(N(0,1))")
  add("l_m9_unif", rng.uniform(0.5, 1.5, 9), "U(0.5, 1.5)")
  return cases, desc


def build_sequences(rng: np.random.Generator) -> dict:
  """Sequences of T=5 Jacobians of a fixed shape, drifting around a base matrix."""
  seqs = {}
  for name, (m, n, kind) in {
    "seqA_m3_n10": (3, 10, "rand"),
    "seqB_m5_n12": (5, 12, "rand"),
    "seqC_m2_n6": (2, 6, "opp"),
  }.items():
    base = rng.standard_normal((m, n))
    if kind == "opp":
      base[1] = -0.8 * base[0] + 0.5 * rng.standard_normal(n)
    Js, J2s = [], []
    for _t in range(5):
      J = base + 0.3 * rng.standard_normal((m, n))
      # scale rows differently over time so that norm-tracking states move
      J *= rng.uniform(0.5, 2.0, size=(m, 1))
      J2 = J + 0.1 * rng.standard_normal((m, n))
      Js.append(J)
      J2s.append(J2)
    seqs[name] = {"J": Js, "J2": J2s, "A": [a @ b.T for a, b in zip(Js, J2s)]}
  return seqs


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


_T0 = [None]


def log_progress(what: str) -> None:
  if _T0[0] is None:
    _T0[0] = time.time()
  print(f"[{time.time() - _T0[0]:7.1f}s] {what}", file=sys.stderr, flush=True)


class Store:
  def __init__(self):
    self.arrays: dict[str, np.ndarray] = {}

  def put(self, key: str, value, dtype=np.float64):
    if key in self.arrays:
      raise KeyError(f"duplicate key {key}")
    self.arrays[key] = np.asarray(value, dtype=dtype)


def t2n(x):
  import torch  # noqa: PLC0415  (optional, not an mtl_jax dependency)

  if isinstance(x, torch.Tensor):
    return x.detach().cpu().numpy().astype(np.float64)
  return np.asarray(x, dtype=np.float64)


@contextlib.contextmanager
def capture_torch_rng(log: dict):
  """Logs every torch.randperm / torch.rand / torch.randn result while active."""
  import torch  # noqa: PLC0415  (optional, not an mtl_jax dependency)

  originals = {name: getattr(torch, name) for name in ("randperm", "rand", "randn")}

  def wrap(name):
    orig = originals[name]

    def f(*a, **k):
      out = orig(*a, **k)
      log.setdefault(name, []).append(out.detach().clone())
      return out

    return f

  for name in originals:
    setattr(torch, name, wrap(name))
  try:
    yield
  finally:
    for name, orig in originals.items():
      setattr(torch, name, orig)


class CallTimeout(Exception):
  pass


@contextlib.contextmanager
def time_limit(seconds: int):
  """Raises CallTimeout if the body runs longer than `seconds` (SIGALRM, main thread only)."""

  def handler(signum, frame):
    raise CallTimeout(f"no result within {seconds} s (killed by the generator's time limit)")

  old = signal.signal(signal.SIGALRM, handler)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


class IterationCap(Exception):
  pass


@contextlib.contextmanager
def matmul_call_cap(max_calls: int | None):
  """Raises IterationCap after `max_calls` calls of torch.matmul (None: no cap).

  LibMTL 1.1.5 MGDA's Frank-Wolfe loop calls torch.matmul exactly once per iteration and never
  increments its iteration counter, so it loops forever when its stopping test never passes
  (nan gradients, or a min-norm point at 0). Capping the calls gives a deterministic failure.
  """
  import torch  # noqa: PLC0415  (optional, not an mtl_jax dependency)

  if max_calls is None:
    yield
    return
  orig = torch.matmul
  count = [0]

  def f(*a, **k):
    count[0] += 1
    if count[0] > max_calls:
      raise IterationCap(
        f"more than {max_calls} Frank-Wolfe iterations (LibMTL never "
        "stops: iter_count is never incremented)"
      )
    return orig(*a, **k)

  torch.matmul = f
  try:
    yield
  finally:
    torch.matmul = orig


@contextlib.contextmanager
def capture_py_shuffle(log: list):
  orig = random.shuffle

  def f(x, *a, **k):
    orig(x, *a, **k)
    log.append(list(x))

  random.shuffle = f
  try:
    yield
  finally:
    random.shuffle = orig


def min_norm_point(J: np.ndarray) -> np.ndarray:
  """Exact min-norm point of the convex hull of the rows of J, by enumerating supports.

  For each support S, solve the equality-constrained QP min w^T G w s.t. sum(w) = 1, w_{~S} = 0
  via the KKT system (least-squares for singular systems); keep feasible (w >= 0) candidates
  and return J^T w of the best one. The vector is unique even when w is not.
  """
  G = J @ J.T
  m = G.shape[0]
  best, best_val = None, np.inf
  for k in range(1, m + 1):
    for S in itertools.combinations(range(m), k):
      S = list(S)
      K = np.zeros((k + 1, k + 1))
      K[:k, :k] = G[np.ix_(S, S)]
      K[:k, k] = 1.0
      K[k, :k] = 1.0
      rhs = np.zeros(k + 1)
      rhs[k] = 1.0
      sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
      wS = sol[:k]
      if abs(wS.sum() - 1.0) > 1e-9 or (wS < -1e-12).any():
        continue
      w = np.zeros(m)
      w[S] = np.clip(wS, 0.0, None)
      w /= w.sum()
      val = w @ G @ w
      if val < best_val:
        best, best_val = w, val
  return best @ J


# ---------------------------------------------------------------------------------------------
# TorchJD aggregators
# ---------------------------------------------------------------------------------------------


def run_torchjd_aggregators(store, meta, Jcases, seqs):
  import torch  # noqa: PLC0415  (optional, not an mtl_jax dependency)
  import torchjd.aggregation as A  # noqa: PLC0415  (optional, not an mtl_jax dependency)
  from torchjd.aggregation import WeightedAggregator  # noqa: PLC0415  (optional, not an mtl_jax dependency)
  from torchjd.linalg import QuadprogProjector  # noqa: PLC0415  (optional, not an mtl_jax dependency)

  case_names = list(Jcases)
  failures = meta.setdefault("failures", {})

  def const_w(m):
    return np.linspace(0.5, 1.5, m)

  for name, J in Jcases.items():
    store.put(f"inputs/const_weights/{name}", const_w(J.shape[0]))

  # name -> (factory(m), applicable(m), random?, info)
  def noapp(m):
    return True

  specs = {
    "UPGrad": (lambda m: A.UPGrad(), noapp, False),
    "DualProj": (lambda m: A.DualProj(), noapp, False),
    "UPGrad_reg1e-10": (
      lambda m: A.UPGrad(projector=QuadprogProjector(reg_eps=1e-10)),
      noapp,
      False,
    ),
    "DualProj_reg1e-10": (
      lambda m: A.DualProj(projector=QuadprogProjector(reg_eps=1e-10)),
      noapp,
      False,
    ),
    "MGDA": (lambda m: A.MGDA(), noapp, False),
    "CAGrad_c0.5": (lambda m: A.CAGrad(c=0.5), noapp, False),
    "CAGrad_c0.2": (lambda m: A.CAGrad(c=0.2), noapp, False),
    "PCGrad": (lambda m: A.PCGrad(), noapp, True),
    "IMTLG": (lambda m: A.IMTLG(), noapp, False),
    "AlignedMTL": (lambda m: A.AlignedMTL(), noapp, False),
    "AlignedMTL_median": (lambda m: A.AlignedMTL(scale_mode="median"), noapp, False),
    "AlignedMTL_rmse": (lambda m: A.AlignedMTL(scale_mode="rmse"), noapp, False),
    "ConFIG": (lambda m: A.ConFIG(), noapp, False),
    "Mean": (lambda m: A.Mean(), noapp, False),
    "Sum": (lambda m: A.Sum(), noapp, False),
    "Constant": (lambda m: A.Constant(torch.tensor(const_w(m))), noapp, False),
    "Krum_f1_k1": (lambda m: A.Krum(n_byzantine=1, n_selected=1), lambda m: m >= 4, False),
    "Krum_f1_k2": (lambda m: A.Krum(n_byzantine=1, n_selected=2), lambda m: m >= 4, False),
    "TrimmedMean_t1": (lambda m: A.TrimmedMean(trim_number=1), lambda m: m >= 3, False),
    "GradDrop": (lambda m: A.GradDrop(), noapp, True),
    "GradDrop_leak0.2": (lambda m: A.GradDrop(leak=torch.full((m,), 0.2)), noapp, True),
    "Random": (lambda m: A.Random(), noapp, True),
    "NashMTL": (lambda m: A.NashMTL(n_tasks=m), noapp, False),
    "FairGrad_a0.5": (lambda m: A.FairGrad(alpha=0.5), noapp, False),
    "FairGrad_a1": (lambda m: A.FairGrad(alpha=1.0), noapp, False),
    "FairGrad_a2": (lambda m: A.FairGrad(alpha=2.0), noapp, False),
    "ExcessMTL": (lambda m: A.ExcessMTL(), noapp, False),
    "GradVac": (lambda m: A.GradVac(), noapp, True),
    "PCD": (lambda m: A.PCD(), noapp, False),
  }
  agg_meta = meta.setdefault("torchjd_aggregators", {})
  for mname, (factory, applicable, is_random) in specs.items():  # noqa: B007  (the flag documents the spec table)
    log_progress(f"torchjd/{mname}")
    recorded = []
    rep = None
    for ci, (cname, Jn) in enumerate(Jcases.items()):
      m = Jn.shape[0]
      if not applicable(m):
        continue
      J = torch.tensor(Jn)
      agg = factory(m)  # fresh instance per case: stateful ones are on their first call
      rep = repr(agg)
      captured = {}
      handle = None
      if isinstance(agg, WeightedAggregator):
        handle = agg.weighting.register_forward_hook(
          lambda mod, inp, out: captured.__setitem__("w", out.detach().clone())  # noqa: B023  (the hook is removed within the iteration)
        )
      rng_log: dict = {}
      try:
        torch.manual_seed(TORCH_SEED_BASE + ci)
        with capture_torch_rng(rng_log), warnings.catch_warnings():
          warnings.simplefilter("ignore")
          v = agg(J)
      except Exception as e:  # noqa: BLE001
        failures.setdefault(f"torchjd/{mname}", {})[cname] = f"{type(e).__name__}: {e}"[:300]
        continue
      finally:
        if handle is not None:
          handle.remove()
      store.put(f"torchjd/{mname}/vector/{cname}", t2n(v))
      if "w" in captured:
        w = t2n(captured["w"])
        store.put(f"torchjd/{mname}/weights/{cname}", w)
        err = float(np.max(np.abs(w @ Jn - t2n(v)))) if np.all(np.isfinite(w)) else None
        if err is not None and err > 1e-9 * max(1.0, float(np.abs(Jn).max()) * m):
          meta.setdefault("warnings", []).append(f"{mname}/{cname}: w@J != vector ({err})")
      if mname.startswith("PCGrad"):
        store.put(
          f"torchjd/{mname}/perms/{cname}",
          np.stack([t2n(p) for p in rng_log["randperm"]]),
          dtype=np.int64,
        )
      if mname.startswith("GradVac"):
        # perm p over `others = [j != i]`; store the actual visiting order of j's
        orders = []
        for i, p in enumerate(rng_log.get("randperm", [])):
          others = [j for j in range(m) if j != i]
          orders.append([others[int(k)] for k in p.tolist()])
        store.put(
          f"torchjd/{mname}/perms/{cname}", np.array(orders).reshape(m, m - 1), dtype=np.int64
        )
      if mname.startswith("GradDrop"):
        store.put(f"torchjd/{mname}/U/{cname}", t2n(rng_log["rand"][0]))
      if mname == "Random":
        store.put(f"torchjd/{mname}/randn/{cname}", t2n(rng_log["randn"][0]))
      recorded.append(cname)
    agg_meta[mname] = {
      "repr_last_instance": rep,
      "n_cases": len(recorded),
      "cases_skipped_not_applicable": [c for c in case_names if not applicable(Jcases[c].shape[0])],
    }

  # Direct Gramian-weighting calls for the stateless deterministic Gramian weightings, to check
  # that the captured weights are exactly XWeighting()(J @ J.T).
  direct = {
    "UPGrad": A.UPGradWeighting,
    "DualProj": A.DualProjWeighting,
    "MGDA": A.MGDAWeighting,
    "IMTLG": A.IMTLGWeighting,
    "AlignedMTL": A.AlignedMTLWeighting,
    "CAGrad_c0.5": lambda: A.CAGradWeighting(c=0.5),
    "FairGrad_a1": lambda: A.FairGradWeighting(alpha=1.0),
  }
  maxdiff = {}
  for mname, wf in direct.items():
    d = 0.0
    for cname, Jn in Jcases.items():
      key = f"torchjd/{mname}/weights/{cname}"
      if key not in store.arrays:
        continue
      G = torch.tensor(Jn) @ torch.tensor(Jn).T
      w = t2n(wf()(G))
      d = max(d, float(np.nanmax(np.abs(w - store.arrays[key]))))
    maxdiff[mname] = d
  meta["check_direct_gramian_weighting_maxdiff"] = maxdiff

  # Weighting-only classes (no aggregator class in 0.18): single call on the Gramian J J^T.
  wmeta = meta.setdefault("torchjd_weightings_only", {})
  for wname, wf in {
    "MoDoWeighting": lambda: A.MoDoWeighting(),
    "SDMGradWeighting": lambda: A.SDMGradWeighting(),
  }.items():
    n_ok = 0
    for cname, Jn in Jcases.items():
      G = torch.tensor(Jn) @ torch.tensor(Jn).T
      wobj = wf()
      try:
        w = wobj(G)
      except Exception as e:  # noqa: BLE001
        failures.setdefault(f"torchjd/{wname}", {})[cname] = f"{type(e).__name__}: {e}"[:300]
        continue
      store.put(f"torchjd/{wname}/weights/{cname}", t2n(w))
      n_ok += 1
    wmeta[wname] = {
      "repr": repr(wf()),
      "n_cases": n_ok,
      "protocol": "fresh instance, ONE call on the Gramian G = J @ J.T "
      "(the method is meant for A = J1 @ J2.T; see torchjd_seq for that)",
    }

  # Sequences for stateful methods: fresh instance per sequence, T calls in order.
  seq_specs = {
    "GradVac": (lambda m: A.GradVac(), "J"),
    "ExcessMTL": (lambda m: A.ExcessMTL(), "J"),
    "ExcessMTL_warmup2": (lambda m: A.ExcessMTL(n_warmup_steps=2), "J"),
    "PCD": (lambda m: A.PCD(), "J"),
    "NashMTL": (lambda m: A.NashMTL(n_tasks=m), "J"),
    "NashMTL_every2": (lambda m: A.NashMTL(n_tasks=m, update_weights_every=2), "J"),
    "CRMOGM_UPGrad": (
      lambda m: A.GramianWeightedAggregator(A.CRMOGMWeighting(A.UPGradWeighting(), alpha=0.9)),
      "J",
    ),
    "CRMOGM_MGDA_a0.5": (
      lambda m: A.GramianWeightedAggregator(A.CRMOGMWeighting(A.MGDAWeighting(), alpha=0.5)),
      "J",
    ),
    "MoDoWeighting": (lambda m: A.MoDoWeighting(), "A"),
    "SDMGradWeighting": (lambda m: A.SDMGradWeighting(), "A"),
  }
  smeta = meta.setdefault("torchjd_sequences", {})
  for mname, (factory, kind) in seq_specs.items():
    log_progress(f"torchjd_seq/{mname}")
    rep = None
    for si, (sname, seq) in enumerate(seqs.items()):
      m = seq["J"][0].shape[0]
      obj = factory(m)
      rep = repr(obj)
      torch.manual_seed(TORCH_SEED_BASE + 500 + si)
      for t in range(len(seq["J"])):
        rng_log: dict = {}
        captured = {}
        handle = None
        if isinstance(obj, WeightedAggregator):
          handle = obj.weighting.register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("w", out.detach().clone())  # noqa: B023  (the hook is removed within the iteration)
          )
        try:
          with capture_torch_rng(rng_log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "A":
              captured["w"] = obj(torch.tensor(seq["A"][t]))
              v = None
            else:
              v = obj(torch.tensor(seq["J"][t]))
        except Exception as e:  # noqa: BLE001
          failures.setdefault(f"torchjd_seq/{mname}", {})[f"{sname}/{t}"] = (
            f"{type(e).__name__}: {e}"[:300]
          )
          break
        finally:
          if handle is not None:
            handle.remove()
        if v is not None:
          store.put(f"torchjd_seq/{mname}/vector/{sname}/{t}", t2n(v))
        store.put(f"torchjd_seq/{mname}/weights/{sname}/{t}", t2n(captured["w"]))
        if mname == "GradVac":
          orders = []
          for i, p in enumerate(rng_log.get("randperm", [])):
            others = [j for j in range(m) if j != i]
            orders.append([others[int(k)] for k in p.tolist()])
          store.put(
            f"torchjd_seq/{mname}/perms/{sname}/{t}",
            np.array(orders).reshape(m, m - 1),
            dtype=np.int64,
          )
    smeta[mname] = {
      "repr": rep,
      "input": "A = J @ J2.T" if kind == "A" else "J",
      "protocol": "fresh instance per sequence; call on step t = 0..4 in order; "
      "record output after each call",
    }


# ---------------------------------------------------------------------------------------------
# TorchJD scalarizers
# ---------------------------------------------------------------------------------------------


def run_torchjd_scalarizers(store, meta, Lcases, rng):
  import torch  # noqa: PLC0415  (optional, not an mtl_jax dependency)
  import torchjd.scalarization as S  # noqa: PLC0415  (optional, not an mtl_jax dependency)

  failures = meta.setdefault("failures", {})
  smeta = meta.setdefault("torchjd_scalarizers", {})

  aux = {}
  for lname, L in Lcases.items():
    m = L.shape[0]
    pref = rng.dirichlet(np.ones(m))
    ref = L * rng.uniform(0.1, 0.9, m)
    logp = np.linspace(-1.0, 1.0, m)
    aux[lname] = (pref, ref, logp)
    store.put(f"inputs/pref/{lname}", pref)
    store.put(f"inputs/reference/{lname}", ref)
    store.put(f"inputs/log_param/{lname}", logp)

  def set_param(p, value):
    with torch.no_grad():
      p.copy_(torch.as_tensor(value))

  # name -> factory(m, pref, ref, logp) returning (scalarizer, param or None)
  def uw(value):
    def f(m, pref, ref, logp):
      s = S.UW(m)
      if value is not None:
        set_param(s.log_var, logp if isinstance(value, str) else np.full(m, value))
      return s, s.log_var

    return f

  def imtll(value):
    def f(m, pref, ref, logp):
      s = S.IMTLL(m)
      if value is not None:
        set_param(s.log_scale, logp)
      return s, s.log_scale

    return f

  specs = {
    "Mean": lambda m, p, r, lp: (S.Mean(), None),
    "Sum": lambda m, p, r, lp: (S.Sum(), None),
    "Constant": lambda m, p, r, lp: (S.Constant(torch.tensor(p)), None),
    "GeometricMean": lambda m, p, r, lp: (S.GeometricMean(), None),
    "STCH_mu0.1": lambda m, p, r, lp: (S.STCH(mu=0.1), None),
    "STCH_mu1": lambda m, p, r, lp: (S.STCH(mu=1.0), None),
    "STCH_mu0.1_pref_ref": lambda m, p, r, lp: (
      S.STCH(mu=0.1, weights=torch.tensor(p), reference=torch.tensor(r)),
      None,
    ),
    "COSMOS_l1": lambda m, p, r, lp: (S.COSMOS(lambda_=1.0, weights=torch.tensor(p)), None),
    "PBI_t5": lambda m, p, r, lp: (S.PBI(theta=5.0, weights=torch.tensor(p)), None),
    "PBI_t5_ref": lambda m, p, r, lp: (
      S.PBI(theta=5.0, weights=torch.tensor(p), reference=torch.tensor(r)),
      None,
    ),
    "UW_init": uw(None),
    "UW_m0.5": uw(-0.5),
    "UW_param": uw("logp"),
    "IMTLL_init": imtll(None),
    "IMTLL_param": imtll("logp"),
    "Random": lambda m, p, r, lp: (S.Random(), None),
    "FAMO_first_call": lambda m, p, r, lp: (S.FAMO(m), None),
    "DWA_first_call": lambda m, p, r, lp: (S.DWA(), None),
  }
  param_desc = {
    "Constant": "weights = inputs/pref/<lcase>",
    "STCH_mu0.1_pref_ref": "weights = inputs/pref, reference = inputs/reference",
    "COSMOS_l1": "lambda_=1.0, weights = inputs/pref",
    "PBI_t5": "theta=5.0, weights = inputs/pref, reference=None",
    "PBI_t5_ref": "theta=5.0, weights = inputs/pref, reference = inputs/reference",
    "UW_init": "log_var = 0 (TorchJD init)",
    "UW_m0.5": "log_var = -0.5 (LibMTL init)",
    "UW_param": "log_var = inputs/log_param",
    "IMTLL_init": "log_scale = 0 (init)",
    "IMTLL_param": "log_scale = inputs/log_param",
    "Random": "torch.manual_seed(TORCH_SEED_BASE + 700 + case index); randn draw stored",
  }
  for sname, factory in specs.items():
    log_progress(f"torchjd_scalar/{sname}")
    n_ok, rep = 0, None
    for li, (lname, L) in enumerate(Lcases.items()):
      m = L.shape[0]
      pref, ref, logp = aux[lname]
      s, param = factory(m, pref, ref, logp)
      rep = repr(s)
      x = torch.tensor(L, requires_grad=True)
      rng_log: dict = {}
      try:
        torch.manual_seed(TORCH_SEED_BASE + 700 + li)
        with capture_torch_rng(rng_log):
          val = s(x)
        inputs = [x] if param is None else [x, param]
        grads = torch.autograd.grad(val, inputs)
      except Exception as e:  # noqa: BLE001
        failures.setdefault(f"torchjd_scalar/{sname}", {})[lname] = f"{type(e).__name__}: {e}"[:300]
        continue
      store.put(f"torchjd_scalar/{sname}/value/{lname}", t2n(val))
      store.put(f"torchjd_scalar/{sname}/grad/{lname}", t2n(grads[0]))
      if param is not None:
        store.put(f"torchjd_scalar/{sname}/param_grad/{lname}", t2n(grads[1]))
      if sname == "Random":
        store.put(f"torchjd_scalar/{sname}/randn/{lname}", t2n(rng_log["randn"][0]))
      n_ok += 1
    smeta[sname] = {
      "repr_last_instance": rep,
      "n_cases": n_ok,
      "params": param_desc.get(sname, "defaults / as named"),
    }

  # DWA protocol: 4 epochs x 2 batches; batch losses = L * factor(e, b, task); s.step() after
  # each epoch. Epochs 0 and 1 give weights 1; epochs 2 and 3 use the two previous averages.
  n_ok = 0
  for lname, L in Lcases.items():
    m = L.shape[0]
    s = S.DWA()  # temperature 2.0
    for e in range(4):
      for b in range(2):
        vals = L * rng.uniform(0.6, 1.2, m) * (0.9**e)
        store.put(f"inputs/dwa/{lname}/e{e}b{b}", vals)
        x = torch.tensor(vals, requires_grad=True)
        out = s(x)
        (g,) = torch.autograd.grad(out, x)
        store.put(f"torchjd_scalar/DWA/value/{lname}/e{e}b{b}", t2n(out))
        store.put(f"torchjd_scalar/DWA/grad/{lname}/e{e}b{b}", t2n(g))
      s.step()
    n_ok += 1
  smeta["DWA"] = {
    "repr": repr(S.DWA()),
    "n_cases": n_ok,
    "protocol": "fresh DWA() per loss case; for e in 0..3: for b in 0..1: "
    "call on inputs/dwa/<lcase>/e<e>b<b>; then .step() at epoch end",
  }

  # FAMO protocol: fresh FAMO(m); for t in 0..3: value = famo(before_t) (record value, grad),
  # then famo.update(after_t) (record z = softmax(logits) after the update).
  n_ok = 0
  for lname, L in Lcases.items():
    m = L.shape[0]
    s = S.FAMO(m)
    before = L.copy()
    for t in range(4):
      after = before * rng.uniform(0.7, 1.05, m)
      store.put(f"inputs/famo/{lname}/before/{t}", before)
      store.put(f"inputs/famo/{lname}/after/{t}", after)
      x = torch.tensor(before, requires_grad=True)
      out = s(x)
      (g,) = torch.autograd.grad(out, x)
      store.put(f"torchjd_scalar/FAMO/value/{lname}/{t}", t2n(out))
      store.put(f"torchjd_scalar/FAMO/grad/{lname}/{t}", t2n(g))
      s.update(torch.tensor(after))
      z = torch.softmax(s._w.detach().flatten(), dim=0)
      store.put(f"torchjd_scalar/FAMO/z_after_update/{lname}/{t}", t2n(z))
      before = after * rng.uniform(0.9, 1.1, m)  # next batch: a different draw
    n_ok += 1
  smeta["FAMO"] = {
    "repr": repr(S.FAMO(2)),
    "n_cases": n_ok,
    "protocol": "fresh FAMO(m) (lr=0.025, weight_decay=1e-3, min_losses=0) per "
    "loss case; for t in 0..3: out = famo(before_t) -> record value "
    "and d out/d losses; famo.update(after_t) -> record "
    "softmax(logits). Logits start at 0.",
  }


# ---------------------------------------------------------------------------------------------
# LibMTL 1.1.5
# ---------------------------------------------------------------------------------------------


def import_libmtl_weighting():
  """Imports LibMTL.weighting without running LibMTL/__init__.py (which needs torchvision)."""
  spec = importlib.util.find_spec("LibMTL")
  if spec is None:
    return None
  pkg = types.ModuleType("LibMTL")
  pkg.__path__ = list(spec.submodule_search_locations)
  pkg.__file__ = spec.origin
  sys.modules["LibMTL"] = pkg
  return importlib.import_module("LibMTL.weighting")


def make_libmtl_shim(cls, m, n):
  """A LibMTL weighting whose only shared parameter is theta in R^n.

  Losses are built as l = J @ theta + c at theta = 0, so that the per-task gradient of l_i with
  respect to the shared parameters is exactly row i of J and the loss values are c. After
  ``backward``, theta.grad holds the aggregated vector that LibMTL would hand to the optimizer.
  """
  import torch  # noqa: PLC0415  (optional, not an mtl_jax dependency)

  class Shim(cls):
    def __init__(self):
      super().__init__()
      self.task_num = m
      self.task_name = [f"task{i}" for i in range(m)]
      self.device = torch.device("cpu")
      self.rep_grad = False
      self.epoch = 0
      self.theta = torch.nn.Parameter(torch.zeros(n))

    def get_share_params(self):
      return [self.theta]

    def zero_grad_share_params(self):
      if self.theta.grad is not None:
        self.theta.grad.zero_()

  s = Shim()
  s.init_param()
  return s


def run_libmtl(store, meta, Jcases, Jlosses, Lcases, dwa_inputs, seqs):
  import torch  # noqa: PLC0415  (optional, not an mtl_jax dependency)

  lmeta = meta.setdefault("libmtl", {})
  failures = meta.setdefault("failures", {})
  try:
    W = import_libmtl_weighting()
  except Exception as e:  # noqa: BLE001
    lmeta["status"] = f"import failed: {type(e).__name__}: {e}"
    return
  if W is None:
    lmeta["status"] = "LibMTL not installed: skipped"
    return
  lmeta["status"] = "ok"

  def call(cls, J, c, kwargs, setup=None):
    m, n = J.shape
    s = make_libmtl_shim(cls, m, n)
    if setup is not None:
      setup(s)
    losses = torch.tensor(J) @ s.theta + torch.tensor(c)
    ret = s.backward(losses, **kwargs)
    return s, t2n(s.theta.grad), ret

  # Gradient-based methods on the Jacobian cases.
  grad_specs = {
    "MGDA_none": (W.MGDA, {"mgda_gn": "none"}, lambda m: True),
    "MGDA_l2": (W.MGDA, {"mgda_gn": "l2"}, lambda m: True),
    "MGDA_loss": (W.MGDA, {"mgda_gn": "loss"}, lambda m: True),
    "MGDA_loss+": (W.MGDA, {"mgda_gn": "loss+"}, lambda m: True),
    "IMTL": (W.IMTL, {}, lambda m: True),
    "CAGrad": (W.CAGrad, {"calpha": 0.5, "rescale": 1}, lambda m: m == 3),
    "PCGrad": (W.PCGrad, {}, lambda m: True),
    "GradVac": (W.GradVac, {"beta": 0.5}, lambda m: True),
    "GradNorm": (W.GradNorm, {"alpha": 1.5}, lambda m: True),
    "GradNorm_param": (W.GradNorm, {"alpha": 1.5}, lambda m: True),
    "EW": (W.EW, {}, lambda m: True),
  }
  for mname, (cls, kwargs, applicable) in grad_specs.items():
    log_progress(f"libmtl/{mname}")
    n_ok = 0
    for ci, (cname, J) in enumerate(Jcases.items()):
      m = J.shape[0]
      if not applicable(m):
        continue
      c = Jlosses[cname]

      def setup(s, mname=mname, c=c, m=m):
        if mname.startswith("GradNorm"):
          s.epoch = 1
          s.train_loss_buffer = np.stack([2.0 * c, c], axis=1)  # epoch-0 avg = 2 c
          if mname == "GradNorm_param":
            with torch.no_grad():
              s.loss_scale.copy_(torch.linspace(-0.5, 0.5, m))

      orders: list = []
      try:
        random.seed(PY_SEED_BASE + ci)
        cap = MGDA_MATMUL_CAP if mname.startswith("MGDA") else None
        with (
          capture_py_shuffle(orders),
          warnings.catch_warnings(),
          time_limit(120),
          matmul_call_cap(cap),
        ):
          warnings.simplefilter("ignore")
          s, v, ret = call(cls, J, c, kwargs, setup)
      except Exception as e:  # noqa: BLE001
        failures.setdefault(f"libmtl/{mname}", {})[cname] = f"{type(e).__name__}: {e}"[:300]
        continue
      store.put(f"libmtl/{mname}/vector/{cname}", v)
      if ret is not None:
        store.put(f"libmtl/{mname}/returned/{cname}", np.asarray(ret, dtype=np.float64))
      if orders:
        store.put(f"libmtl/{mname}/orders/{cname}", np.array(orders), dtype=np.int64)
      if mname.startswith("GradNorm"):
        store.put(f"libmtl/{mname}/loss_scale_grad/{cname}", t2n(s.loss_scale.grad))
      if mname == "IMTL":
        store.put(f"libmtl/{mname}/loss_scale_grad/{cname}", t2n(s.loss_scale.grad))
      n_ok += 1
    lmeta[mname] = {"class": cls.__name__, "kwargs": kwargs, "n_cases": n_ok}
  lmeta["GradNorm"]["setup"] = (
    "epoch = 1; train_loss_buffer[:, 0] = 2 * losses_for_J "
    "(so L_i(t)/L_i(0) = 1/2 for all i); loss_scale param = 1 (init)"
  )
  lmeta["GradNorm_param"]["setup"] = (
    "as GradNorm but loss_scale param = linspace(-0.5, 0.5, m) (weights = m * softmax(loss_scale))"
  )
  for k in ("MGDA_none", "MGDA_l2", "MGDA_loss", "MGDA_loss+"):
    lmeta[k]["note"] = (
      f"LibMTL 1.1.5 MGDA never increments iter_count (MAX_ITER=250 is dead "
      f"code); the generator caps it at {MGDA_MATMUL_CAP} iterations and "
      "records non-terminating cases as failures. For m = 2 it returns the "
      "closed-form pair solution clamped to gamma in {0.001, 0.999} at the "
      "ends (never exactly 0/1)."
    )
  lmeta["CAGrad"]["note"] = (
    "LibMTL 1.1.5 CAGrad hard-codes x.reshape(1, 3): only m = 3 works; "
    "recorded on the m = 3 cases only"
  )

  # GradVac sequence (stateful rho_T)
  for si, (sname, seq) in enumerate(seqs.items()):
    Js = seq["J"]
    m, n = Js[0].shape
    s = make_libmtl_shim(W.GradVac, m, n)
    random.seed(PY_SEED_BASE + 500 + si)
    for t, J in enumerate(Js):
      s.theta.grad = None
      losses = torch.tensor(J) @ s.theta + 1.0
      orders: list = []
      with capture_py_shuffle(orders):
        ret = s.backward(losses, beta=0.5)
      store.put(f"libmtl_seq/GradVac/vector/{sname}/{t}", t2n(s.theta.grad))
      store.put(f"libmtl_seq/GradVac/returned/{sname}/{t}", np.asarray(ret, dtype=np.float64))
      store.put(f"libmtl_seq/GradVac/orders/{sname}/{t}", np.array(orders), dtype=np.int64)
      store.put(f"libmtl_seq/GradVac/rho_T/{sname}/{t}", t2n(s.rho_T))

  # Loss-based methods on the loss cases, with J = identity so that theta.grad = loss weights.
  loss_specs = {
    "EW": (W.EW, {}),
    "GLS": (W.GLS, {}),
    "UW": (W.UW, {}),
    "DWA_epoch2": (W.DWA, {"T": 2.0}),
  }
  for mname, (cls, kwargs) in loss_specs.items():
    n_ok = 0
    for lname, L in Lcases.items():
      m = L.shape[0]
      c = L
      setup = None
      if mname == "DWA_epoch2":
        # train_loss_buffer[:, e] = average of the torchjd DWA protocol batches of epoch e
        buf = np.stack(
          [(dwa_inputs[lname][(e, 0)] + dwa_inputs[lname][(e, 1)]) / 2 for e in range(4)], axis=1
        )
        c = dwa_inputs[lname][(2, 0)]

        def setup(s, buf=buf):
          s.epoch = 2
          s.train_loss_buffer = buf

      try:
        s, v, ret = call(cls, np.eye(m), c, kwargs, setup)
      except Exception as e:  # noqa: BLE001
        failures.setdefault(f"libmtl_loss/{mname}", {})[lname] = f"{type(e).__name__}: {e}"[:300]
        continue
      store.put(f"libmtl_loss/{mname}/weights/{lname}", v)
      if ret is not None:
        store.put(f"libmtl_loss/{mname}/returned/{lname}", np.asarray(ret, dtype=np.float64))
      if mname == "UW":
        store.put(f"libmtl_loss/{mname}/loss_scale_grad/{lname}", t2n(s.loss_scale.grad))
      n_ok += 1
    lmeta[f"loss/{mname}"] = {"class": cls.__name__, "kwargs": kwargs, "n_cases": n_ok}
  lmeta["loss/DWA_epoch2"]["setup"] = (
    "epoch = 2; train_loss_buffer[:, e] = mean of inputs/dwa/<lcase>/e<e>b0 and e<e>b1; "
    "called on inputs/dwa/<lcase>/e2b0. Must equal torchjd_scalar/DWA/grad/<lcase>/e2b0."
  )

  lmeta["not_recorded"] = {
    "RLW": "random weights softmax(N(0,I)) (or other dists) drawn from torch.distributions; "
    "covered in spirit by torchjd Random; nothing deterministic to compare",
    "GradDrop": "LibMTL 1.1.5 GradDrop requires rep_grad=True (gradients w.r.t. the shared "
    "representation, multiplied by sign(rep)) and a torch.rand mask; "
    "TorchJD GradDrop (recorded, with its U draw) covers the combination step",
    "DB_MTL, MoCo, Nash_MTL, Aligned_MTL, STCH, FAMO, ExcessMTL, FairGrad, SDMGrad, MoDo, "
    "UPGrad, RGW": "not in the PyPI package LibMTL 1.1.5 (only on the GitHub master branch); "
    "not recorded (see NOTES.md for DB-MTL and MoCo descriptions)",
  }


# ---------------------------------------------------------------------------------------------
# Metadata about conventions
# ---------------------------------------------------------------------------------------------

CONVENTIONS = {
  "general": (
    "J is [m, n]: row i = gradient of loss i. Every TorchJD WeightedAggregator returns "
    "vector = weights @ J (weights multiply the ROWS of J). Gramian-based weightings receive "
    "G = J @ J.T computed by torchjd.compute_gramian (matrix @ matrix.T). All computations "
    "in float64 (torch.set_default_dtype(torch.float64))."
  ),
  "UPGrad": "mean convention: pref_vector default 1/m; w = sum_i v_i where v_i = argmin "
  "v^T G' v s.t. v >= (1/m) e_i, G' = G/trace(G) + 1e-4 I (norm_eps=1e-4: G'=0 if "
  "trace < 1e-4; reg_eps=1e-4), QP solved by quadprog via qpsolvers.",
  "DualProj": "mean convention: w = argmin v^T G' v s.t. v >= 1/m (same G' as UPGrad).",
  "MGDA": "Frank-Wolfe (Sener & Koltun Alg. 2) from alpha = 1/m, epsilon=1e-3 (stop when "
  "step gamma < eps), max_iters=100; weights on the simplex (sum 1). Not exact: see "
  "derived/min_norm for the exact min-norm point.",
  "CAGrad": "c required (recorded 0.5 and 0.2), norm_eps=1e-4; works on G/trace(G); "
  "weights = 1/m + (sqrt_phi/||g_w||) w*, sqrt_phi = c ||g0|| in the normalised "
  "space; mean convention (c=0 -> Mean); no rescaling by 1/(1+c^2).",
  "PCGrad": "sum convention: weights = sum over i of the projected copy of g_i (coefficients); "
  "conflict-free input -> all ones; visiting order torch.randperm per task i "
  "(self skipped), recorded in perms.",
  "IMTLG": "v = pinv(G) @ sqrt(diag G); w = v / sum(v) (w = 0 if |sum v| < 1e-12); "
  "weights sum to 1.",
  "AlignedMTL": "w = B @ (1/m) with B = sqrt(scale) V S^{-1/2} V^T over eigenpairs with "
  "lambda > max(lambda) m eps; scale = smallest kept eigenvalue (min, default), "
  "median, or mean (rmse); eigh of the raw (unnormalised) G.",
  "ConFIG": "not a weighted aggregator (no weights): unit rows u_i = g_i/||g_i|| (0 for zero "
  "rows), d = pinv(U) @ 1, d_hat = d/||d||, vector = (sum_i g_i . d_hat) d_hat.",
  "Mean": "weights 1/m.",
  "Sum": "weights 1.",
  "Constant": "weights = inputs/const_weights.",
  "Krum": "n_byzantine=f, n_selected=k; score_i = sum of the m-f-2 smallest distances from "
  "row i to the others; weights 1/k on the k lowest scores (mean of selected rows).",
  "TrimmedMean": "per column, drop trim_number smallest and largest entries, average the rest.",
  "GradDrop": "P = (1 + sum_i J_i / sum_i |J_i|)/2 per coordinate, U ~ U(0,1) per coordinate "
  "(recorded), keep J_ij if (P_j > U_j and J_ij > 0) or (P_j < U_j and J_ij < 0); "
  "vector = sum_i (leak_i + (1-leak_i) mask_i) * J_i. Sum convention. A zero "
  "column gives 0/0 = nan in P -> masked out (coordinate 0).",
  "Random": "weights softmax(randn(m)) (randn draw recorded).",
  "NashMTL": "n_tasks=m, max_norm=1.0, update_weights_every=1, optim_niter=20; "
  "G normalised by its Frobenius norm; ECOS via cvxpy, sequential convex "
  "linearisation from prvs_alpha (init ones, float32); weights scaled down so that "
  "||w @ J|| <= max_norm. Stateful (warm start + step counter).",
  "FairGrad": "alpha required (0.5, 1, 2 recorded); solves G w = w^(-1/alpha) with "
  "scipy.optimize.least_squares (bounds w >= 0, start 1/m, max_nfev default); "
  "G is NOT normalised (scale-dependent for alpha != 1).",
  "ExcessMTL": "robust_step_size=1.0, n_warmup_steps=0; stateful: S += J**2; "
  "e_i = sum_j J_ij^2 / sqrt(S_ij + 1e-7); first non-warmup call stores e as the "
  "baseline (unscaled), later calls use e / (baseline + 1e-7); "
  "weights = softmax(log(w_prev) + step * e), w starts at 1/m.",
  "GradVac": "beta=0.5, eps=1e-8; stateful phi_hat[i,j] EMA targets (start 0); "
  "sum convention (weights = column sums of coefficient matrix C); visiting order "
  "torch.randperm over the other tasks (recorded as actual j order). phi_hat is "
  "updated for every visited pair (not only when corrected).",
  "PCD": "tau=0.02, beta=0.999, eps=1e-8; row 0 is primary; stateful EMA of squared norms "
  "(bias-corrected); output rescaled to ||g_0||.",
  "MoDoWeighting": "gamma=0.1, rho=0.1; lambda <- proj_simplex(lambda - gamma (A lambda + rho "
  "lambda)); lambda starts 1/m; returns new lambda (no scale normalisation).",
  "SDMGradWeighting": "lr=10, momentum=0.5, n_iter=20, lambda_=0.3, pref=1/m; A scaled by "
  "1/(mean(sqrt(clamp(diag A,0)))^2 + 1e-8); inner momentum SGD on w with "
  "simplex projection; returns (w + lambda_ pref)/(1 + lambda_); w persists "
  "across calls.",
  "CRMOGMWeighting": "EMA of a wrapped weighting's output: lam_k = a lam_{k-1} + (1-a) hat_k, "
  "lam_0 = hat_1 (first output = wrapped output). alpha default 0.9.",
  "scalarizers": "grad = d value / d losses (the effective loss weights). Sum: 1; Mean: 1/m; "
  "GeometricMean: exp(mean log L) -> grad GM/(m L_i); STCH: mu logsumexp(w (L - z)"
  "/mu), w default 1/m; UW: sum 0.5 exp(-s) L + 0.5 s; IMTLL: sum exp(s) L - s; "
  "DWA: weights m softmax((L(e-1)/L(e-2))/T), T=2, 1 for the first 2 epochs; "
  "FAMO: value c sum z log(L - b + 1e-8) with z, c detached -> grad = "
  "z_i/(L_i + 1e-8) / sum_j z_j/(L_j + 1e-8).",
  "libmtl": "vector = gradient LibMTL writes into the shared parameters. LibMTL EW uses SUM "
  "(weights 1, despite its docstring 1/T). MGDA: weights returned on the simplex, but "
  "applied to J_i / gn_i (gn = 1, ||g_i||, L_i, or L_i ||g_i||), so effective row "
  "weights = returned / gn. IMTL returns alpha with vector = alpha @ J (sum 1). "
  "PCGrad/GradVac return the effective row weights (sum convention). CAGrad returns "
  "the inner-problem simplex weights; vector = (mean g + lambda g_w)/(1 + c^2).",
}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def versions():
  out = {"python": platform.python_version(), "numpy": np.__version__}
  for pkg in [
    "torch",
    "torchjd",
    "LibMTL",
    "scipy",
    "cvxpy",
    "qpsolvers",
    "quadprog",
    "clarabel",
    "ecos",
  ]:
    try:
      out[pkg] = im.version(pkg)
    except im.PackageNotFoundError:
      out[pkg] = None
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="reference_outputs.npz")
  ap.add_argument("--no-libmtl", action="store_true", help="skip LibMTL even if installed")
  args = ap.parse_args()

  import torch  # noqa: PLC0415  (optional, not an mtl_jax dependency)

  torch.set_default_dtype(torch.float64)
  torch.set_num_threads(1)

  rng = np.random.default_rng(SEED)
  Jcases, Jdesc = build_jacobian_cases(rng)
  Lcases, Ldesc = build_loss_cases(rng)
  seqs = build_sequences(rng)
  Jlosses = {name: rng.uniform(0.5, 3.0, J.shape[0]) for name, J in Jcases.items()}

  store = Store()
  meta: dict = {
    "description": "Reference outputs of TorchJD 0.18.0 / LibMTL 1.1.5 for mtl_jax tests. "
    "See NOTES.md and the docstring of make_reference_outputs.py.",
    "versions": versions(),
    "seeds": {
      "numpy_inputs": SEED,
      "torch_base": TORCH_SEED_BASE,
      "python_random_base": PY_SEED_BASE,
      "rule": "torch.manual_seed(torch_base + i) before the call on the i-th J case "
      "(order of jacobian_cases); random.seed(python_random_base + i) for "
      "LibMTL; sequences use base + 500 + seq index; scalarizers base + 700 "
      "+ loss-case index",
    },
    "jacobian_cases": {
      k: {"shape": list(v.shape), "description": Jdesc[k]} for k, v in Jcases.items()
    },
    "loss_cases": {k: {"m": int(v.shape[0]), "description": Ldesc[k]} for k, v in Lcases.items()},
    "sequences": {k: {"shape": list(v["J"][0].shape), "T": len(v["J"])} for k, v in seqs.items()},
    "conventions": CONVENTIONS,
  }

  for name, J in Jcases.items():
    store.put(f"inputs/J/{name}", J)
    store.put(f"inputs/losses_for_J/{name}", Jlosses[name])
  for name, L in Lcases.items():
    store.put(f"inputs/losses/{name}", L)
  for sname, seq in seqs.items():
    for key in ("J", "J2", "A"):
      for t, X in enumerate(seq[key]):
        store.put(f"inputs/seq/{sname}/{key}/{t}", X)

  log_progress("derived/min_norm")
  for name, J in Jcases.items():
    store.put(f"derived/min_norm/vector/{name}", min_norm_point(J))

  run_torchjd_aggregators(store, meta, Jcases, seqs)
  run_torchjd_scalarizers(store, meta, Lcases, rng)

  dwa_inputs = {}
  for lname in Lcases:
    dwa_inputs[lname] = {
      (e, b): store.arrays[f"inputs/dwa/{lname}/e{e}b{b}"] for e in range(4) for b in range(2)
    }
  if args.no_libmtl:
    meta["libmtl"] = {"status": "skipped by --no-libmtl"}
  else:
    run_libmtl(store, meta, Jcases, Jlosses, Lcases, dwa_inputs, seqs)

  meta["n_arrays"] = len(store.arrays)
  arrays = dict(store.arrays)
  # drop memory addresses from reprs (e.g. GradDrop's default f) so that reruns are identical
  meta_json = re.sub(r" at 0x[0-9a-fA-F]+", "", json.dumps(meta, indent=1, sort_keys=True))
  arrays["metadata"] = np.array(meta_json)
  np.savez_compressed(args.out, **arrays)
  n_fail = sum(len(v) for v in meta.get("failures", {}).values())
  print(f"wrote {args.out}: {len(arrays)} arrays; {n_fail} recorded failures")


if __name__ == "__main__":
  try:
    main()
  except Exception:
    traceback.print_exc()
    sys.exit(1)
