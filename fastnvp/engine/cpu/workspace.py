"""Buffers that the CPU walks without a gradient reuse from one call to the next.

docs/design.md §3.2. A call without a gradient (``log_prob`` under ``no_grad``, ``sample``)
needs the same temporaries on every call: the walk's state, the (2, N, H) activations, each
layer's first input and output, exp(s), the log-det sum. Allocated per call, every one of them
is memory the C library may have handed back to the kernel at the previous call's end: glibc
maps an allocation above its mmap threshold afresh (always from 32 MB, and from 128 KB until
a free raises the threshold) and trims the top of the heap once it frees more than twice that,
so the next call touches new pages and takes one page fault per 4 KB. Measured on the 2-core
VM (D = 64, H = 64, L = 8, B = 4096, ``log_prob``): 2160 faults per call and 7.2-7.3 ms,
against 0 faults and 5.4-5.5 ms with the buffers kept; at B = 16384, H = 256 the two
(2, N, H) buffers alone exceed 32 MB and fault on every call (16k faults per call).

A call borrows its flow's :class:`Workspace` (:func:`borrowed`); it is kept for the next call
while its buffers total at most :data:`WORKSPACE_MAX_BYTES`. One call holds it at a time: a
call on another thread, or nested inside one (a hook), gets a workspace of its own that is
dropped afterwards, as every buffer was before. ``FastRealNVP.clear_caches()`` frees it, and
copies and pickles of a flow do not carry it. Outputs never live in a workspace: the walks
return fresh tensors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import Tensor

#: The most bytes of buffers a flow keeps between calls without a gradient. B = 16384 rows
#: at H = 256 take 67 MB of activations plus the state and layer temporaries; above the cap
#: (much larger batches, where each call's arithmetic is long) the buffers go with the call.
WORKSPACE_MAX_BYTES = 128 * 2**20

#: The attribute under which a flow keeps its workspace (one of its per-call caches).
ATTRIBUTE = "_cpu_workspace"


class Workspace:
    """Named buffers, each reused while a call asks for the same shape, dtype and device."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self.lock = threading.Lock()

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialized tensor of ``shape`` with ``like``'s dtype and device, the one of
        the previous call under ``name`` when it matches (its old values remain)."""
        held = self._buffers.get(name)
        if (
            held is not None
            and held.shape == shape
            and held.dtype == like.dtype
            and held.device == like.device
        ):
            return held
        fresh = like.new_empty(shape)
        self._buffers[name] = fresh
        return fresh

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is one of the buffers (a walk copies such a state before
        returning it)."""
        return any(tensor is held for held in self._buffers.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.nelement() * t.element_size() for t in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


@contextlib.contextmanager
def borrowed(owner) -> Iterator[Workspace]:
    """The workspace ``owner`` (a flow) keeps for its calls without a gradient, for one call.

    Yields a throwaway workspace while another call holds the kept one; afterwards drops the
    kept buffers if they exceed :data:`WORKSPACE_MAX_BYTES`.
    """
    kept = owner.__dict__.get(ATTRIBUTE)
    if kept is None:
        kept = Workspace()
        owner.__dict__[ATTRIBUTE] = kept
    if not kept.lock.acquire(blocking=False):
        yield Workspace()
        return
    try:
        yield kept
    finally:
        if kept.nbytes > WORKSPACE_MAX_BYTES:
            kept.clear()
        kept.lock.release()
