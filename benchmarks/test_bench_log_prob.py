"""pytest-benchmark: the ``log_prob`` workload for every provider (see conftest.py)."""


def test_log_prob(run_workload, flow):
    run_workload(flow, "log_prob")
