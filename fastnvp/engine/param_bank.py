"""One contiguous tensor per kind of conditioner weight (docs/design.md §3.2).

A flow of standard layers has twelve parameters per layer: W1, b1, W2, b2, W3, b3 of S, then
of T (``fastnvp.engine.cpu.gemm_stack.layer_parameters`` order). The GEMM stack runs each
kind for all layers and both nets as one (L, 2, ...) tensor, and built it per call with a
``stack`` (five per call, plus one H x H pair per layer and direction: about 1.1 ms of the
14 ms forward and backward of an 8-layer flow at B = 256, H = 256).

A :class:`ParameterBank` makes the parameters *be* those stacks: every parameter of kind ``j``
lives in the memory of the bank's ``kinds[j]`` (L, 2, *shape), set with ``param.data = ...``.
Each parameter keeps its identity, name, ``requires_grad``, version counter and ``state_dict``
key, and an optimizer still sees the same tensors; what changes is only where their values
live. The executor then reads ``kinds[j]`` itself, with no copy.

Each parameter gets a storage of its own over its slice of that memory (``torch.frombuffer``
on the slice, which keeps the slice alive), not a view of the bank's storage: whatever treats a
parameter's storage as the parameter's (a pickle, which writes a view's whole storage; a
``share_memory_()``; ``torch.save``) then sees exactly that parameter, as for a parameter
allocated on its own. The bank itself is never copied or pickled (it reduces to None): a copy
builds its own from its own parameters.

The flow builds a new bank wherever it rebinds its own parameters (``FastRealNVP.
_refresh_storage``: construction, ``.to()`` and the other ``_apply`` conversions,
``load_state_dict`` with ``assign=True``, copies and unpickling). Whatever moves a parameter
from outside (``torch.func.functional_call``'s stand-ins, ``vector_to_parameters``,
``p.data = t``, ``share_memory_()``) is seen by :meth:`ParameterBank.holds`: the executor
then stacks the parameters per call as before, with the same results. The bank is kept, so
it serves again when the parameters come back (after ``functional_call``); where they never
do, it holds one unused copy of the conditioner weights until the flow next rebinds its
parameters (``.to()``, ``load_state_dict(assign=True)``, a copy), which builds a new one. Nets
shared by two flows belong to the bank of the flow that built last; the other one stacks them
per call.

A banked parameter's storage is not resizable (it lies inside the bank): code that frees
parameter storage with ``untyped_storage().resize_(0)`` (FSDP-style sharding) needs the flow
unbanked, e.g. after ``vector_to_parameters`` or on CUDA. A flow loaded with
``torch.load(mmap=True)`` builds its bank in memory, a copy of the mapped weights.

Writes through ``p.data`` are invisible to the no-grad caches (docs/design.md §3.4) with or
without a bank; call ``FastRealNVP.clear_caches()`` after one.

Limit: CPU parameters only, not in shared memory (other processes hold those: they stay
where they are), every layer's parameters of one kind with one shape and dtype, and no
parameter shared (the plan's ``own_parameters``); otherwise there is no bank. On CUDA the
fused kernels read each parameter where it is and the whole-stack kernel keeps its own stacked
copies, so a bank would save nothing there, and packing parameters back to back would move
some off the 16-byte alignment Triton specializes its loads on (a bias of D = 6 floats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Kinds of conditioner weight per net, in ``layer_parameters`` order: W1, b1, W2, b2, W3, b3.
KINDS_PER_NET = 6


@dataclass(frozen=True)
class ParameterBank:
    """The stacked storage of a flow's 12 L conditioner parameters.

    Attributes:
        kinds: six tensors, kind ``j`` of every layer and net: (L, 2, *shape_j), S then T.
        offsets: per parameter (``layer_parameters`` order), its byte offset from the start
            of its kind's tensor.
    """

    kinds: tuple[Tensor, ...]
    offsets: tuple[int, ...]

    def __reduce__(self):
        """Copies and pickles of a flow carry no bank (module doc): it reduces to None."""
        return (_no_bank, ())

    def holds(self, params: list[Tensor]) -> bool:
        """Whether ``params`` (12 L, ``layer_parameters`` order) lie in this bank now.

        Compares addresses with each kind's start plus the parameter's offset: 12 L
        ``data_ptr`` reads, a few us a call. Addresses only: a parameter re-pointed through
        ``.data`` to another shape at the same address is not noticed."""
        if len(params) != len(self.offsets):
            return False
        starts = [kind.data_ptr() for kind in self.kinds]
        for k, (param, offset) in enumerate(zip(params, self.offsets)):
            if param.data_ptr() != starts[k % KINDS_PER_NET] + offset:
                return False
        return True


def _no_bank() -> None:
    return None


def _alias(view: Tensor) -> Tensor:
    """A tensor over ``view``'s memory (contiguous) with a storage of exactly its bytes, which
    keeps ``view`` alive (``torch.frombuffer`` of its bytes; any dtype, bfloat16 included)."""
    raw = view.reshape(-1).view(torch.uint8).numpy()
    return torch.frombuffer(raw, dtype=view.dtype).view(view.shape)


def build(params: list[Tensor]) -> ParameterBank | None:
    """Move ``params`` (12 L distinct tensors, ``layer_parameters`` order: the caller has
    checked the plan's ``own_parameters``) into a new bank; None where the module's limit
    excludes one: off the CPU, in shared memory, empty, or one kind differing in shape or
    dtype across layers and nets.

    The values are copied once; afterwards each parameter's ``.data`` lies in the bank.
    """
    if not params or len(params) % (2 * KINDS_PER_NET):
        return None
    if any(p.device.type != "cpu" or p.is_shared() or p.numel() == 0 for p in params):
        return None
    num_layers = len(params) // (2 * KINDS_PER_NET)
    groups = [params[j::KINDS_PER_NET] for j in range(KINDS_PER_NET)]
    for group in groups:
        first = group[0]
        if any(p.shape != first.shape or p.dtype != first.dtype for p in group):
            return None
    kinds = []
    with torch.no_grad():
        for group in groups:
            stacked = torch.stack([p.detach() for p in group])  # (2 L, *shape), layer-major
            for param, view in zip(group, stacked.unbind(0)):
                param.data = _alias(view)
            kinds.append(stacked.view(num_layers, 2, *group[0].shape))
    offsets = [0] * len(params)
    for j, group in enumerate(groups):
        start = kinds[j].data_ptr()
        for n, param in enumerate(group):
            offsets[n * KINDS_PER_NET + j] = param.data_ptr() - start
    return ParameterBank(tuple(kinds), tuple(offsets))
