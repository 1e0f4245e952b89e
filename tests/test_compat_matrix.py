"""benchmarks/compat.py: the matrix's cells and its verdict, on synthetic compile reports.

The matrix itself (a venv per Triton, the compile report and the interpreter tests in each) runs
in `make compat` and in CI's compat legs (.ci/run); these tests check how it reads the results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compat  # noqa: E402

sys.path.pop(0)


def _row(name, registers=100, spills=0, shared=1024):
    return {
        "name": name, "registers": registers, "spill_stores": spills, "spill_loads": spills,
        "shared": shared,
    }  # fmt: skip


def _report(**overrides):
    rows = [
        _row("_coupling_fwd_kernel[forward,float32,BLOCK=1024x1]"),
        _row("coupling_layer_kernel[bf16,D=2,H=256]", registers=219),
        _row("coupling_layer_backward_kernel[bf16,D=2,H=256]", registers=237),
        _row("coupling_stack_kernel[bf16,D=2,H=256]", registers=213),
    ]
    for i, row in enumerate(rows):
        rows[i] = {**row, **overrides.get(row["name"].split("[")[0], {})}
    return {"rows": rows}


def _tests(failed=0):
    per_file = {f: {"passed": 3, "failed": 0} for f in compat.TEST_FAMILIES}
    per_file["tests/test_ops.py"]["failed"] = failed
    return {"exit": int(failed > 0), "per_file": per_file, "failures": []}


def test_a_clean_report_is_green():
    cells = compat.compile_cells(_report())
    assert set(cells) == set(compat.FAMILIES)
    assert cells["fused layer"]["max_registers"] == 219
    row = {"triton": "3.6.0", "compile": cells, "tests": _tests()}
    assert compat.green(row)
    text = compat.markdown([row], {"command": "c", "date": "d", "commit": "x", "torch": "t"})
    assert "| 3.6.0 | 2.10, 2.11 | fused layer | 1/1 | 219 | 0 |" in text


@pytest.mark.parametrize(
    "overrides",
    [
        {"coupling_layer_kernel": {"spill_stores": 4}},
        {"coupling_stack_kernel": {"shared": 300 * 1024}},
        {"coupling_layer_backward_kernel": {"error": "CompilationError: K >= 16"}},
    ],
)
def test_a_spill_a_shared_overflow_or_a_compile_error_is_not_green(overrides):
    row = {"triton": "3.6.0", "compile": compat.compile_cells(_report(**overrides))}
    assert not compat.green(row)
    text = compat.markdown([row], {"command": "c", "date": "d", "commit": "x", "torch": "t"})
    assert "✗" in text and "failures:" in text


def test_a_failed_interpreter_test_is_not_green():
    row = {"triton": "3.3.1", "compile": compat.compile_cells(_report()), "tests": _tests(1)}
    assert not compat.green(row)


def test_a_family_with_no_configs_is_not_green():
    report = _report()
    report["rows"] = report["rows"][1:]  # no elementwise configs compiled at all
    assert not compat.green({"triton": "3.6.0", "compile": compat.compile_cells(report)})


def test_every_supported_torch_has_its_triton_in_the_default_matrix():
    assert set(compat.TORCH_TRITON.values()) == set(compat.TRITONS)
    assert "3.6.0" in compat.TRITONS, "the GPU image's Triton"


def test_pytest_summary_is_parsed_per_module():
    text = (
        "PASSED tests/test_ops.py::test_a[torch]\n"
        "PASSED tests/test_ops.py::test_b\n"
        "FAILED tests/test_fused_layer.py::test_c[triton-bf16] - AssertionError\n"
        "1 failed, 2 passed in 1.0s\n"
    )
    got = compat.parse_pytest(text, list(compat.TEST_FAMILIES), 1)
    assert got["per_file"]["tests/test_ops.py"] == {"passed": 2, "failed": 0}
    assert got["per_file"]["tests/test_fused_layer.py"] == {"passed": 0, "failed": 1}
    assert got["failures"] == [
        "FAILED tests/test_fused_layer.py::test_c[triton-bf16] - AssertionError"
    ]


def test_a_run_with_no_passed_test_is_not_green():
    tests = compat.parse_pytest("no tests ran in 0.1s\n", list(compat.TEST_FAMILIES), 0)
    row = {"triton": "3.6.0", "compile": compat.compile_cells(_report()), "tests": tests}
    assert not compat.green(row)
