"""sm_90 compile report: every shipped kernel config compiles for Hopper with 0 spills.

The report runs in a subprocess without TRITON_INTERPRET (the interpreter replaces kernels by
Python and cannot compile them); no GPU is needed. The full report compiles every config of
every registered module (minutes on a laptop CPU: marked slow); one narrow-data and one
wide-data (D = 128) config always run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "compile_report.py"
SHARED_LIMIT = 227 * 1024


def run_report(
    tmp_path: Path, *extra: str, timeout: int
) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPORT), "--json", str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    return proc, data


def check_rows(rows) -> None:
    """0 spills, shared memory within sm_90's limit."""
    for row in rows:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        assert row["shared"] <= SHARED_LIMIT, row
        assert 0 < row["registers"] <= 255, row


def test_parse_ptxas_reads_registers_and_spills():
    sys.path.insert(0, str(REPORT.parent))
    try:
        import compile_report
    finally:
        sys.path.remove(str(REPORT.parent))
    text = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers\n"
    )
    got = compile_report.parse_ptxas(text)
    assert got == {"registers": 168, "spill_stores": 12, "spill_loads": 16, "stack_frame": 8}


@pytest.mark.parametrize(
    "name",
    [
        "coupling_layer_kernel[bf16,D=2,H=256]",
        # Wide halves, the most register-bound shipped config (255 registers, 0 spills).
        "coupling_layer_backward_kernel[bf16,D=128,H=256]",
    ],
)
def test_one_fused_layer_config_compiles_for_sm90(tmp_path, name):
    row = _compile_one(tmp_path, name)
    assert row["wgmma"], "the bf16 H x H Linear should compile to wgmma on sm_90"


@pytest.mark.slow
def test_every_shipped_config_compiles_without_spills(tmp_path):
    proc, data = run_report(tmp_path, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = [row["name"] for row in data["rows"]]
    assert any("coupling_layer_backward_kernel" in n for n in names)
    assert any("coupling_stack_kernel" in n for n in names)
    assert any("D=128" in n for n in names), "the wide-data configs are shipped and compiled"
    check_rows(data["rows"])


@pytest.mark.parametrize(
    "name",
    [
        # The elementwise coupling kernels at their largest tiles: fp64 backward holds the most
        # registers; the interpreter accepts code that the GPU compiler rejects, so compile here.
        "_coupling_bwd_kernel[inverse,float64,BLOCK=512x1]",
        "_coupling_fwd_kernel[forward,bfloat16,BLOCK=1024x1]",
    ],
)
def test_elementwise_coupling_config_compiles_for_sm90(tmp_path, name):
    _compile_one(tmp_path, name)


def _compile_one(tmp_path, name: str) -> dict:
    """Compile the one shipped config ``name`` for sm_90 and check its row (no spills...)."""
    proc, data = run_report(tmp_path, "--filter", name, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(data["rows"]) == 1
    check_rows(data["rows"])
    return data["rows"][0]
