"""Opt-in numerical checks: find the first coupling layer whose values stop being finite.

A deep flow that diverges usually shows it as a NaN loss many layers and steps after the cause.
With checks on, every layer of :class:`fastnvp.RealNVP` / :class:`fastnvp.FastRealNVP` verifies its
conditioner outputs (``s``, ``t``), its output and its ``log_det`` (and, during backward, the
gradient reaching its output) and raises :class:`NonFiniteError` naming the layer::

    model = FastRealNVP.standard(2, 200, check=True)      # always on for this model
    with fastnvp.core.checks.enabled():                        # or on for a block of code
        loss = -model.log_prob(x).mean()
        loss.backward()

Each check reads a whole tensor back to the host, so checks cost a synchronisation per layer: use
them to locate a problem, not in production training loops. They are off by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# A plain module global rather than a ContextVar: torch.compile traces a global read (and guards
# on its value), while ContextVar.get breaks a fullgraph trace of every flow.
_enabled_depth = 0


class NonFiniteError(FloatingPointError):
    """A NaN or infinity appeared in a flow.

    Attributes:
        name: which quantity (``"s"``, ``"t"``, ``"z"``, ``"x"``, ``"log_det"``, ``"grad of z"``).
        layer: the coupling layer index (0 = first layer of ``f``), or None for the flow's input.
        direction: ``"f"`` (data -> latent) or ``"g"`` (latent -> data).
    """

    def __init__(self, message: str, name: str, layer: int | None, direction: str):
        super().__init__(message)
        self.name = name
        self.layer = layer
        self.direction = direction


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Turn checks on for every flow used inside the ``with`` block (process-wide; nests)."""
    global _enabled_depth
    _enabled_depth += 1
    try:
        yield
    finally:
        _enabled_depth -= 1


def is_enabled() -> bool:
    """True inside :func:`enabled`."""
    return _enabled_depth > 0


def check_finite(tensor: torch.Tensor, name: str, layer: int | None, direction: str) -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds a NaN or an infinity.

    Args:
        tensor: any floating tensor, e.g. (N, K) activations or (N,) log_det.
        name: what the tensor is, for the message.
        layer: coupling layer index, or None for the flow's input/output.
        direction: ``"f"`` or ``"g"``.
    """
    bad = ~torch.isfinite(tensor.detach())
    if not bool(bad.any()):
        return
    count = int(bad.sum())
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    value = float(tensor.detach()[first])
    where = "the input" if layer is None else f"coupling layer {layer}"
    raise NonFiniteError(
        f"{name} became non-finite in {where} ({direction}): {count} of {tensor.numel()} "
        f"elements, first at index {first} = {value}",
        name,
        layer,
        direction,
    )


def watch_grad(tensor: torch.Tensor, name: str, layer: int | None, direction: str) -> None:
    """Check the gradient that reaches ``tensor`` during backward (no-op without autograd)."""
    if tensor.requires_grad:
        tensor.register_hook(lambda grad: check_finite(grad, f"grad of {name}", layer, direction))


@contextlib.contextmanager
def module_outputs_checked(nets: dict, layer: int, direction: str) -> Iterator[None]:
    """Inside the block, check the output of every submodule of ``nets`` as it is computed.

    Catches a non-finite hidden activation of a user's conditioner net where it first appears,
    even when a later layer (a Tanh, the soft clamp) would hide it from ``s``.

    Args:
        nets: prefix -> module, e.g. ``{"s[3]": model.s[3], "t[3]": model.t[3]}``.
        layer: the coupling layer index, for the message.
        direction: ``"f"`` or ``"g"``.
    """
    names = {
        id(module): f"{prefix}.{name}" if name else prefix
        for prefix, net in nets.items()
        for name, module in net.named_modules()
    }

    def hook(module, args, output):
        name = names.get(id(module))
        if name is not None and isinstance(output, torch.Tensor) and output.is_floating_point():
            check_finite(output, f"output of {name} ({type(module).__name__})", layer, direction)

    # A global hook sees the nets' modules however they are called; it lives only in the block.
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
