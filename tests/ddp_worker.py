"""Worker for tests/test_distributed.py: a few data-parallel training steps in float64.

Run under ``torchrun --nproc_per_node=N tests/ddp_worker.py OUT_DIR STEPS [TRAIN_ARGS...]``:
each rank writes its final parameters to ``OUT_DIR/rank<r>.pt``, then (with TRAIN_ARGS) runs the
``fastnvp train`` command in the same process group. Imported by the test, :func:`run_steps`
gives the single-process result for the same global batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastnvp import cli
from fastnvp.flows.fast_realnvp import FastRealNVP
from fastnvp.training import distributed

ROWS, GLOBAL_BATCH, LAYERS, HIDDEN = 256, 32, 4, 16


def run_steps(world: distributed.World, steps: int) -> dict[str, torch.Tensor]:
    """Adam on the NLL of a fixed float64 data set; returns the final state_dict."""
    # A different init per rank: the equal result proves DDP broadcast rank 0's parameters.
    torch.manual_seed(world.rank)
    flow = FastRealNVP.standard(2, LAYERS, hidden=HIDDEN).double()
    data = torch.randn(ROWS, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    model = distributed.wrap(flow, world)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = distributed.ShardedBatches(
        ROWS, GLOBAL_BATCH, torch.Generator().manual_seed(11), world
    )
    for _ in range(steps):
        loss = distributed.nll(model, data[batches.next()])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def main(argv: list[str]) -> int:
    out, steps, train_args = Path(argv[0]), int(argv[1]), argv[2:]
    torch.set_num_threads(1)
    world = distributed.init("cpu")
    try:
        state = run_steps(world, steps)
        torch.save({"world_size": world.size, "state": state}, out / f"rank{world.rank}.pt")
        if train_args:
            # The command joins the group that is already up and leaves it when done.
            return cli.main(["train", *train_args])
    finally:
        distributed.shutdown(world)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
