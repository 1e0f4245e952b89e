"""A FastRealNVP edited after it has run follows the edit, as RealNVP does (docs/design.md §3.1).

The engine builds its facts (which layers are the standard pair, their H and slope) and its
packs, bank and knot tables once; ``fastnvp.flows.structure`` notices an edit and they are
rebuilt, and the interleaved layers' cached forms also key on BatchNorm's ``eps``. Each edit
below is made to both flows after several calls with and without a gradient (so plans, packs,
the bank and the no-gradient caches exist); then ``log_prob`` with and without a gradient and
every parameter's gradient must equal the reference's in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations

from fastnvp import FastRealNVP, RealNVP

F64 = torch.float64
TOL = 1e-10


def _replace_net_with_tanh_net(flow):
    torch.manual_seed(7)
    flow.s[1] = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).double()


def _replace_net_with_wider_net(flow):
    torch.manual_seed(7)
    flow.t[2] = nn.Sequential(
        nn.Linear(4, 32),
        nn.LeakyReLU(0.01),
        nn.Linear(32, 32),
        nn.LeakyReLU(0.01),
        nn.Linear(32, 4),
    ).double()


def _replace_inner_linear(flow):
    torch.manual_seed(7)
    flow.s[2][2] = nn.Linear(16, 16).double()


def _replace_activation(flow):
    flow.t[0][1] = nn.ELU()


def _weight_norm(flow):
    parametrizations.weight_norm(flow.s[0][0])


def _new_weight_parameter(flow):
    torch.manual_seed(7)
    flow.t[1][2].weight = nn.Parameter(torch.randn(16, 16, dtype=F64) * 0.1)


def _prune(flow):
    prune.l1_unstructured(flow.s[0][2], "weight", amount=0.5)


def _slopes(flow):
    for net in (flow.s[0], flow.t[0]):
        net[1].negative_slope = 0.2
        net[3].negative_slope = 0.2


def _mask_in_place(flow):
    with torch.no_grad():
        flow.mask[1] = 1 - flow.mask[1]


EDITS = [
    _replace_net_with_tanh_net,
    _replace_net_with_wider_net,
    _replace_inner_linear,
    _replace_activation,
    _weight_norm,
    _new_weight_parameter,
    _prune,
    _slopes,
    _mask_in_place,
]


def _used_pair():
    torch.manual_seed(0)
    ref = RealNVP.standard(4, 3, 16).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = FastRealNVP.standard(4, 3, 16).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(20, 4, dtype=F64)
    for _ in range(2):  # plans, the gradient pack and the bank in use
        fast.log_prob(x).sum().backward()
        with torch.no_grad():  # the no-gradient pack and its inference operands
            fast.log_prob(x)
    fast.zero_grad()
    return ref, fast, x


def _assert_same(ref, fast, x, what, **context):
    with torch.no_grad():
        want, got = ref.log_prob(x, **context), fast.log_prob(x, **context)
    assert torch.isfinite(got).all(), what
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max()), f"{what}: no grad"
    ref.zero_grad()
    fast.zero_grad()
    ref.log_prob(x, **context).sum().backward()
    fast.log_prob(x, **context).sum().backward()
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        q = fast_params[name]
        assert (p.grad is None) == (q.grad is None), f"{what}: {name}"
        if p.grad is not None:
            err = (q.grad - p.grad).abs().max()
            assert err <= TOL * max(1.0, p.grad.abs().max()), f"{what}: gradient of {name}"


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.__name__.strip("_"))
def test_an_edit_after_use_is_followed(edit, one_thread):
    """Both flows take the same edit (new modules drawn from the same seed), and no
    ``load_state_dict`` follows it, which would rebuild the facts by itself."""
    ref, fast, x = _used_pair()
    edit(ref)
    edit(fast)
    _assert_same(ref, fast, x, edit.__name__)


def test_edits_of_a_copy_are_followed(one_thread):
    ref, fast, x = _used_pair()
    fast_copy, ref_copy = copy.deepcopy(fast), copy.deepcopy(ref)
    _replace_net_with_tanh_net(ref_copy)
    _replace_net_with_tanh_net(fast_copy)
    _assert_same(ref_copy, fast_copy, x, "copy")
    _assert_same(ref, fast, x, "original")  # the original keeps its own nets and plan


def test_modules_made_elsewhere_do_not_rebuild_the_facts(one_thread):
    """A registration anywhere in the process only makes the next call compare the flow's
    modules with its facts; nothing here moved, so the facts and packs stay."""
    _, fast, x = _used_pair()
    facts = fast._facts
    fast.log_prob(x)
    nn.Sequential(nn.Linear(3, 3), nn.ReLU())  # registers modules and parameters
    fast.log_prob(x)
    assert fast._facts is facts
    assert fast.explain(x).stack == "cpu_gemm_stack"


def test_an_edit_of_a_conditional_flow_with_interleaved_layers_is_followed(one_thread):
    torch.manual_seed(0)
    options = dict(context=2, norm="actnorm", permutation="lu")
    ref = RealNVP.standard(4, 3, 16, **options).double()
    fast = FastRealNVP.standard(4, 3, 16, **options).double()
    fast.load_state_dict(ref.state_dict())
    x, c = torch.randn(20, 4, dtype=F64), torch.randn(20, 2, dtype=F64)
    for flow in (ref, fast):
        flow.log_prob(x, c).sum().backward()  # ActNorm initializes; plans and packs exist
    for flow in (ref, fast):
        torch.manual_seed(7)
        flow.s[1] = nn.Sequential(
            nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
        ).double()
    _assert_same(ref, fast, x, "conditional", context=c)


def test_a_new_clamp_reaches_user_nets(one_thread):
    """``clamp`` soft-clamps the log-scale of layers whose S net is not the standard one (no
    Tanh of its own); set after use, it must reach them."""
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Linear(4, 16), nn.ELU(), nn.Linear(16, 4))

    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], dtype=F64)
    ref = RealNVP(net, net, mask).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(4.0)  # log-scales well beyond the clamp
    fast = FastRealNVP.from_reference(ref).double()
    x = torch.randn(20, 4, dtype=F64)
    fast.log_prob(x).sum().backward()
    for flow in (ref, fast):
        flow.clamp = 0.5
    _assert_same(ref, fast, x, "clamp")


def test_a_new_batchnorm_eps_reaches_the_cached_forms(one_thread):
    """In eval mode, BatchNorm is a fixed affine map built from its running statistics and
    ``eps`` and kept between calls without a gradient; ``eps`` set after use must reach it."""
    torch.manual_seed(0)
    ref = RealNVP.standard(4, 3, 16, norm="batchnorm").double()
    fast = FastRealNVP.standard(4, 3, 16, norm="batchnorm").double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(64, 4, dtype=F64)
    for flow in (ref, fast):
        flow.log_prob(x).sum().backward()  # running statistics move
        flow.eval()
        with torch.no_grad():
            flow.log_prob(x)  # the cached affine forms
    for flow in (ref, fast):
        for layer in flow.norms:
            layer.eps = 0.5
    _assert_same(ref, fast, x, "eps")


def test_forward_hooks_registered_after_use_run_and_the_engine_returns_after_removal(one_thread):
    """The engine runs a standard pair from its weights, which would skip a module's hooks: a
    hook registered on one sends that pair through its modules (hooks called as in the
    reference, same results, no clamp on a standard pair), and removing it gives the pair back
    to the engine."""
    ref, fast, x = _used_pair()
    for flow in (ref, fast):
        flow.clamp = 1.0  # clamps only non-standard pairs: a hooked pair is still standard
    seen = {"ref": [], "fast": []}
    handles = [
        flow.s[1][1].register_forward_hook(lambda m, i, o, k=key: seen[k].append(o.detach()))
        for flow, key in ((ref, "ref"), (fast, "fast"))
    ]
    _assert_same(ref, fast, x, "hooked")
    assert len(seen["fast"]) == len(seen["ref"]) == 2  # a call without and one with a gradient
    for got, want in zip(seen["fast"], seen["ref"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fast.explain(x).layers[1] == "modules"
    for handle in handles:
        handle.remove()
    _assert_same(ref, fast, x, "unhooked")
    assert fast.explain(x).stack == "cpu_gemm_stack"


@pytest.mark.parametrize(
    "options, layers",
    [({"norm": "actnorm"}, "norms"), ({"norm": "batchnorm", "permutation": "lu"}, "permutations")],
    ids=["actnorm", "batchnorm-lu"],
)
def test_a_hook_on_a_norm_or_mixing_layer_runs_and_is_released(options, layers, one_thread):
    """The engine runs its own forms of the norm and mixing layers, which would skip a hook on
    one: with a hook the calls run them as modules, as the reference does; without it, the
    engine's forms again."""
    torch.manual_seed(0)
    ref = RealNVP.standard(4, 3, 16, **options).double()
    fast = FastRealNVP.standard(4, 3, 16, **options).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(20, 4, dtype=F64)
    for flow in (ref, fast):
        flow.log_prob(x).sum().backward()
        flow.eval()
        with torch.no_grad():
            flow.log_prob(x)
    fast.load_state_dict(ref.state_dict())  # the same initialized state
    seen = {"ref": [], "fast": []}
    handles = [
        getattr(flow, layers)[1].register_forward_hook(
            lambda m, i, o, k=key: seen[k].append(o[0].detach())
        )
        for flow, key in ((ref, "ref"), (fast, "fast"))
    ]
    _assert_same(ref, fast, x, "hooked")
    assert len(seen["fast"]) == len(seen["ref"]) == 2
    for got, want in zip(seen["fast"], seen["ref"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fast.explain(x).stack == "layers"
    for handle in handles:
        handle.remove()
    _assert_same(ref, fast, x, "unhooked")
    assert fast.explain(x).stack == "cpu_gemm_stack"
