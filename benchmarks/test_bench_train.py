"""pytest-benchmark: the ``train`` workload for every provider (see conftest.py)."""


def test_train(run_workload, flow):
    run_workload(flow, "train")
