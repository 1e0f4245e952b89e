"""Interleaved layers (docs/design.md §1.8): ActNorm, BatchNorm, permutations and the LU layer,
alone, composed by hand, and inside RealNVP / FastRealNVP on every executor."""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import pickle

import pytest
import torch

from fastnvp import (
    ActNorm,
    BatchNorm,
    FastRealNVP,
    LULinear,
    Permutation,
    RealNVP,
    SequentialFlow,
)
from fastnvp.core.interleave import NORMS, PERMUTATIONS

OPTIONS = [(n, p) for n, p in itertools.product(NORMS, PERMUTATIONS) if n or p]
F64 = torch.float64


def layer_of(kind: str, dim: int):
    return {
        "actnorm": lambda: ActNorm(dim),
        "batchnorm": lambda: BatchNorm(dim),
        "reverse": lambda: Permutation.reverse(dim),
        "random": lambda: Permutation.random(dim),
        "lu": lambda: LULinear(dim),
    }[kind]().double()


def randomize(module: torch.nn.Module) -> None:
    """Move every parameter and running statistic away from its identity initialization."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)


def row_jacobian_log_det(fn, x: torch.Tensor) -> torch.Tensor:
    """slogdet of the Jacobian of a row map, per row: brute force in float64."""
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda r: fn(r[None])[0], row)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


# ----------------------------------------------------------------------------- single layers
@pytest.mark.parametrize("kind", ["actnorm", "batchnorm", "reverse", "random", "lu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_log_det_is_the_jacobian_and_inverse_is_exact(kind, training):
    layer = layer_of(kind, 5)
    x = torch.randn(9, 5, dtype=F64) * 2 + 1
    layer(x)  # initializes ActNorm, updates BatchNorm's running statistics
    randomize(layer)
    layer.train(training)
    y, log_det = layer(x)
    if kind == "batchnorm" and training:
        # The flow's Jacobian of a row holds the batch's statistics fixed (module docstring).
        mean, var = layer.batch_statistics(x)
        brute = row_jacobian_log_det(lambda r: layer.forward_with(r, mean, var)[0], x)
        torch.testing.assert_close(y, layer.forward_with(x, mean, var)[0])
        back, inv_log_det = layer.inverse_with(y, mean, var)
    else:
        layer.eval()  # one row at a time: BatchNorm needs its running statistics here
        brute = row_jacobian_log_det(lambda r: layer(r)[0], x)
        layer.train(training)
        back, inv_log_det = layer.inverse(y)
    assert log_det.shape == (9,)
    torch.testing.assert_close(log_det, brute, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(back, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(inv_log_det, -log_det)


def test_actnorm_initializes_from_its_first_batch_only():
    layer = ActNorm(4)
    x = torch.randn(500, 4) * torch.tensor([1.0, 5.0, 0.1, 3.0]) + torch.tensor([2.0, -1, 0, 7])
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    assert layer.is_initialized and bool(layer.initialized)
    before = layer.state_dict()
    layer(x * 10)  # no second initialization
    torch.testing.assert_close(layer.state_dict()["log_scale"], before["log_scale"])
    fresh = ActNorm(4)
    fresh.load_state_dict(before)  # a loaded layer is initialized: it never re-initializes
    assert fresh.is_initialized
    torch.testing.assert_close(fresh(x * 10)[0], layer(x * 10)[0])
    untouched = ActNorm(4)
    untouched.inverse(x)  # the inverse never initializes
    assert not untouched.is_initialized


def test_batchnorm_running_statistics_and_eval_independence():
    layer = BatchNorm(3, momentum=0.5)
    x = torch.randn(200, 3) * 2 + 5
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.5 * x.mean(0))
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * x.var(0))
    layer.eval()
    alone = layer(x[:1])[0]
    in_batch = layer(torch.cat([x[:1], 100 * torch.randn(7, 3)]))[0][:1]
    torch.testing.assert_close(alone, in_batch)


def test_lu_layer_starts_orthogonal_and_stays_invertible():
    layer = LULinear(6).double()
    w = layer.weight()
    torch.testing.assert_close(w @ w.t(), torch.eye(6, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        torch.linalg.slogdet(w)[1], layer.log_det_constant(), atol=1e-6, rtol=0
    )
    randomize(layer)
    torch.testing.assert_close(
        torch.linalg.slogdet(layer.weight())[1], layer.log_det_constant(), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Permutation(torch.tensor([0, 0, 1])), "permutation of 0..2"),
        (lambda: Permutation(torch.tensor([0.0, 1.0])), "integer"),
        (lambda: Permutation("ab"), "index must be a 1-D integer tensor.*got str"),
        (lambda: Permutation(None), "index must be a 1-D integer tensor.*got NoneType"),
        (lambda: Permutation([]), "D >= 1, got an empty one"),
        (lambda: Permutation.random(-1), "dim must be an int >= 1, got -1"),
        (lambda: Permutation.random(True), "dim must be an int >= 1, got True"),
        (lambda: Permutation.reverse(0), "dim must be an int >= 1, got 0"),
        (lambda: ActNorm(0), "dim"),
        (lambda: BatchNorm(3, momentum=0.0), "momentum"),
        (lambda: BatchNorm(3, eps=-1.0), "eps"),
        (lambda: RealNVP.standard(3, 2, 8, norm="layernorm"), "norm must be one of"),
        (lambda: FastRealNVP.standard(3, 2, 8, permutation="shuffle"), "permutation must be"),
        (lambda: FastRealNVP.standard(3, 2, 8, permutation=1), "permutation must be None or a str"),
    ],
)
def test_bad_options_raise_naming_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="x must have shape"):
        ActNorm(3)(torch.randn(4, 2))
    # The layers' own dtype, as a flow's (a float16 x gave a float16 log-det next to a
    # float32 y; float64 passed through as float64).
    for layer in (ActNorm(3), BatchNorm(3), LULinear(3)):
        for dtype in (torch.float64, torch.float16):
            name = type(layer).__name__
            with pytest.raises(TypeError, match=f"x has dtype {dtype} but the {name} layer's"):
                layer(torch.randn(4, 3, dtype=dtype))
            with pytest.raises(TypeError, match=f"y has dtype {dtype} but the {name} layer's"):
                layer.inverse(torch.randn(4, 3, dtype=dtype))
    assert Permutation.reverse(3)(torch.randn(4, 3, dtype=torch.float64))[0].dtype == F64
    with pytest.raises(ValueError, match="at least 2 rows for BatchNorm in train mode"):
        BatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2 rows for BatchNorm in train mode"):
        FastRealNVP.standard(3, 2, 8, norm="batchnorm").log_prob(torch.randn(1, 3))
    with pytest.raises(ValueError, match="same D"):
        SequentialFlow(ActNorm(3), ActNorm(4))
    with pytest.raises(TypeError, match="dim"):
        SequentialFlow(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="context must be None"):
        SequentialFlow(ActNorm(3)).log_prob(torch.randn(2, 3), torch.randn(2, 1))


# ----------------------------------------------------------------------------- whole flows
def flow_pair(norm, perm, dim=4, layers=3, hidden=12, context=None, **options):
    torch.manual_seed(0)
    ref = RealNVP.standard(dim, layers, hidden, norm=norm, permutation=perm, context=context)
    ref = ref.double()
    fast = FastRealNVP.standard(
        dim, layers, hidden, norm=norm, permutation=perm, context=context, **options
    ).double()
    x = torch.randn(64, dim, dtype=F64) * 3 + 1
    c = None if context is None else torch.randn(64, context, dtype=F64)
    ref.log_prob(x, c)  # ActNorm's data-dependent initialization, BatchNorm statistics
    for module in (*(ref.norms or []), *(ref.permutations or [])):
        randomize(module)
    fast.load_state_dict(ref.state_dict())
    return ref, fast, x, c


@pytest.mark.parametrize("norm, perm", OPTIONS)
def test_flow_log_det_is_the_jacobian(norm, perm):
    ref, _, x, _ = flow_pair(norm, perm)
    ref.eval()
    rows = x[:6]
    _, log_det = ref.f(rows)
    torch.testing.assert_close(log_det, row_jacobian_log_det(lambda r: ref.f(r)[0], rows))
    if norm == "batchnorm":
        # Train mode is eval mode with the batch's statistics as the running ones.
        ref.train()
        stats = []
        hooks = [
            bn.register_forward_pre_hook(lambda m, a: stats.append(m.batch_statistics(a[0])))
            for bn in ref.norms
        ]
        _, train_log_det = ref.f(x)
        for hook in hooks:
            hook.remove()
        for bn, (mean, var) in zip(ref.norms, stats):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        ref.eval()
        torch.testing.assert_close(train_log_det, ref.f(x)[1])
        torch.testing.assert_close(
            train_log_det[:4], row_jacobian_log_det(lambda r: ref.f(r)[0], x[:4])
        )


@pytest.mark.parametrize("norm, perm", OPTIONS)
@pytest.mark.parametrize(
    "options",
    [{}, {"memory": "invertible", "anchor_every": 2}, {"fused": "layer"}, {"knot_tables": False}],
    ids=["gemm", "invertible", "fused", "no-knots"],
)
def test_fast_equals_reference_in_train_and_eval(norm, perm, options):
    """Outputs, every gradient and the running statistics, on the plan each call takes."""
    ref, fast, x, _ = flow_pair(norm, perm, **options)
    for training in (True, False):
        ref.train(training)
        fast.train(training)
        lp_ref, lp_fast = ref.log_prob(x), fast.log_prob(x)
        torch.testing.assert_close(lp_fast, lp_ref, atol=1e-10, rtol=1e-10)
        names = [n for n, _ in ref.named_parameters()]
        g_ref = torch.autograd.grad(lp_ref.sum(), list(ref.parameters()))
        params = dict(fast.named_parameters())
        g_fast = torch.autograd.grad(lp_fast.sum(), [params[n] for n in names])
        # The fused layer's backward recomputes gs from its output, g2 (y2 - t), which cancels
        # (docs/design.md §1.5): float64 agreement to ~1e-9 there, ~1e-13 elsewhere.
        tol = 1e-7 if options.get("fused") == "layer" else 1e-9
        for name, a, b in zip(names, g_ref, g_fast):
            scale = max(1.0, a.abs().max().item())  # relative to the gradient's magnitude
            assert (a - b).abs().max().item() <= tol * scale, name
        mine = dict(fast.named_buffers())
        for name, buffer in ref.named_buffers():
            torch.testing.assert_close(mine[name], buffer, msg=name)
        with torch.no_grad():
            z = torch.randn(9, 4, dtype=F64)
            torch.testing.assert_close(fast.g(z), ref.g(z), atol=1e-10, rtol=1e-10)
            # the walks without a gradient (in place, in the walk's own buffers) as well,
            # leaving their inputs as they were
            x_before, z_before = x.clone(), z.clone()
            for got, want in zip(fast.f(x), ref.f(x), strict=True):
                torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
            for got, want in zip(fast.inverse(z), ref.inverse(z), strict=True):
                torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
            assert torch.equal(x, x_before) and torch.equal(z, z_before)
            if not options:  # from a pack's second call the GEMM stack's inference operands
                assert fast._gemm_pack[1].inference


@pytest.mark.parametrize("norm, perm", OPTIONS)
def test_round_trip_and_every_parameter_learns(norm, perm):
    _, fast, x, _ = flow_pair(norm, perm)
    fast.eval()
    z, log_det = fast.f(x)
    back, inv_log_det = fast.inverse(z)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(inv_log_det, -log_det, atol=1e-10, rtol=1e-10)
    fast.train()
    fast.log_prob(x).sum().backward()
    # Under BatchNorm in train mode, the T net's output bias of every coupling but the last
    # is a per-column shift that the next BatchNorm takes out again (its batch mean): its
    # exact gradient is 0 (the reference's reads a few ulp), every other parameter learns.
    shift_invariant = (
        {f"t.{i}.4.bias" for i in range(fast.num_layers - 1)} if norm == "batchnorm" else set()
    )
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        if name in shift_invariant:
            assert bool(p.grad.abs().max() <= 1e-12), name
        else:
            assert bool(p.grad.abs().sum() > 0), name


@pytest.mark.parametrize("norm, perm", [("actnorm", "lu"), ("batchnorm", "random")])
@pytest.mark.parametrize("memory", ["standard", "invertible"])
def test_gemm_stack_gradcheck(norm, perm, memory):
    _, fast, x, _ = flow_pair(norm, perm, dim=4, layers=2, hidden=4, memory=memory)
    assert fast.explain(x).stack == "cpu_gemm_stack"
    params = [p for p in fast.parameters()]

    def fn(x_in, *weights):
        return fast.log_prob(x_in)

    x_in = x[:5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x_in, *params), eps=1e-6, atol=1e-5)


def test_lu_weights_node_matches_the_layers_and_passes_gradcheck():
    """The engine's one-node W of all LU layers and their log-det equal each layer's own
    ``weight()``, ``factors()`` and ``log_det_constant()``, and its hand-written backward
    passes gradcheck in float64."""
    from fastnvp.core.mixing import LULinear
    from fastnvp.engine.interleaved import _lu_weights

    torch.manual_seed(3)
    layers = [LULinear(5).double() for _ in range(3)]
    with torch.no_grad():  # off the orthogonal start, with both signs on the diagonal
        for m in layers:
            m.lower.add_(0.3 * torch.randn_like(m.lower))
            m.upper.add_(0.3 * torch.randn_like(m.upper))
            m.log_abs_diag.add_(0.2 * torch.randn_like(m.log_abs_diag))
    layers[1].sign[1] = -layers[1].sign[1]
    weight, log_det, (lower, upper, _) = _lu_weights(layers)
    want = sum(m.log_det_constant() for m in layers)
    torch.testing.assert_close(log_det, want, rtol=1e-13, atol=1e-13)
    for k, m in enumerate(layers):
        torch.testing.assert_close(weight[k], m.weight(), rtol=1e-13, atol=1e-13)
        m_lower, m_upper = m.factors()
        torch.testing.assert_close(lower[k], m_lower, rtol=0, atol=0)
        torch.testing.assert_close(upper[k], m_upper, rtol=0, atol=0)
    params = [p for m in layers for p in (m.lower, m.upper, m.log_abs_diag)]

    def weights(*_):
        weight, log_det, _ = _lu_weights(layers)
        return weight, log_det

    assert torch.autograd.gradcheck(weights, params, eps=1e-6, atol=1e-8)


def test_conditional_flow_with_interleaved_layers():
    ref, fast, x, c = flow_pair("batchnorm", "lu", context=2)
    for training in (True, False):
        ref.train(training)
        fast.train(training)
        torch.testing.assert_close(fast.log_prob(x, c), ref.log_prob(x, c))
    samples, log_p = fast.sample_and_log_prob(5, c[:3])
    assert samples.shape == (5, 3, 4)
    torch.testing.assert_close(
        log_p.reshape(-1), fast.log_prob(samples.reshape(-1, 4), c[:3].repeat(5, 1))
    )


def test_without_options_the_flow_and_its_state_dict_are_unchanged():
    torch.manual_seed(0)
    plain = FastRealNVP.standard(4, 3, 8)
    torch.manual_seed(0)
    explicit = FastRealNVP.standard(4, 3, 8, norm=None, permutation=None)
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert not any(k.startswith(("norms", "permutations")) for k in plain.state_dict())
    assert plain.norms is None and plain.permutations is None
    x = torch.randn(10, 4)
    torch.testing.assert_close(plain.log_prob(x), explicit.log_prob(x))


def test_with_a_permutation_every_coupling_keeps_the_first_half():
    """The mixing layer alternates the halves (Glow); alternating masks would undo a reversal."""
    for perm in ("reverse", "random", "lu"):
        model = RealNVP.standard(5, 3, 8, permutation=perm)
        assert torch.equal(model.mask, torch.tensor([[1.0, 1, 1, 0, 0]] * 3))
    assert torch.equal(RealNVP.standard(4, 2, 8, norm="actnorm").mask[:, 0], torch.tensor([0.0, 1]))
    # reverse + half masks: each feature is transformed in every other layer
    model = RealNVP.standard(4, 2, 8, permutation="reverse")
    x = torch.randn(6, 4)
    h, _ = model.permutations[0](x)
    assert torch.equal(h[:, :2], x[:, [3, 2]])  # layer 0 keeps the last two features


def test_state_dict_keys_are_stable():
    keys = set(FastRealNVP.standard(4, 2, 8, norm="actnorm", permutation="lu").state_dict())
    for i in range(2):
        assert {f"norms.{i}.{k}" for k in ("log_scale", "shift", "initialized")} <= keys
        lu = ("lower", "upper", "log_abs_diag", "row_order", "sign")
        assert {f"permutations.{i}.{k}" for k in lu} <= keys
    keys = set(RealNVP.standard(4, 2, 8, norm="batchnorm", permutation="random").state_dict())
    bn = ("log_gamma", "beta", "running_mean", "running_var")
    assert {f"norms.1.{k}" for k in bn} | {"permutations.1.index"} <= keys
    # a random permutation is part of the state: a reloaded model has the same one
    torch.manual_seed(1)
    a = RealNVP.standard(5, 2, 8, permutation="random")
    torch.manual_seed(2)
    b = RealNVP.standard(5, 2, 8, permutation="random")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.permutations[0].index, b.permutations[0].index)
    assert torch.equal(b.permutations[0].inverse_index, torch.argsort(a.permutations[0].index))


def test_from_reference_copies_the_interleaved_layers():
    ref, _, x, _ = flow_pair("actnorm", "random")
    fast = FastRealNVP.from_reference(ref)
    assert fast.norm == "actnorm" and fast.permutation == "random"
    torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x))


def test_plans_say_why():
    model = FastRealNVP.standard(4, 3, 16, norm="actnorm", permutation="reverse")
    x = torch.randn(4096, 4)
    assert "ActNorm layers initialize" in model.explain(x).reason
    model(x)
    plan = model.explain(x)
    assert plan.stack == "cpu_gemm_stack"
    assert "with actnorm + permutation layers inside the stack" in plan.reason
    assert "inside the stack" not in FastRealNVP.standard(4, 3, 16).explain(x).reason
    lu = FastRealNVP.standard(4, 3, 16, norm="batchnorm", permutation="lu")
    assert "batchnorm (batch statistics) + lu layers inside" in lu.explain(x).reason
    with torch.no_grad():
        assert "batchnorm (running statistics)" in lu.eval().explain(x).reason
    bn = FastRealNVP.standard(4, 3, 16, norm="batchnorm", knot_tables=True)
    bn.policy = type(bn.policy)(gemm_stack=False)
    plan = bn.explain(x)
    assert plan.stack != "rows_parallel" and "whole batch's statistics" in plan.reason
    fused = FastRealNVP.standard(4, 3, 16, norm="batchnorm", fused="layer").eval()
    with torch.no_grad():
        assert "folds only fixed permutations" in fused.explain(x).reason
    folded = FastRealNVP.standard(4, 3, 16, permutation="random", fused="layer")
    with torch.no_grad():
        plan = folded.explain(x)
    assert plan.stack == "gpu_fused_stack" and "folded" in plan.reason


@pytest.mark.parametrize("norm, perm", [("actnorm", "lu"), ("batchnorm", "random")])
def test_copies_and_pickles(norm, perm):
    _, fast, x, _ = flow_pair(norm, perm)
    fast.eval()
    expected = fast.log_prob(x)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for clone in (
        copy.deepcopy(fast),
        pickle.loads(pickle.dumps(fast)),
        torch.load(buffer, weights_only=False),
    ):
        torch.testing.assert_close(clone.log_prob(x), expected)
        if norm == "actnorm":
            assert all(layer.is_initialized for layer in clone.norms)


# ----------------------------------------------------------------------------- by hand
def test_sequential_flow_composes_in_the_given_order():
    torch.manual_seed(0)
    members = [
        ActNorm(4),
        FastRealNVP.standard(4, 2, 8),
        LULinear(4),
        Permutation.reverse(4),
        RealNVP.standard(4, 2, 8),
        BatchNorm(4),
    ]
    flow = SequentialFlow(*members).double()
    x = torch.randn(32, 4, dtype=F64)
    z, log_det = flow.f(x)
    h, total = x, torch.zeros(32, dtype=F64)
    for layer in flow.layers:
        h, ld = layer(h)
        total = total + ld
    torch.testing.assert_close(z, h)
    torch.testing.assert_close(log_det, total)
    flow.eval()
    z, log_det = flow.f(x)
    torch.testing.assert_close(flow.g(z), x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(log_det[:3], row_jacobian_log_det(lambda r: flow.f(r)[0], x[:3]))
    assert flow.sample(7).shape == (7, 4)
    assert flow.log_prob(x).shape == (32,)


def test_sequential_flow_passes_the_context_to_conditional_members():
    torch.manual_seed(0)
    cond = FastRealNVP.standard(3, 2, 8, context=2)
    flow = SequentialFlow(ActNorm(3), cond, LULinear(3))
    x, c = torch.randn(16, 3), torch.randn(16, 2)
    flow(x, c)
    z, ld = flow.f(x, c)
    torch.testing.assert_close(flow.g(z, c), x, atol=1e-5, rtol=1e-5)
    assert flow.sample(4, c[:5]).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(x)


def test_sequential_flow_samples_with_log_density_in_one_pass():
    """``sample_and_log_prob`` takes the log-density from the members' inverses; it equals
    ``log_prob`` of the samples (no forward run), unconditional and per context row; and
    ``distribution`` follows torch.distributions as the coupling flows' does."""
    torch.manual_seed(0)
    members = [ActNorm(3), FastRealNVP.standard(3, 2, 8, context=2), LULinear(3)]
    flow = SequentialFlow(*members, BatchNorm(3)).double()
    c = torch.randn(16, 2, dtype=F64)
    flow.f(torch.randn(16, 3, dtype=F64), c)  # ActNorm initializes; then eval mode
    flow.eval()
    samples, log_p = flow.sample_and_log_prob(5, c[:4])
    assert samples.shape == (5, 4, 3) and log_p.shape == (5, 4)
    again = flow.log_prob(samples.reshape(-1, 3), c[:4].repeat(5, 1)).reshape(5, 4)
    torch.testing.assert_close(log_p, again, rtol=1e-10, atol=1e-10)
    one, log_one = flow.sample_and_log_prob(6, c[0])
    assert one.shape == (6, 3) and log_one.shape == (6,)
    torch.testing.assert_close(log_one, flow.log_prob(one, c[0].expand(6, 2)))
    dist = flow.distribution(c[:4])
    assert dist.batch_shape == (4,) and dist.event_shape == (3,)
    x, lp = dist.rsample_and_log_prob((2,))
    torch.testing.assert_close(lp, dist.log_prob(x), rtol=1e-10, atol=1e-10)
    plain = SequentialFlow(ActNorm(3), LULinear(3), Permutation.reverse(3)).double()
    plain.f(torch.randn(16, 3, dtype=F64))  # ActNorm initializes on its first f call
    x, lp = plain.sample_and_log_prob(7)
    assert x.shape == (7, 3)
    torch.testing.assert_close(lp, plain.log_prob(x), rtol=1e-10, atol=1e-10)
    assert plain.distribution().sample((2, 5)).shape == (2, 5, 3)
    with pytest.raises(ValueError, match="context"):
        plain.sample_and_log_prob(3, c[0])


# ----------------------------------------------------------------------------- deep stacks
def test_two_hundred_layers_with_actnorm_train_without_nan():
    torch.manual_seed(0)
    model = FastRealNVP.standard(2, 200, 16, norm="actnorm", permutation="reverse")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(128, 2) * torch.tensor([3.0, 0.2])
    for _ in range(3):
        opt.zero_grad()
        loss = -model.log_prob(x).mean()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("norm, perm", [("actnorm", "reverse"), ("batchnorm", "lu")])
def test_knot_layers_with_interleaved_layers_without_a_gradient(norm, perm):
    """D = 2: the couplings take the knot pieces and the layer loop runs the interleaved
    layers in the engine's forms; outputs, log-dets and running statistics match the reference."""
    ref, fast, _, _ = flow_pair(norm, perm, dim=2, layers=4, hidden=64)
    # The pieces at once and at any batch (built now, not after the rows that pay for them).
    fast.policy = dataclasses.replace(fast.policy, pieces_build_rows=0, pieces_min_work=0)
    x = torch.randn(300, 2, dtype=F64)
    for training in (True, False):
        ref.train(training)
        fast.train(training)
        with torch.no_grad():
            assert all(p == "cpu_knots" for p in fast.explain(x).layers)
            torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x))
            z = torch.randn(50, 2, dtype=F64)
            torch.testing.assert_close(fast.inverse(z)[0], ref.inverse(z)[0])
            torch.testing.assert_close(fast.inverse(z)[1], ref.inverse(z)[1])
        mine = dict(fast.named_buffers())
        for name, buffer in ref.named_buffers():
            torch.testing.assert_close(mine[name], buffer, msg=name)


@pytest.mark.parametrize(
    "norm, perm", [(None, "random"), ("actnorm", "lu"), ("batchnorm", "reverse")]
)
def test_fused_path_with_interleaved_layers(backend, norm, perm):
    """fused="layer" in float32 on both backends (the kernels through the interpreter): folded
    permutations in the whole-stack launch, norms and LU between fused layers; vs float64."""
    torch.manual_seed(0)
    ref = RealNVP.standard(4, 2, 16, norm=norm, permutation=perm)
    x = torch.randn(24, 4)
    ref(x)
    fast = FastRealNVP.standard(4, 2, 16, norm=norm, permutation=perm, fused="layer")
    fast.load_state_dict(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()
    lp = fast.log_prob(x)
    lp64 = ref64.log_prob(x.double())
    torch.testing.assert_close(lp.double(), lp64, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(lp.sum(), list(fast.parameters()))
    grads64 = torch.autograd.grad(lp64.sum(), list(ref64.parameters()))
    scale = max(g.abs().max() for g in grads64)
    assert max((a.double() - b).abs().max() for a, b in zip(grads, grads64)) <= 1e-4 * scale
    fast.eval()
    ref64.eval()
    with torch.no_grad():
        plan = fast.explain(x)
        assert plan.stack == ("gpu_fused_stack" if norm is None else "layers"), plan
        torch.testing.assert_close(
            fast.f(x)[0].double(), ref64.f(x.double())[0], atol=1e-4, rtol=1e-4
        )
        z = torch.randn(24, 4)
        torch.testing.assert_close(fast.g(z).double(), ref64.g(z.double()), atol=1e-4, rtol=1e-4)


def test_each_batchnorm_layer_follows_its_own_mode():
    """A partly frozen flow (some BatchNorm layers in eval mode) computes what the reference
    computes: the mixed modes run as modules."""
    ref, fast, x, _ = flow_pair("batchnorm", "lu")
    for model in (ref, fast):
        model.train()
        model.norms[1].eval()
    assert "mix train and eval" in fast.explain(x).reason
    torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x))
    for model in (ref, fast):
        model.eval()
        model.norms[0].train()
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x))
    mine = dict(fast.named_buffers())
    for name, buffer in ref.named_buffers():
        torch.testing.assert_close(mine[name], buffer, msg=name)


@pytest.mark.parametrize("grad", [True, False])
def test_one_row_in_train_mode_names_the_problem_on_every_path(grad):
    model = FastRealNVP.standard(4, 2, 16, norm="batchnorm")
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="at least 2 rows"):
        model.f(torch.randn(1, 4))
    model.eval()
    assert model.f(torch.randn(1, 4))[0].shape == (1, 4)


def test_sequential_flow_checks_its_generator_and_samples_with_permutations_only():
    flow = SequentialFlow(Permutation.reverse(3), Permutation.random(3))
    assert flow.sample(5).dtype == torch.get_default_dtype()
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        flow.sample(2, generator=5)


def test_a_loaded_permutation_must_be_one():
    layer = Permutation.reverse(3)
    with pytest.raises(ValueError, match="index must be a permutation"):
        layer.load_state_dict({"index": torch.tensor([0, 0, 2])})


def test_a_reversal_is_applied_by_flip_and_a_loaded_index_replaces_it():
    """A reversal takes ``flip`` (module and engine); loading another index turns that off."""
    torch.manual_seed(3)
    x = torch.randn(6, 5)
    layer = Permutation.reverse(5)
    assert layer.is_reversal
    assert not Permutation(torch.tensor([1, 0, 2, 3, 4])).is_reversal
    assert torch.equal(layer(x)[0], x[:, [4, 3, 2, 1, 0]])
    other = torch.tensor([2, 0, 4, 1, 3])
    layer.load_state_dict({"index": other})
    assert not layer.is_reversal
    assert torch.equal(layer(x)[0], x[:, other])
    assert torch.equal(layer.inverse(layer(x)[0])[0], x)
    back = torch.arange(4, -1, -1)
    layer.load_state_dict({"index": back})
    assert layer.is_reversal and torch.equal(layer.inverse(x)[0], x[:, back])
    # The engine's stacks read the same fact per layer, in both directions and in backward.
    flow = FastRealNVP.standard(5, 3, 8, permutation="reverse")
    reference = RealNVP.standard(5, 3, 8, permutation="reverse")
    reference.load_state_dict(flow.state_dict())
    xg = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(flow.log_prob(xg), reference.log_prob(xr))
    flow.log_prob(xg).sum().backward()
    reference.log_prob(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    with torch.no_grad():
        torch.testing.assert_close(flow.g(x), reference.g(x))


def test_the_whole_stack_launch_refuses_norm_layers():
    from fastnvp.engine.gpu import fused as gpu_fused

    model = FastRealNVP.standard(4, 2, 16, norm="actnorm", fused="layer").eval()
    model(torch.randn(8, 4))
    with torch.no_grad(), pytest.raises(ValueError, match="folds only fixed permutations"):
        gpu_fused.model_stack(model, torch.randn(8, 4), inverse=False)


def test_lu_inverse_of_the_engine_uses_the_factors():
    from fastnvp.engine import interleaved

    torch.manual_seed(0)
    model = RealNVP.standard(6, 3, 8, permutation="lu").double()
    for layer in model.permutations:
        randomize(layer)
    with torch.no_grad():
        forms = interleaved.prepare(model, "g", batch_stats=False)
        for i, layer in enumerate(model.permutations):
            eye = torch.eye(6, dtype=F64)
            torch.testing.assert_close(forms.inverse_weights()[i] @ layer.weight(), eye)


@pytest.mark.parametrize("perm", ["random", "lu"])
def test_mixing_buffers_kept_between_calls_follow_a_loaded_state(perm):
    """A state loaded in place into the mixing layers reaches calls with a gradient: the
    permutation steps read the layers' own buffers, and the LU row orders and signs the engine
    keeps between such calls are replaced."""
    torch.manual_seed(0)
    fast = FastRealNVP.standard(6, 3, 8, permutation=perm).double()
    x = torch.randn(16, 6, dtype=F64)
    fast.log_prob(x).sum().backward()  # builds and keeps the LU rows
    if perm == "lu":
        kept = fast._mixing_cache[1]
        assert fast.log_prob(x) is not None and fast._mixing_cache[1] is kept  # reused
    torch.manual_seed(1)
    other = RealNVP.standard(6, 3, 8, permutation=perm).double()
    for layer in other.permutations:
        randomize(layer)
    if perm == "lu":  # another row order and other signs than fast's
        with torch.no_grad():
            for layer in other.permutations:
                layer.row_order.copy_(layer.row_order.roll(1))
                layer.sign.neg_()
    fast.load_state_dict(other.state_dict())
    fast.zero_grad(set_to_none=True)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(fast.log_prob(xf), other.log_prob(xr))
    if perm == "lu":
        assert fast._mixing_cache[1] is not kept
    fast.log_prob(xf).sum().backward()
    other.log_prob(xr).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad)
    for p_fast, p_other in zip(fast.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_other.grad)
