"""Compile every shipped kernel config for Hopper (sm_90) on the CPU and report its resources.

For each entry of each registered module's ``SM90_CONFIGS`` (name, kernel, signature,
constexprs, num_warps) this runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))``, assembles the PTX with Triton's bundled ``ptxas-blackwell -arch=sm_90a -v`` and reads
registers and spill bytes from its report; shared memory comes from the compiled metadata.
No GPU is needed. Must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).

    python benchmarks/compile_report.py [--json PATH] [--filter SUBSTRING]

The fused-layer modules register the unconditional shapes (names ``...[precision,D=..,H=..]``)
and the conditional ones (``HAS_CONTEXT``, names ``...[precision,D=..,E=..,H=..]``:
``fastnvp.kernels.fused_layer.SHIPPED_CONTEXT``); ``--filter E=`` compiles only the latter.

Exit status 1 when any config fails to compile, spills or needs more than the 227 KB of shared
memory an sm_90 block can have. A config that fails to compile is reported as a row with its
error (and no registers), and the report goes on with the next one, so one run shows every
failure of a Triton version.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Modules whose SM90_CONFIGS are compiled; a new kernel module is one more line here.
KERNEL_MODULES = [
    "fastnvp.kernels.coupling",
    "fastnvp.kernels.fused_layer",
    "fastnvp.kernels.fused_layer_backward",
]
SHARED_LIMIT = 227 * 1024

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_path() -> Path:
    """Triton's bundled ptxas that knows sm_90a (``ptxas-blackwell``, else ``ptxas``)."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return bin_dir / name
    raise FileNotFoundError(f"no ptxas under {bin_dir}")


def parse_ptxas(text: str) -> dict:
    """Registers / spill bytes from ``ptxas -v`` output (the kernel's last report block)."""
    out = {}
    for key, pattern in _PTXAS_RE.items():
        found = pattern.findall(text)
        out[key] = int(found[-1]) if found else 0
    return out


def compile_entry(entry: dict, ptxas: Path) -> dict:
    """Compile one config for sm_90 and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    src = ASTSource(entry["kernel"], entry["signature"], entry["constexprs"])
    options = {"num_warps": entry["num_warps"]}
    if "num_stages" in entry:
        options["num_stages"] = entry["num_stages"]
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        run = subprocess.run(
            [str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    stats = parse_ptxas(run.stdout + run.stderr)
    shared = int(getattr(compiled.metadata, "shared", 0))
    return {
        "name": entry["name"],
        "num_warps": entry["num_warps"],
        "num_stages": entry.get("num_stages"),
        "constexprs": {k: v for k, v in entry["constexprs"].items()},
        **stats,
        "shared": shared,
        "wgmma": "wgmma" in compiled.asm["ptx"],
        "compile_s": round(time.perf_counter() - start, 2),
    }


def registered_configs(modules=KERNEL_MODULES) -> list[dict]:
    """All SM90_CONFIGS entries of the registered kernel modules."""
    entries = []
    for name in modules:
        entries.extend(importlib.import_module(name).SM90_CONFIGS)
    return entries


def compile_or_error(entry: dict, ptxas: Path) -> dict:
    """:func:`compile_entry`, or a row carrying the error when the compiler rejects the config."""
    try:
        return compile_entry(entry, ptxas)
    except Exception as exc:  # noqa: BLE001 - recorded in the row, the report goes on
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return {
            "name": entry["name"],
            "num_warps": entry["num_warps"],
            "num_stages": entry.get("num_stages"),
            "constexprs": dict(entry["constexprs"]),
            "error": " ".join(message)[:400],
        }


def ok(row: dict) -> bool:
    """Compiled, 0 spills and shared memory within an sm_90 block's limit."""
    if "error" in row:
        return False
    spills = row["spill_stores"] + row["spill_loads"]
    return spills == 0 and row["shared"] <= SHARED_LIMIT


def _writer(path: Path | None, ptxas: Path, rows: list):
    """A function writing ``rows`` with the run's metadata to ``path`` (a no-op without one)."""
    if path is None:
        return lambda: None
    import triton

    from fastnvp.kernels.triton_limits import UNSHIPPED, _in_force

    path.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    meta = {
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "target": "cuda sm_90 (ptxas -arch=sm_90a)",
        "ptxas": ptxas.name,
        "commit": commit,
        # Kernels this Triton runs as PyTorch instead (fastnvp.kernels.triton_limits.UNSHIPPED).
        "unshipped": sorted("/".join(key) for table in _in_force(UNSHIPPED) for key in table),
    }
    return lambda: path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--filter", default="", help="only configs whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    ptxas = ptxas_path()
    rows = []
    save = _writer(args.json, ptxas, rows)
    header = f"{'config':<60} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'shared':>8} wgmma"
    print(header)
    print("-" * len(header))
    for entry in registered_configs():
        if args.filter not in entry["name"]:
            continue
        # A compiler that aborts the process (an assertion in C++) leaves the rows so far.
        rows.append({"name": entry["name"], "num_warps": entry["num_warps"],
                     "error": "the compiler aborted the process on this config"})  # fmt: skip
        save()
        row = compile_or_error(entry, ptxas)
        rows[-1] = row
        save()
        if "error" in row:
            print(f"{row['name']:<60} {row['num_warps']:>5}  ERROR {row['error']}", flush=True)
            continue
        flag = "" if ok(row) else "  <-- FAIL"
        print(
            f"{row['name']:<60} {row['num_warps']:>5} {row['registers']:>5} "
            f"{row['spill_stores']:>5}/{row['spill_loads']:<6} {row['shared']:>8} "
            f"{'yes' if row['wgmma'] else 'no':>5}{flag}",
            flush=True,
        )
    return 0 if all(ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
