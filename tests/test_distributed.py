"""Data-parallel training: 2 CPU processes (gloo on loopback) equal one process on the same
global batches, in float64 to tight tolerance; helpers of fastnvp.training.distributed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastnvp.training import distributed

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

STEPS = 5
# A tiny `fastnvp train` run: its --batch is the global batch, 8 rows per rank with 2 ranks.
TRAIN = dict(layers=2, hidden=8, steps=4, batch=16, n_train=64, n_test=32, eval_every=2, seed=3)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    for name in distributed.TORCHRUN_VARS:
        env.pop(name, None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(out: Path) -> list[str]:
    args = ["--out", str(out), "--impl", "fast", "--no-progress"]
    for key, value in TRAIN.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """One torchrun job, two checks: the float64 DDP loop, then the `fastnvp train` command."""
    run_dir = tmp_path / "run"
    worker = str(Path(__file__).parent / "ddp_worker.py")
    result = torchrun(2, worker, str(tmp_path), str(STEPS), *train_args(run_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    check_float64_loop(tmp_path)
    check_train_command(tmp_path, run_dir, result.stdout)


def check_float64_loop(tmp_path):
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    single = ddp_worker.run_steps(distributed.World(), STEPS)
    init = ddp_worker.run_steps(distributed.World(), 0)
    for name, expected in single.items():
        for rank in ranks:
            torch.testing.assert_close(rank["state"][name], expected, rtol=1e-10, atol=1e-12)
        if name.endswith("weight"):
            # The comparison is not vacuous: training moved the weights.
            assert (expected - init[name]).abs().max() > 1e-3


def test_world_of_one_without_torchrun(monkeypatch):
    for name in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    world = distributed.init("cpu")
    assert (world.rank, world.size, world.is_main, world.distributed) == (0, 1, True, False)
    flow = torch.nn.Linear(2, 2)
    assert distributed.wrap(flow, world) is flow
    value = torch.tensor(3.0)
    assert distributed.mean_across(value, world) is value


def test_sharded_batches_split_the_global_batch():
    rows, batch = 100, 12
    full = distributed.ShardedBatches(
        rows, batch, torch.Generator().manual_seed(3), distributed.World()
    )
    shards = [
        distributed.ShardedBatches(
            rows, batch, torch.Generator().manual_seed(3), distributed.World(rank=r, size=3)
        )
        for r in range(3)
    ]
    for _ in range(4):
        expected = full.next()
        got = torch.cat([s.next() for s in shards])
        assert torch.equal(got, expected)


def test_sharded_batches_validate():
    world = distributed.World(rank=0, size=4)
    gen = torch.Generator()
    with pytest.raises(ValueError, match="divisible"):
        distributed.ShardedBatches(10, 6, gen, world)
    with pytest.raises(ValueError, match="batch"):
        distributed.ShardedBatches(10, 0, gen, world)
    with pytest.raises(TypeError, match="generator"):
        distributed.ShardedBatches(10, 8, 123, world)


def test_init_rejects_bad_device():
    with pytest.raises(ValueError, match="device"):
        distributed.init("meta")


def check_train_command(tmp_path, run_dir, stdout):
    from fastnvp.training.train import TrainConfig, load_run, train

    # Rank 0 alone reports and writes the run directory.
    assert stdout.count("run: ") == 1, stdout
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.json",
    ]
    ddp_model, _, payload = load_run(run_dir)
    assert payload["step"] == TRAIN["steps"]
    single = train(TrainConfig(impl="fast", **TRAIN), tmp_path / "single", progress=False)
    for name, expected in single.model.state_dict().items():
        # float32: DDP sums two half-batch gradients where one process sums one batch.
        torch.testing.assert_close(ddp_model.state_dict()[name], expected, rtol=1e-4, atol=1e-5)
    # The logged training loss is the global batch's, as in the single-process run.
    np_ddp = torch.tensor(payload["history"]["train_loss"])
    np_single = torch.tensor(single.history["train_loss"])
    torch.testing.assert_close(np_ddp, np_single, rtol=1e-5, atol=1e-5)


def test_nll_takes_the_context_of_a_conditional_flow():
    from fastnvp import FastRealNVP

    torch.manual_seed(0)
    flow = FastRealNVP.standard(3, 2, 8, context=2).double()
    u, c = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    expected = -flow.log_prob(u, context=c).mean()
    torch.testing.assert_close(distributed.nll(flow, u, c), expected)
    with pytest.raises(ValueError, match="context"):
        distributed.nll(flow, u)
