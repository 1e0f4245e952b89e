"""When a value cached from parameters is stale: the one rule every engine cache keys on.

docs/design.md §3.4. The engine keeps work derived from parameters between calls without a
gradient: the packed weights of the GEMM stack, the knot tables of single-input layers, the
stacked interleaved layers and the GPU whole-stack weights. A cache entry is valid while its
tensors hold the values it was built from.

A tensor's storage address and version counter catch most changes: autograd-visible in-place
ops bump the counter (a default or ``foreach`` optimizer step, ``load_state_dict``,
``torch.nn.init``), and ``.to()`` or ``param.data = ...`` move the storage. Two updates leave
both as they were:

- torch's fused optimizers (``fused=True``: Adam, AdamW, SGD among them) write
  the parameters in one kernel without bumping their version counters. A process-wide count of
  optimizer steps, kept by a post-step hook on every ``torch.optim.Optimizer``
  (``torch.optim.optimizer.register_optimizer_step_post_hook``), is part of every key: after
  any step, every cache is rebuilt on its next use. A step of an unrelated optimizer only
  costs one rebuild;
- writes through ``param.data`` (``p.data.copy_(...)``), which bypass the tensor's version
  counter altogether. Nothing can see them; call ``FastRealNVP.clear_caches()`` after one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Registered once per process, at import: the engine imports this module before any cache.
_STEP_HOOK = register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """How many ``step()`` calls any torch optimizer has completed in this process."""
    return _optimizer_steps


def tensors_key(tensors: Iterable[torch.Tensor]) -> tuple:
    """A cache key that changes whenever one of ``tensors`` may have changed (module doc):
    the optimizer step count, then each tensor's (storage address, version counter)."""
    return (_optimizer_steps, *((t.data_ptr(), t._version) for t in tensors))
