"""The execution plan (fastnvp.engine.plan) and the CPU GEMM stack executor.

The plan is tested as a table: facts and context in, stack and layer paths out, with no model
and no call counters. The executor is checked against the float64 reference (outputs and every
gradient, both memory modes), through gradcheck, and for its failure modes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastnvp.core.conditioner import standard_net
from fastnvp.core.reference import RealNVP
from fastnvp.engine import plan as P
from fastnvp.engine.cpu import gemm_stack
from fastnvp.engine.invertible import ReconstructionError
from fastnvp.flows.fast_realnvp import FastRealNVP


def _facts(dim=6, layers=4, hidden=32, kept=None, standard=True, slope=0.01, own=True, pre=()):
    kept = kept if kept is not None else [dim // 2] * layers
    rows = tuple(
        P.LayerFacts(
            kept=k,
            standard=standard,
            hidden=hidden if standard else None,
            slope=slope if standard else None,
            clamped=False,
            pre=pre,
        )
        for k in kept
    )
    return P.FlowFacts(rows, dim, len(set(kept)) == 1, own)


def _ctx(**changes):
    base = P.CallContext(
        direction="f",
        device="cpu",
        dtype=torch.float32,
        rows=256,
        grad=True,
        autocast=False,
        compiling=False,
        checking=False,
        threads=2,
        in_worker=False,
        triton=False,
        memory="standard",
        fused="auto",
        knot_tables=True,
    )
    return dataclasses.replace(base, **changes)


# (facts changes, context changes, policy, expected stack, expected layer path)
TABLE = [
    ({}, {}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({}, {"grad": False}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({}, {"direction": "g", "grad": False}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({}, {"direction": "g"}, P.Policy(), "layers", "cpu_pair"),
    # Inside a torch.func transform: the layer loop on plain ops, fused or not, any device.
    ({}, {"func_transform": True}, P.Policy(), "layers", "split_mlp"),
    ({}, {"func_transform": True, "fused": "layer"}, P.Policy(), "layers", "split_mlp"),
    (
        {},
        {"func_transform": True, "device": "cuda", "triton": True, "grad": False},
        P.Policy(),
        "layers",
        "split_mlp",
    ),
    ({}, {"memory": "invertible"}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({}, {"rows": 4096}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),  # before the row split
    ({}, {"rows": 4096, "memory": "invertible"}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({"own": False}, {"rows": 4096}, P.Policy(), "rows_parallel", "cpu_pair"),
    # Unequal halves (odd D) run in the GEMM stack, padded, norm layers too; not with mixing.
    ({"kept": [3, 2, 3, 2]}, {"rows": 4096}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({"dim": 5, "kept": [3, 2, 3, 2]}, {"grad": False}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    # D = 3 without a gradient: the one-feature layers' knot pieces win from rows * H^2 = 24M.
    (
        {"dim": 3, "hidden": 256, "kept": [2, 1, 2, 1]},
        {"grad": False, "rows": 64},
        P.Policy(),
        "cpu_gemm_stack",
        ("cpu_pair", "cpu_knots"),
    ),
    (
        {"dim": 3, "hidden": 256, "kept": [2, 1, 2, 1]},
        {"grad": False, "rows": 1024},
        P.Policy(),
        "layers",
        ("cpu_pair", "cpu_knots"),
    ),
    # A row worker of a call that declined the stack for the pieces declines it too.
    (
        {"dim": 3, "hidden": 256, "kept": [2, 1, 2, 1]},
        {"grad": False, "rows": 64, "in_worker": True},
        P.Policy(),
        "layers",
        ("cpu_pair", "cpu_knots"),
    ),
    # Pieces not built yet at these parameters (rent, then buy): the stack where it runs the
    # flow, the pieces at once where it cannot.
    (
        {"dim": 2, "hidden": 64},
        {"grad": False, "rows": 2048, "pieces_ready": False},
        P.Policy(),
        "cpu_gemm_stack",
        "cpu_knots",
    ),
    (
        {"dim": 3, "hidden": 256, "kept": [2, 1, 2, 1]},
        {"grad": False, "rows": 1024, "pieces_ready": False},
        P.Policy(),
        "cpu_gemm_stack",
        ("cpu_pair", "cpu_knots"),
    ),
    (
        {"dim": 2, "hidden": 64, "own": False},
        {"grad": False, "rows": 2048, "pieces_ready": False},
        P.Policy(),
        "layers",
        "cpu_knots",
    ),
    (
        {"kept": [3, 2, 3, 2], "pre": ("actnorm",)},
        {"rows": 4096},
        P.Policy(),
        "cpu_gemm_stack",
        "cpu_pair",
    ),
    (
        {"kept": [3, 2, 3, 2], "pre": ("permutation",)},
        {"rows": 4096},
        P.Policy(),
        "rows_parallel",
        "cpu_pair",
    ),
    ({"own": False}, {"rows": 4096, "grad": False}, P.Policy(), "rows_parallel", "cpu_pair"),
    ({"own": False}, {"rows": 4096, "threads": 1}, P.Policy(), "layers", "cpu_pair"),
    ({"own": False}, {"rows": 4096, "in_worker": True}, P.Policy(), "layers", "cpu_pair"),
    (
        {"own": False},
        {"rows": 4096},
        P.Policy(parallel_training=False),
        "layers",
        "cpu_pair",
    ),
    (
        {"own": False},
        {"rows": 4096},
        P.Policy(min_rows_per_thread=4096),
        "layers",
        "cpu_pair",
    ),
    (
        {"own": False},
        {"rows": 4096, "memory": "invertible"},
        P.Policy(),
        "invertible",
        "cpu_pair",
    ),
    ({}, {}, P.Policy(gemm_stack=False), "layers", "cpu_pair"),
    ({}, {"memory": "invertible"}, P.Policy(gemm_stack=False), "invertible", "cpu_pair"),
    ({}, {"compiling": True}, P.Policy(), "layers", "cpu_pair"),
    ({}, {"checking": True}, P.Policy(), "layers", "cpu_pair"),
    ({}, {"autocast": True}, P.Policy(), "layers", "split_mlp"),
    ({}, {"dtype": torch.bfloat16}, P.Policy(), "layers", "split_mlp"),
    ({"kept": [3, 2, 3, 2], "pre": ("batchnorm", "lu")}, {}, P.Policy(), "layers", "cpu_pair"),
    ({"own": False}, {}, P.Policy(), "layers", "cpu_pair"),
    ({"slope": -0.1}, {}, P.Policy(), "layers", "cpu_pair"),
    ({"standard": False}, {}, P.Policy(), "layers", "modules"),
    # Without a gradient the knot pieces from rows * H^3 = 384 Mi and H = 64 (plan.Policy).
    ({"dim": 2, "hidden": 64}, {"grad": False, "rows": 2048}, P.Policy(), "layers", "cpu_knots"),
    ({"dim": 2, "hidden": 64}, {"grad": False}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({"dim": 2, "hidden": 128}, {"grad": False}, P.Policy(), "layers", "cpu_knots"),
    (
        {"dim": 2, "hidden": 32},
        {"grad": False, "rows": 8192},
        P.Policy(),
        "cpu_gemm_stack",
        "cpu_pair",
    ),
    ({"dim": 2}, {"grad": False, "knot_tables": False}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({"dim": 2, "hidden": 256}, {"rows": 1024}, P.Policy(), "cpu_gemm_stack", "cpu_knots"),
    ({"dim": 2, "hidden": 256}, {"rows": 512}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    ({"dim": 2, "hidden": 64}, {"rows": 10**6}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
    (
        {"dim": 2, "hidden": 256, "kept": [1, 1, 1, 1], "own": False},
        {"rows": 1024},
        P.Policy(),
        "layers",
        "cpu_knots",
    ),
    ({}, {"device": "cuda", "triton": True}, P.Policy(), "layers", "fused_layer"),
    (
        {},
        {"device": "cuda", "triton": True, "grad": False},
        P.Policy(),
        "gpu_fused_stack",
        "fused_layer",
    ),
    (
        {},
        {"device": "cuda", "triton": True, "memory": "invertible"},
        P.Policy(),
        "invertible",
        "fused_layer",
    ),
    ({}, {"device": "cuda", "triton": True, "fused": "op"}, P.Policy(), "layers", "split_mlp"),
    ({"hidden": 48}, {"device": "cuda", "triton": True}, P.Policy(), "layers", "split_mlp"),
    ({"hidden": 48}, {"fused": "layer"}, P.Policy(), "layers", "fused_layer"),
    ({"hidden": 48}, {"fused": "layer", "triton": True}, P.Policy(), "cpu_gemm_stack", "cpu_pair"),
]


@pytest.mark.parametrize(("facts", "ctx", "policy", "stack", "path"), TABLE)
def test_plan_table(facts, ctx, policy, stack, path):
    plan = P.choose(_facts(**facts), _ctx(**ctx), policy)
    assert plan.stack == stack, plan.reason
    assert set(plan.layers) == ({path} if isinstance(path, str) else set(path))
    assert plan.reason and stack in str(plan)


def _knot_path(kept: int, rows: int, hidden: int, grad: bool, **context) -> bool:
    layer = P.LayerFacts(kept=kept, standard=True, hidden=hidden, slope=0.01, clamped=False)
    ctx = _ctx(rows=rows, grad=grad, threads=1, **context)
    return P.layer_path(layer, ctx) == "cpu_knots"


def test_knot_form_thresholds():
    # Without a gradient the piece form from rows * H^3 = 384 Mi and H = 64 on (Policy doc).
    assert _knot_path(1, 1536, 64, grad=False)
    assert not _knot_path(1, 1535, 64, grad=False)
    assert _knot_path(1, 24, 256, grad=False)
    assert not _knot_path(1, 23, 256, grad=False)
    assert not _knot_path(1, 10**6, 32, grad=False)  # narrow nets: the GEMM form at any batch
    assert _knot_path(1, 1024, 256, grad=True)
    assert not _knot_path(1, 1023, 256, grad=True)
    assert not _knot_path(1, 10**6, 64, grad=True)  # narrow nets train in the GEMM form
    assert not _knot_path(2, 10**6, 256, grad=False)  # two kept features
    assert not _knot_path(1, 10**6, 256, grad=False, knot_tables=False)
    assert not _knot_path(1, 10**6, 256, grad=False, compiling=True)


def test_plan_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        P.choose(_facts(), _ctx(direction="x"))


def test_flow_facts_follow_load_state_dict():
    model = FastRealNVP.standard(4, 3, 16)
    assert model._facts.uniform_split and model._facts.all_standard
    other = FastRealNVP(
        lambda: standard_net(4, 16, tanh=True),
        lambda: standard_net(4, 16, tanh=False),
        torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]),
    )
    x = torch.randn(5, 4)
    assert model.explain(x).stack == "cpu_gemm_stack"
    model.load_state_dict(other.state_dict())
    assert not model._facts.uniform_split
    # Layers keep 3, 2 and 1 features: the stack pads both halves to 3 (twice in one row).
    assert model.explain(x).stack == "cpu_gemm_stack"
    assert "unequal halves padded" in model.explain(x).reason
    torch.testing.assert_close(model.f(x)[0], other.f(x)[0])


def test_plans_are_cached_per_context():
    model = FastRealNVP.standard(4, 3, 16)
    x = torch.randn(5, 4)
    first = model.explain(x)
    assert model.explain(x) is first
    with torch.no_grad():
        assert model.explain(x) is not first
    model.policy = P.Policy(gemm_stack=False)
    assert model.explain(x).stack == "layers"
    with pytest.raises(TypeError, match="policy"):
        model.policy = {"gemm_stack": False}


def test_explain_validates_its_arguments():
    model = FastRealNVP.standard(4, 2, 16)
    with pytest.raises(ValueError, match="direction"):
        model.explain(torch.randn(3, 4), direction="backward")
    with pytest.raises(ValueError):
        model.explain(torch.randn(3, 5))


def _twins(dim, layers, hidden, memory="standard", anchor_every=8):
    torch.manual_seed(0)
    ref = RealNVP.standard(dim, layers, hidden).double()
    fast = FastRealNVP.from_reference(ref)
    fast.memory = memory
    fast.anchor_every = anchor_every
    return ref, fast


@pytest.mark.parametrize("memory", ["standard", "invertible"])
@pytest.mark.parametrize(
    ("dim", "layers", "hidden", "rows"), [(2, 3, 16, 7), (6, 5, 8, 5), (16, 2, 32, 33)]
)
def test_gemm_stack_matches_float64_reference(memory, dim, layers, hidden, rows, one_thread):
    ref, fast = _twins(dim, layers, hidden, memory, anchor_every=2)
    fast.knot_tables = False
    x = torch.randn(rows, dim, dtype=torch.float64) * 1.5
    assert fast.explain(x.requires_grad_()).stack == "cpu_gemm_stack"
    w = torch.randn(rows, dim, dtype=torch.float64)
    v = torch.randn(rows, dtype=torch.float64)
    grads = []
    for model in (ref, fast):
        xx = x.detach().clone().requires_grad_()
        z, ld = model.f(xx)
        outs = (z, ld)
        grads.append(
            (outs, torch.autograd.grad((z * w).sum() + (ld * v).sum(), [xx, *model.parameters()]))
        )
    (z_ref, ld_ref), g_ref = grads[0]
    (z, ld), g = grads[1]
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(g, g_ref, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if memory == "invertible":
        report = fast.last_reconstruction
        assert report.ok and report.anchor_layers == tuple(range(0, layers, 2))
    with torch.no_grad():
        assert fast.explain(x, "g").stack == "cpu_gemm_stack"
        torch.testing.assert_close(fast.g(z_ref), x.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fast.f(x)[0], z_ref, rtol=1e-12, atol=1e-12)


def test_gemm_stack_gradcheck(one_thread):
    _, fast = _twins(4, 2, 4)
    kept, trans = fast._stack_split()
    params = [p.detach().clone().requires_grad_() for p in gemm_stack.layer_parameters(fast)]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    for memory in ("standard", "invertible"):
        setup = (kept, trans, 0.01, memory, 1, 1e-6, None)

        def fn(x, *ps, setup=setup):
            return gemm_stack._GemmStack.apply(fast, setup, x, None, *ps)

        assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def test_gemm_stack_backward_twice_accumulates_like_autograd(one_thread):
    ref, fast = _twins(6, 3, 8)
    x = torch.randn(9, 6, dtype=torch.float64)
    for model in (ref, fast):
        lp = model.log_prob(x)
        for _ in range(2):
            lp.square().mean().backward(retain_graph=True)
    for p_ref, p in zip(ref.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12)


def test_gemm_stack_only_some_parameters_trained(one_thread):
    ref, fast = _twins(6, 3, 8)
    for model in (ref, fast):
        for net in (*model.s, *model.t):
            net[2].weight.requires_grad_(False)
    x = torch.randn(9, 6, dtype=torch.float64)
    (-ref.log_prob(x).mean()).backward()
    (-fast.log_prob(x).mean()).backward()
    for p_ref, p in zip(ref.parameters(), fast.parameters(), strict=True):
        assert (p.grad is None) == (p_ref.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", ["standard", "invertible"])
def test_gemm_stack_refuses_parameters_changed_before_backward(memory):
    _, fast = _twins(6, 3, 8, memory)
    loss = -fast.log_prob(torch.randn(4, 6, dtype=torch.float64)).mean()
    with torch.no_grad():
        fast.s[1][2].weight.mul_(2)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: s\.1\.2\.weight"):
        loss.backward()


def test_gemm_stack_reconstruction_guard():
    _, fast = _twins(6, 4, 8, "invertible")
    fast.float()
    fast.reconstruction_tolerance = 1e-30  # float32 round trips cannot meet this
    loss = -fast.log_prob(torch.randn(16, 6)).mean()
    assert fast.explain(torch.randn(16, 6).requires_grad_()).stack == "cpu_gemm_stack"
    with pytest.raises(ReconstructionError, match="reconstruction_tolerance=1e-30"):
        loss.backward()
    assert all(p.grad is None for p in fast.parameters())
    assert not fast.last_reconstruction.ok


def test_gemm_stack_invertible_saves_no_activations_per_layer():
    """Autograd keeps the output and one (N, D) anchor per anchor_every layers, nothing else."""
    sizes = {}
    for layers in (4, 32):
        _, fast = _twins(6, layers, 16, "invertible", anchor_every=8)
        x = torch.randn(64, 6, dtype=torch.float64)
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z, ld = gemm_stack.run_forward(
                fast,
                x,
                *fast._stack_split(),
                0.01,
                grad=True,
                memory="invertible",
                anchor_every=8,
                tolerance=1e-6,
            )
        sizes[layers] = sum(saved)
    assert sizes[32] == sizes[4] + 3 * 64 * 6  # 4 anchors at L = 32, 1 at L = 4


def test_masks_with_interleaved_features_run_on_the_gemm_stack(one_thread):
    masks = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 1, 0]])
    torch.manual_seed(1)
    ref = RealNVP(
        lambda: standard_net(5, 8, tanh=True), lambda: standard_net(5, 8, tanh=False), masks
    ).double()
    fast = FastRealNVP.from_reference(ref)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert fast.explain(x).stack == "cpu_gemm_stack"
    torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast.log_prob(x).sum(), [x, *fast.parameters()])
    g_ref = torch.autograd.grad(ref.log_prob(x).sum(), [x, *ref.parameters()])
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [{}, {"context": 3}, {"norm": "actnorm", "permutation": "lu"}, {"permutation": "random"}],
)
def test_first_calls_under_inference_mode(options, one_thread):
    """A fresh flow called first under torch.inference_mode (sampling, evaluation): the
    engine's caches are built from normal tensors, so the calls agree with the float64
    reference and a training step afterwards still runs and matches it."""
    torch.manual_seed(4)
    dim, width = 6, options.get("context") or 0
    ref = RealNVP.standard(dim, 4, 16, **options).double()
    fast = FastRealNVP.from_reference(ref)
    x = torch.randn(9, dim, dtype=torch.float64)
    given = {"context": torch.randn(9, width, dtype=torch.float64)} if width else {}
    with torch.inference_mode():
        x_inference = x.clone()
        lp = fast.log_prob(x_inference, **given)
        z, _ = fast.f(x_inference, **given)
        back = fast.g(z, **given)
        drawn = fast.sample(4, **({"context": given["context"][0]} if width else {}))
    assert drawn.shape == (4, dim) and torch.isfinite(drawn).all()
    ref.load_state_dict(fast.state_dict())  # ActNorm initialized by the first call
    with torch.no_grad():
        torch.testing.assert_close(lp, ref.log_prob(x, **given))
    torch.testing.assert_close(back, x)
    for model in (fast, ref):
        model.zero_grad()
        model.log_prob(x, **given).sum().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize(
    "dim, options",
    [(4, {}), (2, {}), (4, {"memory": "invertible"}), (4, {"permutation": "lu"})],
)
def test_second_derivatives_raise_on_first_order_nodes(dim, options, one_thread):
    """The engine's hand-written backwards are first order: asking for a second derivative
    (create_graph=True) raises and names the reference, instead of autograd.grad pruning the
    node and returning a silent None (zero) with allow_unused=True."""
    fast = FastRealNVP.standard(dim, 2, 8, **options).double()
    x = torch.randn(5, dim, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="first-order backward.*fastnvp.RealNVP.*torch.func"):
        torch.autograd.grad(fast.log_prob(x).sum(), x, create_graph=True)
    (grad,) = torch.autograd.grad(fast.log_prob(x).sum(), x)  # first order still runs
    assert torch.isfinite(grad).all()


def test_second_derivatives_where_the_path_is_plain_autograd(one_thread):
    """The layer loop (here: the GEMM stack turned off by the policy) runs ops that are
    differentiable twice: its second derivative equals the reference's."""
    ref = RealNVP.standard(3, 2, 8).double()
    fast = FastRealNVP.from_reference(ref)
    fast.policy = P.Policy(gemm_stack=False)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert fast.explain(x).stack == "layers"

    def curvature(model):
        (grad,) = torch.autograd.grad(model.log_prob(x).sum(), x, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), x)[0]

    torch.testing.assert_close(curvature(fast), curvature(ref), rtol=1e-10, atol=1e-12)
