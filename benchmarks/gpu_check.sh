#!/usr/bin/env bash
# GPU check of the fused coupling layer on one CUDA GPU (benchmarks/gpu_check.py): API checks,
# an sm_90 compile report of representative configs (CPU, in the background), correctness of
# every path vs float64, the L=50 / D=2 / H=256 timing table, torch.compile of the reference in
# a subprocess killed when the budget is spent, more correctness cases.
# Results: $OUT/gpu_check.json (OUT defaults to ./gpu_check_out), rewritten after every row, so
# a time-out or a kill still leaves every finished row; "sections" says what completed.
#
#   bash benchmarks/gpu_check.sh [--budget-s S]           # the real run, on one CUDA GPU
#   bash benchmarks/gpu_check.sh --smoke [--budget-s S]   # rehearsal on the CPU (see below)
#
# Time of the real run, all bounded here: the install (skipped when this checkout already
# imports) is killed after INSTALL_TIMEOUT_S = 30 s; Python gets BUDGET_S (default 300 s) and
# starts nothing that does not fit in it; the shell sends it SIGTERM at BUDGET_S + 20 s (it then
# records, kills its subprocesses and exits) and SIGKILL 10 s later. Worst case 30 + 300 + 30 s
# = 6 minutes; expected about 5 minutes (the torch.compile subprocess uses what the budget has
# left). A different BUDGET_S moves every bound with it.
#
# --smoke: tiny sizes on the CPU through Triton's interpreter (TRITON_INTERPRET=1 and
# FASTNVP_BACKEND=triton are exported before Python starts: Triton reads them at import), the
# compile report in subprocesses without TRITON_INTERPRET, torch.compile with aot_eager. It
# checks the script and this Triton's APIs, not the numbers (about 1-2 minutes on 2 cores).
#
# Environment: PYTHON (the interpreter; preferred over .venv/bin/python, else python3), OUT,
# BUDGET_S (the same as --budget-s).
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=()
BUDGET_S="${BUDGET_S:-300}"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=(--smoke) ;;
        --budget-s) BUDGET_S="${2:?--budget-s needs seconds}"; shift ;;
        --budget-s=*) BUDGET_S="${1#--budget-s=}" ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--smoke] [--budget-s SECONDS]" >&2; exit 2 ;;
    esac
    shift
done
case "$BUDGET_S" in
    '' | *[!0-9]*) echo "BUDGET_S / --budget-s must be whole seconds, got '$BUDGET_S'" >&2; exit 2 ;;
esac
INSTALL_TIMEOUT_S=30
TERM_AFTER_S=$((BUDGET_S + 20))  # SIGTERM: Python records and exits
KILL_AFTER_S=10                  # then SIGKILL
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
    PY="$PWD/.venv/bin/python"
else
    PY=python3
fi
PY="$(command -v "$PY")" || { echo "no Python interpreter '${PYTHON:-python3}'" >&2; exit 2; }
case "$PY" in  # absolute, without resolving a venv's python symlink
    */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
esac
export TRITON_DEFAULT_FP_FUSION=1
if [ ${#SMOKE[@]} -gt 0 ]; then
    export TRITON_INTERPRET=1 FASTNVP_BACKEND=triton
else
    unset TRITON_INTERPRET
    export FASTNVP_BACKEND=auto
fi
# Use the installed torch/triton. Install this checkout (editable, no dependencies) into $PY's
# environment only when it does not already import from here; checked from / so that the
# working directory on sys.path cannot fake it. Fall back to PYTHONPATH when pip cannot.
here_check='import importlib.util as u, sys
s = u.find_spec("fastnvp.kernels")
sys.exit(0 if s and s.origin and s.origin.startswith(sys.argv[1]) else 1)'
HERE="$PWD"
if (cd / && "$PY" -c "$here_check" "$HERE/") >/dev/null 2>&1; then
    echo "fastnvp already imports from $PWD with $PY: no install"
elif ! timeout "$INSTALL_TIMEOUT_S" "$PY" -m pip install -q -e . --no-deps --no-build-isolation \
        >"$OUT/pip.log" 2>&1; then
    echo "pip install failed (see $OUT/pip.log); using PYTHONPATH"
    ln -sfn "$PWD/kernels" "$PWD/fastnvp/kernels"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
start=$SECONDS
rc=0
timeout -k "$KILL_AFTER_S" "$TERM_AFTER_S" \
    "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s "$BUDGET_S" "${SMOKE[@]}" || rc=$?
echo "gpu_check.py exit status $rc after $((SECONDS - start)) s; results in $OUT/gpu_check.json"
exit "$rc"
