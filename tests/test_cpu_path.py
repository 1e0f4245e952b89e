"""The CPU conditioner path (fastnvp.engine.cpu.conditioner_pair) against the reference, in
float64."""

import pytest
import torch

from fastnvp.core.conditioner import match_standard_mlp, standard_net
from fastnvp.core.masks import alternating_masks
from fastnvp.core.reference import RealNVP
from fastnvp.engine.cpu import conditioner_pair
from fastnvp.engine.plan import DEFAULT_POLICY, Policy
from fastnvp.flows.fast_realnvp import FastRealNVP

#: The row split runs flows the GEMM stack does not take: these tests turn the stack off.
LAYER_LOOP = Policy(gemm_stack=False)


def _pair(dim, hidden, slope=0.01):
    return (
        standard_net(dim, hidden, tanh=True, negative_slope=slope).double(),
        standard_net(dim, hidden, tanh=False, negative_slope=slope).double(),
    )


def _reference_st(s_net, t_net, x, mask):
    """The reference's s and t on the full width, restricted to the transformed columns."""
    kept_x = x * mask
    transformed = torch.nonzero(mask == 0).flatten()
    return s_net(kept_x)[:, transformed], t_net(kept_x)[:, transformed]


@pytest.mark.parametrize("dim", [2, 3, 6])
@pytest.mark.parametrize("rows,tile", [(1, 4), (7, 3), (16, 16), (33, 8)])
def test_standard_st_matches_modules_no_grad(dim, rows, tile):
    s_net, t_net = _pair(dim, 16)
    mask = alternating_masks(dim, 2)[1].double()
    kept = torch.nonzero(mask == 1).flatten()
    transformed = torch.nonzero(mask == 0).flatten()
    x = torch.randn(rows, dim, dtype=torch.float64)
    with torch.no_grad():
        s, t = conditioner_pair.standard_st(
            match_standard_mlp(s_net, dim),
            match_standard_mlp(t_net, dim),
            x[:, kept],
            kept,
            transformed,
            tile_rows=tile,
        )
        s_ref, t_ref = _reference_st(s_net, t_net, x, mask)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("slope", [0.01, 0.0, -0.2])
def test_standard_st_gradients_match_modules(slope):
    dim = 4
    s_net, t_net = _pair(dim, 8, slope)
    mask = alternating_masks(dim, 1)[0].double()
    kept = torch.nonzero(mask == 1).flatten()
    transformed = torch.nonzero(mask == 0).flatten()
    x = torch.randn(11, dim, dtype=torch.float64, requires_grad=True)
    s, t = conditioner_pair.standard_st(
        match_standard_mlp(s_net, dim),
        match_standard_mlp(t_net, dim),
        x[:, kept],
        kept,
        transformed,
    )
    (s.sin().sum() + t.square().sum()).backward()
    fast = [p.grad.clone() for p in (*s_net.parameters(), *t_net.parameters())] + [x.grad.clone()]
    for p in (*s_net.parameters(), *t_net.parameters()):
        p.grad = None
    x.grad = None
    s_ref, t_ref = _reference_st(s_net, t_net, x, mask)
    (s_ref.sin().sum() + t_ref.square().sum()).backward()
    ref = [p.grad for p in (*s_net.parameters(), *t_net.parameters())] + [x.grad]
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim,layers", [(2, 1), (2, 8), (5, 3)])
def test_fast_flow_log_prob_and_all_gradients_match_reference(dim, layers):
    ref = RealNVP.standard(dim, layers, hidden=24).double()
    fast = FastRealNVP.from_reference(ref)
    x = torch.randn(37, dim, dtype=torch.float64)
    lp_ref, lp_fast = ref.log_prob(x), fast.log_prob(x)
    torch.testing.assert_close(lp_fast, lp_ref, rtol=1e-12, atol=1e-12)
    lp_ref.mean().backward()
    lp_fast.mean().backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        assert p_fast.grad is not None, name
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fast_flow_no_grad_paths_match_reference_across_tiles():
    # More rows than one tile, and a ragged last tile.
    ref = RealNVP.standard(2, 3, hidden=16).double()
    fast = FastRealNVP.from_reference(ref)
    n = conditioner_pair.TILE_ROWS * 2 + 5
    x = torch.randn(n, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast.g(x), ref.g(x), rtol=1e-12, atol=1e-12)


def test_parameter_updates_are_seen():
    # Weights are gathered on every call: an optimizer step must change the output.
    fast = FastRealNVP.standard(2, 2, hidden=8).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        before = fast.log_prob(x)
        for p in fast.parameters():
            p.add_(0.05)
        after = fast.log_prob(x)
        ref = RealNVP.standard(2, 2, hidden=8).double()
        ref.load_state_dict(fast.state_dict())
        torch.testing.assert_close(after, ref.log_prob(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(before, after)


def test_invalid_arguments_name_the_argument():
    s_net, t_net = _pair(2, 4)
    s_mlp, t_mlp = match_standard_mlp(s_net, 2), match_standard_mlp(t_net, 2)
    kept, transformed = torch.tensor([1]), torch.tensor([0])
    x1 = torch.zeros(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="tile_rows"):
        conditioner_pair.standard_st(s_mlp, t_mlp, x1, kept, transformed, tile_rows=0)
    with pytest.raises(ValueError, match="x1"):
        conditioner_pair.standard_st(s_mlp, t_mlp, torch.zeros(3, 2), kept, transformed)
    other = match_standard_mlp(standard_net(2, 4, tanh=False, negative_slope=0.3), 2)
    with pytest.raises(ValueError, match="slope"):
        conditioner_pair.standard_st(s_mlp, other, x1, kept, transformed)


ROWS_PER_THREAD = DEFAULT_POLICY.min_rows_per_thread


def test_rows_parallel_matches_reference_and_restores_threads(two_threads):
    ref = RealNVP.standard(3, 4, hidden=16).double()
    fast = FastRealNVP.from_reference(ref)
    fast.policy = LAYER_LOOP
    n = 2 * ROWS_PER_THREAD + 3
    x = torch.randn(n, 3, dtype=torch.float64)
    with torch.no_grad():
        assert fast.explain(x).stack == "rows_parallel"
        assert fast.explain(x, "g").stack == "rows_parallel"
        z, log_det = fast.f(x)
        z_ref, log_det_ref = ref.f(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_det, log_det_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast.g(z), ref.g(z), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    assert torch.get_num_threads() == 2
    with torch.inference_mode():  # runs as under no_grad (FastRealNVP._forward/_inverse)
        x_back = fast.g(z)
    assert not x_back.requires_grad
    torch.testing.assert_close(x_back, ref.g(z), rtol=1e-12, atol=1e-12)


def test_rows_parallel_declines_when_it_does_not_apply(two_threads):
    fast = FastRealNVP.standard(3, 2, hidden=8, knot_tables=False)
    fast.policy = LAYER_LOOP
    big = torch.randn(2 * ROWS_PER_THREAD, 3)
    small = big[: 2 * ROWS_PER_THREAD - 1]
    with torch.no_grad():
        assert fast.explain(big).stack == "rows_parallel"
        assert fast.explain(small).stack == "layers"
    two = FastRealNVP.standard(3, 2, hidden=8, knot_tables=False)
    with torch.no_grad():  # the GEMM stack comes first where it applies (odd D padded)
        assert two.explain(big).stack == "cpu_gemm_stack"
    # g under autograd keeps the layer loop.
    assert fast.explain(big, "g").stack == "layers"
    torch.set_num_threads(1)
    with torch.no_grad():
        assert fast.explain(big).stack == "layers"


def test_rows_parallel_reraises_worker_errors(two_threads, monkeypatch):
    fast = FastRealNVP.standard(3, 2, hidden=8, knot_tables=False)
    fast.policy = LAYER_LOOP
    x = torch.randn(2 * ROWS_PER_THREAD, 3)

    def broken(i, h, path, inverse, e=None):
        raise RuntimeError("layer failed")

    monkeypatch.setattr(fast, "_layer", broken)  # the workers run the layer loop
    with torch.no_grad(), pytest.raises(RuntimeError, match="layer failed"):
        fast.f(x)
    assert torch.get_num_threads() == 2


def test_rows_parallel_training_gradients_match_reference(two_threads):
    ref = RealNVP.standard(3, 4, hidden=16).double()
    fast = FastRealNVP.from_reference(ref)
    fast.policy = LAYER_LOOP
    n = 2 * ROWS_PER_THREAD + 5
    x_ref = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    x_fast = x_ref.detach().clone().requires_grad_(True)
    assert fast.explain(x_fast).stack == "rows_parallel"
    lp_ref, lp_fast = ref.log_prob(x_ref), fast.log_prob(x_fast)
    torch.testing.assert_close(lp_fast, lp_ref, rtol=1e-12, atol=1e-12)
    # Backward twice through a retained graph: gradients accumulate like the reference's.
    for _ in range(2):
        lp_ref.square().mean().backward(retain_graph=True)
        lp_fast.square().mean().backward(retain_graph=True)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.get_num_threads() == 2


def test_rows_parallel_training_can_be_switched_off(two_threads):
    fast = FastRealNVP.standard(3, 2, hidden=8).double()
    fast.policy = LAYER_LOOP
    x = torch.randn(2 * ROWS_PER_THREAD, 3, dtype=torch.float64, requires_grad=True)
    assert fast.explain(x).stack == "rows_parallel"
    assert fast.explain(x, "g").stack == "layers"  # a differentiable g runs layer by layer
    fast.policy = Policy(parallel_training=False, gemm_stack=False)
    assert fast.explain(x).stack == "layers"
    # Off: one graph over the whole batch, same gradients.
    fast.log_prob(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in fast.parameters())
