#!/usr/bin/env bash
# The accelerator benchmarks in one run: paper_scale, the Gramian engine (with the bfloat16
# Gramian's error), the methods, the sweep (vmap lanes) and the bfloat16 tests, each table
# written to OUTDIR.
#
#   benchmarks/device_suite.sh OUTDIR [--smoke] [--wheels DIR]
#
# Full run: on a machine whose jax sees a GPU (or TPU); each part runs under its own time budget
# (BUDGETS below, 8m20s together, inside the 9 minutes asked of one H200), and a part that runs
# out is recorded as such in OUTDIR/summary.md while the others still run.
# --smoke: the same parts at CI sizes on the CPU (tests/test_device_suite.py runs it); its budgets
# are generous, for a shared CPU.
# --wheels DIR: first install every wheel in DIR (pip --no-index --no-deps, into a private
# folder put first on PYTHONPATH); by default ./.whl when it holds wheels; 'none' installs
# nothing (the environment already has every package). The device machine
# is bare and offline: benchmarks/device_wheels.txt lists what to carry and how to download it.
set -uo pipefail

usage() {
  echo "usage: benchmarks/device_suite.sh OUTDIR [--smoke] [--wheels DIR]" >&2
  exit 2
}

OUTDIR=""
SMOKE=0
WHEELS=".whl"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --wheels)
      [[ $# -ge 2 ]] || usage
      WHEELS="$2"
      shift
      ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) [[ -z "$OUTDIR" ]] || usage; OUTDIR="$1" ;;
  esac
  shift
done
[[ -n "$OUTDIR" ]] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" || { echo "error: OUTDIR $OUTDIR cannot be created" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
PYTHON="${PYTHON:-python3}"

if [[ "$WHEELS" == "none" ]]; then
  :
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/mtl_jax_device_site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || { echo "error: installing $WHEELS/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
elif [[ "$WHEELS" != ".whl" ]]; then
  echo "error: --wheels $WHEELS holds no .whl files" >&2
  exit 2
fi
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1

# Every module the parts import, then the backend: a full run needs an accelerator.
BACKEND="$("$PYTHON" - <<'EOF'
import importlib, sys
missing = []
for name in ("jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "tensorboardX",
             "absl", "numpy", "pytest"):
  try:
    importlib.import_module(name)
  except ImportError as error:
    missing.append(f"{name} ({error})")
if missing:
  print("error: missing Python packages: " + "; ".join(missing)
        + " (carry them as wheels: benchmarks/device_wheels.txt)", file=sys.stderr)
  sys.exit(2)
import jax
print(jax.default_backend())
EOF
)" || exit 2
if [[ $SMOKE -eq 0 && "$BACKEND" == "cpu" ]]; then
  echo "error: jax sees no accelerator (backend cpu); use --smoke for the CPU run" >&2
  exit 2
fi

if [[ $SMOKE -eq 1 ]]; then
  export JAX_PLATFORMS=cpu
  # The smoke run's figures are not recorded, so its parts may load their programs from the
  # persistent compilation cache the tests use (MTL_JAX_COMPILATION_CACHE; empty: none). A full
  # run compiles afresh: the sweep benchmark reports compile times.
  SMOKE_CACHE="${MTL_JAX_COMPILATION_CACHE-$HOME/.cache/mtl_jax/xla}"
  if [[ -n $SMOKE_CACHE ]]; then
    export JAX_COMPILATION_CACHE_DIR="$SMOKE_CACHE" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2
  fi
  PAPER_SCALE=(benchmarks/paper_scale.py --smoke --configs=cityscapes_segnet)
  GRAMIAN=(benchmarks/gramian.py --rounds 1 --batch-sizes 4 --encoders mlp)
  METHODS=(benchmarks/methods.py --cases=tiny --methods=pcgrad --sample_level_methods= --repeats=1)
  SWEEP=(benchmarks/sweep.py --config=configs/test.py --runs=2 --steps=2 --rounds=1 --modes=vmap)
  # -n 0: one process, not pyproject's two xdist workers, which would each start JAX (and on a
  # GPU each preallocate most of its memory).
  BF16=(-m pytest -q -n 0 -p no:cacheprovider tests/test_mixed_precision.py -k keeps_float32)
  BUDGETS=(240 120 120 120 120)
else
  PAPER_SCALE=(benchmarks/paper_scale.py --steps 10)
  GRAMIAN=(benchmarks/gramian.py --rounds 10)
  METHODS=(benchmarks/methods.py --repeats=10)
  SWEEP=(benchmarks/sweep.py --runs=4,8 --modes=vmap,loop)
  BF16=(-m pytest -q -n 0 -p no:cacheprovider tests/test_mixed_precision.py)
  BUDGETS=(270 60 60 60 50)
fi

SUMMARY="$OUTDIR/summary.md"
{
  echo "# device_suite $(date -u +%Y-%m-%dT%H:%MZ) backend=$BACKEND smoke=$SMOKE"
  "$PYTHON" -c "import jax; print('jax', jax.__version__, [d.device_kind for d in jax.devices()])"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  echo
  echo "| part | exit | seconds |"
  echo "|---|---|---|"
} >"$SUMMARY"

run_part() {  # name budget_seconds python-arguments...
  local name="$1" budget="$2"
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$budget" "$PYTHON" "$@" >"$OUTDIR/$name.md" 2>"$OUTDIR/$name.log"
  local status=$?
  local note="$status"
  [[ $status -eq 124 || $status -eq 137 ]] && note="$status (over its ${budget}s budget)"
  echo "| $name | $note | $((SECONDS - start)) |" >>"$SUMMARY"
  echo "[$name: exit $note, $((SECONDS - start)) s]" >&2
}

# One part at a time, so that no part's timings are disturbed by another's.
run_part paper_scale "${BUDGETS[0]}" "${PAPER_SCALE[@]}"
run_part gramian "${BUDGETS[1]}" "${GRAMIAN[@]}"
run_part methods "${BUDGETS[2]}" "${METHODS[@]}"
run_part sweep "${BUDGETS[3]}" "${SWEEP[@]}"
run_part bf16_check "${BUDGETS[4]}" "${BF16[@]}"
# A part that failed or ran out of time has a non-zero exit in the summary.
if grep -qE '^\| [a-z0-9_]+ \| [1-9]' "$SUMMARY"; then
  exit 1
fi
