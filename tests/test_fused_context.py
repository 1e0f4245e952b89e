"""Conditional fused coupling layer: kernels (interpreter) and ops with a context vs float64.

A conditional layer's nets read ``cat(x * m, e)`` (width D + E); on the split halves that is
``cat(x[:, kept], e)`` against ``W1[:, inputs]`` with ``inputs = cat(kept, D + arange(E))``
(docs/design.md §4.2-4.4). The oracle is that full-width masked layer in float64 with autograd
(gradients of x, e and every weight). Tolerances are relative to each tensor's largest
magnitude (ieee 1e-5, bf16 2e-2); NaN never passes, and kernel outputs are written into
NaN-poisoned buffers, so an element a kernel skips fails. Shapes are odd on purpose: D in
{2, 3, 5}, E in {1, 3}, N = 37 (the interpreter's tile is 16 rows, so the last tile is partial),
and K1 + E both on the outer-product first Linear (<= 4) and on the dot one (> 4).
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import fastnvp.engine.gpu.fused as gpu_fused
import fastnvp.ops.fused_layer as fl
from fastnvp.core.masks import alternating_masks, split_indices

TOL = {"ieee": 1e-5, "bf16": 2e-2}
SLOPE = 0.01
N_ROWS = 37
NAN = float("nan")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|; inf when got has a NaN/inf."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def standard(dim: int, context: int, hidden: int, tanh: bool) -> nn.Sequential:
    mods = [nn.Linear(dim + context, hidden), nn.LeakyReLU(SLOPE), nn.Linear(hidden, hidden),
            nn.LeakyReLU(SLOPE), nn.Linear(hidden, dim)]  # fmt: skip
    return nn.Sequential(*mods, *([nn.Tanh()] if tanh else []))


class CondFlow:
    """A float64 conditional Real NVP: alternating masks, standard nets on cat(x * m, e)."""

    def __init__(self, dim: int, context: int, hidden: int = 16, layers: int = 2):
        self.dim, self.context, self.layers = dim, context, layers
        self.mask = alternating_masks(dim, layers).double()
        self.s = [standard(dim, context, hidden, True).double() for _ in range(layers)]
        self.t = [standard(dim, context, hidden, False).double() for _ in range(layers)]
        with torch.no_grad():  # larger biases than the default init, so every term matters
            for net in self.s + self.t:
                for p in net.parameters():
                    p.add_(0.1 * torch.randn_like(p))

    def params(self, layer: int) -> list[torch.Tensor]:
        """S's then T's (W1, b1, W2, b2, W3, b3), full width."""
        return [p for net in (self.s[layer], self.t[layer]) for p in net.parameters()]

    def split(self, layer: int, dtype=torch.float32):
        """(kept, transformed, s_weights, t_weights): W1 gathered at cat(kept, D + arange(E))."""
        kept, transformed = split_indices(self.mask[layer])
        inputs = torch.cat([kept, self.dim + torch.arange(self.context)])
        nets = []
        for net in (self.s[layer], self.t[layer]):
            w1, b1, w2, b2, w3, b3 = (p.detach() for p in net.parameters())
            ws = [w1[:, inputs], b1, w2, b2, w3[transformed], b3[transformed]]
            nets.append([w.to(dtype) for w in ws])
        return kept, transformed, nets[0], nets[1]

    def layer(self, layer: int, x, e, inverse: bool):
        """The full-width masked layer (docs/design.md §1.2) with context e."""
        m = self.mask[layer].to(x.dtype)
        xin = torch.cat([x * m, e], dim=1)
        s = self.s[layer](xin) * (1 - m)
        t = self.t[layer](xin) * (1 - m)
        if inverse:
            return x * m + (1 - m) * (x - t) * torch.exp(-s), -s.sum(1)
        return x * m + (1 - m) * (x * torch.exp(s) + t), s.sum(1)

    def stack(self, x, e, inverse: bool):
        order = reversed(range(self.layers)) if inverse else range(self.layers)
        log_det = torch.zeros(x.shape[0], dtype=x.dtype)
        for i in order:
            x, ld = self.layer(i, x, e, inverse)
            log_det = log_det + ld
        return x, log_det

    def grads(self, layer, x, e, inverse, grad_out, grad_ld):
        """Oracle (out, log_det, gx, split weight grads (12), ge) of one layer, float64."""
        kept, transformed = split_indices(self.mask[layer])
        inputs = torch.cat([kept, self.dim + torch.arange(self.context)])
        x = x.detach().double().requires_grad_()
        e = e.detach().double().requires_grad_()
        out, log_det = self.layer(layer, x, e, inverse)
        params = self.params(layer)
        loss = (out * grad_out.double()).sum() + (log_det * grad_ld.double()).sum()
        gx, ge, *g = torch.autograd.grad(loss, [x, e, *params])
        split = []
        for net in range(2):
            w1, b1, w2, b2, w3, b3 = g[6 * net : 6 * net + 6]
            split += [w1[:, inputs], b1, w2, b2, w3[transformed], b3[transformed]]
        return out.detach(), log_det.detach(), gx, split, ge


def poisoned(*shape):
    return torch.full(shape, NAN)


# (D, E, layer, H): K1 + E = 2, 4 (outer product) and 5, 6 (dot first Linear); H = 32 walks two
# K chunks of the interpreter's 16.
LAYER_CASES = [(2, 1, 0, 16), (3, 3, 0, 32), (3, 3, 1, 16), (5, 1, 1, 16), (5, 3, 1, 32)]


# --------------------------------------------------------------------- kernels (interpreter)
@pytest.mark.interpreter
@pytest.mark.parametrize("dim,context,layer,hidden", LAYER_CASES)
def test_layer_kernel_with_context(dim, context, layer, hidden):
    from fastnvp.kernels.fused_layer import coupling_layer

    flow = CondFlow(dim, context, hidden)
    kept, transformed, sw, tw = flow.split(layer)
    x = torch.randn(N_ROWS, dim, dtype=torch.float64)
    e = torch.randn(N_ROWS, context, dtype=torch.float64)
    for inverse in (False, True):
        ref_out, ref_ld = flow.layer(layer, x, e, inverse)
        out, log_det = poisoned(N_ROWS, dim), poisoned(N_ROWS)
        coupling_layer(
            x.float(), kept, transformed, sw, tw, SLOPE, "ieee", inverse, out=out,
            log_det=log_det, context=e.float(),
        )  # fmt: skip
        assert rel_err(out, ref_out) <= TOL["ieee"], inverse
        assert rel_err(log_det, ref_ld) <= TOL["ieee"], inverse


@pytest.mark.interpreter
@pytest.mark.parametrize("dim,context,layer,hidden", LAYER_CASES)
def test_backward_kernel_with_context(dim, context, layer, hidden):
    from fastnvp.kernels.fused_layer_backward import coupling_layer_backward

    flow = CondFlow(dim, context, hidden)
    kept, transformed, sw, tw = flow.split(layer)
    x = torch.randn(N_ROWS, dim, dtype=torch.float64)
    e = torch.randn(N_ROWS, context, dtype=torch.float64)
    grad_out = torch.randn(N_ROWS, dim, dtype=torch.float64)
    grad_ld = torch.randn(N_ROWS, dtype=torch.float64)
    for inverse in (False, True):
        out, _, gx, gw, ge = flow.grads(layer, x, e, inverse, grad_out, grad_ld)
        got = coupling_layer_backward(
            out.float(), grad_out.float(), grad_ld.float(), kept, transformed, sw, tw, SLOPE,
            "ieee", inverse, fill=NAN, context=e.float(),
        )  # fmt: skip
        assert len(got) == 14
        assert rel_err(got[0], gx) <= TOL["ieee"], inverse
        for i, (g, r) in enumerate(zip(got[1:13], gw)):
            assert rel_err(g, r) <= TOL["ieee"], (inverse, fl.WEIGHT_NAMES[i % 6], i // 6)
        assert rel_err(got[13], ge) <= TOL["ieee"], inverse


@pytest.mark.interpreter
def test_bf16_layer_kernels_with_context_match_bf16_torch_path():
    """bf16 (emulated on CPU) with the dot first Linear (K1 + E = 6): the kernels round the
    same operands as the PyTorch path, context columns included."""
    from fastnvp.kernels.fused_layer import coupling_layer
    from fastnvp.kernels.fused_layer_backward import coupling_layer_backward

    flow = CondFlow(5, 3, 16)
    kept, transformed, sw, tw = flow.split(1)
    x, e = torch.randn(N_ROWS, 5), torch.randn(N_ROWS, 3)
    out, log_det = fl.torch_layer(x, kept, transformed, sw, tw, SLOPE, False, "bf16", e)
    got = coupling_layer(x, kept, transformed, sw, tw, SLOPE, "bf16", False, context=e)
    assert rel_err(got[0], out) <= TOL["bf16"] and rel_err(got[1], log_det) <= TOL["bf16"]
    grad_out, grad_ld = torch.randn(N_ROWS, 5), torch.randn(N_ROWS)
    ref = fl.torch_layer_backward(
        out.double(), grad_out.double(), grad_ld.double(), kept, transformed,
        [w.double() for w in sw], [w.double() for w in tw], SLOPE, False, "bf16", e.double(),
    )  # fmt: skip
    got = coupling_layer_backward(
        out, grad_out, grad_ld, kept, transformed, sw, tw, SLOPE, "bf16", False, fill=NAN,
        context=e,
    )  # fmt: skip
    assert len(got) == len(ref) == 14
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= TOL["bf16"]


@pytest.mark.interpreter
@pytest.mark.parametrize("dim,context", [(2, 3), (3, 1), (5, 3)])
def test_stack_kernel_with_context(dim, context):
    """One context for every layer; at D = 3 and 5 the layers keep different K1, so each
    layer's context columns start at a different W1 column."""
    from fastnvp.kernels.fused_layer import coupling_stack

    layers = 3
    flow = CondFlow(dim, context, 16, layers)
    stacked = fl.stack_layers([flow.split(i) for i in range(layers)])
    kept, transformed, k1, k2, *weights = stacked
    x = torch.randn(N_ROWS, dim, dtype=torch.float64)
    e = torch.randn(N_ROWS, context, dtype=torch.float64)
    for inverse in (False, True):
        ref_out, ref_ld = flow.stack(x, e, inverse)
        out, log_det = poisoned(N_ROWS, dim), poisoned(N_ROWS)
        coupling_stack(
            x.float(), kept, transformed, k1, k2, weights[:6], weights[6:], SLOPE, "ieee",
            inverse, out=out, log_det=log_det, context=e.float(),
        )  # fmt: skip
        assert rel_err(out, ref_out) <= TOL["ieee"], inverse
        assert rel_err(log_det, ref_ld) <= TOL["ieee"], inverse


# ------------------------------------------------------------------------ ops, both backends
def op_args(dim=3, context=3, layer=1, hidden=16, rows=N_ROWS, dtype=torch.float32):
    flow = CondFlow(dim, context, hidden)
    kept, transformed, sw, tw = flow.split(layer, dtype)
    x = torch.randn(rows, dim, dtype=dtype)
    e = torch.randn(rows, context, dtype=dtype)
    return flow, (x, kept, transformed, *sw, *tw, SLOPE, "ieee"), e


def test_ops_with_context_and_autograd(backend):
    """Op values and every gradient, context's included, against the float64 oracle (float32
    through the kernels on the triton backend)."""
    flow, args, e = op_args()
    for inverse, op in ((False, fl.coupling_layer), (True, fl.coupling_layer_inverse)):
        x = args[0].clone().requires_grad_()
        c = e.clone().requires_grad_()
        weights = [w.clone().requires_grad_() for w in args[3:15]]
        out, log_det = op(x, args[1], args[2], *weights, SLOPE, "ieee", c)
        grad_out, grad_ld = torch.randn_like(out), torch.randn_like(log_det)
        loss = (out * grad_out).sum() + (log_det * grad_ld).sum()
        got = torch.autograd.grad(loss, [x, *weights, c])
        ref_out, ref_ld, gx, gw, ge = flow.grads(1, x, c, inverse, grad_out, grad_ld)
        assert rel_err(out, ref_out) <= TOL["ieee"]
        assert rel_err(log_det, ref_ld) <= TOL["ieee"]
        for g, r in zip(got, [gx, *gw, ge]):
            assert rel_err(g, r) <= TOL["ieee"]


def test_stack_ops_with_context_match_per_layer_ops(backend):
    layers = 3
    flow = CondFlow(3, 3, 16, layers)
    per_layer = [flow.split(i) for i in range(layers)]
    stacked = fl.stack_layers(per_layer)
    x, e = torch.randn(N_ROWS, 3), torch.randn(N_ROWS, 3)
    z, ld = fl.coupling_stack_forward(x, *stacked, SLOPE, "ieee", e)
    h, ld_sum = x, torch.zeros(N_ROWS)
    for kept, transformed, sw, tw in per_layer:
        h, ld_i = fl.coupling_layer(h, kept, transformed, *sw, *tw, SLOPE, "ieee", e)
        ld_sum = ld_sum + ld_i
    assert rel_err(z, h) <= TOL["ieee"]
    assert rel_err(ld, ld_sum) <= TOL["ieee"]
    back, ld_inv = fl.coupling_stack_inverse(z, *stacked, SLOPE, "ieee", e)
    assert rel_err(back, x) <= 1e-5
    assert rel_err(ld_inv, -ld) <= 1e-5


def test_unconditional_backward_op_returns_empty_context_gradient(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    flow, args, _ = op_args(context=0, rows=5)
    x, kept, transformed, *weights, slope, precision = args
    grads = fl.coupling_layer_backward(
        x, torch.randn(5, 3), torch.randn(5), kept, transformed, *weights, slope, precision, False
    )
    assert len(grads) == 14 and grads[13].shape == (5, 0)


# ---------------------------------------------------------------- PyTorch path: float64 checks
def test_gradcheck_float64_layer_ops_with_context(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    _, args, e = op_args(dim=3, context=2, layer=1, hidden=8, rows=5, dtype=torch.float64)
    tensors = [a.clone().requires_grad_(a.is_floating_point()) for a in args[:15]]
    tensors.append(e.clone().requires_grad_())
    for op in (fl.coupling_layer, fl.coupling_layer_inverse):

        def fn(*t, op=op):
            return op(*t[:15], SLOPE, "ieee", t[15])

        assert torch.autograd.gradcheck(fn, tensors)


def _opcheck_cases():
    _, args, e = op_args(dim=3, context=3, layer=1, rows=5)
    x, kept, transformed, *weights, slope, precision = args
    z, _ = fl.torch_layer(x, kept, transformed, weights[:6], weights[6:], SLOPE, False, context=e)
    flow = CondFlow(3, 3, 16, 2)
    stacked = fl.stack_layers([flow.split(i) for i in range(2)])
    grad = (torch.randn(5, 3), torch.randn(5))
    return [
        (fl.coupling_layer, (*args, e)),
        (fl.coupling_layer_inverse, (*args, e)),
        (
            fl.coupling_layer_backward,
            (z, *grad, kept, transformed, *weights, slope, precision, False, e),
        ),
        (fl.coupling_stack_forward, (x, *stacked, SLOPE, "ieee", e)),
        (fl.coupling_stack_inverse, (x, *stacked, SLOPE, "ieee", e)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck_with_context_torch_backend(case, monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    op, args = _opcheck_cases()[case]
    if op in (fl.coupling_layer, fl.coupling_layer_inverse):
        args = (args[0].requires_grad_(), *args[1:-1], args[-1].requires_grad_())
    torch.library.opcheck(op, args)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [0, 2])
def test_opcheck_with_context_triton_backend(case, monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "triton")
    op, args = _opcheck_cases()[case]
    if op is fl.coupling_layer:
        args = (args[0].requires_grad_(), *args[1:3], *(w.requires_grad_() for w in args[3:15]),
                *args[15:17], args[17].requires_grad_())  # fmt: skip
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------- validation
def test_bad_context_is_rejected_naming_context(backend):
    """Checked before either backend runs: a kernel never sees a context that does not fit."""
    _, args, e = op_args(dim=3, context=3, layer=1, rows=4)
    layer_ops = (fl.coupling_layer, fl.coupling_layer_inverse)
    for op in layer_ops:
        with pytest.raises(ValueError, match=r"context is required.*\(N, E\) = \(4, 3\)"):
            op(*args)
        with pytest.raises(ValueError, match=r"context must have shape \(N, E\) = \(4, 3\)"):
            op(*args, e[:, :2])
        with pytest.raises(ValueError, match=r"context must have shape \(N, E\) = \(4, 3\)"):
            op(*args, e[:3])
        with pytest.raises(ValueError, match="context must have shape"):
            op(*args, e[0])
        with pytest.raises(TypeError, match="context must have dtype torch.float32"):
            op(*args, e.double())
        with pytest.raises(TypeError, match="context must be None or a torch.Tensor"):
            fl._check_context(e.tolist(), args[0], "x", 3, "E = 3")
        with pytest.raises(RuntimeError, match="context"):  # the dispatcher's own type check
            op(*args, e.tolist())
    # (an op call with a meta context dispatches to the fake; the check itself is device-wise)
    with pytest.raises(ValueError, match="context is on meta but x is on cpu"):
        fl._check_context(e.to("meta"), args[0], "x", 3, "E = 3")
    # Unconditional weights (W1 (H, K1)): a context with columns has nowhere to go.
    _, plain, _ = op_args(dim=3, context=0, layer=1, rows=4)
    with pytest.raises(ValueError, match=r"context must have shape \(N, E\) = \(4, 0\)"):
        fl.coupling_layer(*plain, e)
    x, kept, transformed, *weights, slope, precision = args
    with pytest.raises(ValueError, match="context is required"):
        fl.coupling_layer_backward(
            x, torch.randn(4, 3), torch.randn(4), kept, transformed, *weights, slope, precision,
            False,
        )  # fmt: skip
    flow = CondFlow(3, 3, 16, 2)
    stacked = fl.stack_layers([flow.split(i) for i in range(2)])  # W1 padded to 16 columns
    for op in (fl.coupling_stack_forward, fl.coupling_stack_inverse):
        with pytest.raises(ValueError, match="context must have shape"):
            op(x, *stacked, SLOPE, "ieee", e[:3])
        with pytest.raises(ValueError, match=r"context has E = 16 columns.*\(N, E\)"):
            op(x, *stacked, SLOPE, "ieee", torch.randn(4, 16))
        with pytest.raises(ValueError, match=r"context has E = 15 columns"):
            op(x, *stacked, SLOPE, "ieee", torch.randn(4, 15))  # K1 = 2 + 15 > 16


# ------------------------------------------------------------------------- the model binding
class _StubModel(torch.nn.Module):
    """The FastRealNVP surface ``fastnvp.engine.gpu.fused`` uses (docs: SPEC of issue #13)."""

    def __init__(self, flow: CondFlow):
        super().__init__()
        self.dim, self.num_layers, self.precision = flow.dim, flow.layers, "ieee"
        self.embedded_features = flow.context
        self.s, self.t = nn.ModuleList(flow.s), nn.ModuleList(flow.t)
        self.register_buffer("split_order", torch.arange(flow.dim))
        self.flow = flow

    def _split(self, i):
        return split_indices(self.flow.mask[i])

    def _inputs(self, i):
        kept, _ = self._split(i)
        return torch.cat([kept, self.dim + torch.arange(self.embedded_features)])

    def _plan(self, h, direction):
        return types.SimpleNamespace(layers=["fused_layer"] * self.num_layers)


def test_model_layer_and_stack_pass_the_context(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    flow = CondFlow(3, 2, 8, layers=3)
    model = _StubModel(flow)
    x, e = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    for inverse in (False, True):
        out, ld = gpu_fused.model_layer(model, 1, x, inverse, context=e)
        ref_out, ref_ld = flow.layer(1, x, e, inverse)
        assert rel_err(out, ref_out) <= 1e-12 and rel_err(ld, ref_ld) <= 1e-12
    with torch.no_grad():
        z, ld = gpu_fused.model_stack(model, x, False, context=e)
        back, _ = gpu_fused.model_stack(model, z, True, context=e)
    ref_z, ref_ld = flow.stack(x, e, False)
    assert rel_err(z, ref_z) <= 1e-12 and rel_err(ld, ref_ld) <= 1e-12
    assert rel_err(back, x) <= 1e-10
    assert model._fused_stack_cache[0][-1] == 2  # E is part of the cache key, the values not


# --------------------------------------------------------------------- sm_90 compile report
def test_heaviest_context_config_compiles_for_sm90(tmp_path):
    """The conditional bf16 backward with the dot first Linear (D = 2, E = 8: K1 + E = 9 padded
    to 16) is the most register-bound context config: 0 spills, shared memory within sm_90's
    227 KB. The report runs in a subprocess without TRITON_INTERPRET (no GPU needed)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name = "coupling_layer_backward_kernel[bf16,D=2,E=8,H=256]"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "compile_report.py"), "--json", str(out),
         "--filter", name],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
    assert 0 < row["registers"] <= 255 and row["shared"] <= 227 * 1024, row
    assert row["constexprs"]["HAS_CONTEXT"] and row["constexprs"]["K1P"] == 16, row
