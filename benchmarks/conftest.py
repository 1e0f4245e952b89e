"""pytest-benchmark suite: one file per workload, one benchmark per provider.

Run with ``make bench`` (or ``pytest benchmarks --benchmark-only``); compare runs with
``--benchmark-autosave`` and ``--benchmark-compare``. Not part of ``make test``.

Size: ``FASTNVP_BENCH_SIZE="L,D,H,B"`` (default ``8,2,256,1024``), threads
``FASTNVP_BENCH_THREADS`` (default 2). ``torch.compile`` of the reference joins with
``FASTNVP_BENCH_COMPILE=1`` (its cold compile takes minutes on a small CPU).
"""

import os

import pytest
import torch

from fastnvp.bench import harness
from fastnvp.bench import providers as prov
from fastnvp.core.reference import RealNVP


def _size() -> harness.BenchConfig:
    text = os.environ.get("FASTNVP_BENCH_SIZE", "8,2,256,1024")
    try:
        layers, dim, hidden, batch = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"FASTNVP_BENCH_SIZE must be 'L,D,H,B' ints, got {text!r}") from None
    return harness.BenchConfig(layers, dim, hidden, batch)


CONFIG = _size()
PROVIDERS = [
    p
    for p in prov.ALL_PROVIDERS
    if p != "torch.compile" or os.environ.get("FASTNVP_BENCH_COMPILE") == "1"
]


@pytest.fixture(scope="session")
def reference_model():
    torch.set_num_threads(int(os.environ.get("FASTNVP_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    return RealNVP.standard(CONFIG.dim, CONFIG.layers, CONFIG.hidden)


@pytest.fixture(scope="session")
def inputs():
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(CONFIG.batch, CONFIG.dim, generator=gen),
        torch.randn(CONFIG.batch, CONFIG.dim, generator=gen),
    )


@pytest.fixture(params=PROVIDERS)
def flow(request, reference_model):
    try:
        return prov.build(request.param, reference_model)
    except prov.ProviderUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def run_workload(benchmark, reference_model, inputs):
    """Time a workload of a provider in the group ``<workload> L=.. D=.. H=.. B=..``."""

    def run(flow, workload):
        x, z = inputs
        call = harness._make_call(flow, workload, x, z, lr=1e-5)
        benchmark.group = f"{workload} {CONFIG.label()}"
        benchmark.extra_info["provider"] = flow.name
        flops = harness.workload_flops(reference_model, workload, CONFIG.batch)
        benchmark.extra_info["gflop"] = flops / 1e9
        benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)

    return run
