"""Unequal halves in the CPU GEMM stack (docs/design.md §3.2): odd D, and masks that keep
different numbers of features per layer, run padded with a zero column of the walk state.

Checked against the float64 reference on fresh inputs: values, log-det, inverse and every
gradient in both memory modes, training in lockstep, fresh buffers poisoned with NaN, and the
layout itself. The conditional forms are in tests/test_context.py.
"""

from __future__ import annotations

import pytest
import torch

from fastnvp import FastRealNVP, RealNVP
from fastnvp.engine.cpu.columns import split_layouts, stack_layout


def _twins(dim, layers=4, hidden=16, **fast_options):
    ref = RealNVP.standard(dim, layers, hidden).double()
    fast = FastRealNVP.from_reference(ref)
    for name, value in fast_options.items():
        setattr(fast, name, value)
    return ref, fast


def _gradients(model, x):
    model.zero_grad()
    xi = x.clone().requires_grad_(True)
    lp = model.log_prob(xi)
    (lp * torch.linspace(0.5, 1.5, lp.shape[0], dtype=lp.dtype)).sum().backward()
    return lp.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]


def _assert_same_gradients(ref, fast, x):
    """log_prob and the gradients of x and of every parameter equal the reference's."""
    lp_r, gx_r, gp_r = _gradients(ref, x)
    lp_f, gx_f, gp_f = _gradients(fast, x)
    torch.testing.assert_close(lp_f, lp_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-10, atol=1e-12)
    for (name, _), got, want in zip(ref.named_parameters(), gp_f, gp_r, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_padded_layout_keeps_the_alternating_halves_as_ranges():
    # D = 5, checkerboard: A = (0, 2, 4) and B = (1, 3); B is padded with the index D = 5.
    kept = torch.tensor([[0, 2, 4], [1, 3, 5], [0, 2, 4]])
    trans = torch.tensor([[1, 3, 5], [0, 2, 4], [1, 3, 5]])
    layouts = split_layouts(kept, trans, 5)
    layout = layouts.reordered
    assert layout.padded and layout.order.tolist() == [0, 2, 4, 1, 3, 5]
    assert [c.start for c in layout.kept] == [0, 3, 0]
    assert [c.start for c in layout.trans] == [3, 0, 3]
    x = torch.randn(7, 5)
    state = layout.enter(x, copy=False)
    assert state.shape == (7, 6) and state is not x
    assert torch.equal(state[:, 5], torch.zeros(7))  # the padding column
    for i in range(3):
        padded_x = torch.nn.functional.pad(x, (0, 1))
        assert torch.equal(layout.kept[i].take(state), padded_x.index_select(1, kept[i]))
    assert torch.equal(layout.leave(state), x)
    assert layouts.plain.padded and layouts.plain.order is None
    assert torch.equal(layouts.plain.leave(layouts.plain.enter(x)), x)
    padding = layouts.padding
    assert padding.kept_mask.tolist()[1] == [False, False, True]
    assert padding.kept.tolist()[1] == [1, 3, 0]  # gathers column 0, zeroed in the pack
    assert split_layouts(kept[:, :2], trans[:, :3], 5).padding is None


def test_layout_rejects_halves_that_do_not_cover_the_features():
    with pytest.raises(ValueError, match="features=5"):
        stack_layout(torch.tensor([[0, 2]]), torch.tensor([[1, 3]]), features=5)


@pytest.mark.parametrize("dim", [3, 5, 11])
@pytest.mark.parametrize("memory", ["standard", "invertible"])
def test_odd_dim_matches_reference(dim, memory, one_thread):
    ref, fast = _twins(dim, memory=memory, anchor_every=2)
    x = torch.randn(19, dim, dtype=torch.float64) * 1.5
    plan = fast.explain(x.requires_grad_())
    assert plan.stack == "cpu_gemm_stack" and "unequal halves" in plan.reason
    x = x.detach()
    _assert_same_gradients(ref, fast, x)
    with torch.no_grad():
        assert fast.explain(x).stack == "cpu_gemm_stack"
        z, log_det = ref.f(x)
        z_fast, log_det_fast = fast.f(x)
        torch.testing.assert_close(z_fast, z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_det_fast, log_det, rtol=1e-12, atol=1e-12)
        assert fast.explain(z, "g").stack == "cpu_gemm_stack"
        torch.testing.assert_close(fast.g(z), ref.g(z), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast.g(z), x, rtol=1e-10, atol=1e-10)
        samples, log_q = fast.sample_and_log_prob(9, generator=torch.Generator().manual_seed(2))
        assert samples.shape == (9, dim) and torch.isfinite(samples).all()
        torch.testing.assert_close(log_q, ref.log_prob(samples), rtol=1e-10, atol=1e-10)


def test_odd_dim_trains_in_lockstep_with_reference(one_thread):
    ref, fast = _twins(7, layers=3, hidden=12)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ref, fast)]
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        x = torch.randn(33, 7, dtype=torch.float64, generator=gen)
        for model, opt in zip((ref, fast), opts, strict=True):
            opt.zero_grad()
            (-model.log_prob(x).mean()).backward()
            opt.step()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast, p_ref, rtol=1e-9, atol=1e-11, msg=name)
    with torch.no_grad():
        x = torch.randn(5, 7, dtype=torch.float64)
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)


def test_padded_stack_reads_no_uninitialized_memory(one_thread, monkeypatch):
    """Every fresh buffer of the walk starts as NaN: the padding column, the gradient buffers
    of the padding entries and the workspaces are all written before they are read."""

    def nan_empty_like(t, *args, **kwargs):
        return torch.full_like(t, float("nan"), *args, **kwargs)

    def nan_new_empty(t, size, *args, **kwargs):
        return t.new_full(size, float("nan"), *args, **kwargs)

    ref, fast = _twins(5, layers=3, hidden=8)
    x = torch.randn(6, 5, dtype=torch.float64)
    expected = _gradients(ref, x)
    for memory in ("standard", "invertible"):
        fast.memory = memory
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty_like", nan_empty_like)
            patch.setattr(torch.Tensor, "new_empty", nan_new_empty)
            got = _gradients(fast, x)
            with torch.no_grad():
                z = fast.f(x)[0]
                x_back = fast.g(z)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)
        for a, b in zip(got[2], expected[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm", ["actnorm", "batchnorm"])
@pytest.mark.parametrize("memory", ["standard", "invertible"])
def test_odd_dim_with_norm_layers_matches_reference(norm, memory, one_thread):
    """Norm layers run in the padded stack: the padding column passes them as an identity, and
    BatchNorm's log-det and running averages leave it out."""
    ref = RealNVP.standard(5, 3, 12, norm=norm).double()
    x = torch.randn(17, 5, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        ref.log_prob(x)  # ActNorm's data-dependent initialization
    fast = FastRealNVP.from_reference(ref)
    fast.memory, fast.anchor_every = memory, 2
    plan = fast.explain(x.requires_grad_())
    assert plan.stack == "cpu_gemm_stack" and "unequal halves" in plan.reason
    x = x.detach()
    _assert_same_gradients(ref, fast, x)
    buffers = [{n: b for n, b in m.named_buffers() if n.startswith("norms.")} for m in (ref, fast)]
    assert buffers[0].keys() == buffers[1].keys()
    for name, want in buffers[0].items():  # BatchNorm's running averages, in feature order
        torch.testing.assert_close(buffers[1][name], want, rtol=1e-12, atol=1e-12, msg=name)
    for train in (True, False):
        ref.train(train)
        fast.train(train)
        with torch.no_grad():
            assert fast.explain(x).stack == "cpu_gemm_stack"
            z, log_det = ref.f(x)
            z_fast, log_det_fast = fast.f(x)
            torch.testing.assert_close(z_fast, z, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(log_det_fast, log_det, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # eval mode: g inverts f
        torch.testing.assert_close(fast.g(z), ref.g(z), rtol=1e-10, atol=1e-10)


def test_mixing_layers_keep_the_layer_loop_for_unequal_halves():
    masks = torch.tensor([[1.0, 0, 1, 0, 1], [0, 1, 0, 1, 0]])
    ref = RealNVP(
        lambda: torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)),
        lambda: torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)),
        masks,
        permutation="reverse",
    )
    standard = RealNVP.standard(5, 2, 8)
    for i in range(2):  # the standard pair on these masks and a mixing layer
        ref.s[i], ref.t[i] = standard.s[i], standard.t[i]
    fast = FastRealNVP.from_reference(ref)
    x = torch.randn(4, 5)
    plan = fast.explain(x.requires_grad_())
    assert plan.stack != "cpu_gemm_stack"
    assert "mixing layers" in plan.reason
    torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x))
