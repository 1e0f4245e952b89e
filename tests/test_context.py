"""Conditional flows (docs/design.md §1.7): the API, bad input and every CPU executor.

Each executor is checked against the float64 reference on fresh inputs: outputs, log-det and
the gradients of the parameters, the embedding and the context itself; the GEMM stack also
through gradcheck in both memory modes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastnvp import FastRealNVP, RealNVP
from fastnvp.core.masks import alternating_masks
from fastnvp.engine import plan as P
from fastnvp.engine.cpu import gemm_stack

D, C = 6, 3


def _embedding(width=4):
    return nn.Sequential(nn.Linear(C, width), nn.Tanh())


def _twins(dim=D, layers=4, hidden=16, embedding=None, **fast_options):
    ref = RealNVP.standard(dim, layers, hidden, context=C, embedding=embedding).double()
    fast = FastRealNVP.from_reference(ref).double()
    for name, value in fast_options.items():
        setattr(fast, name, value)
    return ref, fast


def _with_masks(proto, masks, **options):
    """A reference flow with ``proto``'s nets (and context, embedding) and other masks."""
    s_nets, t_nets = iter(list(proto.s)), iter(list(proto.t))
    return RealNVP(
        lambda: next(s_nets),
        lambda: next(t_nets),
        masks,
        context=proto.context_features,
        embedding=proto.embedding,
        **options,
    ).double()


def _inputs(rows=23, dim=D):
    return torch.randn(rows, dim, dtype=torch.float64), torch.randn(rows, C, dtype=torch.float64)


def _assert_same_gradients(ref, fast, x, c, x_grad=True, context_grad=True):
    """log_prob, and the gradients of every parameter, x and the context, equal the reference's.
    ``x_grad`` / ``context_grad``: whether x / the context require a gradient (without one,
    neither model gives it one)."""
    grads = []
    for model in (ref, fast):
        model.zero_grad()
        xi = x.clone().requires_grad_(x_grad)
        ci = c.clone().requires_grad_(context_grad)
        lp = model.log_prob(xi, ci)
        (lp * torch.linspace(0.5, 1.5, lp.shape[0], dtype=lp.dtype)).sum().backward()
        grads.append((lp.detach(), xi.grad, ci.grad, [p.grad for p in model.parameters()]))
    (lp_r, gx_r, gc_r, gp_r), (lp_f, gx_f, gc_f, gp_f) = grads
    torch.testing.assert_close(lp_f, lp_r, rtol=1e-10, atol=1e-10)
    for wanted, got, expected in ((x_grad, gx_f, gx_r), (context_grad, gc_f, gc_r)):
        if wanted:
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
        else:
            assert got is None and expected is None
    assert len(gp_f) == len(gp_r)
    for a, b in zip(gp_f, gp_r):
        assert a is not None
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _assert_stack_matches_without_gradient(ref, fast, x, c):
    """Without a gradient f and g run on the GEMM stack: f's values and log-det equal the
    reference's, and g inverts them."""
    with torch.no_grad():
        z, ld = ref.f(x, c)
        assert fast.explain(z, "g", c).stack == "cpu_gemm_stack"
        z_fast, ld_fast = fast.f(x, c)
        torch.testing.assert_close(z_fast, z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ld_fast, ld, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast.g(z, c), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("embedding", [None, _embedding], ids=["raw", "embedded"])
@pytest.mark.parametrize("memory", ["standard", "invertible"])
def test_gemm_stack_matches_reference(one_thread, embedding, memory):
    ref, fast = _twins(embedding=embedding() if embedding else None, memory=memory)
    x, c = _inputs()
    assert fast.explain(x, "f", c.requires_grad_()).stack == "cpu_gemm_stack"
    c = c.detach()
    _assert_same_gradients(ref, fast, x, c)
    _assert_stack_matches_without_gradient(ref, fast, x, c)


@pytest.mark.parametrize("memory", ["standard", "invertible"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["params-only", "x-too"])
def test_gemm_stack_without_context_gradient(one_thread, memory, x_grad):
    """A context that requires no gradient (the usual training step): the backward skips the
    context's columns of W1 (docs/design.md §3.2), and every parameter's gradient, and x's
    where asked, still equal the reference's."""
    ref, fast = _twins(memory=memory)
    x, c = _inputs()
    _assert_same_gradients(ref, fast, x, c, x_grad=x_grad, context_grad=False)


def _gradcheck_stack(fast, rows: int) -> None:
    """gradcheck of the GEMM stack's node in x, the context and every parameter, both memory
    modes."""
    kept, trans = fast._stack_split()
    params = [p.detach().clone().requires_grad_() for p in gemm_stack.layer_parameters(fast)]
    x = torch.randn(rows, fast.dim, dtype=torch.float64, requires_grad=True)
    e = torch.randn(rows, C, dtype=torch.float64, requires_grad=True)
    for memory in ("standard", "invertible"):
        setup = (kept, trans, 0.01, memory, 1, 1e-6, None)

        def fn(x, e, *ps, setup=setup):
            return gemm_stack._GemmStack.apply(fast, setup, x, e, *ps)

        assert torch.autograd.gradcheck(fn, (x, e, *params))
        # A context without a gradient: the backward leaves its columns out.
        assert torch.autograd.gradcheck(fn, (x, e.detach(), *params))


def test_gemm_stack_gradcheck_with_context(one_thread):
    _, fast = _twins(dim=4, layers=2, hidden=4)
    _gradcheck_stack(fast, rows=5)


#: Layers keep 2, 4 and 4 features: the GEMM stack pads both halves to 4, twice in two rows.
UNEQUAL_MASKS = torch.tensor(
    [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1]], dtype=torch.float32
)


@pytest.mark.parametrize("embedding", [None, _embedding], ids=["raw", "embedded"])
@pytest.mark.parametrize("memory", ["standard", "invertible"])
def test_gemm_stack_pads_unequal_halves(one_thread, embedding, memory):
    """Layers that keep different numbers of features run in the GEMM stack, padded with a
    zero column (docs/design.md §3.2): same values and gradients as the reference, including
    the W1 column and W3 row (index 0) that the padding entries gather from."""
    proto = RealNVP.standard(D, 3, 16, context=C, embedding=embedding() if embedding else None)
    ref = _with_masks(proto, UNEQUAL_MASKS)
    fast = FastRealNVP.from_reference(ref).double()
    fast.memory = memory
    kept, trans = fast._stack_split()
    assert kept.tolist()[0] == [0, 1, D, D] and trans.tolist()[1] == [0, 1, D, D]
    x, c = _inputs()
    plan = fast.explain(x, "f", c)
    assert plan.stack == "cpu_gemm_stack" and "unequal halves" in plan.reason
    _assert_same_gradients(ref, fast, x, c)
    _assert_stack_matches_without_gradient(ref, fast, x, c)


def test_gemm_stack_gradcheck_with_unequal_halves(one_thread):
    ref = _with_masks(RealNVP.standard(5, 3, 4, context=C), alternating_masks(5, 3))
    fast = FastRealNVP.from_reference(ref).double()
    kept, trans = fast._stack_split()
    assert kept.shape == trans.shape == (3, 3)  # 3 + 2 features, padded to 3 + 3
    _gradcheck_stack(fast, rows=4)


def test_layer_paths_and_custom_nets_match_reference(one_thread):
    """Standard layers on the per-layer CPU path (the GEMM stack turned off), and user nets,
    match the reference with masks that keep different numbers of features."""
    masks = UNEQUAL_MASKS
    width = D + C

    def user_net():
        return nn.Sequential(nn.Linear(width, 12), nn.ELU(), nn.Linear(12, D))

    for nets in ("standard", "user"):
        if nets == "standard":
            ref = _with_masks(RealNVP.standard(D, 3, 16, context=C), masks)
        else:
            ref = RealNVP(user_net, user_net, masks, context=C, clamp=2.0).double()
        fast = FastRealNVP.from_reference(ref).double()
        fast.policy = P.Policy(gemm_stack=False)
        x, c = _inputs()
        plan = fast.explain(x, "f", c)
        assert plan.stack == "layers"
        assert set(plan.layers) == ({"cpu_pair"} if nets == "standard" else {"modules"})
        _assert_same_gradients(ref, fast, x, c)
        with torch.no_grad():
            torch.testing.assert_close(fast.g(ref.f(x, c)[0], c), x, rtol=1e-10, atol=1e-10)


def test_generic_invertible_stack_with_context(one_thread):
    ref = _with_masks(RealNVP.standard(D, 3, 16, context=C, embedding=_embedding()), UNEQUAL_MASKS)
    fast = FastRealNVP.from_reference(ref).double()
    fast.memory = "invertible"
    fast.policy = P.Policy(gemm_stack=False)  # the generic invertible stack
    x, c = _inputs()
    assert fast.explain(x, "f", c).stack == "invertible"
    _assert_same_gradients(ref, fast, x, c)
    assert fast.last_reconstruction.ok


def test_rows_parallel_with_context(two_threads):
    rows = 2 * P.DEFAULT_POLICY.min_rows_per_thread + 3
    masks = alternating_masks(D, 3)
    masks[1] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    ref = _with_masks(RealNVP.standard(D, 3, 8, context=C), masks)
    fast = FastRealNVP.from_reference(ref).double()
    fast.policy = P.Policy(gemm_stack=False)  # the row split runs the layer loop
    x, c = _inputs(rows)
    assert fast.explain(x, "f", c).stack == "rows_parallel"
    _assert_same_gradients(ref, fast, x, c)
    with torch.no_grad():
        assert fast.explain(x, "g", c).stack == "rows_parallel"
        z = ref.f(x, c)[0]
        torch.testing.assert_close(fast.g(z, c), x, rtol=1e-10, atol=1e-10)


def test_sample_shapes_and_one_pass_log_prob(one_thread):
    _, fast = _twins(embedding=_embedding())
    c = torch.randn(3, C, dtype=torch.float64)
    assert fast.sample(7, c[0]).shape == (7, D)
    samples = fast.sample(7, c, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (7, 3, D)
    again = fast.sample(7, c, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples, again)
    x, log_prob = fast.sample_and_log_prob(6, c)
    assert x.shape == (6, 3, D) and log_prob.shape == (6, 3)
    direct = fast.log_prob(x.reshape(-1, D), c.repeat(6, 1)).reshape(6, 3)
    torch.testing.assert_close(log_prob, direct, rtol=1e-9, atol=1e-9)
    # Column j of the samples was drawn given context row j: invert it with that row.
    z = fast.f(x[:, 1], c[1].expand(6, C))[0]
    torch.testing.assert_close(fast.g(z, c[1].expand(6, C)), x[:, 1], rtol=1e-9, atol=1e-9)


def test_sample_and_log_prob_does_not_run_the_forward(one_thread, monkeypatch):
    _, fast = _twins()

    def no_forward(*args, **kwargs):
        raise AssertionError("sample_and_log_prob ran the forward")

    monkeypatch.setattr(fast, "_forward", no_forward)
    x, lp = fast.sample_and_log_prob(4, torch.randn(C, dtype=torch.float64))
    assert x.shape == (4, D) and lp.shape == (4,) and torch.isfinite(lp).all()


def test_unconditional_sample_and_log_prob_matches_log_prob(one_thread):
    for cls in (RealNVP, FastRealNVP):
        model = cls.standard(3, 4, 16).double()
        x, lp = model.sample_and_log_prob(9)
        torch.testing.assert_close(lp, model.log_prob(x), rtol=1e-9, atol=1e-9)


def test_fp32_sample_and_log_prob_within_tolerance(one_thread):
    fast = FastRealNVP.standard(4, 6, 32, context=2)
    c = torch.randn(5, 2)
    x, lp = fast.sample_and_log_prob(50, c)
    direct = fast.log_prob(x.reshape(-1, 4), c.repeat(50, 1)).reshape(50, 5)
    torch.testing.assert_close(lp, direct, rtol=1e-4, atol=1e-4)


def test_distribution_follows_torch_distributions(one_thread):
    _, fast = _twins(embedding=_embedding())
    c = torch.randn(3, C, dtype=torch.float64)
    dist = fast.distribution(c)
    assert isinstance(dist, torch.distributions.Distribution)
    assert dist.batch_shape == (3,) and dist.event_shape == (D,)
    assert dist.sample().shape == (3, D)
    assert dist.sample((2, 4)).shape == (2, 4, 3, D)
    x = dist.rsample((5,))
    assert x.requires_grad and x.shape == (5, 3, D)
    x, lp = dist.rsample_and_log_prob((5,))
    torch.testing.assert_close(lp, dist.log_prob(x), rtol=1e-9, atol=1e-9)
    # log_prob broadcasts: one value against every context row.
    value = torch.randn(D, dtype=torch.float64)
    assert dist.log_prob(value).shape == (3,)
    torch.testing.assert_close(
        dist.log_prob(value), fast.log_prob(value.expand(3, D), c), rtol=1e-12, atol=1e-12
    )
    single = fast.distribution(c[0])
    assert single.batch_shape == () and single.sample((4,)).shape == (4, D)
    assert single.log_prob(torch.randn(4, D, dtype=torch.float64)).shape == (4,)
    plain = FastRealNVP.standard(3, 2, 8).distribution()
    assert plain.batch_shape == () and plain.sample((2,)).shape == (2, 3)
    with pytest.raises(ValueError, match="event_shape"):
        dist.log_prob(torch.randn(3, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="broadcast"):
        dist.log_prob(torch.randn(4, D, dtype=torch.float64))


def test_distribution_expands_like_torch_distributions(one_thread):
    """``expand`` (what Pyro's plates call): the batch broadcasts to new leading dimensions,
    each element keeping its context; unconditional batch elements are independent draws."""
    _, fast = _twins()
    c = torch.randn(3, C, dtype=torch.float64)
    dist = fast.distribution(c)
    wide = dist.expand((2, 3))
    assert isinstance(wide, type(dist)) and wide.batch_shape == (2, 3)
    assert wide.event_shape == (D,) and dist.batch_shape == (3,)  # the original is unchanged
    assert wide.sample().shape == (2, 3, D) and wide.sample((4,)).shape == (4, 2, 3, D)
    x, lp = wide.rsample_and_log_prob((5,))
    assert x.shape == (5, 2, 3, D) and lp.shape == (5, 2, 3)
    torch.testing.assert_close(lp, wide.log_prob(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(wide.log_prob(x), dist.log_prob(x), rtol=1e-12, atol=1e-12)
    single = fast.distribution(c[1]).expand((4,))
    assert single.batch_shape == (4,) and single.sample((2,)).shape == (2, 4, D)
    value = torch.randn(4, D, dtype=torch.float64)
    torch.testing.assert_close(
        single.log_prob(value), fast.log_prob(value, c[1].expand(4, C)), rtol=1e-12, atol=1e-12
    )
    plain = FastRealNVP.standard(D, 2, 8).double().distribution().expand((2, 3))
    draws = plain.sample((4,))
    assert draws.shape == (4, 2, 3, D) and plain.log_prob(draws).shape == (4, 2, 3)
    assert torch.unique(draws.reshape(-1, D), dim=0).shape[0] == 24  # independent draws
    for bad in ((4,), (3, 2), "3", (2, 1)):
        with pytest.raises(ValueError, match="batch_shape must be a shape that broadcasts"):
            dist.expand(bad)


def test_embedding_runs_once_per_call(one_thread):
    calls = []
    embedding = _embedding()
    embedding.register_forward_hook(lambda *args: calls.append(1))
    fast = FastRealNVP.standard(D, 4, 16, context=C, embedding=embedding).double()
    calls.clear()
    x, c = _inputs()
    fast.log_prob(x, c)
    assert len(calls) == 1
    fast.sample(10, c[:4])  # embedded once for the 4 distinct rows, then repeated
    assert len(calls) == 2


def test_state_dicts(one_thread):
    plain = RealNVP.standard(D, 2, 8)
    fast_plain = FastRealNVP.standard(D, 2, 8)
    assert list(plain.state_dict()) == list(fast_plain.state_dict())
    assert not any(k.startswith("embedding") for k in plain.state_dict())
    assert plain.state_dict()["s.0.0.weight"].shape == (8, D)
    ref, fast = _twins(embedding=_embedding())
    keys = list(ref.state_dict())
    assert keys == list(fast.state_dict()) and "embedding.0.weight" in keys
    assert ref.state_dict()["s.0.0.weight"].shape == (16, D + 4)
    other = FastRealNVP.standard(D, 4, 16, context=C, embedding=_embedding()).double()
    other.load_state_dict(ref.state_dict())
    x, c = _inputs()
    torch.testing.assert_close(other.log_prob(x, c), ref.log_prob(x, c), rtol=1e-12, atol=1e-12)


def test_plan_facts_carry_the_context_width():
    _, fast = _twins(dim=2, embedding=_embedding(6))
    assert fast._facts.context_width == 6
    assert all(layer.context_width == 6 for layer in fast._facts.layers)
    # One kept feature plus a context is not the one-input knot form.
    x = torch.randn(4096, 2, dtype=torch.float64)
    with torch.no_grad():
        plan = fast.explain(x, "f", torch.randn(4096, C, dtype=torch.float64))
    assert "cpu_knots" not in plan.layers


#: What sample(n, context) and distribution(context) expect, as their errors say it (C = 3).
SAMPLE_SHAPES = r"shape \(3,\) for one context or \(M, 3\) for M contexts"
BAD_CALLS = [
    (lambda m, x, c: m.f(x), ValueError, r"context is required.*\(23, 3\)"),
    (lambda m, x, c: m.log_prob(x, c[:, :2]), ValueError, r"context must have shape \(23, 3\)"),
    (lambda m, x, c: m.log_prob(x, c[:5]), ValueError, "context must have one row per input row"),
    (lambda m, x, c: m.log_prob(x, c.float()), TypeError, "context has dtype torch.float32"),
    (lambda m, x, c: m.log_prob(x, c.long()), TypeError, "context must have a floating dtype"),
    (lambda m, x, c: m.log_prob(x, c.numpy()), TypeError, "context must be a torch.Tensor"),
    (lambda m, x, c: m.log_prob(x, c.to("meta")), ValueError, "context is on meta"),
    (lambda m, x, c: m.g(x, c[0]), ValueError, r"context must have shape \(23, 3\)"),
    (lambda m, x, c: m.sample(4), ValueError, rf"context is required.*{SAMPLE_SHAPES}"),
    (lambda m, x, c: m.sample(4, c[None]), ValueError, rf"{SAMPLE_SHAPES}, got \(1, 23, 3\)"),
    (lambda m, x, c: m.sample(4, c[0, :2]), ValueError, rf"{SAMPLE_SHAPES}, got \(2,\)"),
    (lambda m, x, c: m.sample(4, c[:, :2]), ValueError, rf"{SAMPLE_SHAPES}, got \(23, 2\)"),
    (lambda m, x, c: m.sample(4, c[0, 0]), ValueError, rf"{SAMPLE_SHAPES}, got \(\)"),
    (lambda m, x, c: m.sample(4, c[0].tolist()), TypeError, f"torch.Tensor of {SAMPLE_SHAPES}"),
    (lambda m, x, c: m.sample(4, c[0].float()), TypeError, "context has dtype torch.float32"),
    (lambda m, x, c: m.distribution(), ValueError, rf"context is required.*{SAMPLE_SHAPES}"),
    (lambda m, x, c: m.distribution(c[0, :2]), ValueError, rf"{SAMPLE_SHAPES}, got \(2,\)"),
    (lambda m, x, c: m.sample(2, c[:0]), ValueError, r"at least one row \(M >= 1\), got \(0, 3\)"),
    (lambda m, x, c: m.distribution(c[0]).sample("x"), TypeError, "sample_shape must be a shape"),
]


@pytest.mark.parametrize("cls", [RealNVP, FastRealNVP])
@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_context_is_named(cls, call, error, message):
    model = cls.standard(D, 2, 8, context=C).double()
    x, c = _inputs()
    with pytest.raises(error, match=message):
        call(model, x, c)


@pytest.mark.parametrize("cls", [RealNVP, FastRealNVP])
def test_context_given_to_an_unconditional_flow(cls):
    model = cls.standard(D, 2, 8).double()
    x, c = _inputs()
    for call in (
        lambda: model.f(x, c),
        lambda: model.log_prob(x, c),
        lambda: model.sample(3, c[0]),
    ):
        with pytest.raises(ValueError, match="context was given, but this flow is unconditional"):
            call()


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"context": 0}, ValueError, "context must be None or an int C >= 1"),
        ({"context": 2.5}, TypeError, "context must be None or an int"),
        ({"embedding": nn.Linear(3, 4)}, ValueError, "embedding needs context=C"),
        ({"context": 3, "embedding": lambda c: c}, TypeError, "embedding must be None or an nn"),
        ({"context": 3, "embedding": nn.Linear(2, 4)}, TypeError, r"embedding must accept a \(N"),
        ({"context": 3, "embedding": nn.Flatten(0)}, ValueError, r"embedding must map \(N, 3\)"),
    ],
)
def test_bad_constructor_options(options, error, message):
    with pytest.raises(error, match=message):
        FastRealNVP.standard(D, 2, 8, **options)


@pytest.mark.parametrize("memory", ["standard", "invertible"])
def test_fused_layer_paths_with_context(backend, one_thread, memory):
    """fused="layer": every layer (and without gradients the whole stack) through the fused
    ops with the context columns, on the PyTorch implementation and the interpreted kernels."""
    ref = RealNVP.standard(4, 3, 16, context=C, embedding=_embedding())
    fast = FastRealNVP.from_reference(ref)
    fast.fused, fast.memory = "layer", memory
    x, c = torch.randn(19, 4), torch.randn(19, C)
    assert set(fast.explain(x.requires_grad_(), "f", c).layers) == {"fused_layer"}
    lp_ref, lp_fast = ref.log_prob(x, c), fast.log_prob(x, c)
    torch.testing.assert_close(lp_fast, lp_ref, rtol=1e-5, atol=1e-5)
    lp_ref.sum().backward()
    lp_fast.sum().backward()
    for p, q in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        x0 = x.detach()
        assert fast.explain(x0, "f", c).stack == "gpu_fused_stack"
        z = ref.f(x0, c)[0]
        torch.testing.assert_close(fast.f(x0, c)[0], z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.g(z, c), x0, rtol=1e-5, atol=1e-5)
        xs, lp = fast.sample_and_log_prob(5, c[:2])
        direct = ref.log_prob(xs.reshape(-1, 4), c[:2].repeat(5, 1)).reshape(5, 2)
        torch.testing.assert_close(lp, direct, rtol=1e-4, atol=1e-4)


def test_distribution_takes_an_int_sample_shape():
    model = RealNVP.standard(D, 2, 8, context=C).double()
    dist = model.distribution(torch.randn(4, C, dtype=torch.float64))
    assert dist.sample(3).shape == (3, 4, D) and dist.rsample(2).shape == (2, 4, D)
    x, log_p = dist.rsample_and_log_prob(5)
    assert x.shape == (5, 4, D) and log_p.shape == (5, 4)
