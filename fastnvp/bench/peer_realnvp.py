"""Each peer library's own Real NVP, built the way its users build one, for likelihood studies.

The real-data study trains these next to fastnvp's models at the same parameter budget and the
same number of optimizer steps, and compares test negative log-likelihoods. Unlike
:mod:`fastnvp.bench.providers` (peers holding copies of fastnvp's reference weights, for speed
benchmarks), every flow here is the library's canonical Real NVP, with its own nets, masks,
scale parametrisation and initialisation. ``hidden`` is the width of every hidden layer of the
coupling nets; :func:`hidden_for_budget` picks it for a parameter budget.

How each peer is built (``D`` features, ``L`` layers, ``H`` hidden):

- ``nflows``: ``nflows.flows.realnvp.SimpleRealNVP(features=D, hidden_features=H, num_layers=L,
  num_blocks_per_layer=2)``, all other arguments at their defaults (no batch norm, ReLU, no
  dropout). Alternating even/odd masks; each coupling net is a ``ResidualNet`` with two residual
  blocks whose last layers start near zero; scale ``sigmoid(a + 2) + 1e-3``; base
  ``StandardNormal``. ``num_blocks_per_layer`` has no default, 2 is the value of nflows' own
  examples.
- ``zuko``: ``zuko.flows.RealNVP(features=D, transforms=L, hidden_features=(H, H),
  univariate=MonotonicAffineTransform)`` (the univariate transform is zuko's default, spelled out):
  alternating checkered masks, a ``zuko.nn.MLP`` hyper-network per coupling with default
  (PyTorch) initialisation, scale ``exp(a / (1 + |a / log(1e-3)|))``, base a diagonal standard
  normal held in buffers. ``flow()`` builds the distribution.
- ``normflows``: the Real NVP of normflows' README, ``nf.NormalizingFlow(q0, flows)`` with
  ``q0 = nf.distributions.DiagGaussian(D, trainable=False)`` and, per layer,
  ``nf.flows.AffineCouplingBlock(nf.nets.MLP([ceil(D/2), H, H, 2 * floor(D/2)],
  init_zeros=True))`` then ``nf.flows.Permute(D, mode="swap")``. The README's
  ``MLP([D // 2, H, H, D])`` is the same net for even D; for odd D the block's channel split
  keeps ``ceil(D/2)`` features, so the net takes those. Scale ``exp(a)``.
- ``FrEIA``: ``FrEIA.framework.SequenceINN(D)`` with ``L`` blocks
  ``FrEIA.modules.RNVPCouplingBlock(subnet_constructor=mlp, clamp=2.0)`` (the default clamp and
  its ``ATAN`` soft clamp), ``mlp(c_in, c_out) = Linear(c_in, H) - ReLU - Linear(H, H) - ReLU -
  Linear(H, c_out)`` with PyTorch's default initialisation, and
  ``FrEIA.modules.PermuteRandom(seed=seed + k)`` between consecutive blocks (FrEIA's documented
  pattern). Each RNVPCouplingBlock couples BOTH halves in turn with four subnets (s and t for
  each half), so one FrEIA layer is two affine couplings; the parameter budget, not the layer
  count, is what the study equalises. Prior: a standard normal, applied here.

All flows are built in float32 on CPU (move ``module`` afterwards as needed); ``log_prob`` is
differentiable with respect to ``module``'s parameters; ``sample`` runs under ``torch.no_grad``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

PEER_REALNVPS = ("nflows", "zuko", "normflows", "FrEIA")

#: nflows' ``SimpleRealNVP`` has no default for ``num_blocks_per_layer``; 2 is what its examples
#: use.
NFLOWS_BLOCKS_PER_LAYER = 2


@dataclass
class PeerFlow:
    """One peer library's Real NVP.

    Attributes:
        name: the peer's name, one of :data:`PEER_REALNVPS`.
        module: the ``nn.Module`` holding every trainable parameter (give it to the optimizer).
        log_prob: (N, D) float32 -> (N,) log-density, differentiable w.r.t. ``module``.
        sample: n -> (n, D) samples (no graph).
        params: number of trainable parameters of ``module`` (each tensor counted once).
        construction: one line saying exactly what was built.
    """

    name: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]
    params: int
    construction: str


def peer_available(name: str) -> bool:
    """True when the peer library ``name`` (one of :data:`PEER_REALNVPS`) can be imported."""
    _check_name(name)
    return importlib.util.find_spec(name) is not None


def trainable_params(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``, each (possibly shared) tensor counted once."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        if p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def peer_param_count(name: str, dim: int, num_layers: int, hidden: int) -> int:
    """Closed-form trainable parameter count of :func:`build_peer_realnvp`'s flow.

    Needs no peer library (the tests check it against the built models).
    """
    _check_name(name)
    _check_shape(dim, num_layers, hidden)
    big, small = (dim + 1) // 2, dim // 2  # ceil(D/2), floor(D/2)
    total = 0
    for layer in range(num_layers):
        if name == "nflows":
            # Identity (net input) features are the mask <= 0 ones: the even indices first.
            kept = big if layer % 2 == 0 else small
            blocks = NFLOWS_BLOCKS_PER_LAYER * 2 * _linear(hidden, hidden)
            total += _linear(kept, hidden) + blocks + _linear(hidden, 2 * (dim - kept))
        elif name == "zuko":
            # zuko's mask ``arange(D) % 2 == layer % 2`` marks the kept (net input) features.
            kept = big if layer % 2 == 0 else small
            total += _mlp(kept, hidden, 2 * (dim - kept))
        elif name == "normflows":
            # ``z.chunk(2)`` keeps the first ceil(D/2) features on every layer.
            total += _mlp(big, hidden, 2 * small)
        else:  # FrEIA
            # split_len1 = round(0.5 * D) (Python rounds half to even); s and t nets each way.
            first = round(0.5 * dim)
            second = dim - first
            total += 2 * _mlp(first, hidden, second) + 2 * _mlp(second, hidden, first)
    return total


def build_peer_realnvp(
    name: str, dim: int, num_layers: int, hidden: int, *, seed: int = 0
) -> PeerFlow:
    """Build peer ``name``'s own Real NVP on ``dim`` features (see the module docstring).

    Args:
        name: one of :data:`PEER_REALNVPS`.
        dim: number of features D >= 2.
        num_layers: number of coupling layers (FrEIA: RNVPCouplingBlocks) >= 1.
        hidden: width of every hidden layer of the coupling nets >= 1.
        seed: seeds the initial weights (and FrEIA's permutations); the caller's torch and
            numpy global RNG states are restored afterwards.

    Returns:
        A :class:`PeerFlow` whose ``log_prob`` maps (N, D) -> (N,) and ``sample`` n -> (n, D).

    Raises:
        ValueError / TypeError: an unknown name or a bad argument (named in the message).
        ImportError: the peer library is not installed.
    """
    _check_name(name)
    _check_shape(dim, num_layers, hidden)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not peer_available(name):
        raise ImportError(
            f"{name} is not installed (pip install fastnvp[bench] or pip install {name})"
        )
    builder = _BUILDERS[name]
    # FrEIA's PermuteRandom reseeds numpy's legacy global RNG, so that state is restored too.
    np_state = np.random.get_state()  # noqa: NPY002
    try:
        with torch.random.fork_rng(devices=[]), _float32_default():
            torch.manual_seed(seed)
            flow = builder(dim, num_layers, hidden, seed)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
    flow.params = trainable_params(flow.module)
    return flow


def hidden_for_budget(name: str, dim: int, num_layers: int, budget: int) -> int:
    """Hidden width whose flow's trainable parameter count is closest to ``budget``.

    The count grows strictly with the width, so the width is found by bisection on the
    closed-form count (:func:`peer_param_count`); ties go to the smaller width. Returns 1 when
    even width 1 exceeds the budget.
    """
    _check_name(name)
    _check_shape(dim, num_layers, 1)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int, got {type(budget).__name__}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")

    def count(h: int) -> int:
        return peer_param_count(name, dim, num_layers, h)

    if count(1) >= budget:
        return 1
    lo, hi = 1, 2  # invariant: count(lo) < budget, and hi grows until count(hi) >= budget
    while count(hi) < budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) < budget:
            lo = mid
        else:
            hi = mid
    return lo if budget - count(lo) <= count(hi) - budget else hi


# ------------------------------------------------------------------------------ helpers
def _check_name(name: str) -> None:
    if name not in PEER_REALNVPS:
        raise ValueError(f"name must be one of {PEER_REALNVPS}, got {name!r}")


def _check_shape(dim: int, num_layers: int, hidden: int) -> None:
    for arg, value, least in (
        ("dim", dim, 2),
        ("num_layers", num_layers, 1),
        ("hidden", hidden, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{arg} must be >= {least}, got {value}")


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _mlp(fan_in: int, hidden: int, fan_out: int) -> int:
    """Parameters of Linear(fan_in, H) - act - Linear(H, H) - act - Linear(H, fan_out)."""
    return _linear(fan_in, hidden) + _linear(hidden, hidden) + _linear(hidden, fan_out)


@contextmanager
def _float32_default():
    """Make float32 the default dtype for a while (restoring the caller's).

    Some peers create tensors with the default dtype (nflows draws its base noise with plain
    ``torch.randn``), which must match the float32 flow even if the caller changed the default.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _nograd_sampler(draw: Callable[[int], Tensor]) -> Callable[[int], Tensor]:
    def sample(n: int) -> Tensor:
        with torch.no_grad(), _float32_default():
            return draw(n)

    return sample


# ------------------------------------------------------------------------------ builders
# Each builder runs inside build_peer_realnvp's seeded RNG fork and returns a PeerFlow whose
# params is filled in afterwards.
def _nflows(dim: int, num_layers: int, hidden: int, seed: int) -> PeerFlow:
    from nflows.flows.realnvp import SimpleRealNVP

    flow = SimpleRealNVP(
        features=dim,
        hidden_features=hidden,
        num_layers=num_layers,
        num_blocks_per_layer=NFLOWS_BLOCKS_PER_LAYER,
    )
    return PeerFlow(
        name="nflows",
        module=flow,
        log_prob=flow.log_prob,
        sample=_nograd_sampler(flow.sample),
        params=0,
        construction=(
            f"nflows.flows.realnvp.SimpleRealNVP(features={dim}, hidden_features={hidden}, "
            f"num_layers={num_layers}, num_blocks_per_layer={NFLOWS_BLOCKS_PER_LAYER})"
        ),
    )


def _zuko(dim: int, num_layers: int, hidden: int, seed: int) -> PeerFlow:
    import zuko
    from zuko.transforms import MonotonicAffineTransform

    flow = zuko.flows.RealNVP(
        features=dim,
        transforms=num_layers,
        hidden_features=(hidden, hidden),
        univariate=MonotonicAffineTransform,
    )
    return PeerFlow(
        name="zuko",
        module=flow,
        log_prob=lambda x: flow().log_prob(x),
        sample=_nograd_sampler(lambda n: flow().sample((n,))),
        params=0,
        construction=(
            f"zuko.flows.RealNVP(features={dim}, transforms={num_layers}, "
            f"hidden_features=({hidden}, {hidden}), "
            "univariate=zuko.transforms.MonotonicAffineTransform)"
        ),
    )


def _normflows(dim: int, num_layers: int, hidden: int, seed: int) -> PeerFlow:
    import normflows as nf

    kept, moved = (dim + 1) // 2, dim // 2
    flows = []
    for _ in range(num_layers):
        param_map = nf.nets.MLP([kept, hidden, hidden, 2 * moved], init_zeros=True)
        flows.append(nf.flows.AffineCouplingBlock(param_map))
        flows.append(nf.flows.Permute(dim, mode="swap"))
    q0 = nf.distributions.DiagGaussian(dim, trainable=False)
    model = nf.NormalizingFlow(q0, flows)
    return PeerFlow(
        name="normflows",
        module=model,
        log_prob=model.log_prob,
        sample=_nograd_sampler(lambda n: model.sample(n)[0]),
        params=0,
        construction=(
            f"normflows.NormalizingFlow(DiagGaussian({dim}, trainable=False), {num_layers} x "
            f"[AffineCouplingBlock(MLP([{kept}, {hidden}, {hidden}, {2 * moved}], "
            f"init_zeros=True)), Permute({dim}, mode='swap')])"
        ),
    )


def _freia(dim: int, num_layers: int, hidden: int, seed: int) -> PeerFlow:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(c_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, c_out),
        )

    inn = Ff.SequenceINN(dim)
    for k in range(num_layers):
        if k > 0:
            # numpy seeds must fit 32 bits.
            inn.append(Fm.PermuteRandom, seed=(seed + k) % 2**32)
        # clamp left at the block's default (2.0, ATAN soft clamp).
        inn.append(Fm.RNVPCouplingBlock, subnet_constructor=subnet)
    log_norm = 0.5 * dim * math.log(2 * math.pi)

    def log_prob(x: Tensor) -> Tensor:
        z, log_jac = inn(x)
        return -0.5 * (z**2).sum(1) - log_norm + log_jac

    def draw(n: int) -> Tensor:
        z = torch.randn(n, dim, dtype=torch.float32, device=_device(inn))
        return inn(z, rev=True)[0]

    return PeerFlow(
        name="FrEIA",
        module=inn,
        log_prob=log_prob,
        sample=_nograd_sampler(draw),
        params=0,
        construction=(
            f"FrEIA.framework.SequenceINN({dim}) with {num_layers} x "
            f"FrEIA.modules.RNVPCouplingBlock(subnet_constructor=Linear(c_in, {hidden})-ReLU-"
            f"Linear({hidden}, {hidden})-ReLU-Linear({hidden}, c_out), clamp=2.0 default) and "
            f"FrEIA.modules.PermuteRandom(seed={seed}+k) between blocks; standard normal prior"
        ),
    )


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


_BUILDERS: dict[str, Callable[[int, int, int, int], PeerFlow]] = {
    "nflows": _nflows,
    "zuko": _zuko,
    "normflows": _normflows,
    "FrEIA": _freia,
}
