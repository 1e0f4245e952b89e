"""First-order backward of the engine's hand-written autograd nodes (docs/design.md §3.2).

The executors' nodes (the GEMM stack, the invertible stack, the knot tables, the standard
pair's row tiles, the LU weights) write their backward out by hand, for the first derivative
only. ``torch.autograd.function.once_differentiable`` alone lets a second derivative fail only
if the backward pass reaches its error node, and ``torch.autograd.grad(g, x)`` prunes that
node when x lies beyond it: it reports x as unused, and with ``allow_unused=True`` returns
None, a second derivative silently zero (``gradgradcheck`` reports a mismatch, not an error).

:func:`first_order` raises instead, as soon as such a backward runs with ``create_graph=True``
(grad mode is on inside backward exactly then), and names the alternative: the reference
``fastnvp.RealNVP``, plain autograd, computes the same function with higher derivatives.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable


def first_order(backward):
    """Decorate a ``torch.autograd.Function.backward`` (under ``@staticmethod``): as
    ``once_differentiable``, and a clear error when the backward itself would be recorded."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{backward.__qualname__} is a hand-written first-order backward: higher "
                "derivatives (backward or torch.autograd.grad with create_graph=True) are not "
                "supported on FastRealNVP's fast paths. fastnvp.RealNVP computes the same "
                "function with plain autograd: build one with the same arguments and "
                "load_state_dict(fast.state_dict()); or take the derivatives with torch.func "
                "(hessian, jacrev, jacfwd), inside which FastRealNVP runs plain tensor ops"
            )
        return inner(ctx, *grads)

    return checked
