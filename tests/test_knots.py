"""The knot form of single-input conditioner layers (fastnvp.engine.cpu.knots) against float64
oracles."""

import copy

import pytest
import torch

from fastnvp.core.conditioner import match_standard_mlp, standard_net
from fastnvp.core.reference import RealNVP
from fastnvp.engine import plan
from fastnvp.engine.cpu import knots
from fastnvp.engine.cpu import threads as cpu_threads
from fastnvp.flows.fast_realnvp import FastRealNVP

ROWS = 64  # a batch size for the flow-level tests
KEPT = torch.tensor([0])
TRANSFORMED = torch.tensor([1])


def _net(hidden, slope, tanh, dtype=torch.float64, dead_units=True):
    """A D = 2 standard net with some awkward first-layer units: w1 = 0 with b1 of either sign
    (no knot), and two units sharing one knot."""
    net = standard_net(2, hidden, tanh=tanh, negative_slope=slope).to(dtype)
    with torch.no_grad():
        net[0].weight.mul_(3)
        if dead_units and hidden >= 4:
            net[0].weight[0, 0] = 0.0
            net[0].bias[0] = 0.7
            net[0].weight[1, 0] = 0.0
            net[0].bias[1] = -0.4
            net[0].weight[3, 0] = 2 * net[0].weight[2, 0]
            net[0].bias[3] = 2 * net[0].bias[2]
    return net


def _oracle(net, x1):
    """The module itself on (x1, 0) in float64, transformed column only."""
    double = copy.deepcopy(net).double()
    with torch.no_grad():
        x = torch.cat((x1.double(), torch.zeros_like(x1, dtype=torch.float64)), dim=1)
        return double(x)[:, 1:]


def _inputs(rows, net, dtype=torch.float64):
    x1 = torch.randn(rows, 1, dtype=dtype) * 4
    w1, b1 = net[0].weight[:, 0].detach(), net[0].bias.detach()
    on_knots = (-b1 / w1)[w1 != 0][: rows // 3]
    x1[: on_knots.numel(), 0] = on_knots.to(dtype)  # exactly on a knot: both sides agree
    if rows > 4:
        x1[-1, 0] = 1e4
        x1[-2, 0] = -1e4
    return x1


@pytest.mark.parametrize("hidden", [1, 5, 33])
@pytest.mark.parametrize("slope", [0.01, 0.0, -0.3, 1.7])
@pytest.mark.parametrize("rows,tile", [(1, 4), (7, 4), (300, 64)])
def test_pair_matches_modules_float64(hidden, slope, rows, tile):
    s_net, t_net = _net(hidden, slope, True), _net(hidden, slope, False)
    x1 = _inputs(rows, s_net)
    with torch.no_grad():
        tables = [knots.build(match_standard_mlp(n, 2), KEPT, TRANSFORMED) for n in (s_net, t_net)]
        s, t = knots.evaluate_pair(*tables, x1, tile_rows=tile)
    for got, net in ((s, s_net), (t, t_net)):
        want = _oracle(net, x1)
        scale = want.abs().max().clamp_min(1.0)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-12 * scale


def test_pair_float32_is_as_accurate_as_the_gemm_form():
    torch.manual_seed(3)
    s_net, t_net = _net(256, 0.01, True, torch.float32), _net(256, 0.01, False, torch.float32)
    x1 = torch.randn(2000, 1) * 3
    with torch.no_grad():
        tables = [knots.build(match_standard_mlp(n, 2), KEPT, TRANSFORMED) for n in (s_net, t_net)]
        s, t = knots.evaluate_pair(*tables, x1)
        gemm_t = t_net(torch.cat((x1, torch.zeros_like(x1)), 1))[:, 1:]
    want_t = _oracle(t_net, x1)
    knot_error = (t.double() - want_t).abs().max()
    gemm_error = (gemm_t.double() - want_t).abs().max()
    assert knot_error <= 2 * gemm_error + 1e-7 * want_t.abs().max()
    assert (s.double() - _oracle(s_net, x1)).abs().max() <= 1e-5


def test_non_finite_inputs_and_weights_propagate():
    s_net, t_net = _net(8, 0.01, True), _net(8, 0.01, False)
    x1 = torch.randn(6, 1, dtype=torch.float64)
    x1[2, 0] = float("nan")
    with torch.no_grad():
        tables = [knots.build(match_standard_mlp(n, 2), KEPT, TRANSFORMED) for n in (s_net, t_net)]
        s, t = knots.evaluate_pair(*tables, x1)
    assert torch.isnan(s[2]).all() and torch.isnan(t[2]).all()
    assert torch.isfinite(s[[0, 1, 3, 4, 5]]).all()
    with torch.no_grad():
        t_net[2].weight[0, 5] = float("nan")
        tables = [knots.build(match_standard_mlp(n, 2), KEPT, TRANSFORMED) for n in (s_net, t_net)]
        _, t = knots.evaluate_pair(*tables, torch.randn(5, 1, dtype=torch.float64))
    assert torch.isnan(t).all()


@pytest.mark.parametrize("slope", [0.01, -0.3])
def test_evaluate_pair_gradcheck(slope):
    torch.manual_seed(0)
    s_net, t_net = _net(6, slope, True), _net(6, slope, False)
    with torch.no_grad():
        tables = [knots.build(match_standard_mlp(n, 2), KEPT, TRANSFORMED) for n in (s_net, t_net)]
    leaves = [
        p.detach().clone().requires_grad_() for tab in tables for p in (tab.table, tab.w3, tab.b3)
    ]
    x1 = torch.randn(9, 1, dtype=torch.float64, requires_grad=True)

    def fn(x1, s_table, s_w3, s_b3, t_table, t_w3, t_b3):
        s_tab = tables[0]._replace(table=s_table, w3=s_w3, b3=s_b3)
        t_tab = tables[1]._replace(table=t_table, w3=t_w3, b3=t_b3)
        return knots.evaluate_pair(s_tab, t_tab, x1, tile_rows=4)

    assert torch.autograd.gradcheck(fn, (x1, *leaves))


def test_build_many_matches_build_on_two_threads(two_threads):
    torch.manual_seed(2)
    nets = [match_standard_mlp(_net(7, 0.01, tanh), 2) for tanh in (True, False, True, False)]
    many = knots.build_many([(mlp, KEPT, TRANSFORMED) for mlp in nets])
    single = [knots.build(mlp, KEPT, TRANSFORMED) for mlp in nets]
    grads = []
    for tables in (many, single):
        loss = sum(
            (t.table * torch.linspace(-1, 1, t.table.numel()).view_as(t.table)).sum()
            for t in tables
        )
        params = [p for mlp in nets for lin in (mlp.lin1, mlp.lin2) for p in lin.parameters()]
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(many, single, strict=True):
        assert torch.equal(a.knots, b.knots) and torch.equal(a.table, b.table)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one LeakyReLU slope"):
        knots.build_many(
            [
                (nets[0], KEPT, TRANSFORMED),
                (match_standard_mlp(_net(7, 0.2, 0), 2), KEPT, TRANSFORMED),
            ]
        )


@pytest.mark.parametrize("slope", [0.01, 0.2])
def test_build_gradcheck(slope):
    torch.manual_seed(1)
    net = _net(5, slope, False, dead_units=False)
    w1 = net[0].weight[:, 0].detach().clone().requires_grad_()
    b1 = net[0].bias.detach().clone().requires_grad_()
    w2 = net[2].weight.detach().clone().requires_grad_()
    b2 = net[2].bias.detach().clone().requires_grad_()

    def fn(w1, b1, w2, b2):
        return knots._BuildTable.apply(w1, b1, w2, b2, slope)[1]

    assert torch.autograd.gradcheck(fn, (w1, b1, w2, b2))


def _always_knots(monkeypatch):
    """Models built after this take the knot form at every width and batch, also under autograd
    (where the plan otherwise prefers the GEMM stack)."""
    policy = plan.Policy(
        knot_min_hidden=1,
        knot_min_work_grad=1,
        pieces_min_hidden=1,
        pieces_min_work=1,
        pieces_build_rows=0,
        gemm_stack=False,
    )
    monkeypatch.setattr(plan, "DEFAULT_POLICY", policy)


def _flows(dim, layers, hidden, **options):
    torch.manual_seed(0)
    ref = RealNVP.standard(dim, layers, hidden=hidden).double()
    fast = FastRealNVP.from_reference(ref)
    for key, value in options.items():
        setattr(fast, key, value)
    return ref, fast


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_flow_matches_reference_float64(dim, threads, monkeypatch, one_thread):
    """Outputs and every gradient, including the row split across threads."""
    _always_knots(monkeypatch)
    monkeypatch.setattr(knots, "MIN_ROWS_PER_THREAD", 8)
    torch.set_num_threads(threads)
    splits = []
    real = cpu_threads.on_threads
    monkeypatch.setattr(
        cpu_threads, "on_threads", lambda task, n: splits.append(n) or real(task, n)
    )
    ref, fast = _flows(dim, 4, 16)
    x = torch.randn(37, dim, dtype=torch.float64) * 2
    z_ref, ld_ref = ref.f(x)
    z, ld = fast.f(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(fast.g(z_ref), x, rtol=1e-12, atol=1e-12)
    grads = []
    for model in (ref, fast):
        xx = x.clone().requires_grad_()
        loss = -model.log_prob(xx).mean()
        grads.append(torch.autograd.grad(loss, [xx, *model.parameters()]))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (set(splits) == {2}) if threads == 2 else not splits  # rows split across threads


def test_invertible_memory_mode_matches_standard(monkeypatch, one_thread):
    _always_knots(monkeypatch)
    _, fast = _flows(2, 6, 16)
    x = torch.randn(40, 2, dtype=torch.float64)
    grads = {}
    for memory in ("standard", "invertible"):
        fast.memory = memory
        fast.zero_grad()
        (-fast.log_prob(x).mean()).backward()
        grads[memory] = [p.grad.clone() for p in fast.parameters()]
    for got, want in zip(grads["invertible"], grads["standard"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_partly_frozen_weights_keep_their_gradients(monkeypatch, one_thread):
    """Freezing some weights (here every H x H Linear) must not switch to the piece form,
    which has no autograd: the other weights still get the reference's gradients."""
    _always_knots(monkeypatch)
    ref, fast = _flows(2, 3, 8)
    for model in (ref, fast):
        for nets in (model.s, model.t):
            for net in nets:
                net[2].weight.requires_grad_(False)
    x = torch.randn(ROWS, 2, dtype=torch.float64)
    grads = []
    for model in (ref, fast):
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(model.log_prob(x).sum(), params))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_flow_gradcheck_through_tables(monkeypatch):
    _always_knots(monkeypatch)
    _, fast = _flows(2, 2, 4)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fast.log_prob(x), (x,))


def _count_builds(monkeypatch):
    """Record each table build: "intervals" per net, "pieces" per layer."""
    calls = []
    real_build, real_many, real_pieces = knots.build, knots.build_many, knots.build_pieces

    def build(*args):
        calls.append("intervals")
        return real_build(*args)

    def build_many(nets):
        calls.extend(["intervals"] * len(nets))
        return real_many(nets)

    def build_pieces(*args):
        calls.append("pieces")
        return real_pieces(*args)

    monkeypatch.setattr(knots, "build", build)
    monkeypatch.setattr(knots, "build_many", build_many)
    monkeypatch.setattr(knots, "build_pieces", build_pieces)
    return calls


def test_knot_tables_off_and_small_training_batches_use_the_gemm_path(monkeypatch):
    policy = plan.Policy(
        knot_min_hidden=1,
        knot_min_work_grad=ROWS * 8 * 8,
        pieces_min_hidden=1,
        pieces_min_work=1,
        pieces_build_rows=0,
        gemm_stack=False,
    )
    monkeypatch.setattr(plan, "DEFAULT_POLICY", policy)
    calls = _count_builds(monkeypatch)
    ref, fast = _flows(2, 3, 8, knot_tables=False)
    x = torch.randn(ROWS, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x))
    fast.log_prob(x).sum().backward()
    assert not calls
    fast.knot_tables = True
    fast.log_prob(x[: ROWS - 1]).sum().backward()
    assert not calls
    fast.log_prob(x).sum().backward()
    assert calls == ["intervals"] * 6
    with torch.no_grad():
        fast.log_prob(x[:1])
    assert calls[6:] == ["pieces"] * 3


def test_pieces_are_built_once_the_work_at_these_parameters_pays(monkeypatch):
    """Rent, then buy (FastRealNVP._pieces_ready): calls without a gradient at new parameters
    run the GEMM stack until the rows they ran reach Policy.pieces_build_rows,
    then the pieces are built once and served; an optimizer step starts the count again, so a
    loop that evaluates after every step never builds; explain() counts nothing."""
    calls = _count_builds(monkeypatch)
    ref, fast = _flows(2, 3, 8)
    fast.policy = plan.Policy(pieces_min_hidden=1, pieces_min_work=1, pieces_build_rows=3 * ROWS)
    x = torch.randn(ROWS, 2, dtype=torch.float64)
    expected = ref.log_prob(x).detach()
    optimizer = torch.optim.SGD(fast.parameters(), lr=1e-3)
    with torch.no_grad():
        for _ in range(4):
            assert fast.explain(x).stack == "cpu_gemm_stack"  # counts nothing
        for _ in range(2):  # 2 of the 3 calls' work: still the GEMM stack
            torch.testing.assert_close(fast.log_prob(x), expected, rtol=1e-12, atol=1e-12)
        assert not calls and fast._knot_cache.nbytes == 0
        torch.testing.assert_close(fast.log_prob(x), expected, rtol=1e-12, atol=1e-12)
        assert calls == ["pieces"] * 3  # the third call pays: built, one per layer
        assert fast.explain(x).layers == ("cpu_knots",) * 3
        fast.sample(ROWS)
        assert len(calls) == 3  # served from the cache
    for _ in range(3):  # step, evaluate: the count restarts after every step
        (-fast.log_prob(x).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            assert fast.explain(x).stack == "cpu_gemm_stack"
            ref.load_state_dict(fast.state_dict())
            torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    assert "pieces" not in calls[3:]  # never rebuilt in the step-evaluate loop


def test_cache_serves_no_grad_calls_and_sees_weight_updates(monkeypatch):
    _always_knots(monkeypatch)
    calls = _count_builds(monkeypatch)
    ref, fast = _flows(2, 3, 8)
    x = torch.randn(ROWS + 3, 2, dtype=torch.float64)
    with torch.no_grad():
        first = fast.log_prob(x)
        fast.log_prob(x)
        fast.sample(ROWS)
    assert calls == ["pieces"] * 3  # built once per layer, then served
    assert fast._knot_cache.nbytes > 0
    torch.testing.assert_close(first, ref.log_prob(x).detach(), rtol=1e-12, atol=1e-12)

    optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)
    (-fast.log_prob(x).mean()).backward()  # grad mode: fresh interval tables, not cached
    optimizer.step()
    assert calls[3:] == ["intervals"] * 6
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    assert calls[9:] == ["pieces"] * 3  # every layer rebuilt after the step

    state = {k: v.clone() * 0.5 for k, v in ref.state_dict().items() if k != "mask"}
    ref.load_state_dict(state, strict=False)
    fast.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    assert calls[12:] == ["pieces"] * 3

    # The input's gradient without weight gradients: the (cached) interval tables.
    for p in fast.parameters():
        p.requires_grad_(False)
    xx = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fast.log_prob(xx).sum(), xx)
    (want,) = torch.autograd.grad(ref.log_prob(xx).sum(), xx)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    assert calls[15:] == ["intervals"] * 6

    clone = copy.deepcopy(fast)
    assert clone._knot_cache.nbytes == 0


@pytest.mark.parametrize("dim,kept_index", [(2, 0), (2, 1), (3, 1)])
@pytest.mark.parametrize("hidden", [1, 5, 33])
@pytest.mark.parametrize("slope", [0.01, 0.0, -0.3, 1.7])
def test_piece_form_matches_modules_float64(dim, kept_index, hidden, slope):
    torch.manual_seed(hidden)
    nets = [standard_net(dim, hidden, tanh=tanh, negative_slope=slope).double() for tanh in (1, 0)]
    for net in nets:
        with torch.no_grad():
            net[0].weight.mul_(3)
            if hidden >= 4:  # units with no knot, and two units sharing one
                net[0].weight[:2, kept_index] = 0.0
                net[0].weight[3] = 2 * net[0].weight[2]
                net[0].bias[3] = 2 * net[0].bias[2]
    kept = torch.tensor([kept_index])
    transformed = torch.tensor([j for j in range(dim) if j != kept_index])
    mlps = [match_standard_mlp(net, dim) for net in nets]
    table = knots.build_pieces(*mlps, kept, transformed)
    w1, b1 = nets[0][0].weight[:, kept_index].detach(), nets[0][0].bias.detach()
    x1 = torch.cat((torch.randn(200, 1, dtype=torch.float64) * 4, (-b1 / w1)[w1 != 0].unsqueeze(1)))
    x1 = torch.cat((x1, torch.tensor([[1e4], [-1e4], [0.0]], dtype=torch.float64)))
    s, t = knots.evaluate_pieces(table, x1)
    full = torch.zeros(x1.shape[0], dim, dtype=torch.float64)
    full[:, kept_index] = x1[:, 0]
    with torch.no_grad():
        want = [net(full)[:, transformed] for net in nets]
    for got, ref in zip((s, t), want, strict=True):
        scale = ref.abs().max().clamp_min(1.0)
        assert torch.isfinite(got).all()
        assert (got - ref).abs().max() <= 1e-12 * scale


def test_piece_form_non_finite_and_too_many_pieces(monkeypatch):
    s_net, t_net = _net(8, 0.01, True), _net(8, 0.01, False)
    mlps = [match_standard_mlp(n, 2) for n in (s_net, t_net)]
    table = knots.build_pieces(*mlps, KEPT, TRANSFORMED)
    x1 = torch.randn(6, 1, dtype=torch.float64)
    x1[2, 0] = float("nan")
    s, t = knots.evaluate_pieces(table, x1)
    assert torch.isnan(s[2]).all() and torch.isnan(t[2]).all()
    assert torch.isfinite(s[[0, 1, 3, 4, 5]]).all()
    with torch.no_grad():
        t_net[2].weight[0, 5] = float("nan")
    _, t = knots.evaluate_pieces(knots.build_pieces(*mlps, KEPT, TRANSFORMED), x1)
    assert torch.isnan(t).all()
    # A net past the piece limit keeps the interval form, with the same results.
    monkeypatch.setattr(knots, "MAX_PIECES_PER_UNIT", 0)
    assert knots.build_pieces(*mlps, KEPT, TRANSFORMED) is None
    _always_knots(monkeypatch)
    ref, fast = _flows(2, 3, 8)
    x = torch.randn(ROWS, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    layer0 = [match_standard_mlp(net[0], 2) for net in (fast.s, fast.t)]
    assert fast._knot_cache.pieces(0, *layer0, *fast._split(0)) is None


def test_cache_budget_and_inference_mode_tables(monkeypatch):
    _always_knots(monkeypatch)
    _, fast = _flows(2, 3, 8)
    fast._knot_cache.budget = 0
    x = torch.randn(ROWS, 2, dtype=torch.float64)
    with torch.no_grad():
        fast.log_prob(x)
    assert fast._knot_cache.nbytes == 0
    fast._knot_cache.budget = knots.CACHE_BUDGET
    for p in fast.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        fast.log_prob(x)
    # Tables cached under inference_mode serve a later call that differentiates the input.
    xx = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fast.log_prob(xx).sum(), xx)
    assert torch.isfinite(grad).all()


def test_bad_arguments_are_rejected():
    s_net, t_net = _net(4, 0.01, True), _net(4, 0.01, False)
    tables = [knots.build(match_standard_mlp(n, 2), KEPT, TRANSFORMED) for n in (s_net, t_net)]
    with pytest.raises(ValueError, match=r"x1 must have shape \(N, 1\)"):
        knots.evaluate_pair(*tables, torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="tile_rows"):
        knots.evaluate_pair(*tables, torch.randn(3, 1, dtype=torch.float64), tile_rows=0)
    with pytest.raises(ValueError, match="one LeakyReLU slope"):
        knots.evaluate_pair(tables[0], tables[1]._replace(slope=0.2), torch.randn(3, 1))
    with pytest.raises(ValueError, match="exactly one index"):
        knots.build(match_standard_mlp(s_net, 2), torch.tensor([0, 1]), TRANSFORMED)
    with pytest.raises(TypeError, match="knot_tables must be a bool"):
        FastRealNVP.standard(2, 2, hidden=4, knot_tables="yes")
