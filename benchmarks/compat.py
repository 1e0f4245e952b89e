"""Compile-and-interpret matrix: every kernel on every Triton that a supported torch ships with.

For each Triton version (default: :data:`TRITONS`, one per supported torch plus the newest)

1. build a cached virtual environment ``.compat/triton-X/`` with the CPU torch that installs
   on this machine (``torch==2.13.0`` from local disk: it does not pin Triton), that Triton,
   and the test dependencies; install this checkout into it with ``--no-deps``;
2. run the sm_90 compile report (``benchmarks/compile_report.py``, no GPU: 0 spills, shared
   memory within 227 KB, registers per config) without ``TRITON_INTERPRET``;
3. run the interpreter kernel tests (``pytest -m "interpreter and not slow"``,
   ``TRITON_INTERPRET=1`` set before Triton is imported, by ``tests/conftest.py``).

It writes one table, Triton version x kernel family -> configs compiled, max registers, spill
bytes, interpreter tests passed, as ``matrix.json`` and ``matrix.md`` under ``--out``
(default ``benchmarks/results/compat/``). Exit status 1 when any cell is not green.

    python benchmarks/compat.py [--tritons 3.6.0,3.9.0] [--out DIR] [--no-tests]

Runs with any Python 3.10+ (standard library only); ``make compat`` calls it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# torch release -> the Triton its Linux wheels pin. The floor is pyproject's torch requirement:
# torch 2.6's Triton 3.2.0 aborts in its compiler on the bf16 fused layer (a LinearLayout
# assertion) and spills in ieee, so the floor is torch 2.7 (``--tritons 3.2.0`` still runs it).
TORCH_TRITON = {
    "2.7": "3.3.1",
    "2.8": "3.4.0",
    "2.9": "3.5.1",
    "2.10": "3.6.0",
    "2.11": "3.6.0",
    "newest": "3.9.0",
}
TRITONS = tuple(dict.fromkeys(TORCH_TRITON.values()))
# The CPU torch that installs from this machine's disk; its wheel does not depend on Triton.
TORCH_CPU = os.environ.get("TORCH_CPU", "torch==2.13.0")
TEST_DEPS = ("numpy", "pytest", "hypothesis", "matplotlib", "tqdm")
# Kernel families: a compile-report config belongs to the first family whose key its name has.
FAMILIES = {
    "elementwise coupling": ("_coupling_fwd_kernel", "_coupling_bwd_kernel"),
    "fused layer": ("coupling_layer_kernel",),
    "fused layer backward": ("coupling_layer_backward_kernel",),
    "whole stack": ("coupling_stack_kernel",),
}
# Interpreter test modules and the kernel family each one exercises.
TEST_FAMILIES = {
    "tests/test_ops.py": "elementwise coupling",
    "tests/test_properties.py": "elementwise coupling",
    "tests/test_fused_layer.py": "fused layer",
    "tests/test_invertible_fused.py": "fused layer backward",
    "tests/test_fused_context.py": "fused layer",  # the context columns (HAS_CONTEXT)
    "tests/test_interleaved.py": "whole stack",  # permutations folded into its gathers
    # Whole flows on drawn configurations: every fused-layer kernel, counted under backward
    # (each case takes gradients through it)
    "tests/test_config_sweep.py": "fused layer backward",
}


def run(cmd, log, env=None, timeout=None) -> int:
    """Run ``cmd`` with its output appended to ``log``; its exit status."""
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        proc = subprocess.run(
            [str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            timeout=timeout,
        )  # fmt: skip
    return proc.returncode


def venv_for(version: str, cache: Path, log: Path) -> Path:
    """The cached venv's python for Triton ``version`` (built on first use)."""
    venv = cache / f"triton-{version}"
    py = venv / "bin" / "python"
    stamp = venv / ".ready"
    if not stamp.exists():
        if not py.exists() and run([sys.executable, "-m", "venv", venv], log):
            raise RuntimeError(f"could not create {venv} (see {log})")
        steps = [
            [py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", "wheel"],
            [py, "-m", "pip", "install", "-q", TORCH_CPU, f"triton=={version}", *TEST_DEPS],
        ]
        for step in steps:
            if run(step, log):
                raise RuntimeError(f"install failed for Triton {version} (see {log})")
        stamp.write_text(version)
    # The checkout itself, every time: the tree may have changed since the venv was built.
    step = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ROOT]
    if run(step, log):
        raise RuntimeError(f"installing the checkout failed for Triton {version} (see {log})")
    return py


def family_of(name: str) -> str | None:
    for family, keys in FAMILIES.items():
        if any(name.startswith(key + "[") for key in keys):
            return family
    return None


def compile_cells(report: dict) -> dict:
    """Per family: configs, compiled, max registers, spill bytes, shared, failures."""
    cells = {f: {"configs": 0, "compiled": 0, "max_registers": 0, "spill_bytes": 0,
                 "max_shared": 0, "failures": []} for f in FAMILIES}  # fmt: skip
    for row in report.get("rows", []):
        cell = cells.get(family_of(row["name"]))
        if cell is None:
            continue
        cell["configs"] += 1
        if "error" in row:
            cell["failures"].append(f"{row['name']}: {row['error']}")
            continue
        cell["compiled"] += 1
        spills = row["spill_stores"] + row["spill_loads"]
        cell["max_registers"] = max(cell["max_registers"], row["registers"])
        cell["spill_bytes"] += spills
        cell["max_shared"] = max(cell["max_shared"], row["shared"])
        if spills:
            cell["failures"].append(f"{row['name']}: {spills} B spilled")
        if row["shared"] > 227 * 1024:
            cell["failures"].append(f"{row['name']}: {row['shared']} B shared memory")
    return cells


# pytest -rA's short summary: "PASSED tests/test_ops.py::test_name[...]".
_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED) (tests/[^:\s]+)::", re.M)


def interpreter_tests(py: Path, log: Path) -> dict:
    """Run the interpreter-marked kernel tests; per test module, passed / failed counts."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTNVP_BACKEND": "triton"}
    env.pop("PYTEST_ADDOPTS", None)
    files = [f for f in TEST_FAMILIES if (ROOT / f).exists()]
    out = log.with_suffix(".pytest.txt")
    with open(out, "w") as fh:
        proc = subprocess.run(
            [str(py), "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
             "-m", "interpreter and not slow", "-o", "addopts=", *files],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip
    return parse_pytest(out.read_text(), files, proc.returncode)


def parse_pytest(text: str, files: list[str], exit_code: int) -> dict:
    """Per test module, passed / failed counts from pytest ``-rA`` output."""
    per_file: dict[str, dict] = {f: {"passed": 0, "failed": 0} for f in files}
    for outcome, path in _OUTCOME.findall(text):
        counts = per_file.setdefault(path, {"passed": 0, "failed": 0})
        if outcome == "PASSED":
            counts["passed"] += 1
        elif outcome in ("FAILED", "ERROR"):
            counts["failed"] += 1
    failed_lines = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"exit": exit_code, "per_file": per_file, "failures": failed_lines[:20]}


def triton_row(version: str, cache: Path, out_dir: Path, with_tests: bool) -> dict:
    """Build (or reuse) the venv for ``version``, compile and test; the matrix row."""
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"triton-{version}.log"
    log.write_text("")
    start = time.monotonic()
    row: dict = {"triton": version}
    try:
        py = venv_for(version, cache, log)
    except RuntimeError as exc:
        return {**row, "error": str(exc)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report_path = out_dir / f"compile_triton-{version}.json"
    report_path.unlink(missing_ok=True)
    status = run([py, "benchmarks/compile_report.py", "--json", report_path], log, env=env)
    report = json.loads(report_path.read_text()) if report_path.exists() else {"rows": []}
    row["compile"] = compile_cells(report)
    row["unshipped"] = report.get("meta", {}).get("unshipped", [])
    if not report["rows"]:
        row["error"] = f"the compile report wrote no rows (see {log})"
    elif status not in (0, 1):  # 1: some config failed; anything else: the process died
        row["error"] = (
            f"the compile report died (exit {status}) at {report['rows'][-1]['name']}; the "
            "configs after it were not compiled"
        )
    if with_tests:
        row["tests"] = interpreter_tests(py, log)
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


def green(row: dict) -> bool:
    if "error" in row:
        return False
    cells_ok = all(
        c["configs"] > 0 and c["compiled"] == c["configs"] and not c["failures"]
        for c in row["compile"].values()
    )
    tests = row.get("tests")
    tests_ok = tests is None or (
        tests["exit"] == 0
        and all(c["failed"] == 0 for c in tests["per_file"].values())
        and sum(c["passed"] for c in tests["per_file"].values()) > 0  # a run that ran no test
    )
    return cells_ok and tests_ok


def tests_of(row: dict, family: str) -> str:
    tests = row.get("tests")
    if tests is None:
        return "not run"
    passed = failed = 0
    for path, counts in tests["per_file"].items():
        if TEST_FAMILIES.get(path) == family:
            passed += counts["passed"]
            failed += counts["failed"]
    if passed + failed == 0:
        return "–"
    return f"{passed}/{passed + failed}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Kernel compatibility matrix",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} (commit {meta['commit']}).",
        f"Each Triton in its own venv with {meta['torch']} (CPU build) and the checkout "
        "installed `--no-deps`. *compiled*: configs that compile for sm_90 (`triton.compile` "
        "+ `ptxas -arch=sm_90a -v`, no GPU); *regs*: the most registers of one config; "
        "*spills*: spill bytes over all configs; *tests*: interpreter kernel tests "
        '(`TRITON_INTERPRET=1 pytest -m "interpreter and not slow"`) of the modules exercising '
        "the family.",
        "",
        "| Triton | torch | kernel family | compiled | regs | spills | max shared | tests | ok |",
        "|---|---|---|---:|---:|---:|---:|---:|:-:|",
    ]
    torch_of = {}
    for torch_version, triton_version in TORCH_TRITON.items():
        torch_of.setdefault(triton_version, []).append(torch_version)
    notes = []
    for row in rows:
        version = row["triton"]
        torches = ", ".join(torch_of.get(version, ["–"]))
        if "compile" not in row:
            lines.append(f"| {version} | {torches} | all | – | – | – | – | – | ✗ |")
            notes.append(f"- Triton {version}: {row.get('error')}")
            continue
        for family, cell in row["compile"].items():
            ok = not cell["failures"] and cell["compiled"] == cell["configs"] > 0
            test_cell = tests_of(row, family)
            if "/" in test_cell:
                passed, total = test_cell.split("/")
                ok = ok and passed == total
            lines.append(
                f"| {version} | {torches} | {family} | {cell['compiled']}/{cell['configs']} | "
                f"{cell['max_registers']} | {cell['spill_bytes']} | {cell['max_shared']} | "
                f"{test_cell} | {'✓' if ok else '✗'} |"
            )
            notes += [f"- Triton {version}, {family}: {f}" for f in cell["failures"][:5]]
        for kernel in row.get("unshipped", []):
            notes.append(
                f"- Triton {version}: `{kernel}` (kernel/precision/tier) runs as PyTorch GEMMs "
                "(no 0-spill tile; `fastnvp.kernels.triton_limits.UNSHIPPED`)"
            )
        for failure in row.get("tests", {}).get("failures", [])[:5]:
            notes.append(f"- Triton {version}, test: {failure}")
    if notes:
        lines += ["", "Notes and failures:", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tritons", default=",".join(TRITONS), help="comma-separated Triton versions"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compat")
    parser.add_argument("--cache", type=Path, default=ROOT / ".compat", help="venv cache")
    parser.add_argument("--no-tests", action="store_true", help="compile report only")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="instead of running, merge the rows of these matrix.json files (runs split across "
        "processes) into one table under --out, with their compile reports",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.merge:
        for path in args.merge:
            rows += json.loads(path.read_text())["rows"]
            for report in path.parent.glob("compile_triton-*.json"):
                (args.out / report.name).write_text(report.read_text())
        order = {v: i for i, v in enumerate(TRITONS)}
        rows.sort(key=lambda r: order.get(r["triton"], len(order)))
        versions = [r["triton"] for r in rows]
    else:
        versions = [v.strip() for v in args.tritons.split(",") if v.strip()]
    for version in [] if args.merge else versions:
        print(f"== Triton {version}", flush=True)
        row = triton_row(version, args.cache, args.out, not args.no_tests)
        rows.append(row)
        print(f"   {'green' if green(row) else 'NOT GREEN'} ({row.get('seconds', '?')} s)")
    commit = subprocess.run(
        ["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    meta = {
        "command": "python benchmarks/compat.py --tritons " + ",".join(versions),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "torch": TORCH_CPU,
        "python": sys.version.split()[0],
    }
    (args.out / "matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "matrix.md").write_text(markdown(rows, meta))
    print((args.out / "matrix.md").read_text())
    return 0 if all(green(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
