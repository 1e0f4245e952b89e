"""pytest-benchmark: the ``inverse`` workload for every provider (see conftest.py)."""


def test_inverse(run_workload, flow):
    run_workload(flow, "inverse")
