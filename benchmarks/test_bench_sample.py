"""pytest-benchmark: the ``sample`` workload for every provider (see conftest.py)."""


def test_sample(run_workload, flow):
    run_workload(flow, "sample")
