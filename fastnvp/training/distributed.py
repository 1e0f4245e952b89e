"""Data-parallel training across processes: ``torchrun --nproc_per_node=N -m fastnvp train ...``.

Each process (rank) holds a full replica of the flow wrapped in ``DistributedDataParallel``
(gloo on CPU, nccl on CUDA). Every step all ranks draw the *same* global batch of row indices
from identically seeded generators and each takes its own contiguous shard of
``global_batch / world_size`` rows; DDP averages the gradients, so each rank's update equals
the single-process update on the whole global batch::

    mean over ranks r of (1/b) Σ_{i in shard r} ∇loss_i  =  (1/B) Σ_{i in batch} ∇loss_i,
    B = world_size · b.

The global batch and the generator state are therefore independent of the world size, which
makes a run resumable on a different number of processes. Only rank 0 logs and writes files.

Single-process runs need none of this: :func:`init` returns a world of size 1 whose helpers
are no-ops, so a training loop can call them unconditionally.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastnvp.core.prior import prior_log_prob

# Environment variables torchrun sets for every worker.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class World:
    """This process's place in the job.

    Attributes:
        rank: global rank in [0, size).
        size: number of processes (1 = not distributed).
        local_rank: rank on this machine (picks the CUDA device).
        device: where this rank's model and batches live.
        backend: ``"gloo"``, ``"nccl"``, or None when not distributed.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (RANK, WORLD_SIZE, ...) is present."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from exc


def init(device: str | torch.device | None = None) -> World:
    """Join the process group described by the torchrun environment, or a world of one.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Under torchrun each rank
            uses ``cuda:LOCAL_RANK`` with nccl; on CPU the backend is gloo.

    Raises:
        ValueError: a bad ``device``, or an inconsistent torchrun environment.
        RuntimeError: CUDA requested but unavailable, or fewer GPUs than local ranks.
    """
    if device is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = torch.device(device).type
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    if not launched_by_torchrun() or _env_int("WORLD_SIZE") == 1:
        return World(device=torch.device(device_type, 0) if device_type == "cuda" else _CPU)
    rank, size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={size}), got {rank}")
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} needs a GPU but only {torch.cuda.device_count()} exist"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = _CPU, "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=size)
    return World(rank, size, local_rank, dev, backend)


def shutdown(world: World) -> None:
    """Leave the process group (no-op for a world of one)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(flow: nn.Module, world: World) -> nn.Module:
    """``flow`` in ``DistributedDataParallel`` for a distributed world, else ``flow`` itself.

    DDP broadcasts rank 0's parameters and buffers once here, so every replica starts equal.
    The masks are constant buffers, so they are not re-broadcast every step.
    """
    if not isinstance(flow, nn.Module):
        raise TypeError(f"flow must be an nn.Module, got {type(flow).__name__}")
    if not world.distributed:
        return flow
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # Newer torch renames broadcast_buffers (and warns on the old name); both keep the sync
    # at construction and skip the per-step one.
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(flow, device_ids=device_ids, forward_sync_buffers=False)
    return ddp(flow, device_ids=device_ids, broadcast_buffers=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The flow inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def nll(flow: nn.Module, u: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of the rows of ``u`` (N, D) [given ``context`` (N, C)].

    Goes through ``flow(u, context)`` (``forward`` = ``f``), because DDP synchronises gradients
    only for computations that pass through its ``forward``; ``flow.module.log_prob`` would
    bypass it. ``context`` is required exactly when the flow is conditional
    (docs/design.md §1.7).
    """
    z, log_det = flow(u) if context is None else flow(u, context=context)
    return -(prior_log_prob(unwrap(flow).prior, z) + log_det).mean()


class ShardedBatches:
    """Random global batches (rows drawn with replacement), sharded across ranks.

    Every rank holds a generator with the same seed and state and draws the same ``batch``
    indices; rank r keeps ``indices[r * b : (r + 1) * b]`` with ``b = batch / world.size``.
    A world of one gets the whole batch, drawn by the same generator calls, so the stream of
    global batches does not depend on the number of processes.

    Args:
        num_rows: rows in the training set (indices are drawn from [0, num_rows)).
        batch: global batch size; must be divisible by ``world.size``.
        generator: a ``torch.Generator`` seeded identically on every rank (its state is what a
            checkpoint saves to resume the stream).
        world: from :func:`init`.
    """

    def __init__(self, num_rows: int, batch: int, generator: torch.Generator, world: World):
        for name, value in (("num_rows", num_rows), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if batch % world.size:
            raise ValueError(
                f"batch ({batch}) must be divisible by the number of processes ({world.size}) "
                "so every rank gets an equal shard of the global batch"
            )
        self.num_rows, self.batch, self.generator, self.world = num_rows, batch, generator, world
        self.local_batch = batch // world.size

    def next(self) -> torch.Tensor:
        """This rank's row indices for the next step: (batch / world.size,) int64 on the CPU."""
        idx = torch.randint(0, self.num_rows, (self.batch,), generator=self.generator)
        start = self.world.rank * self.local_batch
        return idx[start : start + self.local_batch]


def mean_across(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a per-rank scalar over all ranks (itself for a world of one).

    With equal shards, the mean of per-rank mean losses is the global batch's mean loss.
    """
    if not world.distributed:
        return value
    out = value.detach().clone().to(world.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world.size


def barrier(world: World) -> None:
    """Wait for every rank (no-op for a world of one)."""
    if world.distributed:
        dist.barrier()
