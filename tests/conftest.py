"""Test setup: Triton's interpreter on, so FASTNVP_BACKEND=triton runs the real kernels on CPU.

TRITON_INTERPRET is read when a kernel is defined, so it is set here, before any test imports
``fastnvp.kernels``. Tests choose the backend per test with the ``backend`` fixture.
"""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastnvp.ops.backend import triton_available  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run a test once per backend (``torch`` and ``triton`` through the interpreter)."""
    if request.param == "triton" and not triton_available():
        pytest.fail("Triton is a dependency on Linux and must be importable for the kernel tests")
    monkeypatch.setenv("FASTNVP_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, restoring the setting after.

    The models in these tests are tiny: intra-op threads only add synchronisation, and OpenMP
    spin-waits stall badly when the cores are shared.
    """
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """Run a test on two torch threads (the row-splitting paths), restoring the setting after."""
    yield from _threads(2)


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("name")``: ``benchmarks/name.py`` as a module (benchmarks/ is not a
    package)."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def run_ab_benchmark(tmp_path, monkeypatch, load_benchmark):
    """``run_ab_benchmark(name, shape, timed)``: ``benchmarks/name.py`` (an A/B script of
    ``fastnvp.bench.paired``) on the one shape ``shape`` at tiny sizes, checked for what every
    such script promises: a JSON and a markdown file, one row per workload, finite positive
    times (the ``timed`` keys) and speed-ups with their quartiles, and the exact command
    recorded in both. Returns ``(module, rows, table)`` for the script's own checks."""
    import json
    import shlex

    def run(name: str, shape: tuple, timed: tuple[str, ...]):
        module = load_benchmark(name)
        monkeypatch.setattr(module, "SHAPES", (shape,))
        argv = ["--rounds", "4", "--threads", "1", "--seconds", "0.002", "--out", str(tmp_path)]
        module.main(argv)
        record = json.loads((tmp_path / f"{name}.json").read_text())
        rows = record["rows"]
        assert [row["workload"] for row in rows] == list(module.WORKLOADS)
        for row in rows:
            for key in (*timed, "speedup", "q1", "q3"):
                assert 0 < row[key] < float("inf"), (key, row)
        table = (tmp_path / f"{name}.md").read_text()
        # The recorded command is the one that made these numbers, options included.
        command = shlex.join(["python", f"benchmarks/{name}.py", *argv])
        assert table.startswith(f"Measured by `{command}` at commit ")
        assert record["command"] == command
        return module, rows, table

    return run


def _threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)
