"""The fully fused coupling layer as custom ops (docs/design.md §4.2–4.4).

One op computes a whole standard coupling layer — both conditioner MLPs on the kept half, the
affine update of the transformed half and log_det — from the full (N, D) input::

    x1 = x[:, kept], x2 = x[:, transformed]
    s = tanh(S(x1)), t = T(x1)     S, T: Linear(K1,H)-LeakyReLU-Linear(H,H)-LeakyReLU-Linear(H,K2)
    forward  (fastnvp::coupling_layer):          z2 = x2 * exp(s) + t,    log_det = +sum(s)
    inverse  (fastnvp::coupling_layer_inverse):  x2 = (z2 - t) * exp(-s), log_det = -sum(s)

The output keeps the kept columns and overwrites the transformed ones. Each net's weights are
``(W1 (H, K1), b1 (H,), W2 (H, H), b2 (H,), W3 (K2, H), b3 (K2,))`` — the standard net restricted
to the split halves (``fastnvp.core.conditioner.standard_weights``).

Backward (``fastnvp::coupling_layer_backward``) recomputes the nets from the layer's *output*
(its kept half equals the input's) and, with upstream g (per element) and gl (per row)::

    forward:  gx2 = g2 * exp(s),   gs = g2 * (z2 - t) + gl,   gt = g2
    inverse:  gz2 = g2 * exp(-s),  gs = -(g2 * x2 + gl),      gt = -gz2
    gu_S = gs * (1 - s^2), gu_T = gt; then through each MLP; gx1 = g1 + sum over nets of ga1 @ W1.

``fastnvp::coupling_stack_forward`` / ``coupling_stack_inverse`` run all L layers in one launch
for inference (no autograd), on stacked zero-padded weights (see :func:`stack_layers`).

Context (conditional flows, docs/design.md §4.2-4.4): every op takes an optional last argument
``context`` (N, E), in x's dtype and on its device. A conditional layer's nets read
``cat(x1, context)`` (K1 + E columns) against ``W1 (H, K1 + E)``, kept columns first, then the
E context columns (``FastRealNVP._inputs``), so E = W1.shape[1] - K1; the stack ops share one
context across all layers. The backward op also returns ``grad_context`` (N, E) ((N, 0) without
a context), the context columns of the first Linear's input gradient summed over both nets.

Dispatch: :func:`fastnvp.ops.backend.use_triton` picks the Triton kernels (``fastnvp.kernels.
fused_layer*``, imported lazily); otherwise, and always for float64, the PyTorch code below runs
the same math. ``precision`` ("ieee" | "tf32" | "bf16") selects the matmul mode. The PyTorch
path computes in the input's precision (fp32 for half inputs); for "bf16" it rounds exactly the
matmul operands the kernels round (bf16 operands, fp32 accumulation), so both backends give the
same numbers; "tf32" runs as fp32 there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnvp.core.validation import ensure_batch, ensure_tensor
from fastnvp.ops.backend import use_triton

PRECISIONS = ("ieee", "tf32", "bf16")
# Kept halves up to this width run the first Linear as fp32 outer products in the kernels (no
# bf16 rounding); the PyTorch path mirrors it (kernels/fused_layer.py: OUTER_K1_MAX).
FIRST_LINEAR_OUTER_MAX = 4
# Weights of the whole stack at or below this many bytes take the one-launch stack kernel
# (50 layers at H = 256 are ~27 MB of fp32: they stay in the H200's L2 across row tiles).
STACK_CACHE_BUDGET = 40 * 1024 * 1024
WEIGHT_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")


# ------------------------------------------------------------------------------- validation
def _check_precision(precision) -> None:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_slope(slope) -> None:
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        raise TypeError(f"slope must be a float, got {type(slope).__name__}")


def _check_index(idx, name: str, dim: int, ndim: int = 1) -> None:
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 indices, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64, got {idx.dtype}")
    if idx.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(idx.shape)}")


def _check_net(weights: Sequence[Tensor], prefix: str, x: Tensor, k1: int, k2: int, layers=None):
    """Shapes/dtypes/devices of one net's (W1, b1, W2, b2, W3, b3); returns H."""
    for name, w in zip(WEIGHT_NAMES, weights):
        ensure_tensor(w, f"{prefix}{name}")
        if w.device != x.device:
            raise ValueError(f"{prefix}{name} is on {w.device} but x is on {x.device}")
        if w.dtype != weights[0].dtype:
            raise TypeError(
                f"{prefix}{name} has dtype {w.dtype} but {prefix}w1 has {weights[0].dtype}"
            )
    lead = () if layers is None else (layers,)
    hidden = weights[0].shape[-2] if weights[0].ndim >= 2 else -1
    expected = {
        "w1": (*lead, hidden, k1),
        "b1": (*lead, hidden),
        "w2": (*lead, hidden, hidden),
        "b2": (*lead, hidden),
        "w3": (*lead, k2, hidden),
        "b3": (*lead, k2),
    }
    for name, w in zip(WEIGHT_NAMES, weights):
        if tuple(w.shape) != expected[name]:
            raise ValueError(
                f"{prefix}{name} must have shape {expected[name]} (H={hidden}, K1={k1}, K2={k2}; "
                f"K1 counts the context columns of a conditional layer), "
                f"got {tuple(w.shape)}"
            )
    return hidden


def _check_context(context, x: Tensor, x_name: str, e: int | None, why: str) -> None:
    """``context`` is None or an (N, E) tensor in x's dtype, on x's device.

    ``e``: the expected E (None: any E >= 1); ``why``: where E comes from, for the message.
    """
    n = x.shape[0]
    expected = f"(N, E) = ({n}, {e})" if e is not None else f"(N, E) = ({n}, E)"
    if context is None:
        if e:
            raise ValueError(
                f"context is required: {why}, so context must have shape {expected}, got None"
            )
        return
    if not isinstance(context, Tensor):
        raise TypeError(
            f"context must be None or a torch.Tensor of shape {expected}, "
            f"got {type(context).__name__}"
        )
    if context.dtype != x.dtype:
        raise TypeError(f"context must have dtype {x.dtype} like {x_name}, got {context.dtype}")
    if context.device != x.device:
        raise ValueError(f"context is on {context.device} but {x_name} is on {x.device}")
    if context.ndim != 2 or context.shape[0] != n or (e is not None and context.shape[1] != e):
        raise ValueError(f"context must have shape {expected} ({why}), got {tuple(context.shape)}")


def _context_width(w1, k1: int) -> int:
    """E = W1.shape[-1] - K1 of a (possibly malformed) first-Linear weight; 0 when narrower."""
    if isinstance(w1, Tensor) and w1.ndim >= 2:
        return max(int(w1.shape[-1]) - k1, 0)
    return 0


def _check_layer(x, kept, transformed, sw, tw, slope, precision, x_name="x", context=None):
    ensure_batch(x, x_name)
    _check_index(kept, "kept", x.shape[1])
    _check_index(transformed, "transformed", x.shape[1])
    k1, k2 = kept.numel(), transformed.numel()
    if k1 < 1 or k2 < 1 or k1 + k2 != x.shape[1]:
        raise ValueError(
            f"kept ({k1}) and transformed ({k2}) must be non-empty and together cover the "
            f"{x.shape[1]} features of {x_name}"
        )
    e = _context_width(sw[0], k1)
    h_s = _check_net(sw, "s_", x, k1 + e, k2)
    h_t = _check_net(tw, "t_", x, k1 + e, k2)
    if h_s != h_t:
        raise ValueError(f"S and T must have the same hidden width, got {h_s} and {h_t}")
    why = f"s_w1 has {k1 + e} columns for K1 = {k1} kept features, so E = {e}"
    _check_context(context, x, x_name, e, why)
    _check_slope(slope)
    _check_precision(precision)


# -------------------------------------------------------------------------------- torch math
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ld_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rounder(bf16: bool):
    """Identity, or rounding to the nearest bf16 value (kept in the compute dtype)."""
    if not bf16:
        return lambda v: v
    return lambda v: v.to(torch.bfloat16).to(v.dtype)


def _mlp(x1: Tensor, w: Sequence[Tensor], slope: float, bf16: bool = False) -> Tensor:
    """(N, K1) -> (N, K2) standard MLP; ``bf16`` rounds every matmul operand the kernels round."""
    r = _rounder(bf16)
    r1 = _rounder(bf16 and x1.shape[1] > FIRST_LINEAR_OUTER_MAX)
    h = F.leaky_relu(F.linear(r1(x1), r1(w[0]), w[1]), slope)
    h = F.leaky_relu(F.linear(r(h), r(w[2]), w[3]), slope)
    return F.linear(r(h), r(w[4]), w[5])


def _net_input(y: Tensor, kept: Tensor, context: Tensor | None) -> Tensor:
    """The first Linear's input: y[:, kept], then the context columns when there is one."""
    x1 = y.index_select(1, kept)
    if context is None:
        return x1
    return torch.cat([x1, context.to(y.dtype)], dim=1)


def torch_layer(
    x, kept, transformed, sw, tw, slope: float, inverse: bool, precision="ieee", context=None
):
    """PyTorch implementation of one coupling layer.  (N, D) -> ((N, D), (N,)).

    ``context``: None or (N, E); the nets then read cat(x[:, kept], context) against W1
    (H, K1 + E).
    """
    cd = _compute_dtype(x.dtype)
    bf16 = precision == "bf16"
    xc = x.to(cd)
    sw = [w.to(cd) for w in sw]
    tw = [w.to(cd) for w in tw]
    x1 = _net_input(xc, kept, context)
    x2 = xc.index_select(1, transformed)
    s = torch.tanh(_mlp(x1, sw, slope, bf16))
    t = _mlp(x1, tw, slope, bf16)
    if inverse:
        y2 = (x2 - t) * torch.exp(-s)
        log_det = -s.sum(dim=1)
    else:
        y2 = x2 * torch.exp(s) + t
        log_det = s.sum(dim=1)
    out = xc.index_copy(1, transformed, y2).to(x.dtype)
    return out, log_det.to(_ld_dtype(x))


_lrelu_backward = torch.ops.aten.leaky_relu_backward  # (grad, pre-activation, slope, False)


def _mlp_backward(x1, w, slope, gu, bf16: bool):
    """Through one MLP given the gradient of its output: (gx1, (gW1, gb1, gW2, gb2, gW3, gb3))."""
    r = _rounder(bf16)
    r1 = _rounder(bf16 and x1.shape[1] > FIRST_LINEAR_OUTER_MAX)
    a1 = F.linear(r1(x1), r1(w[0]), w[1])
    h1 = F.leaky_relu(a1, slope)
    a2 = F.linear(r(h1), r(w[2]), w[3])
    h2 = F.leaky_relu(a2, slope)
    # The LeakyReLU derivative in the compute dtype: a mask built from Python numbers is
    # float32, and a slope rounded to float32 put float64 gradients 2e-8 off.
    ga2 = _lrelu_backward(r(gu) @ r(w[4]), a2, slope, False)
    ga1 = _lrelu_backward(r(ga2) @ r(w[2]), a1, slope, False)
    grads = (
        r1(ga1).T @ r1(x1), ga1.sum(0), r(ga2).T @ r(h1), ga2.sum(0), r(gu).T @ r(h2), gu.sum(0)
    )  # fmt: skip
    return r1(ga1) @ r1(w[0]), grads


def torch_layer_backward(
    out, grad_out, grad_log_det, kept, transformed, sw, tw, slope, inverse, precision="ieee",
    context=None,
):  # fmt: skip
    """PyTorch backward of one coupling layer from its output; same algebra as the kernel.

    Returns (grad_in (N, D), 6 gradients of S's weights, 6 of T's), in the inputs' dtypes, then,
    when ``context`` (N, E) is given, grad_context (N, E) in out's dtype.
    """
    cd = _compute_dtype(out.dtype)
    bf16 = precision == "bf16"
    y = out.to(cd)
    g = grad_out.to(cd)
    gl = grad_log_det.to(cd)[:, None]
    swc = [w.to(cd) for w in sw]
    twc = [w.to(cd) for w in tw]
    x1 = _net_input(y, kept, context)
    y2 = y.index_select(1, transformed)
    g2 = g.index_select(1, transformed)
    u_s = _mlp(x1, swc, slope, bf16)
    s = torch.tanh(u_s)
    t = _mlp(x1, twc, slope, bf16)
    if inverse:
        gin2 = g2 * torch.exp(-s)
        gs = -(g2 * y2 + gl)
        gt = -gin2
    else:
        gin2 = g2 * torch.exp(s)
        gs = g2 * (y2 - t) + gl
        gt = g2
    gx1_s, gws = _mlp_backward(x1, swc, slope, gs * (1 - s * s), bf16)
    gx1_t, gwt = _mlp_backward(x1, twc, slope, gt, bf16)
    k1 = kept.numel()
    gin1 = g.index_select(1, kept) + gx1_s[:, :k1] + gx1_t[:, :k1]
    grad_in = torch.zeros_like(y).index_copy(1, kept, gin1).index_copy(1, transformed, gin2)
    gws = [gw.to(w.dtype) for gw, w in zip(gws, sw)]
    gwt = [gw.to(w.dtype) for gw, w in zip(gwt, tw)]
    if context is None:
        return (grad_in.to(out.dtype), *gws, *gwt)
    # A sum, so a fresh contiguous tensor: op outputs must not be views of another.
    grad_context = (gx1_s[:, k1:] + gx1_t[:, k1:]).to(out.dtype)
    return (grad_in.to(out.dtype), *gws, *gwt, grad_context)


def torch_stack(
    x, kept, transformed, k1, k2, sw, tw, slope: float, inverse: bool, precision="ieee",
    context=None,
):  # fmt: skip
    """PyTorch implementation of the whole stack on stacked, zero-padded weights.

    ``context``: None or (N, E), shared by every layer (layer l's W1 holds its k1[l] kept
    columns, then the E context columns).
    """
    num_layers = kept.shape[0]
    k1s, k2s = k1.tolist(), k2.tolist()
    e = 0 if context is None else context.shape[1]
    order = range(num_layers - 1, -1, -1) if inverse else range(num_layers)
    out = x
    log_det = torch.zeros(x.shape[0], dtype=_ld_dtype(x), device=x.device)
    for layer in order:
        a, b = k1s[layer], k2s[layer]
        ws = [sw[0][layer, :, :a + e], sw[1][layer], sw[2][layer], sw[3][layer],
              sw[4][layer, :b], sw[5][layer, :b]]  # fmt: skip
        wt = [tw[0][layer, :, :a + e], tw[1][layer], tw[2][layer], tw[3][layer],
              tw[4][layer, :b], tw[5][layer, :b]]  # fmt: skip
        out, ld = torch_layer(
            out, kept[layer, :a], transformed[layer, :b], ws, wt, slope, inverse, precision,
            context,
        )  # fmt: skip
        log_det = log_det + ld
    return out, log_det


# ---------------------------------------------------------------------------------- dispatch
def _triton_ok(x: Tensor) -> bool:
    # float64 always takes the PyTorch path: the kernels compute in fp32.
    return use_triton(x) and x.dtype != torch.float64


def _layer(x, kept, transformed, sw, tw, slope, precision, inverse, context=None):
    if _triton_ok(x):
        from fastnvp.kernels.fused_layer import coupling_layer as launch

        return launch(x, kept, transformed, sw, tw, slope, precision, inverse, context=context)
    return torch_layer(x, kept, transformed, sw, tw, slope, inverse, precision, context)


def _layer_backward(out, g, gl, kept, transformed, sw, tw, slope, precision, inverse, context):
    """13 gradients (grad_in, S's six, T's six) and grad_context (N, E); (N, 0) without one."""
    grads = None
    if _triton_ok(out):
        from fastnvp.kernels.fused_layer_backward import coupling_layer_backward as launch
        from fastnvp.kernels.fused_layer_backward import ships

        # A Triton that cannot compile this backward without spills (kernels.triton_limits)
        # runs it as the PyTorch GEMMs below, with the same operand rounding; the interpreter
        # has no registers, so it always runs the kernel.
        k_in = sw[0].shape[1]  # the first Linear's input: kept features, then context columns
        if not out.is_cuda or ships(precision, k_in, transformed.numel()):
            grads = launch(
                out, g, gl, kept, transformed, sw, tw, slope, precision, inverse, context=context
            )
    if grads is None:
        grads = torch_layer_backward(
            out, g, gl, kept, transformed, sw, tw, slope, inverse, precision, context
        )
    if len(grads) == 13:  # no context (or a zero-width one): an (N, 0) grad_context
        grads = (*grads, out.new_zeros(out.shape[0], 0))
    return tuple(grads)


def _stack(x, kept, transformed, k1, k2, sw, tw, slope, precision, inverse, context=None):
    if _triton_ok(x):
        from fastnvp.kernels.fused_layer import coupling_stack as launch

        return launch(
            x, kept, transformed, k1, k2, sw, tw, slope, precision, inverse, context=context
        )
    return torch_stack(x, kept, transformed, k1, k2, sw, tw, slope, inverse, precision, context)


def _fake_layer(x: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=_ld_dtype(x))


def _context_of(rest: tuple, positional: int, context):
    """The ``context`` argument of an op whose fake got ``positional`` arguments before it."""
    return rest[positional] if len(rest) > positional else context


# -------------------------------------------------------------------------------------- ops
@torch.library.custom_op("fastnvp::coupling_layer", mutates_args=())
def coupling_layer(
    x: Tensor, kept: Tensor, transformed: Tensor,
    w1s: Tensor, b1s: Tensor, w2s: Tensor, b2s: Tensor, w3s: Tensor, b3s: Tensor,
    w1t: Tensor, b1t: Tensor, w2t: Tensor, b2t: Tensor, w3t: Tensor, b3t: Tensor,
    slope: float, precision: str, context: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One fused coupling layer, data -> latent: ``(z (N, D), log_det (N,))``.

    ``context``: None or (N, E) with E = w1s.shape[1] - K1 (the nets read cat(x1, context)).
    """
    sw, tw = [w1s, b1s, w2s, b2s, w3s, b3s], [w1t, b1t, w2t, b2t, w3t, b3t]
    _check_layer(x, kept, transformed, sw, tw, slope, precision, context=context)
    return _layer(x, kept, transformed, sw, tw, slope, precision, False, context)


@torch.library.custom_op("fastnvp::coupling_layer_inverse", mutates_args=())
def coupling_layer_inverse(
    z: Tensor, kept: Tensor, transformed: Tensor,
    w1s: Tensor, b1s: Tensor, w2s: Tensor, b2s: Tensor, w3s: Tensor, b3s: Tensor,
    w1t: Tensor, b1t: Tensor, w2t: Tensor, b2t: Tensor, w3t: Tensor, b3t: Tensor,
    slope: float, precision: str, context: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One fused coupling layer, latent -> data: ``(x (N, D), log_det (N,))`` (log_det = -sum s).

    ``context``: None or (N, E), as for :func:`coupling_layer`.
    """
    sw, tw = [w1s, b1s, w2s, b2s, w3s, b3s], [w1t, b1t, w2t, b2t, w3t, b3t]
    _check_layer(z, kept, transformed, sw, tw, slope, precision, "z", context)
    return _layer(z, kept, transformed, sw, tw, slope, precision, True, context)


@coupling_layer.register_fake
def _(x, kept, transformed, *weights_slope_precision_context, context=None):
    return _fake_layer(x)


@coupling_layer_inverse.register_fake
def _(z, kept, transformed, *weights_slope_precision_context, context=None):
    return _fake_layer(z)


@torch.library.custom_op("fastnvp::coupling_layer_backward", mutates_args=())
def coupling_layer_backward(
    out: Tensor, grad_out: Tensor, grad_log_det: Tensor, kept: Tensor, transformed: Tensor,
    w1s: Tensor, b1s: Tensor, w2s: Tensor, b2s: Tensor, w3s: Tensor, b3s: Tensor,
    w1t: Tensor, b1t: Tensor, w2t: Tensor, b2t: Tensor, w3t: Tensor, b3t: Tensor,
    slope: float, precision: str, inverse: bool, context: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward of a fused layer from its output ``out`` (N, D).

    Returns ``(grad_in (N, D), gW1s, gb1s, gW2s, gb2s, gW3s, gb3s, gW1t, ..., gb3t,
    grad_context (N, E))``; grad_context is (N, 0) without a context.
    """
    sw, tw = [w1s, b1s, w2s, b2s, w3s, b3s], [w1t, b1t, w2t, b2t, w3t, b3t]
    _check_layer(out, kept, transformed, sw, tw, slope, precision, "out", context)
    if grad_out.shape != out.shape:
        raise ValueError(
            f"grad_out must have shape {tuple(out.shape)}, got {tuple(grad_out.shape)}"
        )
    if grad_log_det.shape != (out.shape[0],):
        raise ValueError(
            f"grad_log_det must have shape ({out.shape[0]},), got {tuple(grad_log_det.shape)}"
        )
    return _layer_backward(
        out, grad_out, grad_log_det, kept, transformed, sw, tw, slope, precision, inverse,
        context,
    )  # fmt: skip


@coupling_layer_backward.register_fake
def _(out, grad_out, grad_log_det, kept, transformed, *rest, context=None):
    weights = rest[:12]
    context = _context_of(rest, 15, context)
    e = 0 if context is None else context.shape[1]
    return (
        torch.empty_like(out),
        *(torch.empty_like(w) for w in weights),
        out.new_empty(out.shape[0], e),
    )


def _setup(ctx, inputs, output):
    x, kept, transformed, *weights, slope, precision, context = inputs
    ctx.save_for_backward(output[0], kept, transformed, context, *weights)
    ctx.slope = slope
    ctx.precision = precision


def _make_backward(inverse: bool):
    def backward(ctx, grad_out, grad_log_det):
        out, kept, transformed, context, *weights = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_log_det is None:
            grad_log_det = out.new_zeros(out.shape[0], dtype=_ld_dtype(out))
        grads = coupling_layer_backward(
            out, grad_out.contiguous(), grad_log_det.contiguous(), kept, transformed, *weights,
            ctx.slope, ctx.precision, inverse, context,
        )  # fmt: skip
        grad_context = None if context is None else grads[13]
        return (grads[0], None, None, *grads[1:13], None, None, grad_context)

    return backward


coupling_layer.register_autograd(_make_backward(False), setup_context=_setup)
coupling_layer_inverse.register_autograd(_make_backward(True), setup_context=_setup)


def _check_stack(x, kept, transformed, k1, k2, sw, tw, slope, precision, x_name, context) -> None:
    ensure_batch(x, x_name)
    _check_index(kept, "kept", x.shape[1], ndim=2)
    _check_index(transformed, "transformed", x.shape[1], ndim=2)
    num_layers = kept.shape[0]
    for name, k in (("k1", k1), ("k2", k2)):
        if not isinstance(k, Tensor) or k.dtype in (torch.float32, torch.float64) or k.ndim != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor of per-layer counts")
        if k.shape[0] != num_layers:
            raise ValueError(f"{name} must have {num_layers} entries, got {k.shape[0]}")
    if transformed.shape[0] != num_layers:
        raise ValueError(f"transformed must have {num_layers} rows like kept")
    h_s = _check_net(sw, "s_", x, kept.shape[1], transformed.shape[1], num_layers)
    h_t = _check_net(tw, "t_", x, kept.shape[1], transformed.shape[1], num_layers)
    if h_s != h_t:
        raise ValueError(f"S and T must have the same hidden width, got {h_s} and {h_t}")
    # The stacked W1 is padded, so E is not in its shape: every layer's K1 + E must fit its
    # columns. Checked here, before either backend runs (one host read of k1 on a GPU), so a
    # kernel never reads past a layer's weights.
    why = "E = the context width the weights were stacked with"
    _check_context(context, x, x_name, None, why)
    if context is not None:
        e, widest = context.shape[1], int(k1.max())
        if widest + e > sw[0].shape[2]:
            raise ValueError(
                f"context has E = {e} columns but the stacked W1 has {sw[0].shape[2]} columns "
                f"for up to {widest} kept features: context must have shape (N, E) with E the "
                "context width the weights were stacked with"
            )
    _check_slope(slope)
    _check_precision(precision)


@torch.library.custom_op("fastnvp::coupling_stack_forward", mutates_args=())
def coupling_stack_forward(
    x: Tensor, kept: Tensor, transformed: Tensor, k1: Tensor, k2: Tensor,
    w1s: Tensor, b1s: Tensor, w2s: Tensor, b2s: Tensor, w3s: Tensor, b3s: Tensor,
    w1t: Tensor, b1t: Tensor, w2t: Tensor, b2t: Tensor, w3t: Tensor, b3t: Tensor,
    slope: float, precision: str, context: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """All layers 0..L-1, data -> latent, inference only: ``(z (N, D), log_det (N,))``.

    ``context``: None or (N, E), one context for every layer; E must be the context width the
    weights were stacked with (:func:`stack_layers`).
    """
    sw, tw = [w1s, b1s, w2s, b2s, w3s, b3s], [w1t, b1t, w2t, b2t, w3t, b3t]
    _check_stack(x, kept, transformed, k1, k2, sw, tw, slope, precision, "x", context)
    return _stack(x, kept, transformed, k1, k2, sw, tw, slope, precision, False, context)


@torch.library.custom_op("fastnvp::coupling_stack_inverse", mutates_args=())
def coupling_stack_inverse(
    z: Tensor, kept: Tensor, transformed: Tensor, k1: Tensor, k2: Tensor,
    w1s: Tensor, b1s: Tensor, w2s: Tensor, b2s: Tensor, w3s: Tensor, b3s: Tensor,
    w1t: Tensor, b1t: Tensor, w2t: Tensor, b2t: Tensor, w3t: Tensor, b3t: Tensor,
    slope: float, precision: str, context: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """All layers L-1..0, latent -> data, inference only: ``(x (N, D), log_det (N,))``.

    ``context``: None or (N, E), as for :func:`coupling_stack_forward`.
    """
    sw, tw = [w1s, b1s, w2s, b2s, w3s, b3s], [w1t, b1t, w2t, b2t, w3t, b3t]
    _check_stack(z, kept, transformed, k1, k2, sw, tw, slope, precision, "z", context)
    return _stack(z, kept, transformed, k1, k2, sw, tw, slope, precision, True, context)


@coupling_stack_forward.register_fake
def _(x, *rest, context=None):
    return _fake_layer(x)


@coupling_stack_inverse.register_fake
def _(z, *rest, context=None):
    return _fake_layer(z)


# ---------------------------------------------------------------------------------- helpers
def layer_args(s_weights: Sequence[Tensor], t_weights: Sequence[Tensor]) -> list[Tensor]:
    """The 12 weight arguments of the layer ops, S's six then T's six."""
    if len(s_weights) != 6 or len(t_weights) != 6:
        raise ValueError("s_weights and t_weights must each hold (W1, b1, W2, b2, W3, b3)")
    return [*s_weights, *t_weights]


def pad_widths(k1_max: int, k2_max: int) -> tuple[int, int]:
    """Padded kept/transformed widths of the stacked weights (what the stack kernel needs)."""

    def pow2(k: int) -> int:
        return 1 << max(int(k) - 1, 0).bit_length()

    k1p = pow2(k1_max)
    k1p = k1p if k1p <= FIRST_LINEAR_OUTER_MAX else max(k1p, 16)
    return k1p, max(pow2(k2_max), 16)


def stack_layers(layers: Sequence[tuple[Tensor, Tensor, Sequence[Tensor], Sequence[Tensor]]]):
    """Stack per-layer ``(kept, transformed, s_weights, t_weights)`` for the stack ops.

    Returns ``(kept (L, K1P), transformed (L, K2P), k1 (L,), k2 (L,), 12 stacked weights)``,
    zero-padded to the widths of :func:`pad_widths` (padded W1 columns, W3 rows and b3 entries
    are 0, so padding contributes nothing). Inference only: the result is detached. A
    conditional layer's W1 is (H, K1 + E) (kept columns, then the E context columns): K1P then
    pads the widest K1 + E, and each layer's context columns follow its own K1 kept ones.
    """
    if len(layers) < 1:
        raise ValueError("stack_layers needs at least one layer")
    k1p, k2p = pad_widths(
        max(int(sw[0].shape[1]) for *_, sw, _ in layers),
        max(int(tr.numel()) for _, tr, *_ in layers),
    )
    kept_rows, trans_rows, k1s, k2s = [], [], [], []
    nets: list[list[list[Tensor]]] = [[[] for _ in range(6)] for _ in range(2)]
    for kept, transformed, sw, tw in layers:
        a, b = kept.numel(), transformed.numel()
        kept_rows.append(F.pad(kept, (0, k1p - a)))
        trans_rows.append(F.pad(transformed, (0, k2p - b)))
        k1s.append(a)
        k2s.append(b)
        for net, weights in zip(nets, (sw, tw)):
            w1, b1, w2, b2, w3, b3 = (w.detach() for w in weights)
            net[0].append(F.pad(w1, (0, k1p - w1.shape[1])))  # K1 (+ E context) columns
            net[1].append(b1)
            net[2].append(w2)
            net[3].append(b2)
            net[4].append(F.pad(w3, (0, 0, 0, k2p - b)))
            net[5].append(F.pad(b3, (0, k2p - b)))
    device = layers[0][0].device
    stacked = [torch.stack(ws) for net in nets for ws in net]
    return (
        torch.stack(kept_rows),
        torch.stack(trans_rows),
        torch.tensor(k1s, dtype=torch.int32, device=device),
        torch.tensor(k2s, dtype=torch.int32, device=device),
        *stacked,
    )


def stack_weight_bytes(stacked_weights: Sequence[Tensor]) -> int:
    """Bytes of the stacked weights (for the cache-budget choice of stack vs per-layer)."""
    return sum(w.numel() * 4 for w in stacked_weights)


# ------------------------------------------------------------------------------- flow helpers
def layer_weights(flow, layer: int):
    """``(kept, transformed, s_weights, t_weights)`` of a standard coupling layer of a flow.

    ``flow`` is a :class:`fastnvp.core.reference.FlowBase` (RealNVP or FastRealNVP) whose layer
    ``layer`` has a standard conditioner pair (``fastnvp.core.conditioner.is_standard_pair``). The
    weights are differentiable gathers of the module's parameters.
    """
    from fastnvp.core.conditioner import match_standard_mlp, standard_weights
    from fastnvp.core.masks import split_indices

    s_mlp = match_standard_mlp(flow.s[layer], flow.dim)
    t_mlp = match_standard_mlp(flow.t[layer], flow.dim)
    if s_mlp is None or t_mlp is None:
        raise ValueError(f"layer {layer} does not have a standard conditioner pair")
    kept, transformed = split_indices(flow.mask[layer])
    kept = kept.to(s_mlp.lin1.weight.device)
    transformed = transformed.to(s_mlp.lin1.weight.device)
    sw = standard_weights(s_mlp, kept, transformed)
    tw = standard_weights(t_mlp, kept, transformed)
    return kept, transformed, sw, tw


def flow_slope(flow) -> float:
    """The LeakyReLU slope shared by a flow's standard conditioners."""
    from fastnvp.core.conditioner import match_standard_mlp

    return match_standard_mlp(flow.s[0], flow.dim).negative_slope


def flow_forward(flow, x: Tensor, precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """f through all layers, one fused-layer launch each (differentiable).  (N, D) -> (z, ld)."""
    slope = flow_slope(flow)
    z, log_det = x, None
    for layer in range(flow.num_layers):
        kept, transformed, sw, tw = layer_weights(flow, layer)
        z, ld = coupling_layer(z, kept, transformed, *sw, *tw, slope, precision)
        log_det = ld if log_det is None else log_det + ld
    return z, log_det


def flow_inverse(flow, z: Tensor, precision: str = "ieee") -> Tensor:
    """g through all layers (L-1..0) with one fused-layer launch each.  (N, D) -> (N, D)."""
    slope = flow_slope(flow)
    x = z
    for layer in reversed(range(flow.num_layers)):
        kept, transformed, sw, tw = layer_weights(flow, layer)
        x, _ = coupling_layer_inverse(x, kept, transformed, *sw, *tw, slope, precision)
    return x


def flow_stack(flow):
    """The stack ops' arguments (without x/slope/precision) for a flow: see :func:`stack_layers`."""
    return stack_layers([layer_weights(flow, i) for i in range(flow.num_layers)])


def stack_fits(stacked, budget: int = STACK_CACHE_BUDGET) -> bool:
    """True when the stacked weights fit the cache budget of the one-launch stack kernel."""
    return stack_weight_bytes(stacked[4:]) <= budget


# ---------------------------------------------------------------------- FastRealNVP hooks
FUSED_LEVELS = ("auto", "layer", "op", "none")


def check_fused(fused) -> str:
    """Validate FastRealNVP's ``fused`` level.

    ``auto``: the fused layer (and the whole-stack kernel for inference) on CUDA tensors with
    the Triton backend, for layers with the standard conditioner; ``layer``: the fused-layer ops
    wherever the conditioner is standard (the PyTorch path of the ops on CPU); ``op``: only the
    elementwise coupling op; ``none``: the same, named for symmetry with the reference.
    """
    if not isinstance(fused, str) or fused not in FUSED_LEVELS:
        raise ValueError(f"fused must be one of {FUSED_LEVELS}, got {fused!r}")
    return fused


def check_precision(precision) -> str:
    """Validate a matmul precision name ("ieee", "tf32" or "bf16")."""
    _check_precision(precision)
    return precision
