"""Fully fused coupling layer: kernels (interpreter) and PyTorch path vs float64 oracles.

The oracle is the reference Real NVP layer (``fastnvp.core.reference.RealNVP.standard`` nets on the
masked full-width input) in float64 with autograd. Tolerances are relative to each tensor's
largest magnitude: ieee 1e-5, tf32 1e-3, bf16 2e-2; NaN never passes (``allclose`` is false
for NaN). Kernel outputs are written into NaN-poisoned buffers, so an element a kernel skips fails.
"""

from __future__ import annotations

import pytest
import torch

import fastnvp.engine.gpu.fused as gpu_fused
import fastnvp.ops.fused_layer as fl
from fastnvp.core.conditioner import match_standard_mlp, standard_weights
from fastnvp.core.masks import split_indices
from fastnvp.core.reference import RealNVP

TOL = {"ieee": 1e-5, "tf32": 1e-3, "bf16": 2e-2}
SLOPE = 0.01
N_ROWS = 37  # not a multiple of the interpreter's 16-row tile: the last tile is partial


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|; inf when got has a NaN/inf."""
    got = got.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_flow(dim: int, hidden: int, layers: int = 2) -> RealNVP:
    model = RealNVP.standard(dim, layers, hidden=hidden, negative_slope=SLOPE).double()
    with torch.no_grad():  # larger biases than the default init, so every term matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def split_weights(model: RealNVP, layer: int, dtype=torch.float64):
    kept, transformed = split_indices(model.mask[layer])
    sw = standard_weights(match_standard_mlp(model.s[layer], model.dim), kept, transformed)
    tw = standard_weights(match_standard_mlp(model.t[layer], model.dim), kept, transformed)
    sw = [w.detach().to(dtype) for w in sw]
    tw = [w.detach().to(dtype) for w in tw]
    return kept, transformed, sw, tw


def ref_layer(model: RealNVP, layer: int, x: torch.Tensor, inverse: bool):
    """The reference layer on the masked full-width input (docs/design.md §1.2), float64."""
    m = model.mask[layer].to(x.dtype)
    s = model.s[layer](x * m) * (1 - m)
    t = model.t[layer](x * m) * (1 - m)
    if inverse:
        return x * m + (1 - m) * (x - t) * torch.exp(-s), -s.sum(1)
    return x * m + (1 - m) * (x * torch.exp(s) + t), s.sum(1)


def ref_grads(model, layer, x, inverse, grad_out, grad_log_det):
    """Oracle gradients: input, then S's and T's split weights (W1[:, kept] ... b3[transformed])."""
    kept, transformed = split_indices(model.mask[layer])
    x = x.detach().double().requires_grad_()
    out, log_det = ref_layer(model, layer, x, inverse)
    params = []
    for net in (model.s[layer], model.t[layer]):
        params += [
            net[0].weight,
            net[0].bias,
            net[2].weight,
            net[2].bias,
            net[4].weight,
            net[4].bias,
        ]
    loss = (out * grad_out.double()).sum() + (log_det * grad_log_det.double()).sum()
    grads = torch.autograd.grad(loss, [x, *params])
    gx, g = grads[0], grads[1:]
    split = []
    for net in range(2):
        w1, b1, w2, b2, w3, b3 = g[6 * net : 6 * net + 6]
        split += [w1[:, kept], b1, w2, b2, w3[transformed], b3[transformed]]
    return out.detach(), log_det.detach(), gx, split


# --------------------------------------------------------------------- kernels (interpreter)
LAYER_CASES = [  # (D, H, layer): D = 3 has K1 = 1, 2 by layer; D = 18 takes the dot first Linear
    (2, 32, 0),
    (3, 64, 1),
    (8, 32, 0),
    (18, 32, 1),
    (128, 32, 0),  # wide halves: K1P = K2P = 64 (the D = 128 configs of the compile report)
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dim,hidden,layer", LAYER_CASES)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("inverse", [False, True])
def test_layer_kernel_matches_reference(dim, hidden, layer, precision, inverse):
    from fastnvp.kernels.fused_layer import coupling_layer

    model = make_flow(dim, hidden)
    kept, transformed, sw, tw = split_weights(model, layer, torch.float32)
    x = torch.randn(N_ROWS, dim, dtype=torch.float64)
    ref_out, ref_ld = ref_layer(model, layer, x, inverse)
    out = torch.full((N_ROWS, dim), float("nan"))
    log_det = torch.full((N_ROWS,), float("nan"))
    coupling_layer(
        x.float(), kept, transformed, sw, tw, SLOPE, precision, inverse, out=out, log_det=log_det
    )
    assert rel_err(out, ref_out) <= TOL[precision]
    assert rel_err(log_det, ref_ld) <= TOL[precision]


@pytest.mark.interpreter
@pytest.mark.parametrize("dim,hidden,layer", [(2, 32, 0), (3, 32, 1), (18, 32, 0), (128, 32, 1)])
@pytest.mark.parametrize("inverse", [False, True])
def test_backward_kernel_matches_reference(dim, hidden, layer, inverse):
    from fastnvp.kernels.fused_layer_backward import coupling_layer_backward

    model = make_flow(dim, hidden)
    kept, transformed, sw, tw = split_weights(model, layer, torch.float32)
    x = torch.randn(N_ROWS, dim, dtype=torch.float64)
    grad_out = torch.randn(N_ROWS, dim, dtype=torch.float64)
    grad_ld = torch.randn(N_ROWS, dtype=torch.float64)
    out, _, gx, gw = ref_grads(model, layer, x, inverse, grad_out, grad_ld)
    got = coupling_layer_backward(
        out.float(), grad_out.float(), grad_ld.float(), kept, transformed, sw, tw, SLOPE,
        "ieee", inverse, fill=float("nan"),
    )  # fmt: skip
    assert rel_err(got[0], gx) <= TOL["ieee"]
    for i, (g, r) in enumerate(zip(got[1:], gw)):
        assert g.shape == r.shape
        assert rel_err(g, r) <= TOL["ieee"], (
            f"weight gradient {fl.WEIGHT_NAMES[i % 6]} of net {i // 6}"
        )


@pytest.mark.interpreter
@pytest.mark.parametrize("dim,layer", [(3, 0), (18, 1)])
def test_bf16_backward_kernel_matches_bf16_torch_path(dim, layer):
    """bf16 gradients vs the PyTorch path rounding the same operands (exact-math oracle: the
    rounding of a2 flips a few LeakyReLU branches, which dominates the gap to float64)."""
    from fastnvp.kernels.fused_layer_backward import coupling_layer_backward

    model = make_flow(dim, 32)
    kept, transformed, sw, tw = split_weights(model, layer, torch.float32)
    x = torch.randn(N_ROWS, dim)
    out, _ = fl.torch_layer(x, kept, transformed, sw, tw, SLOPE, False, "bf16")
    grad_out, grad_ld = torch.randn(N_ROWS, dim), torch.randn(N_ROWS)
    ref = fl.torch_layer_backward(
        out.double(), grad_out.double(), grad_ld.double(), kept, transformed,
        [w.double() for w in sw], [w.double() for w in tw], SLOPE, False, "bf16",
    )  # fmt: skip
    got = coupling_layer_backward(
        out, grad_out, grad_ld, kept, transformed, sw, tw, SLOPE, "bf16", False, fill=float("nan")
    )
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= TOL["bf16"]


@pytest.mark.interpreter
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
@pytest.mark.parametrize("dim", [2, 3])
def test_stack_kernel_matches_reference(dim, precision):
    from fastnvp.kernels.fused_layer import coupling_stack

    layers = 3
    model = make_flow(dim, 32, layers)
    stacked = fl.stack_layers([split_weights(model, i, torch.float32) for i in range(layers)])
    kept, transformed, k1, k2, *weights = stacked
    x = torch.randn(N_ROWS, dim, dtype=torch.float64)
    with torch.no_grad():
        ref_z, ref_ld = model.f(x)
        ref_x = model.g(x)
    for inverse, ref_out in ((False, ref_z), (True, ref_x)):
        out = torch.full((N_ROWS, dim), float("nan"))
        log_det = torch.full((N_ROWS,), float("nan"))
        coupling_stack(
            x.float(), kept, transformed, k1, k2, weights[:6], weights[6:], SLOPE, precision,
            inverse, out=out, log_det=log_det,
        )  # fmt: skip
        assert rel_err(out, ref_out) <= TOL[precision]
        if not inverse:
            assert rel_err(log_det, ref_ld) <= TOL[precision]


# ------------------------------------------------------------------------ ops, both backends
def op_args(dim=3, hidden=32, layer=0, rows=N_ROWS, dtype=torch.float32, precision="ieee"):
    model = make_flow(dim, hidden)
    kept, transformed, sw, tw = split_weights(model, layer, dtype)
    x = torch.randn(rows, dim, dtype=dtype)
    return model, (x, kept, transformed, *sw, *tw, SLOPE, precision)


def test_ops_forward_inverse_and_autograd(backend):
    """Op values and every gradient (via register_autograd) against the float64 oracle."""
    model, args = op_args()
    for inverse, op in ((False, fl.coupling_layer), (True, fl.coupling_layer_inverse)):
        x = args[0].clone().requires_grad_()
        weights = [w.clone().requires_grad_() for w in args[3:15]]
        out, log_det = op(x, args[1], args[2], *weights, SLOPE, "ieee")
        grad_out, grad_ld = torch.randn_like(out), torch.randn_like(log_det)
        got = torch.autograd.grad((out * grad_out).sum() + (log_det * grad_ld).sum(), [x, *weights])
        ref_out, ref_ld, gx, gw = ref_grads(model, 0, x, inverse, grad_out, grad_ld)
        assert rel_err(out, ref_out) <= TOL["ieee"]
        assert rel_err(log_det, ref_ld) <= TOL["ieee"]
        for g, r in zip(got, [gx, *gw]):
            assert rel_err(g, r) <= TOL["ieee"]


def test_round_trip_through_ops(backend):
    _, args = op_args(dim=8, layer=1, precision="bf16")
    z, ld = fl.coupling_layer(*args)
    x, ld_inv = fl.coupling_layer_inverse(z, *args[1:])
    assert torch.allclose(x, args[0], atol=1e-5)
    assert torch.allclose(ld, -ld_inv, atol=1e-5)


def test_stack_ops_match_per_layer_ops(backend):
    layers = 3
    model = make_flow(3, 32, layers)
    per_layer = [split_weights(model, i, torch.float32) for i in range(layers)]
    stacked = fl.stack_layers(per_layer)
    x = torch.randn(N_ROWS, 3)
    z, ld = fl.coupling_stack_forward(x, *stacked, SLOPE, "ieee")
    h, ld_sum = x, torch.zeros(N_ROWS)
    for kept, transformed, sw, tw in per_layer:
        h, ld_i = fl.coupling_layer(h, kept, transformed, *sw, *tw, SLOPE, "ieee")
        ld_sum = ld_sum + ld_i
    assert rel_err(z, h) <= TOL["ieee"]
    assert rel_err(ld, ld_sum) <= TOL["ieee"]
    back, ld_inv = fl.coupling_stack_inverse(z, *stacked, SLOPE, "ieee")
    assert rel_err(back, x) <= 1e-5
    assert rel_err(ld_inv, -ld) <= 1e-5


# ---------------------------------------------------------------- PyTorch path: float64 checks
def test_gradcheck_float64_layer_ops(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    _, args = op_args(dim=3, hidden=8, rows=5, dtype=torch.float64)
    tensors = [a.clone().requires_grad_(a.is_floating_point()) for a in args[:15]]
    for op in (fl.coupling_layer, fl.coupling_layer_inverse):
        assert torch.autograd.gradcheck(lambda *t, op=op: op(*t, SLOPE, "ieee"), tensors)


@pytest.mark.parametrize("inverse", [False, True])
def test_float64_torch_backward_matches_oracle_to_float64_rounding(inverse):
    """The PyTorch backward in float64 against autograd through the reference layer, at float64
    rounding (gradcheck's tolerances would let a float32-rounded constant through: a LeakyReLU
    slope of 0.01 rounded to float32 is off by 2e-8 relative)."""
    model = make_flow(5, 16)
    kept, transformed, sw, tw = split_weights(model, 1, torch.float64)
    x = torch.randn(N_ROWS, 5, dtype=torch.float64)
    grad_out = torch.randn(N_ROWS, 5, dtype=torch.float64)
    grad_ld = torch.randn(N_ROWS, dtype=torch.float64)
    out, _, gx, gw = ref_grads(model, 1, x, inverse, grad_out, grad_ld)
    got = fl.torch_layer_backward(out, grad_out, grad_ld, kept, transformed, sw, tw, SLOPE, inverse)
    assert rel_err(got[0], gx) <= 1e-12
    for i, (g, r) in enumerate(zip(got[1:], gw)):
        assert rel_err(g, r) <= 1e-12, f"weight gradient {fl.WEIGHT_NAMES[i % 6]} of net {i // 6}"


def test_float64_takes_torch_path_under_triton_backend(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "triton")
    model, args = op_args(dim=2, hidden=16, rows=4, dtype=torch.float64)
    out, log_det = fl.coupling_layer(*args)
    ref_out, ref_ld = ref_layer(model, 0, args[0], False)
    assert out.dtype == torch.float64 and log_det.dtype == torch.float64
    assert rel_err(out, ref_out) <= 1e-12


def _opcheck_cases():
    _, args = op_args(dim=3, hidden=16, rows=5)
    x, kept, transformed, *weights, slope, precision = args
    z, _ = fl.torch_layer(x, kept, transformed, weights[:6], weights[6:], SLOPE, False)
    model = make_flow(3, 16, 2)
    stacked = fl.stack_layers([split_weights(model, i, torch.float32) for i in range(2)])
    grad = (torch.randn(5, 3), torch.randn(5))
    return [
        (fl.coupling_layer, args),
        (fl.coupling_layer_inverse, args),
        (
            fl.coupling_layer_backward,
            (z, *grad, kept, transformed, *weights, slope, precision, False),
        ),
        (fl.coupling_stack_forward, (x, *stacked, SLOPE, "ieee")),
        (fl.coupling_stack_inverse, (x, *stacked, SLOPE, "ieee")),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck_torch_backend(case, monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    op, args = _opcheck_cases()[case]
    if op in (fl.coupling_layer, fl.coupling_layer_inverse):
        args = (args[0].requires_grad_(), *args[1:])
    torch.library.opcheck(op, args)


@pytest.mark.interpreter
def test_opcheck_triton_backend(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "triton")
    op, args = _opcheck_cases()[0]
    args = (args[0].requires_grad_(), *args[1:3], *(w.requires_grad_() for w in args[3:15]),
            *args[15:])  # fmt: skip
    torch.library.opcheck(op, args)


def test_traces_under_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    torch._dynamo.reset()
    _, args = op_args(dim=3, hidden=16, rows=6)
    x, kept, transformed, *weights, slope, precision = args
    weights = [w.requires_grad_() for w in weights]
    model = make_flow(3, 16, 2)
    stacked = fl.stack_layers([split_weights(model, i, torch.float32) for i in range(2)])

    def fn(x, *ws):
        z, ld = fl.coupling_layer(x, kept, transformed, *ws, slope, precision)
        zs, lds = fl.coupling_stack_forward(z.detach(), *stacked, SLOPE, "ieee")
        return (z * z).sum() + ld.sum() + zs.sum() + lds.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, *weights)
    loss_e = fn(x, *weights)
    grads_c = torch.autograd.grad(loss_c, weights)
    grads_e = torch.autograd.grad(loss_e, weights)
    assert torch.allclose(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        assert torch.allclose(a, b)


# ------------------------------------------------------------------------------- validation
def test_validation_names_the_argument():
    _, args = op_args(dim=3, hidden=16, rows=4)
    x, kept, transformed, *weights, slope, precision = args
    with pytest.raises(ValueError, match="precision"):
        fl.coupling_layer(x, kept, transformed, *weights, slope, "fp8")
    with pytest.raises(TypeError, match="kept"):
        fl.coupling_layer(x, kept.int(), transformed, *weights, slope, precision)
    with pytest.raises(ValueError, match="cover"):
        fl.coupling_layer(x, kept, transformed[:0], *weights, slope, precision)
    bad = list(weights)
    bad[2] = bad[2][:, :-1]
    with pytest.raises(ValueError, match="s_w2"):
        fl.coupling_layer(x, kept, transformed, *bad, slope, precision)
    bad = list(weights)
    bad[10] = bad[10].double()
    with pytest.raises(TypeError, match="t_w3"):
        fl.coupling_layer(x, kept, transformed, *bad, slope, precision)
    with pytest.raises(ValueError, match="x must have shape"):
        fl.coupling_layer(x[0], kept, transformed, *weights, slope, precision)


def test_kernels_reject_non_power_of_two_hidden(monkeypatch):
    from fastnvp.kernels.fused_layer import check_hidden

    with pytest.raises(ValueError, match="power-of-two"):
        check_hidden(48)
    check_hidden(32)


# ------------------------------------------------------------------------- dot shape limits
def test_every_shipped_dot_meets_tensor_core_minimums():
    """GPU tl.dot needs K >= 16 for bf16, K >= 8 for tf32, M >= 16 and N >= 8 (the interpreter
    accepts anything, so the launchers' config tables are checked directly)."""
    from fastnvp.kernels import fused_layer, fused_layer_backward

    entries = fused_layer.SM90_CONFIGS + fused_layer_backward.SM90_CONFIGS
    assert len(entries) >= 3 * 4 * 3  # precisions x shapes x kernels
    for entry in entries:
        for m, k, n, precision in entry["dots"]:
            assert m >= 16 and n >= 8, entry["name"]
            assert k >= {"bf16": 16, "tf32": 8, "ieee": 8}[precision], entry["name"]
    # The launchers' choices for every supported width, not only the compiled ones.
    for hidden in (16, 32, 64, 128, 256, 512):
        for precision in ("ieee", "tf32", "bf16"):
            for dim in (2, 3, 17, 64, 128):
                k1p = fused_layer.pad_k1(dim - dim // 2)
                k2p = fused_layer.pad_k2(dim // 2)
                fwd = fused_layer.layer_config(hidden, precision, False, k1p, k2p)
                bwd = fused_layer_backward.backward_config(hidden, precision, False, k1p, k2p)
                shapes = fused_layer.dot_shapes(fwd, k1p, k2p)
                shapes += fused_layer_backward.dot_shapes(bwd, k1p, k2p)
                for m, k, n in shapes:
                    assert m >= 16 and n >= 8, (hidden, precision, dim)
                    assert k >= (16 if precision == "bf16" else 8), (hidden, precision, dim)
                for cfg in (fwd, bwd):
                    assert hidden % cfg["HC"] == 0 and hidden % cfg["KC"] == 0


def test_flow_with_unsupported_hidden_width_takes_unfused_path():
    """A width the kernel cannot tile (H = 24) falls back per layer instead of raising; the
    ops' PyTorch path (no Triton) takes any width and stays fused."""
    from fastnvp import FastRealNVP
    from fastnvp.ops.backend import use_triton

    torch.manual_seed(3)
    ref = make_flow(4, 24)
    fast = FastRealNVP.from_reference(ref)
    fast.fused = "layer"
    x = torch.randn(9, 4, dtype=torch.float64)
    assert gpu_fused.model_uses_fused_layer(fast, 0, x) == (not use_triton(x))
    z, ld = fast.f(x)
    z_ref, ld_ref = ref.f(x)
    assert torch.allclose(z, z_ref, atol=1e-12) and torch.allclose(ld, ld_ref, atol=1e-12)
