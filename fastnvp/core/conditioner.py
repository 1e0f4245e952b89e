"""The standard Real NVP conditioner and its structural detection.

Standard conditioner (docs/design.md §1.3), for data dimension D and hidden width H::

    S = Linear(D, H) - LeakyReLU - Linear(H, H) - LeakyReLU - Linear(H, D) - Tanh
    T = Linear(D, H) - LeakyReLU - Linear(H, H) - LeakyReLU - Linear(H, D)

Fast paths recognise this structure by module types and shapes (never by names), so a user's
own ``nn.Sequential`` of the same form gets the fused kernels too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def standard_net(
    dim: int, hidden: int, *, tanh: bool, negative_slope: float = 0.01, context: int = 0
) -> nn.Sequential:
    """One conditioner MLP: (N, D + E) -> (N, D); ends in Tanh when ``tanh`` (the scale net S).

    ``context`` is E, the width of the (embedded) context the net sees after the masked input
    (docs/design.md §1.7); 0 for an unconditional flow.
    """
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
    if (
        isinstance(negative_slope, bool)
        or not isinstance(negative_slope, (int, float))
        or not math.isfinite(negative_slope)
    ):
        raise ValueError(f"negative_slope must be a finite float, got {negative_slope!r}")
    layers: list[nn.Module] = [
        nn.Linear(dim + context, hidden),
        nn.LeakyReLU(negative_slope),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(negative_slope),
        nn.Linear(hidden, dim),
    ]
    if tanh:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class StandardMLP:
    """Handles on the three Linear layers of a recognised standard conditioner net."""

    lin1: nn.Linear
    lin2: nn.Linear
    lin3: nn.Linear
    negative_slope: float
    tanh: bool


def match_standard_mlp(net: nn.Module, dim: int, context: int = 0) -> StandardMLP | None:
    """The Linear layers of ``net`` if it is a standard conditioner MLP for ``dim``, else None.

    Matches ``Sequential(Linear(D+E,H), LeakyReLU(a), Linear(H,H), LeakyReLU(a), Linear(H,D))``
    optionally followed by ``Tanh``, with biases on every Linear and one slope ``a`` for both
    activations; E = ``context`` (0 for an unconditional flow).
    """
    if type(net) is not nn.Sequential or len(net) not in (5, 6):
        return None
    mods = list(net)
    if not (
        type(mods[0]) is nn.Linear
        and type(mods[1]) is nn.LeakyReLU
        and type(mods[2]) is nn.Linear
        and type(mods[3]) is nn.LeakyReLU
        and type(mods[4]) is nn.Linear
    ):
        return None
    tanh = len(mods) == 6
    if tanh and type(mods[5]) is not nn.Tanh:
        return None
    lin1, lin2, lin3 = mods[0], mods[2], mods[4]
    if any(lin.bias is None for lin in (lin1, lin2, lin3)):
        return None
    hidden = lin1.out_features
    if lin1.in_features != dim + context or lin3.out_features != dim:
        return None
    if lin2.in_features != hidden or lin2.out_features != hidden or lin3.in_features != hidden:
        return None
    if mods[1].negative_slope != mods[3].negative_slope:
        return None
    return StandardMLP(lin1, lin2, lin3, float(mods[1].negative_slope), tanh)


def is_standard_pair(s_net: nn.Module, t_net: nn.Module, dim: int, context: int = 0) -> bool:
    """True for a standard conditioner pair: S with Tanh, T without, same H, slope and dtype."""
    s = match_standard_mlp(s_net, dim, context)
    t = match_standard_mlp(t_net, dim, context)
    return (
        s is not None
        and t is not None
        and s.tanh
        and not t.tanh
        and s.lin1.out_features == t.lin1.out_features
        and s.negative_slope == t.negative_slope
        and all(p.dtype == s.lin1.weight.dtype for p in (*s_net.parameters(), *t_net.parameters()))
    )


#: The hook dicts of an ``nn.Module`` that run only when its ``forward`` runs; the first two
#: are the forward ones (what ``torch.nn.utils.prune`` and activation probes register).
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def module_hooks(net: nn.Module, forward_only: bool = False) -> tuple[dict, ...]:
    """The hook dicts (:data:`HOOK_DICTS`, or its forward two) of ``net`` and of each module
    directly in it."""
    names = HOOK_DICTS[:2] if forward_only else HOOK_DICTS
    modules = (net, *net._modules.values())
    return tuple(getattr(m, name) for m in modules for name in names)


def engine_can_run(s_net: nn.Module, t_net: nn.Module) -> bool:
    """Whether the engine may run a standard pair from its weights alone, without calling the
    modules: no module of either net has a forward or backward hook (an engine that reads
    the weights would skip them: an activation probe, ``torch.nn.utils.prune``, which
    recomputes the weight in a forward pre-hook), and every Linear keeps its weight and bias
    as registered parameters. Otherwise the pair runs as modules, as in the reference; the
    math (which layers are the standard pair, and so which ones clamp) does not change."""
    for net in (s_net, t_net):
        if any(module_hooks(net)):
            return False
        for module in net._modules.values():
            if type(module) is nn.Linear and not all(
                isinstance(module._parameters.get(name), nn.Parameter)
                for name in ("weight", "bias")
            ):
                return False
    return True


def standard_weights(mlp: StandardMLP, kept: torch.Tensor, transformed: torch.Tensor):
    """The weights of a standard net restricted to the split halves.

    The net sees ``x * m`` and its output is multiplied by ``1 - m``, so only the kept input
    columns of the first Linear and the transformed output rows of the last Linear matter.
    ``kept`` indexes the first Linear's input columns: for a conditional flow pass the layer's
    ``inputs`` (kept columns, then the context columns D..D+E-1), giving W1 (H, K1 + E).

    Returns:
        ``(W1 (H, K1), b1 (H,), W2 (H, H), b2 (H,), W3 (K2, H), b3 (K2,))``,
        gathers that stay differentiable with respect to the module's parameters.
    """
    w1 = mlp.lin1.weight.index_select(1, kept)
    w3 = mlp.lin3.weight.index_select(0, transformed)
    b3 = mlp.lin3.bias.index_select(0, transformed)
    return w1, mlp.lin1.bias, mlp.lin2.weight, mlp.lin2.bias, w3, b3
