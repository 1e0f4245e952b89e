"""FastRealNVP inside ``torch.func`` transforms, against the reference RealNVP in float64.

Inside ``vmap``, ``grad``, ``jacrev``, ``jacfwd`` and ``hessian`` the plan runs the layer loop
on plain tensor ops (docs/design.md §3.1): the engine's own autograd nodes and custom ops have
no batching rule and are first order. Checked here:

- ``vmap`` of a one-row ``log_prob`` and ``g`` equals the batched call and the reference's;
- the Jacobian of ``f`` (reverse and forward mode) equals the reference's, and its
  log-|determinant| equals ``f``'s log-det;
- the Hessian of ``log_prob`` in x (second order) equals the reference's;
- per-sample parameter gradients (``vmap(grad(...))`` over ``functional_call``) equal the
  gradients of one-row calls on the engine's own path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

from fastnvp import FastRealNVP, RealNVP

TOL = 1e-10

#: vmap's fallback for an op without a batching rule warns; every op on these paths has one.
NO_FALLBACK = pytest.mark.filterwarnings("error:There is a performance drop")

#: (dim, norm, permutation, context, embedding): each kind of layer, odd D, both kinds of flow.
CONFIGS = [
    (2, None, None, None, False),
    (5, "actnorm", "lu", None, False),
    (4, "batchnorm", "random", 3, False),
    (7, None, "reverse", 2, True),
    (6, "actnorm", None, 1, False),
]


def _pair(dim, norm, permutation, context, embedding):
    torch.manual_seed(dim)
    embed = nn.Sequential(nn.Linear(context, 3), nn.Tanh()) if embedding else None
    options = dict(norm=norm, permutation=permutation, context=context, embedding=embed)
    ref = RealNVP.standard(dim, 3, 8, **options).double()
    with torch.no_grad():  # away from the identity-like initialization
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = FastRealNVP.standard(dim, 3, 8, **options).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, dim, dtype=torch.float64)
    c = torch.randn(6, context, dtype=torch.float64) if context else None
    kw = {} if c is None else {"context": c}
    for flow in (ref, fast):  # ActNorm initializes on a first batch; then eval mode
        with torch.no_grad():
            flow.log_prob(x, **kw)
        flow.eval()
    return ref, fast, x, c


def _row_kw(c, i=None):
    """The context of one row (``c[i]`` or, under vmap, the mapped row) as a (1, C) keyword."""
    if c is None:
        return {}
    return {"context": (c if i is None else c[i])[None]}


def _close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: not finite"
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item() / scale
    assert err <= TOL, f"{what}: error {err:.3e}"


@NO_FALLBACK
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_vmap_of_one_row_calls_equals_the_batched_call(config):
    ref, fast, x, c = _pair(*config)
    kw = {} if c is None else {"context": c}
    dims = (0,) if c is None else (0, 0)
    args = (x,) if c is None else (x, c)

    def per_row(flow, method):
        def one(r, *cc):
            return getattr(flow, method)(r[None], **_row_kw(cc[0] if cc else None))[0]

        return vmap(one, in_dims=dims)(*args)

    with torch.no_grad():
        batched = fast.log_prob(x, **kw)
        _close(per_row(fast, "log_prob"), batched, "vmap log_prob vs batched")
        _close(per_row(fast, "log_prob"), per_row(ref, "log_prob"), "vmap log_prob vs reference")
        _close(per_row(fast, "g"), fast.g(x, **kw), "vmap g vs batched")


@NO_FALLBACK
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_jacobian_of_f_matches_reference_and_its_log_det(config):
    ref, fast, x, c = _pair(*config)
    for i in range(2):
        kw = _row_kw(c, i)

        def f_of(flow, kw=kw):
            return lambda r: flow.f(r[None], **kw)[0][0]

        jac = jacrev(f_of(fast))(x[i])
        _close(jac, jacrev(f_of(ref))(x[i]), f"jacrev row {i}")
        _close(jacfwd(f_of(fast))(x[i]), jac, f"jacfwd row {i}")
        with torch.no_grad():
            _, log_det = fast.f(x[i : i + 1], **kw)
        _close(torch.linalg.slogdet(jac).logabsdet[None], log_det, f"log|det J| row {i}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_hessian_of_log_prob_matches_reference(config):
    """Second order: the engine's hand-written backwards are first order and raise under
    ``create_graph``; inside the transform the plain ops give the exact Hessian."""
    ref, fast, x, c = _pair(*config)
    kw = _row_kw(c, 0)

    def log_p(flow):
        return lambda r: flow.log_prob(r[None], **kw)[0]

    _close(hessian(log_p(fast))(x[0]), hessian(log_p(ref))(x[0]), "Hessian")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_per_sample_gradients_match_one_row_calls(config):
    _, fast, x, c = _pair(*config)
    params = {name: p.detach() for name, p in fast.named_parameters()}

    def loss(p, r, *cc):
        return -_log_prob(fast, p, r[None], _row_kw(cc[0] if cc else None)).sum()

    dims = (None, 0) if c is None else (None, 0, 0)
    args = (params, x) if c is None else (params, x, c)
    per_sample = vmap(grad(loss), in_dims=dims)(*args)
    for i in range(x.shape[0]):  # the engine's own path, one row at a time
        fast.zero_grad()
        (-fast.log_prob(x[i : i + 1], **_row_kw(c, i)).sum()).backward()
        for name, p in fast.named_parameters():
            _close(per_sample[name][i], p.grad, f"per-sample gradient of {name}, row {i}")


class _LogProb(nn.Module):
    """``flow.log_prob`` as a module's forward, for ``functional_call``."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x, **kw):
        return self.flow.log_prob(x, **kw)


def _log_prob(flow, params, x, kw):
    """``flow.log_prob(x, **kw)`` with ``params`` (the flow's names) in its parameters' place."""
    named = {f"flow.{name}": p for name, p in params.items()}
    return functional_call(_LogProb(flow), named, (x,), kw)


def test_the_plan_inside_a_transform_is_the_plain_layer_loop():
    fast = FastRealNVP.standard(4, 3, 16, fused="layer")
    x = torch.randn(5, 4)
    seen = []

    def one(r):
        seen.append(fast.explain(r[None]))
        return fast.log_prob(r[None])[0]

    vmap(one)(x)
    plan = seen[0]
    assert plan.stack == "layers" and "torch.func" in plan.reason
    assert set(plan.layers) == {"split_mlp"}
    assert set(fast.explain(x).layers) == {"fused_layer"}  # outside: the engine's own path


def test_fused_layers_inside_transforms_agree_with_the_kernels(backend):
    """A ``fused="layer"`` flow runs the fused-layer op (its Triton kernels on the triton
    backend) outside a transform and the plain ops inside one: per-row input gradients by
    ``vmap(grad(...))`` equal the batched call's input gradient to float32 rounding."""
    torch.manual_seed(1)
    fast = FastRealNVP.standard(4, 2, 16, context=2, fused="layer").eval()
    x, c = torch.randn(3, 4), torch.randn(3, 2)
    xg = x.clone().requires_grad_()
    fast.log_prob(xg, context=c).sum().backward()
    per_row = vmap(grad(lambda r, cc: fast.log_prob(r[None], context=cc[None])[0]))(x, c)
    torch.testing.assert_close(per_row, xg.grad, rtol=1e-5, atol=1e-5)
