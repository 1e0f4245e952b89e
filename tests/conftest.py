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


def _threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)
