"""The process's pool of CPU buffers, reused once nothing holds them (docs/design.md §3.2).

The CPU GEMM stack's walks allocate the same tensors on every call: with a gradient each
layer's first input, activations and net output (saved for backward), the new states, and
backward's temporaries and parameter gradients; without one the state, the activations and
the layers' outputs. Freed at the end of a call and allocated again by the next, they are
memory that glibc may have handed back to the kernel in between (it trims the top of its heap
once more than twice its mmap threshold is free, and maps anything from 32 MB afresh), and the
next call takes one page fault per 4 KB it touches again. The pool keeps the buffers instead,
as the CUDA caching allocator does on the GPU.

One pool serves every flow of the process (:func:`shared`), as the C library's heap did: a
pool per flow measured 15-20 % slower training steps when several flows alternate (six flows
at D = 64, H = 64, B = 4096: 22-23 ms against 19-20 ms without a pool, or with one pool),
each flow's buffers gone cold in the cache while the others ran.

A buffer is reused only when nothing else refers to its memory: the pool hands out tensors
that share the buffer's storage (``detach()``: not autograd views, so an autograd node may
return one and the caller may write it in place), and a buffer is free when its storage is
referenced by the pool alone (the storage use count, which counts every tensor over that
memory: those a walk holds, tensors autograd saved for backward, a ``.grad``, a NumPy array
made from one; compared with the count measured when the buffer was made, not a constant).
So a graph kept for a second backward holds its buffers, and the pool allocates others. Where
torch does not expose the count (``torch._C._storage_Use_Count``: CPU builds of some older
releases), nothing is reused and every take allocates, as before the pool.

Buffers under ``MIN_BYTES`` are allocated as before. Per (shape, dtype, device) the buffers
form a queue: ``take`` checks the one taken longest
ago and moves it to the back, handing it out if it is free, and allocates a new one after
``CHECKS`` held ones. In a loop of steps the first check finds the oldest buffer free, so a take
costs one check, not a scan. The walks return new tensors, never pooled ones, so outputs a
caller keeps do not fill the pool. The pool keeps at most ``max_bytes``; past that it drops
free buffers of other shapes, then allocates without keeping, and it never keeps a single
buffer of more than a quarter of that (64 MB): a one-off call on a huge batch (``sample`` of
100k rows at H = 256 needs 205 MB per activation buffer) would otherwise leave its memory held
after it, where the heap would have handed it back.
"""

from __future__ import annotations

import collections
import math
import threading

import torch
from torch import Tensor

#: The most bytes the pool keeps. One training step at L = 8, H = 256, B = 4096 takes
#: about 140 MB of activations; deeper or wider steps keep what fits, the rest allocated per
#: step as before.
POOL_MAX_BYTES = 256 * 2**20

#: The smallest buffer the pool keeps: glibc's default mmap threshold (128 KB). Below it an
#: allocation comes from the heap's free lists, which hand back memory that is already mapped.
MIN_BYTES = 128 * 1024

#: Buffers ``take`` checks before it allocates: the oldest are checked first, and a held one
#: goes to the back, so a graph kept for a second backward does not starve the others.
CHECKS = 4

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _bytes(buffer: Tensor) -> int:
    return buffer.nelement() * buffer.element_size()


class BufferPool:
    """Buffers by (shape, dtype, device), each handed out while nothing else holds its memory
    (module doc)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self._max_bytes = max_bytes  # None: POOL_MAX_BYTES as it is at each take
        self._queues: dict[tuple, collections.deque] = {}
        self.nbytes = 0
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        return POOL_MAX_BYTES if self._max_bytes is None else self._max_bytes

    def buffers(self, free_only: bool = False) -> list[Tensor]:
        """The pooled buffers (for tests and inspection), or only those nothing else holds
        now."""
        with self._lock:
            return [
                buffer
                for queue in self._queues.values()
                for buffer, storage, alone in queue
                if not free_only or _use_count(storage._cdata) == alone
            ]

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialized (shape) tensor with ``like``'s dtype and device over a free pooled
        buffer (its old values remain), else over a new one."""
        # Small buffers come from the C library's free lists, not from fresh pages: the pool
        # would only add its bookkeeping (~2 us a take, 80 takes a step at B = 256).
        if _use_count is None or math.prod(shape) * like.element_size() < MIN_BYTES:
            return like.new_empty(shape)
        key = (tuple(shape), like.dtype, like.device)
        with self._lock:
            queue = self._queues.get(key)
            for _ in range(min(len(queue or ()), CHECKS)):
                buffer, storage, alone = queue[0]
                queue.rotate(-1)  # taken or held: to the back either way
                if _use_count(storage._cdata) == alone:  # only the pool refers to it
                    return buffer.detach()
            buffer = like.new_empty(shape)
            size = _bytes(buffer)
            if size > self.max_bytes // 4:  # a one-off huge batch: not worth its memory later
                return buffer
            if self.nbytes + size > self.max_bytes:
                self._drop_free(keep=key)
            if self.nbytes + size > self.max_bytes:
                return buffer  # not kept: the pool is full of buffers in use
            if queue is None:
                queue = self._queues[key] = collections.deque()
            storage = buffer.untyped_storage()
            # The count with nothing but the pool's tensor and storage handle, measured rather
            # than assumed: the baseline that means "free".
            queue.append((buffer, storage, _use_count(storage._cdata)))
            self.nbytes += size
            return buffer.detach()

    def _drop_free(self, keep: tuple) -> None:
        """Drop the free buffers of every shape but ``keep``."""
        for key, queue in list(self._queues.items()):
            if key == keep:
                continue
            held = collections.deque(
                entry for entry in queue if _use_count(entry[1]._cdata) != entry[2]
            )
            self.nbytes -= sum(_bytes(entry[0]) for entry in queue) - sum(
                _bytes(entry[0]) for entry in held
            )
            if held:
                self._queues[key] = held
            else:
                del self._queues[key]

    def clear(self) -> None:
        """Forget every buffer (those in use stay valid: their holders keep them alive)."""
        with self._lock:
            self._queues.clear()
            self.nbytes = 0


_SHARED = BufferPool()


def shared() -> BufferPool:
    """The pool every CPU walk of the process takes its buffers from."""
    return _SHARED


def release() -> None:
    """Forget the shared pool's buffers; the next calls allocate again."""
    _SHARED.clear()
