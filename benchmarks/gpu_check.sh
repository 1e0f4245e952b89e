#!/usr/bin/env bash
# GPU check of the fused coupling layer on one CUDA GPU, in at most ~6 minutes:
# correctness of every path vs float64, then the L=50 / D=2 / H=256 timing table
# (benchmarks/gpu_check.py). Results: $OUT/gpu_check.json (OUT defaults to ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
unset TRITON_INTERPRET
export FASTNVP_BACKEND=auto
export TRITON_DEFAULT_FP_FUSION=1
# Use the installed torch/triton; install this checkout without touching dependencies, and fall
# back to PYTHONPATH when pip cannot (read-only site-packages).
if ! "$PY" -m pip install -q -e . --no-deps --no-build-isolation >"$OUT/pip.log" 2>&1; then
    echo "pip install failed (see $OUT/pip.log); using PYTHONPATH"
    ln -sfn "$PWD/kernels" "$PWD/fastnvp/kernels"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
timeout 350 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-300}"
