"""Benchmark providers: one flow per implementation, all computing the reference's function.

Every provider is built from one :class:`fastnvp.core.reference.RealNVP` with the standard
conditioner (docs/design.md §1.3) and gets its weights copied from it, so each computes the same
``log p(x)``:

- ``fastnvp``: :class:`fastnvp.flows.fast_realnvp.FastRealNVP` (the CPU conditioner path on CPU,
the fused
  kernels on CUDA); ``fastnvp[k=v,...]`` variants pass constructor keywords (fused levels).
- ``reference``: the eager :class:`fastnvp.core.reference.RealNVP` itself.
- ``torch.compile``: ``torch.compile`` of the reference's ``log_prob`` / ``g`` / training loss.
- ``nflows``: ``AffineCouplingTransform`` with the scale ``exp(tanh(.))``; its transform net is
  the S and T nets on the kept half, outputs concatenated ``[t, s]``.
- ``normflows``: ``MaskedAffineFlow`` per layer with copies of the reference's full-width nets
  (its ``forward_and_log_det`` is the data -> latent direction of the reference).
- ``zuko``: ``CouplingTransform`` whose meta returns ``AffineTransform(t, exp(tanh(s)))``.
- ``FrEIA``: ``AffineCouplingOneSided`` (clamp 1, TANH) with fixed permutations that bring each
  layer's kept features first; its subnet is the S and T nets, outputs ``[s, t]``.

Peers with split-half nets hold exactly the weights that influence the function; the
full-width nets of the reference also hold the weights that only ever see zeros (the
transformed input columns) or get multiplied by zero (the kept output rows). Both counts are
reported: ``params_total`` and ``params_effective`` (the latter must agree across providers).

Conditional flows (a reference built with ``context=C``, no embedding; docs/design.md §1.3, §1.7):
every net sees ``cat([x * m, c])``, width D + C, so the split-half nets of the peers take
``cat([x_kept, c])`` (K1 + C) with the first-Linear columns ``cat(kept, D + arange(C))`` of the
reference. Each peer gets the context the way its library passes it to a coupling net:

- ``nflows``: ``Flow.log_prob(x, context=c)``; the coupling calls ``transform_net(x_kept, c)``.
- ``zuko``: ``flow(c)`` builds the distribution p(x | c) (batch shape (M,)); the coupling's
  meta concatenates ``x_a`` and ``c`` as zuko's ``GeneralCouplingTransform`` does.
- ``FrEIA``: blocks appended with ``cond=0, cond_shape=(C,)``, called ``inn(x, c=[c])``; the
  subnet sees ``cat([x1, c])``.
- ``normflows`` has no conditional affine coupling (``MaskedAffineFlow`` takes no context): not
  available for conditional flows.

A conditional :class:`Flow` has ``context = C`` and its callables take the context (M, C)
as the last argument; ``sample(c)`` draws ONE sample per context row, (M, C) -> (M, D), with
the call each library offers for that (``sample_form``): fastnvp and the reference
``model.sample(1, context=c)[0]`` ((1, M, D) -> (M, D)), nflows ``flow.sample(1,
context=c)[:, 0]`` ((M, 1, D)), zuko ``flow(c).sample()`` (batch shape (M,)), FrEIA (no
sampler) ``inn(randn(M, D), c=[c], rev=True)``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from fastnvp.core.conditioner import match_standard_mlp
from fastnvp.core.masks import split_indices
from fastnvp.core.reference import RealNVP
from fastnvp.flows.fast_realnvp import FastRealNVP

PEERS = ("nflows", "normflows", "zuko", "FrEIA")
BASE_PROVIDERS = ("fastnvp", "reference", "torch.compile")
ALL_PROVIDERS = BASE_PROVIDERS + PEERS
#: Providers with a conditional Real NVP (normflows has none; torch.compile works but its cold
#: compile is left out of the conditional preset).
CONDITIONAL_PEERS = ("zuko", "nflows", "FrEIA")
CONDITIONAL_PROVIDERS = ("fastnvp", "reference", *CONDITIONAL_PEERS)


@dataclass
class Flow:
    """One implementation under test.

    Attributes:
        name: provider name as reported.
        module: the ``nn.Module`` holding the trainable parameters.
        log_prob: (N, D) -> (N,); conditional: (x (N, D), c (N, C)) -> (N,).
        inverse: latent (N, D) -> data (N, D); conditional: (z (N, D), c (N, C)) -> (N, D).
        sample: n -> (n, D); conditional: c (M, C) -> (M, D), one sample per context row.
        params_total: trainable parameters held.
        params_effective: trainable parameters that influence the function.
        compiled: True for ``torch.compile`` (its first calls compile; timed separately).
        train_loss: optional (N, D) [, (N, C)] -> scalar loss override (the compiled loss).
        context: C for a conditional flow, None for an unconditional one.
        sample_form: the library call behind ``sample`` of a conditional flow.
    """

    name: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    inverse: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]
    params_total: int
    params_effective: int
    compiled: bool = False
    train_loss: Callable[..., Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    context: int | None = None
    sample_form: str = ""

    def loss(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Negative mean log-likelihood of a batch x (N, D) [given c (N, C)]: the objective."""
        args = (x,) if c is None else (x, c)
        if self.train_loss is not None:
            return self.train_loss(*args)
        return -self.log_prob(*args).mean()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


class ProviderUnavailable(RuntimeError):
    """A provider cannot be built here (missing optional package, unsupported option)."""


# ------------------------------------------------------------------------------ helpers
def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _std_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z.square().sum(dim=1) + z.shape[1] * math.log(2 * math.pi))


def context_width(model: nn.Module) -> int:
    """E, the width of the (embedded) context the nets of ``model`` see; 0 if unconditional."""
    if getattr(model, "context_features", None) is None:
        return 0
    return int(model.embedded_features)


def effective_params(ref: RealNVP) -> int:
    """Parameters of a full-width standard flow that influence its function (see module doc).

    Per net: the first Linear on the kept and context columns, ``H (K1 + E) + H``; the middle
    Linear ``H H + H``; the last Linear on the transformed rows ``K2 (H + 1)``; plus the
    parameters of an embedding, if any.
    """
    ctx = context_width(ref)
    total = 0
    for i in range(ref.num_layers):
        kept, transformed = split_indices(ref.mask[i])
        for net in (ref.s[i], ref.t[i]):
            mlp = match_standard_mlp(net, ref.dim, ctx)
            if mlp is None:
                raise ValueError(f"layer {i}: the benchmark needs standard conditioner nets")
            hidden = mlp.lin1.out_features
            total += hidden * (kept.numel() + ctx) + hidden  # first Linear: kept + context
            total += hidden * hidden + hidden
            total += transformed.numel() * (hidden + 1)  # last Linear, transformed rows
    embedding = getattr(ref, "embedding", None)
    if embedding is not None:
        total += _count(embedding)
    return total + interleaved_effective_params(ref)


def interleaved_effective_params(flow: nn.Module) -> int:
    """Parameters of a flow's interleaved layers (docs/design.md §1.8) that influence its
    function: all of ActNorm's and BatchNorm's; of an LU layer the strict triangles and the
    diagonal, ``D (D - 1) + D`` (its ``lower`` / ``upper`` tensors also hold the unused
    triangles); none of a fixed permutation."""
    total = 0
    for name in ("norms", "permutations"):
        for layer in getattr(flow, name, None) or ():
            if layer.kind == "lu":
                total += layer.dim * (layer.dim - 1) + layer.dim
            else:
                total += _count(layer)
    return total


def _split_net(
    net: nn.Module, dim: int, kept: Tensor, transformed: Tensor, context: int = 0
) -> nn.Sequential:
    """The standard net restricted to the split halves, without its Tanh, weights copied.

    A conditional net (``context`` = E > 0) takes ``cat([x_kept, e])`` (N, K1 + E): the first
    Linear keeps the kept columns, then the context columns D..D+E-1.
    """
    mlp = match_standard_mlp(net, dim, context)
    hidden, slope = mlp.lin1.out_features, mlp.negative_slope
    w = mlp.lin1.weight
    inputs = torch.cat((kept, dim + torch.arange(context, device=kept.device)))
    out = nn.Sequential(
        nn.Linear(inputs.numel(), hidden),
        nn.LeakyReLU(slope),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(slope),
        nn.Linear(hidden, transformed.numel()),
    ).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out[0].weight.copy_(mlp.lin1.weight[:, inputs])
        out[0].bias.copy_(mlp.lin1.bias)
        out[2].weight.copy_(mlp.lin2.weight)
        out[2].bias.copy_(mlp.lin2.bias)
        out[4].weight.copy_(mlp.lin3.weight[transformed])
        out[4].bias.copy_(mlp.lin3.bias[transformed])
    return out


def _layer_halves(ref: RealNVP, i: int):
    kept, transformed = split_indices(ref.mask[i].cpu())
    kept_d, transformed_d = kept.to(ref.mask.device), transformed.to(ref.mask.device)
    ctx = context_width(ref)
    s = _split_net(ref.s[i], ref.dim, kept_d, transformed_d, ctx)
    t = _split_net(ref.t[i], ref.dim, kept_d, transformed_d, ctx)
    return kept, transformed, s, t


class _Concat(nn.Module):
    """Two nets on the same input, outputs concatenated (the peers' single "transform net").

    ``context`` (N, C), when given (nflows passes it), is appended to the input columns.
    """

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            x = torch.cat((x, context), dim=1)
        return torch.cat((self.first(x), self.second(x)), dim=1)


def _peer_context(ref: RealNVP, name: str) -> int:
    """C of a conditional reference for a peer (0: unconditional); peers take no embedding."""
    if getattr(ref, "embedding", None) is not None:
        raise ProviderUnavailable(
            f"{name}: the benchmark's conditional peers take the context as it is (no embedding)"
        )
    return context_width(ref)


def peer_available(name: str) -> bool:
    """True when the peer package can be imported."""
    return importlib.util.find_spec(name) is not None


def _require(name: str):
    if not peer_available(name):
        raise ProviderUnavailable(
            f"{name} is not installed (pip install 'fastnvp[bench]' or pip install {name})"
        )
    return importlib.import_module(name)


# ------------------------------------------------------------------------------ providers
def _fastnvp(ref: RealNVP, options: dict) -> Flow:
    conditional = getattr(ref, "context_features", None) is not None
    if options or conditional:  # options checked by parse_provider
        extra = {}
        if conditional:
            extra = {"context": ref.context_features, "embedding": copy.deepcopy(ref.embedding)}
        s_nets = iter(copy.deepcopy(list(ref.s)))
        t_nets = iter(copy.deepcopy(list(ref.t)))
        model = FastRealNVP(
            lambda: next(s_nets),
            lambda: next(t_nets),
            ref.mask.detach().cpu(),
            **extra,
            **options,
        ).to(device=ref.mask.device)
        model.load_state_dict(ref.state_dict())
    else:
        model = FastRealNVP.from_reference(ref)
    return _flow_of("fastnvp" + _option_suffix(options), model)


def _flow_of(name: str, model) -> Flow:
    """A provider for a fastnvp flow (RealNVP or FastRealNVP): its own methods."""
    count, effective = _count(model), effective_params(model)
    if getattr(model, "context_features", None) is None:
        return Flow(name, model, model.log_prob, model.g, model.sample, count, effective)
    return Flow(
        name,
        model,
        lambda x, c: model.log_prob(x, context=c),
        lambda z, c: model.g(z, context=c),
        lambda c: model.sample(1, context=c)[0],
        count,
        effective,
        context=model.context_features,
        sample_form="model.sample(1, context=c)[0]: one draw per row of the (M, C) context",
    )


def _option_suffix(options: dict) -> str:
    if not options:
        return ""
    return "[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]"


def _reference(ref: RealNVP, options: dict) -> Flow:
    return _flow_of("reference", copy.deepcopy(ref))


def _compiled(ref: RealNVP, options: dict) -> Flow:
    model = copy.deepcopy(ref)
    log_prob = torch.compile(model.log_prob)
    g = torch.compile(model.g)
    dtype = model._anchor().dtype
    if getattr(model, "context_features", None) is not None:
        loss_c = torch.compile(lambda x, c: -model.log_prob(x, context=c).mean())

        def sample_c(c: Tensor) -> Tensor:
            z = torch.randn(c.shape[0], model.dim, device=model.mask.device, dtype=dtype)
            return g(z, context=c)

        return Flow(
            "torch.compile",
            model,
            lambda x, c: log_prob(x, context=c),
            lambda z, c: g(z, context=c),
            sample_c,
            _count(model),
            effective_params(model),
            compiled=True,
            train_loss=loss_c,
            context=model.context_features,
            sample_form="compiled g(randn(M, D), context=c)",
        )
    loss = torch.compile(lambda x: -model.log_prob(x).mean())

    def sample(n: int) -> Tensor:
        return g(torch.randn(n, model.dim, device=model.mask.device, dtype=dtype))

    return Flow(
        "torch.compile",
        model,
        log_prob,
        g,
        sample,
        _count(model),
        effective_params(model),
        compiled=True,
        train_loss=loss,
    )


def _nflows(ref: RealNVP, options: dict) -> Flow:
    _require("nflows")
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow as NFlow
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import AffineCouplingTransform

    class ExpTanhAffineCoupling(AffineCouplingTransform):
        """nflows' affine coupling with the reference's scale ``exp(tanh(u))``."""

        def _scale_and_shift(self, transform_params):
            k = self.num_transform_features
            return torch.exp(torch.tanh(transform_params[:, k:])), transform_params[:, :k]

    ctx = _peer_context(ref, "nflows")
    layers = []
    for i in range(ref.num_layers):
        _, _, s, t = _layer_halves(ref, i)
        net = _Concat(t, s)  # nflows reads [shift, unconstrained scale]
        layers.append(ExpTanhAffineCoupling((1 - ref.mask[i]).cpu(), lambda _in, _out, n=net: n))
    dev = ref._anchor()
    flow = NFlow(CompositeTransform(layers), StandardNormal([ref.dim])).to(
        device=dev.device, dtype=dev.dtype
    )
    if ctx:
        return Flow(
            "nflows",
            flow,
            lambda x, c: flow.log_prob(x, context=c),
            lambda z, c: flow._transform.inverse(z, context=c)[0],
            lambda c: flow.sample(1, context=c)[:, 0],
            _count(flow),
            _count(flow),
            context=ref.context_features,
            sample_form="flow.sample(1, context=c)[:, 0]: (M, 1, D), one draw per context row",
        )
    return Flow(
        "nflows",
        flow,
        flow.log_prob,
        lambda z: flow._transform.inverse(z)[0],
        flow.sample,
        _count(flow),
        _count(flow),
    )


def _normflows(ref: RealNVP, options: dict) -> Flow:
    nf = _require("normflows")
    if context_width(ref):
        raise ProviderUnavailable(
            "normflows has no conditional affine coupling (MaskedAffineFlow takes no context)"
        )
    flows = [
        nf.flows.MaskedAffineFlow(
            ref.mask[i].detach().clone(), t=copy.deepcopy(ref.t[i]), s=copy.deepcopy(ref.s[i])
        )
        for i in range(ref.num_layers)
    ]
    dev = ref._anchor()
    model = nf.NormalizingFlow(
        q0=nf.distributions.DiagGaussian(ref.dim, trainable=False), flows=flows
    )
    model = model.to(device=dev.device, dtype=dev.dtype)

    # normflows' flows map latent -> data; MaskedAffineFlow.forward is the reference's f, so
    # the reference's direction is normflows' forward pass through the same stack.
    def log_prob(x: Tensor) -> Tensor:
        z, log_det = model.forward_and_log_det(x)
        return model.q0.log_prob(z) + log_det

    def sample(n: int) -> Tensor:
        return model.inverse(model.q0(n)[0])

    return Flow(
        "normflows",
        model,
        log_prob,
        model.inverse,
        sample,
        _count(model),
        effective_params(ref),
    )


def _zuko(ref: RealNVP, options: dict) -> Flow:
    _require("zuko")
    from torch.distributions import AffineTransform
    from zuko.distributions import DiagNormal
    from zuko.lazy import Flow as ZFlow
    from zuko.lazy import LazyTransform, UnconditionalDistribution
    from zuko.transforms import CouplingTransform
    from zuko.utils import broadcast

    class ExpTanhCoupling(LazyTransform):
        """zuko coupling whose meta is the reference's affine map on the transformed half.

        Given a context c, the meta sees ``cat([x_a, c])`` as in zuko's own
        ``GeneralCouplingTransform.meta``.
        """

        def __init__(self, mask: Tensor, s: nn.Module, t: nn.Module):
            super().__init__()
            self.register_buffer("mask", mask.bool())
            self.s = s
            self.t = t

        def meta(self, c: Tensor | None, x_a: Tensor):
            if c is not None:
                x_a = torch.cat(broadcast(x_a, c, ignore=1), dim=-1)
            return AffineTransform(self.t(x_a), torch.exp(torch.tanh(self.s(x_a))), event_dim=1)

        def forward(self, c=None):
            return CouplingTransform(partial(self.meta, c), self.mask)

    ctx = _peer_context(ref, "zuko")

    layers = []
    for i in range(ref.num_layers):
        _, _, s, t = _layer_halves(ref, i)
        layers.append(ExpTanhCoupling(ref.mask[i].detach().clone(), s, t))
    dev = ref._anchor()
    zeros = torch.zeros(ref.dim, device=dev.device, dtype=dev.dtype)
    flow = ZFlow(layers, UnconditionalDistribution(DiagNormal, zeros, zeros + 1, buffer=True))
    flow = flow.to(device=dev.device, dtype=dev.dtype)
    if ctx:
        # flow(c) is p(x | c) with batch shape (M,): sample() draws one x per context row.
        return Flow(
            "zuko",
            flow,
            lambda x, c: flow(c).log_prob(x),
            lambda z, c: flow(c).transform.inv(z),
            lambda c: flow(c).sample(),
            _count(flow),
            _count(flow),
            context=ref.context_features,
            sample_form="flow(c).sample(): p(x | c) has batch shape (M,), one draw per row",
        )
    return Flow(
        "zuko",
        flow,
        lambda x: flow().log_prob(x),
        lambda z: flow().transform.inv(z),
        lambda n: flow().sample((n,)),
        _count(flow),
        _count(flow),
    )


def _freia(ref: RealNVP, options: dict) -> Flow:
    _require("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    ctx = _peer_context(ref, "FrEIA")
    cond = {"cond": 0, "cond_shape": (ctx,)} if ctx else {}
    inn = Ff.SequenceINN(ref.dim)
    order = list(range(ref.dim))

    def permute(new_order: list[int]) -> None:
        perm = torch.tensor([order.index(j) for j in new_order])
        if torch.equal(perm, torch.arange(ref.dim)):
            return
        inn.append(Fm.PermuteRandom)
        block = inn.module_list[-1]
        block.perm.data = perm
        block.perm_inv.data = torch.argsort(perm)

    for i in range(ref.num_layers):
        kept, transformed, s, t = _layer_halves(ref, i)
        new_order = kept.tolist() + transformed.tolist()
        permute(new_order)
        order = new_order
        net = _Concat(s, t)  # FrEIA reads [s, t] and applies clamp * tanh to s
        inn.append(
            Fm.AffineCouplingOneSided,
            **cond,  # the subnet sees cat([x1, c]) (FrEIA's conditional coupling)
            subnet_constructor=lambda _in, _out, n=net: n,
            clamp=1.0,
            clamp_activation="TANH",
            split_len=kept.numel(),
        )
    permute(list(range(ref.dim)))
    dev = ref._anchor()
    inn = inn.to(device=dev.device, dtype=dev.dtype)
    for module in inn.module_list:  # the permutation indices stay int64
        if isinstance(module, Fm.PermuteRandom):
            module.perm.data = module.perm.data.long()
            module.perm_inv.data = module.perm_inv.data.long()

    if ctx:

        def log_prob_c(x: Tensor, c: Tensor) -> Tensor:
            z, log_jac = inn(x, c=[c])
            return _std_normal_log_prob(z) + log_jac

        def inverse_c(z: Tensor, c: Tensor) -> Tensor:
            return inn(z, c=[c], rev=True)[0]

        def sample_c(c: Tensor) -> Tensor:
            z = torch.randn(c.shape[0], ref.dim, device=dev.device, dtype=dev.dtype)
            return inverse_c(z, c)

        return Flow(
            "FrEIA",
            inn,
            log_prob_c,
            inverse_c,
            sample_c,
            _count(inn),
            _count(inn),
            context=ref.context_features,
            sample_form="inn(randn(M, D), c=[c], rev=True) (FrEIA has no sampler)",
        )

    def log_prob(x: Tensor) -> Tensor:
        z, log_jac = inn(x)
        return _std_normal_log_prob(z) + log_jac

    def inverse(z: Tensor) -> Tensor:
        return inn(z, rev=True)[0]

    def sample(n: int) -> Tensor:
        return inverse(torch.randn(n, ref.dim, device=dev.device, dtype=dev.dtype))

    return Flow("FrEIA", inn, log_prob, inverse, sample, _count(inn), _count(inn))


_BUILDERS: dict[str, Callable[[RealNVP, dict], Flow]] = {
    "fastnvp": _fastnvp,
    "reference": _reference,
    "torch.compile": _compiled,
    "nflows": _nflows,
    "normflows": _normflows,
    "zuko": _zuko,
    "FrEIA": _freia,
}


def parse_provider(spec: str) -> tuple[str, dict]:
    """``"fastnvp[fused=layer,precision=tf32]"`` -> ``("fastnvp", {...})``; values stay strings
    except ``true``/``false``/``none`` and integers."""
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"provider must be a non-empty string, got {spec!r}")
    name, options = spec, {}
    if "[" in spec:
        if not spec.endswith("]"):
            raise ValueError(f"provider {spec!r}: options must be written name[k=v,...]")
        name, body = spec[:-1].split("[", 1)
        for item in filter(None, body.split(",")):
            if "=" not in item:
                raise ValueError(f"provider {spec!r}: option {item!r} is not k=v")
            key, value = item.split("=", 1)
            options[key.strip()] = _parse_value(value.strip())
    if name not in _BUILDERS:
        raise ValueError(f"unknown provider {name!r}; choose from {list(_BUILDERS)}")
    if options and name != "fastnvp":
        raise ValueError(f"provider {name!r} takes no options")
    unknown = sorted(set(options) - _fastnvp_options())
    if unknown:
        raise ValueError(
            f"provider {spec!r}: FastRealNVP has no option(s) {unknown}; it takes "
            f"{sorted(_fastnvp_options())}"
        )
    return name, options


def _fastnvp_options() -> set[str]:
    """The keyword options a ``fastnvp[k=v,...]`` provider can set (FastRealNVP's, less the
    nets, masks and context the benchmark builds from its reference)."""
    params = inspect.signature(FastRealNVP.__init__).parameters
    return set(params) - {"self", "nets", "nett", "masks", "context", "embedding"}


def _parse_value(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return int(value)
    except ValueError:
        return value


def fastnvp_variants(device: str) -> list[str]:
    """FastRealNVP's fused levels other than the default, as provider specs for ``device``.

    Reads ``fastnvp.ops.fused_layer.FUSED_LEVELS`` / ``PRECISIONS`` when FastRealNVP takes
    ``fused`` / ``precision``. The default ``fused="auto"`` is the plain ``fastnvp`` provider,
    ``"none"`` is an alias of ``"op"``. On the CPU: ``fused="layer"`` (the PyTorch path of the
    fused-layer ops; fp32 only: reduced-precision GEMMs are slower than fp32 on CPUs without
    native bf16) and ``knot_tables=False`` (single-input layers in the GEMM form instead of the
    knot form of ``fastnvp.engine.cpu.knots``).
    """
    params = inspect.signature(FastRealNVP.__init__).parameters
    if "fused" not in params:
        return []
    from fastnvp.ops import fused_layer

    levels = [v for v in getattr(fused_layer, "FUSED_LEVELS", ()) if v not in ("auto", "none")]
    if device != "cuda":
        specs = ["fastnvp[fused=layer]"] if "layer" in levels else []
        if "knot_tables" in params:
            specs.append("fastnvp[knot_tables=False]")  # the GEMM form of single-input layers
        return specs
    precisions = ["ieee"]
    if "precision" in params:
        precisions = list(getattr(fused_layer, "PRECISIONS", ("ieee",)))
    specs = []
    for level in levels:
        for precision in precisions if level == "layer" else ["ieee"]:
            extra = f",precision={precision}" if precision != "ieee" else ""
            specs.append(f"fastnvp[fused={level}{extra}]")
    specs += [f"fastnvp[precision={p}]" for p in precisions if p != "ieee"]
    return specs


def build(spec: str, ref: RealNVP) -> Flow:
    """Build one provider from the reference model ``ref`` (weights copied).

    Raises:
        ProviderUnavailable: the peer package is missing or the option is not supported.
    """
    if not isinstance(ref, RealNVP):
        raise TypeError(f"ref must be a fastnvp.core.reference.RealNVP, got {type(ref).__name__}")
    name, options = parse_provider(spec)
    try:
        return _BUILDERS[name](ref, options)
    except ProviderUnavailable:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        if name == "fastnvp" and options:
            raise ProviderUnavailable(f"{spec}: {exc}") from exc
        raise
