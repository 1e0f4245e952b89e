"""Split halves as column ranges (fastnvp.engine.cpu.columns) and the GEMM stack on both forms.

A half whose columns form a range is taken as a view and written in place; any other half
keeps the index ops; a stack that alternates two halves (the checkerboard masks of
``standard()``) runs on reordered columns. All must give the float64 reference's values and
gradients, with a context and in both memory modes.
"""

from __future__ import annotations

import pytest
import torch

from fastnvp.core.conditioner import standard_net
from fastnvp.core.masks import alternating_masks
from fastnvp.core.reference import RealNVP
from fastnvp.engine.cpu.buffer_pool import BufferPool
from fastnvp.engine.cpu.columns import Columns, split_columns, stack_layout
from fastnvp.flows.fast_realnvp import FastRealNVP

NAN = float("nan")


def test_split_columns_finds_ranges_only():
    index = torch.tensor([[0, 1, 2], [2, 3, 4], [0, 2, 4], [4, 3, 2], [1, 2, 4]])
    assert [c.start for c in split_columns(index)] == [0, 2, None, None, None]
    for row, cols in zip(index, split_columns(index), strict=True):
        assert torch.equal(cols.index, row)


@pytest.mark.parametrize("index", [[1, 2], [0, 3], [3, 4], [0, 1]])
def test_columns_match_the_index_ops(index):
    dim = 5
    h = torch.randn(6, dim, dtype=torch.float64)
    values = torch.randn(6, len(index), dtype=torch.float64)
    idx = torch.tensor(index)
    rest = torch.tensor([j for j in range(dim) if j not in index])
    (cols,) = split_columns(idx[None])
    (other,) = split_columns(rest[None])
    assert torch.equal(cols.take(h), h.index_select(1, idx))
    assert torch.equal(cols.replaced(h, values, other), h.index_copy(1, idx, values))
    target = torch.full_like(h, NAN)
    target.copy_(h)
    assert cols.put_(target, values) is target
    assert torch.equal(target, h.index_copy(1, idx, values))
    # the gathered form on the same columns gives the same results
    gathered = Columns(idx, None)
    assert torch.equal(gathered.take(h), cols.take(h))
    assert torch.equal(gathered.replaced(h, values, other), cols.replaced(h, values, other))
    # the in-place affine maps of the walks without a gradient, in both forms
    scale = torch.rand(6, len(index), dtype=torch.float64) + 0.5
    forward = h.index_copy(1, idx, h.index_select(1, idx) * scale + values)
    inverse = h.index_copy(1, idx, (h.index_select(1, idx) - values) * scale)
    for form in (cols, gathered):
        target = h.clone()
        assert form.scale_shift_(target, scale, values) is target
        torch.testing.assert_close(target, forward, rtol=1e-15, atol=1e-15)
        target = h.clone()
        assert form.shift_scale_(target, values, scale) is target
        torch.testing.assert_close(target, inverse, rtol=1e-15, atol=1e-15)


# Two kept features per layer: a range at the start, interleaved, a range at the end (whose
# transformed half starts at column 0), and the reverse of the first.
MIXED_MASKS = torch.tensor(
    [[1.0, 1, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [1, 0, 0, 0, 1]]
)


def _halves(masks):
    order = torch.argsort(1 - masks, dim=1, stable=True)
    k1 = int(masks[0].sum())
    return order[:, :k1].contiguous(), order[:, k1:].contiguous()


def test_stack_layout_reorders_alternating_halves():
    kept, trans = _halves(alternating_masks(6, 3))
    layout = stack_layout(kept, trans)
    assert layout.order.tolist() == [1, 3, 5, 0, 2, 4]
    assert [c.start for c in layout.kept] == [0, 3, 0]
    assert [c.start for c in layout.trans] == [3, 0, 3]
    x = torch.randn(4, 6)
    state = layout.enter(x)
    for i in range(3):  # each half of the reordered state is the layer's own columns
        assert torch.equal(layout.kept[i].take(state), x.index_select(1, kept[i]))
        assert torch.equal(layout.trans[i].take(state), x.index_select(1, trans[i]))
    assert torch.equal(layout.leave(state), x)
    plain = stack_layout(kept, trans, reorder=False)
    assert plain.order is None and all(c.start is None for c in plain.kept)


def test_stack_layout_keeps_feature_order_for_other_masks():
    layout = stack_layout(*_halves(MIXED_MASKS))
    assert layout.order is None and layout.restore is None
    assert [c.start for c in layout.kept] == [0, None, 3, 2, None]
    x = torch.randn(3, 5)
    state = layout.enter(x)
    assert torch.equal(state, x) and state is not x
    assert layout.leave(state) is state


def _twins(context, masks=MIXED_MASKS):
    torch.manual_seed(3)
    dim, hidden = masks.shape[1], 8
    width = context or 0

    def nets():
        return standard_net(dim, hidden, tanh=True, context=width)

    def nett():
        return standard_net(dim, hidden, tanh=False, context=width)

    ref = RealNVP(nets, nett, masks, context=context).double()
    return ref, FastRealNVP.from_reference(ref)


@pytest.mark.parametrize("masks", ["mixed", "checkerboard"])
@pytest.mark.parametrize("memory", ["standard", "invertible"])
@pytest.mark.parametrize("context", [None, 3])
def test_gemm_stack_matches_float64_reference(masks, memory, context, one_thread):
    ref, fast = _twins(context, MIXED_MASKS if masks == "mixed" else alternating_masks(6, 4))
    dim = ref.dim
    fast.memory = memory
    fast.anchor_every = 2
    rows = 9
    x = torch.randn(rows, dim, dtype=torch.float64, requires_grad=True)
    c = None if context is None else torch.randn(rows, context, dtype=torch.float64)
    given = {} if c is None else {"context": c}
    assert fast.explain(x, **given).stack == "cpu_gemm_stack"
    w = torch.randn(rows, dim, dtype=torch.float64)
    v = torch.randn(rows, dtype=torch.float64)
    results = []
    for model in (ref, fast):
        xx = x.detach().clone().requires_grad_()
        inputs = [xx, *model.parameters()]
        kw = {}
        if c is not None:
            cc = c.clone().requires_grad_()
            inputs.append(cc)
            kw = {"context": cc}
        z, ld = model.f(xx, **kw)
        grads = torch.autograd.grad((z * w).sum() + (ld * v).sum(), inputs)
        results.append((z, ld, grads))
    (z_ref, ld_ref, g_ref), (z, ld, g) = results
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(g, g_ref, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(fast.f(x, **given)[0], z_ref, rtol=1e-12, atol=1e-12)
        x_back, ld_back = fast.inverse(z_ref, **given)
        torch.testing.assert_close(x_back, x.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ld_back, -ld_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("masks", ["mixed", "checkerboard"])
def test_gemm_stack_does_not_write_into_its_input(masks, one_thread):
    _, fast = _twins(None, MIXED_MASKS if masks == "mixed" else alternating_masks(6, 4))
    x = torch.randn(4, fast.dim, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    fast.log_prob(x).sum().backward()
    with torch.no_grad():
        fast.f(x)
        fast.g(x)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("memory", ["standard", "invertible"])
@pytest.mark.parametrize("norm", ["actnorm", "batchnorm"])
def test_norm_layers_walk_the_reordered_columns(norm, memory, one_thread):
    """standard(norm=...) keeps checkerboard masks: the walk reorders the state and the norm
    layers' per-feature tensors together, and their gradients and running averages come back
    in feature order."""
    torch.manual_seed(5)
    ref = RealNVP.standard(6, 4, 8, norm=norm).double()
    x = torch.randn(11, 6, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        ref.log_prob(x)  # ActNorm's data-dependent initialization
    fast = FastRealNVP.from_reference(ref)
    fast.memory = memory
    fast.anchor_every = 2
    kept, trans = fast._stack_split()
    assert stack_layout(kept, trans).order is not None
    results = []
    for model in (ref, fast):
        xx = x.clone().requires_grad_()
        lp = model.log_prob(xx)
        grads = torch.autograd.grad(lp.square().mean(), [xx, *model.parameters()])
        buffers = [b.clone() for n, b in model.named_buffers() if n.startswith("norms.")]
        results.append((lp, grads, buffers))
    (lp_ref, g_ref, b_ref), (lp, g, b) = results
    assert len(b) == len(b_ref) > 0
    assert fast.explain(x.requires_grad_()).stack == "cpu_gemm_stack"
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(b, b_ref, strict=True):  # running averages in feature order
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        z = ref.f(x)[0]
        torch.testing.assert_close(fast.f(x)[0], z, rtol=1e-12, atol=1e-12)
        ref.eval()
        fast.eval()
        torch.testing.assert_close(fast.g(z), ref.g(z), rtol=1e-10, atol=1e-10)


def test_split_layouts_are_built_once_per_split():
    from fastnvp.engine.cpu.columns import split_layouts
    from fastnvp.engine.cpu.gemm_stack import cached_layouts

    ranges = split_layouts(*_halves(torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0]])))
    assert ranges.plain is ranges.reordered and ranges.reordered.order is None
    alternating = split_layouts(*_halves(alternating_masks(4, 2)))
    assert alternating.reordered.order is not None and alternating.plain.order is None
    _, fast = _twins(None, alternating_masks(6, 4))
    kept, trans = fast._stack_split()
    first = cached_layouts(fast, kept, trans)
    assert cached_layouts(fast, kept, trans) is first
    assert cached_layouts(fast, kept.clone(), trans) is not first


@pytest.mark.parametrize("context", [None, 3])
def test_cached_pack_inference_operands_or_pairs_from_bank_or_per_layer(
    context, monkeypatch, one_thread
):
    """The no-gradient pack adds its inference operands (a copy of the H x H weights with b2
    as a last column) on its second call, while they fit CACHED_W2_MAX_BYTES; above it each layer
    reads its pair from the parameter bank (views, no copy) or, without a bank, stacks it
    where it runs. Same values all three ways, and as the float64 reference."""
    from fastnvp.engine.cpu import gemm_stack

    ref, fast = _twins(context, alternating_masks(6, 4))
    bank = fast._param_bank
    assert bank is not None
    x = torch.randn(7, fast.dim, dtype=torch.float64)
    given = {} if context is None else {"context": torch.randn(7, context, dtype=torch.float64)}
    with torch.no_grad():
        expected = (ref.log_prob(x, **given), *ref.inverse(x, **given))
        for source, limit in (("copy", None), ("bank", 0), ("per layer", 0)):
            fast._param_bank = None if source == "per layer" else bank
            if limit is not None:
                monkeypatch.setattr(gemm_stack, "CACHED_W2_MAX_BYTES", limit)
            fast.clear_caches()
            first = fast.log_prob(x, **given)
            assert not fast._gemm_pack[1].inference  # a pack's first call: plain operands
            got = (fast.log_prob(x, **given), *fast.inverse(x, **given))
            torch.testing.assert_close(first, expected[0], rtol=1e-12, atol=1e-12)
            packed = fast._gemm_pack[1]  # the pack of the second and third calls
            assert packed.inference == (source == "copy")
            for i, v in enumerate(packed.layers):
                if source == "copy":
                    hidden = packed.hidden
                    w2t_bias = v.inference.w2t_bias
                    assert w2t_bias.shape == (2, hidden + 1, hidden)
                    assert w2t_bias.transpose(1, 2).is_contiguous()  # a view of [W2 | b2]
                    assert v.inference.w1t.is_contiguous() and v.inference.w3t.is_contiguous()
                    assert torch.equal(w2t_bias[:, :hidden], torch.stack(v.w2).transpose(1, 2))
                    assert torch.equal(w2t_bias[:, hidden:], v.b2)
                    assert w2t_bias.data_ptr() != bank.kinds[2][i].data_ptr()
                elif source == "bank":
                    assert v.inference is None
                    assert v.w2_stacked.data_ptr() == bank.kinds[2][i].data_ptr()
                else:
                    assert v.inference is None and v.w2_stacked is None
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dim, context",
    [(2, None), (2, 3), (5, None), (6, 2)],
    ids=["one-input", "context", "odd", "even"],
)
def test_inference_operands_match_the_plain_ones(dim, context, one_thread):
    """forward_no_grad / inverse_no_grad on a pack with inference operands (h1 with a column
    of ones, b2 inside the second GEMM; the single-input broadcast form too, D = 2) equal the
    plain pack's, outputs poisoned beforehand, float64."""
    from fastnvp.engine.cpu import gemm_stack

    _, fast = _twins(context, alternating_masks(dim, 4))
    kept, trans = fast._stack_split()
    layouts = gemm_stack.cached_layouts(fast, kept, trans)
    params = gemm_stack.layer_parameters(fast)
    slope = 0.01
    x = torch.randn(11, dim, dtype=torch.float64)
    e = None if context is None else torch.randn(11, context, dtype=torch.float64)
    with torch.no_grad():
        plain = gemm_stack.pack(params, kept, trans, slope, layouts)
        inference = gemm_stack.with_inference_operands(plain)
        assert inference.inference and not plain.inference
        assert inference.bias_column == (dim > 2 or context is not None)
        for run in (gemm_stack.forward_no_grad, gemm_stack.inverse_no_grad):
            unkept = BufferPool(max_bytes=0)  # buffers of this call only
            want = run(plain, x, e, None, unkept)
            got = run(inference, x, e, None, unkept)
            for a, b in zip(got, want, strict=True):
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
        # h1's last column is exactly 1 for every row, whatever the input
        tail = gemm_stack._input_tail(inference, x, e)
        x_in = gemm_stack._first_input(x[:, inference.kept[0]], tail)
        ws1, ws2 = gemm_stack._workspaces(x, inference, True)
        ws1.fill_(float("nan"))
        ws2.fill_(float("nan"))
        h1, h2, _, _ = gemm_stack._nets(inference, 0, x_in, ws1, ws2, True)
        assert h1.shape == (2, 11, inference.hidden + 1)
        assert torch.equal(h1[..., -1], torch.ones(2, 11, dtype=torch.float64))
        assert torch.isfinite(h2).all()


def test_inference_operands_ab_benchmark_writes_its_table(one_thread, run_ab_benchmark):
    """benchmarks/inference_operands_ab.py on one tiny shape (``run_ab_benchmark``), with the
    rebuild cost of the log_prob row and the cap on cached H x H weights restored after."""
    from fastnvp.engine.cpu import gemm_stack

    cap = gemm_stack.CACHED_W2_MAX_BYTES
    _, rows, table = run_ab_benchmark(
        "inference_operands_ab", (4, 2, 8, 16, 2), ("plain_ms", "inference_ms")
    )
    assert gemm_stack.CACHED_W2_MAX_BYTES == cap
    assert torch.isfinite(torch.tensor(rows[0]["rebuild_ms"]))
    assert "| 4 | 2 | 8 | 16 | 2 | log_prob |" in table and "| sample |" in table
