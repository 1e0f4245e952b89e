"""Packaging: the CLI entry points, and `kernels/` installed only as `fastnvp.kernels`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastnvp

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_version_flags(tmp_path):
    out = run([sys.executable, "-m", "fastnvp", "--version"], tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"fastnvp {fastnvp.__version__}"
    exe = shutil.which("fastnvp", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `fastnvp` console script is not installed"
    out = run([exe, "--version"], tmp_path)
    assert out.returncode == 0 and fastnvp.__version__ in out.stdout


def test_kernels_install_under_fastnvp_only(tmp_path):
    code = (
        "import importlib.util, fastnvp.kernels, fastnvp.kernels.coupling;"
        "print(importlib.util.find_spec('kernels') is None)"
    )
    out = run([sys.executable, "-c", code], tmp_path)  # cwd outside the repo
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True", "a top-level `kernels` module is importable"


def test_import_fastnvp_does_not_import_triton(tmp_path):
    code = (
        "import sys, fastnvp, fastnvp.ops, fastnvp.flows.fast_realnvp; "
        "print('triton' in sys.modules)"
    )
    out = run([sys.executable, "-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_ruff_bans_top_level_kernels_import(tmp_path):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.fail("ruff is a dev dependency and must be installed")
    probe = ROOT / "tests" / "_probe_banned_import.py"
    probe.write_text("import kernels  # noqa: F401\n")
    try:
        out = run([ruff, "check", "--no-cache", str(probe)], ROOT)
    finally:
        probe.unlink()
    assert out.returncode != 0 and "TID251" in out.stdout
