"""The layers a flow interleaves with its couplings: options, construction and order.

docs/design.md §1.8. ``RealNVP`` / ``FastRealNVP`` built with ``norm=`` and ``permutation=``
hold one layer of each kind per coupling, in the ModuleLists ``norms`` and ``permutations``
(state_dict keys ``norms.{i}.*``, ``permutations.{i}.*``; absent when the option is None).
Step ``i`` of the flow runs, data -> latent (Glow's order)::

    norms[i]  ->  permutations[i]  ->  coupling i

and latent -> data the reverse: coupling i's inverse, then ``permutations[i]``'s, then
``norms[i]``'s.
"""

from __future__ import annotations

from torch import nn

from fastnvp.core.mixing import LULinear, Permutation
from fastnvp.core.normalization import ActNorm, BatchNorm

#: ``norm=`` options: None, or the normalization layer before each coupling.
NORMS = (None, "actnorm", "batchnorm")
#: ``permutation=`` options: None, a fixed permutation (``reverse``, seeded ``random``) or the
#: learned LU linear layer (``lu``) before each coupling.
PERMUTATIONS = (None, "reverse", "random", "lu")


def check_option(value, name: str, choices: tuple) -> str | None:
    """``value`` must be one of ``choices`` (None or a str)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(
            f"{name} must be None or a str, one of {choices}, got {type(value).__name__}"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def build_norms(kind: str | None, dim: int, num_layers: int) -> nn.ModuleList | None:
    """One normalization layer per coupling (``norm=`` option), or None."""
    kind = check_option(kind, "norm", NORMS)
    if kind is None:
        return None
    make = ActNorm if kind == "actnorm" else BatchNorm
    return nn.ModuleList(make(dim) for _ in range(num_layers))


def build_permutations(kind: str | None, dim: int, num_layers: int) -> nn.ModuleList | None:
    """One mixing layer per coupling (``permutation=`` option), or None.

    ``random`` and ``lu`` draw from the global RNG (``torch.manual_seed`` fixes them, like the
    nets' initialization); the draws are buffers and parameters, so the state_dict keeps them.
    """
    kind = check_option(kind, "permutation", PERMUTATIONS)
    if kind is None:
        return None
    if kind == "reverse":
        layers = [Permutation.reverse(dim) for _ in range(num_layers)]
    elif kind == "random":
        layers = [Permutation.random(dim) for _ in range(num_layers)]
    else:
        layers = [LULinear(dim) for _ in range(num_layers)]
    return nn.ModuleList(layers)


def step_layers(model, i: int) -> list[nn.Module]:
    """The layers step ``i`` runs before coupling ``i`` (data -> latent order)."""
    out = []
    for name in ("norms", "permutations"):
        layers = getattr(model, name, None)
        if layers is not None:
            out.append(layers[i])
    return out


def copy_couplings(source: nn.Module, target: nn.Module) -> None:
    """Load the conditioner nets of ``source``'s couplings into ``target``'s, leaving the masks
    and the interleaved layers as they are (the same couplings with and without norm or
    mixing layers, for comparisons)."""
    for mine, theirs in ((target.s, source.s), (target.t, source.t)):
        for net, other in zip(mine, theirs, strict=True):
            net.load_state_dict(other.state_dict())
