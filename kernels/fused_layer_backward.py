"""Backward of the fully fused coupling layer, recomputed from the layer's output.

Math (docs/design.md §4.3), with the layer output y (its kept half x1 equals the input's),
upstream g (per element, halves g1/g2) and gl (per row); a1, a2 are the pre-activations of each
net::

    forward layer:  gin2 = g2 * exp(s),   gs = g2 * (y2 - t) + gl,   gt = g2
    inverse layer:  gin2 = g2 * exp(-s),  gs = -(g2 * y2 + gl),      gt = -gin2
    gu_S = gs * (1 - s^2),  gu_T = gt                                  (BLOCK_M, K2)
    per net:  ga2 = (gu @ W3) * leaky'(a2)     ga1 = (ga2 @ W2) * leaky'(a1)
              dW3 = gu^T h2, db3 = sum gu, dW2 = ga2^T h1, db2 = sum ga2, dW1 = ga1^T x1,
              db1 = sum ga1,  gx1 += ga1 @ W1
    gin1 = g1 + gx1_S + gx1_T

Memory traffic per row: y, g (2 D), gl, gin (D) and the scratch ga2 (H floats per net, written
once and read back once by the same program). Compute: per net three H x H products in the
kernel (the recompute of a2 twice: once for s/t, once chunk by chunk for ga2) plus dW2 outside.

Design: one program per BLOCK_M rows, both nets. Pass A recomputes s and t (the forward
kernel's ``_net``). Pass B walks the H x H Linear's output columns in HC chunks: recompute a2,
form ga2 = (gu @ W3[:, chunk]) * leaky'(a2), store it to the scratch and fold the chunk's dW3 and
db2 partials. Pass C (after a barrier: other threads wrote ga2) walks h1 in KC chunks:
gh1 = ga2 @ W2[:, chunk], ga1, the dW1/db1 partials and gx1. The small weight gradients (dW1,
db1, db2, dW3, db3: O(H * (K1 + K2)) per program) are per-program partial sums reduced by one
``sum(0)`` afterwards — deterministic, no atomics. The H x H gradient dW2 = ga2^T h1 is a GEMM
on the scratch (cuBLAS at full rate, deterministic): per-program (H, H) partials would cost
256 KB of writes per 128 rows at H = 256, more than the activations themselves (the
tiny-cuda-nn choice). For a wide kept half (K1 > 4) ga1 goes to a second scratch and dW1 / the
conditioner's part of gx1 are GEMMs too. Limits: the scratch is N x H fp32 per net (bf16 in bf16
mode would halve it); the recompute costs one extra H x H product per net; wide halves (D = 128:
(rows, 64) x1/gu/gx1 tiles) leave fewer registers for the H x H chunks, so their tiles are
narrower (16 output columns per chunk: more passes over W2 per row tile) to stay 0-spill on
sm_90; halves wider than 64 are not compiled by benchmarks/compile_report.py.

Context (HAS_CONTEXT, docs/design.md §4.3): the nets' input is cat(x1, c), K1 + E columns with c
the (N, E) context; gx1 is then the gradient of that whole input, its columns < K1 (plus g1) go
to gin at the kept indices and its columns K1..K1+E-1 are d(context), stored to an (N, E)
output. Without context the kernel compiles to exactly the unconditional code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastnvp.kernels.fused_layer import (
    _OUTER_K1_MAX,
    OUTER_K1_MAX,
    _context_cols,
    _dot,
    _hidden2,
    _layer1,
    _leaky,
    _net,
    _tanh,
    _with_context,
    check_hidden,
    context_arg,
    for_this_triton,
    layer_config,
    pad_k1,
    pad_k2,
    prec_code,
    tile_tier,
    wide_halves,
)
from fastnvp.kernels.triton_limits import kernel_ships


@triton.jit
def _net_backward(x1, k1cols, K1, K2, gu, rows, row_ok, pid,
                  w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, ga2_ptr, ga1_ptr, part_ptr, slope,
                  H: tl.constexpr, BLOCK_M: tl.constexpr, K1P: tl.constexpr, K2P: tl.constexpr,
                  HC: tl.constexpr, KC: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Passes B and C for one net; returns this net's gx1 (BLOCK_M, K1P).

    Partials of this program go to part_ptr + pid * PW in the layout
    [dW1 (H, K1P) | db1 (H) | db2 (H) | dW3 (K2P, H) | db3 (K2P)].
    """
    k2cols = tl.arange(0, K2P)
    pw: tl.constexpr = H * (K1P + 2 + K2P) + K2P
    base = part_ptr + pid.to(tl.int64) * pw
    off_b1: tl.constexpr = H * K1P
    off_b2: tl.constexpr = off_b1 + H
    off_w3: tl.constexpr = off_b2 + H
    off_b3: tl.constexpr = off_w3 + K2P * H
    scratch = ga2_ptr + rows.to(tl.int64)[:, None] * H
    # Pass B: ga2 chunk by chunk, with its dW3 / db2 partials.
    for n0 in range(0, H, HC):
        ncols = n0 + tl.arange(0, HC)
        a2 = _hidden2(x1, k1cols, K1, w1_ptr, K1, b1_ptr, w2_ptr, b2_ptr, ncols, slope,
                      H, BLOCK_M, K1P, HC, KC, PREC)  # fmt: skip
        w3 = tl.load(
            w3_ptr + k2cols[:, None] * H + ncols[None, :], mask=(k2cols < K2)[:, None], other=0.0
        )  # (K2P, HC)
        gh2 = _dot(gu, w3, tl.zeros((BLOCK_M, HC), tl.float32), PREC)
        ga2 = tl.where(row_ok[:, None], gh2 * tl.where(a2 > 0, 1.0, slope), 0.0)
        tl.store(scratch + ncols[None, :], ga2, mask=row_ok[:, None])
        h2 = _leaky(a2, slope)
        pw3 = _dot(tl.trans(gu), h2, tl.zeros((K2P, HC), tl.float32), PREC)
        tl.store(base + off_w3 + k2cols[:, None] * H + ncols[None, :], pw3)
        tl.store(base + off_b2 + ncols, tl.sum(ga2, axis=0))
    tl.store(base + off_b3 + k2cols, tl.sum(gu, axis=0))
    # Pass C reads ga2 columns written by other threads of this program.
    tl.debug_barrier()
    gx1 = tl.zeros((BLOCK_M, K1P), tl.float32)
    for k0 in range(0, H, KC):
        kcols = k0 + tl.arange(0, KC)
        gh1 = tl.zeros((BLOCK_M, KC), tl.float32)
        for n0 in range(0, H, HC):
            ncols = n0 + tl.arange(0, HC)
            ga2 = tl.load(scratch + ncols[None, :], mask=row_ok[:, None], other=0.0)
            w2 = tl.load(w2_ptr + ncols[:, None] * H + kcols[None, :])  # (HC, KC)
            gh1 = _dot(ga2, w2, gh1, PREC)
        a1 = _layer1(x1, k1cols, K1, w1_ptr, K1, b1_ptr, kcols, BLOCK_M, KC, K1P, PREC)
        ga1 = gh1 * tl.where(a1 > 0, 1.0, slope)
        tl.store(base + off_b1 + kcols, tl.sum(ga1, axis=0))
        if K1P > _OUTER_K1_MAX:
            # Wide kept half: ga1 goes to a scratch; dW1 = ga1^T x1 and gx1 += ga1 W1 are GEMMs
            # after the kernel (two more wide dots here spill on sm_90).
            tl.store(ga1_ptr + rows.to(tl.int64)[:, None] * H + kcols[None, :], ga1,
                     mask=row_ok[:, None])  # fmt: skip
        else:
            # K1 <= 4: row/column reductions in fp32 instead of dots padded to 16.
            for k in tl.static_range(K1P):
                xk = tl.sum(tl.where(k1cols[None, :] == k, x1, 0.0), axis=1)
                tl.store(base + kcols * K1P + k, tl.sum(ga1 * xk[:, None], axis=0))
                w1k = tl.load(w1_ptr + kcols * K1 + k, mask=(kcols * 0 + k) < K1, other=0.0)
                gk = tl.sum(ga1 * w1k[None, :], axis=1)
                gx1 += tl.where(k1cols[None, :] == k, gk[:, None], 0.0)
    return gx1


@triton.jit
def coupling_layer_backward_kernel(out_ptr, gout_ptr, gld_ptr, gin_ptr, kept_ptr, trans_ptr,
                                   N, D, K1, K2,
                                   w1s, b1s, w2s, b2s, w3s, b3s, w1t, b1t, w2t, b2t, w3t, b3t,
                                   ga2s_ptr, ga2t_ptr, ga1s_ptr, ga1t_ptr, parts_ptr, partt_ptr,
                                   slope, ctx_ptr, gctx_ptr, E,
                                   H: tl.constexpr, BLOCK_M: tl.constexpr, K1P: tl.constexpr,
                                   K2P: tl.constexpr, HC: tl.constexpr, KC: tl.constexpr,
                                   PREC: tl.constexpr, INVERSE: tl.constexpr,
                                   HAS_CONTEXT: tl.constexpr):  # fmt: skip
    """Backward of one fused layer; grid = cdiv(N, BLOCK_M). out/gout/gin (N, D), gld (N,).

    With HAS_CONTEXT: W1 (H, K1 + E), ctx (N, E) and its gradient gctx (N, E), contiguous.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    k1cols = tl.arange(0, K1P)
    k2cols = tl.arange(0, K2P)
    kidx = tl.load(kept_ptr + k1cols, mask=k1cols < K1, other=0)
    tidx = tl.load(trans_ptr + k2cols, mask=k2cols < K2, other=0)
    m1 = row_ok[:, None] & (k1cols < K1)[None, :]
    m2 = row_ok[:, None] & (k2cols < K2)[None, :]
    base = rows.to(tl.int64)[:, None] * D
    x1 = tl.load(out_ptr + base + kidx[None, :], mask=m1, other=0.0).to(tl.float32)
    y2 = tl.load(out_ptr + base + tidx[None, :], mask=m2, other=0.0).to(tl.float32)
    g2 = tl.load(gout_ptr + base + tidx[None, :], mask=m2, other=0.0).to(tl.float32)
    gl = tl.load(gld_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_CONTEXT:
        x1 = _with_context(x1, k1cols, K1, rows, row_ok, ctx_ptr, E)
        kin = K1 + E
    else:
        kin = K1
    # Pass A: s and t.
    s = _tanh(
        _net(x1, k1cols, kin, K2, w1s, kin, b1s, w2s, b2s, w3s, b3s, slope,
             H, BLOCK_M, K1P, K2P, HC, KC, PREC)
    )  # fmt: skip
    t = _net(x1, k1cols, kin, K2, w1t, kin, b1t, w2t, b2t, w3t, b3t, slope,
             H, BLOCK_M, K1P, K2P, HC, KC, PREC)  # fmt: skip
    if INVERSE:
        gin2 = g2 * tl.exp(-s)
        gs = -(g2 * y2 + gl[:, None])
        gt = -gin2
    else:
        gin2 = g2 * tl.exp(s)
        gs = g2 * (y2 - t) + gl[:, None]
        gt = g2
    gu_s = tl.where(m2, gs * (1.0 - s * s), 0.0)
    gu_t = tl.where(m2, gt, 0.0)
    # Store gin2 now and load g1 last: fewer (BLOCK_M, K) tensors live through the nets.
    tl.store(gin_ptr + base + tidx[None, :], gin2.to(gin_ptr.dtype.element_ty), mask=m2)
    gx1 = _net_backward(x1, k1cols, kin, K2, gu_s, rows, row_ok, pid,
                         w1s, b1s, w2s, b2s, w3s, ga2s_ptr, ga1s_ptr, parts_ptr, slope,
                         H, BLOCK_M, K1P, K2P, HC, KC, PREC)  # fmt: skip
    gx1 += _net_backward(x1, k1cols, kin, K2, gu_t, rows, row_ok, pid,
                         w1t, b1t, w2t, b2t, w3t, ga2t_ptr, ga1t_ptr, partt_ptr, slope,
                         H, BLOCK_M, K1P, K2P, HC, KC, PREC)  # fmt: skip
    if HAS_CONTEXT:
        # Columns K1..K1+E-1 of the input gradient are d(context) (no upstream term).
        is_ctx, coff = _context_cols(k1cols, K1, E)
        tl.store(
            gctx_ptr + rows.to(tl.int64)[:, None] * E + coff[None, :],
            gx1.to(gctx_ptr.dtype.element_ty),
            mask=row_ok[:, None] & is_ctx[None, :],
        )
    gx1 += tl.load(gout_ptr + base + kidx[None, :], mask=m1, other=0.0).to(tl.float32)
    tl.store(gin_ptr + base + kidx[None, :], gx1.to(gin_ptr.dtype.element_ty), mask=m1)


def backward_config(
    hidden: int, precision: str, interpret: bool, k1p: int = 1, k2p: int = 16
) -> dict:
    """Tile sizes of the backward kernel (all measured 0-spill on sm_90).

    Pass C keeps a (BLOCK_M, KC) gradient and (BLOCK_M, HC) loads live next to pass A's s/t, so
    the backward takes narrower tiles than the forward: tf32/bf16 64 rows x 64 columns x 16-row
    (tf32) / 32-row (bf16) K chunks on 8 warps; ieee (FMA dots) 32 rows x 16 columns (16 rows x
    32 columns with a dot first Linear) x 8-row K chunks.
    Wide halves (``wide_halves``: D = 128 compiled) also keep x1, gu and gx1 as (rows, 64) tiles
    and contract over K2P = 64 in gu @ W3: 16 output columns per chunk, and 8-row (tf32) /
    16-row (bf16) K chunks; ieee keeps 32 rows on 8 warps (twice the threads to hold them).
    Before this tier the D = 128 backward spilled 388-516 B at 255 registers in every precision.
    These are the tiles measured on Triton 3.9; ``for_this_triton`` adapts them to the installed
    Triton (``fastnvp.kernels.triton_limits``).
    """
    if interpret:
        return layer_config(hidden, precision, interpret, k1p, k2p)
    if wide_halves(k1p, k2p):
        if precision == "ieee":
            cfg = {"BLOCK_M": 32, "HC": min(hidden, 16), "KC": 8, "num_warps": 8}
        else:
            kc = 8 if precision == "tf32" else 16  # the tensor-core minimum K of each precision
            cfg = {"BLOCK_M": 64, "HC": min(hidden, 16), "KC": min(hidden, kc), "num_warps": 8}
    elif precision == "ieee":
        if k1p > OUTER_K1_MAX:
            cfg = {"BLOCK_M": 16, "HC": min(hidden, 32), "KC": 8, "num_warps": 4}
        else:
            # 16 columns at H >= 128; at H = 64 the 4 column chunks spill and 32 columns do not.
            cfg = {
                "BLOCK_M": 32,
                "HC": min(hidden, 32 if hidden <= 64 else 16),
                "KC": 8,
                "num_warps": 4,
            }
    else:
        kc = 16 if precision == "tf32" else 32  # tf32 operands are twice bf16's registers
        cfg = {"BLOCK_M": 64, "HC": min(hidden, 64), "KC": min(hidden, kc), "num_warps": 8}
    return for_this_triton(cfg, "backward", precision, hidden, k1p, k2p)


def ships(precision: str, k1: int, k2: int) -> bool:
    """Whether this Triton's fused backward kernel runs for a layer with K1 first-Linear inputs
    (kept features, plus the context columns of a conditional layer) and K2 transformed features
    (``triton_limits.UNSHIPPED``: else the PyTorch backward runs)."""
    return kernel_ships("backward", precision, tile_tier(pad_k1(k1), pad_k2(k2)))


def dot_shapes(cfg: dict, k1p: int, k2p: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every tl.dot the backward kernel issues for a config (forward dots included)."""
    bm, hc, kc = cfg["BLOCK_M"], cfg["HC"], cfg["KC"]
    shapes = [(bm, kc, hc), (bm, hc, k2p), (bm, k2p, hc), (k2p, bm, hc), (bm, hc, kc)]
    if k1p > OUTER_K1_MAX:
        shapes.append((bm, k1p, kc))
    return shapes


def partial_width(hidden: int, k1p: int, k2p: int) -> int:
    """Floats per program in one net's partial-gradient row."""
    return hidden * (k1p + 2 + k2p) + k2p


def _reduce(part, ga2, x1, weights, k1, k2, k1p, k2p, slope, precision):
    """Sum the per-program partials and run the dW2 GEMM; gradients in the weights' dtypes."""
    hidden = weights[2].shape[0]
    total = part.sum(dim=0)
    o_b1 = hidden * k1p
    o_b2 = o_b1 + hidden
    o_w3 = o_b2 + hidden
    o_b3 = o_w3 + k2p * hidden
    gw1 = total[:o_b1].view(hidden, k1p)[:, :k1]
    gb1 = total[o_b1:o_b2]
    gb2 = total[o_b2:o_w3]
    gw3 = total[o_w3:o_b3].view(k2p, hidden)[:k2]
    gb3 = total[o_b3 : o_b3 + k2]
    w1 = weights[0].detach().to(torch.float32)
    b1 = weights[1].detach().to(torch.float32)
    h1 = F.leaky_relu(F.linear(x1, w1, b1), slope)
    if precision == "bf16":
        # bf16 operands, fp32 products and sums (the kernel's dots): a bf16 matmul would also
        # round the result to bf16, ~3e-3 from the fp32-accumulated gradient.
        gw2 = ga2.to(torch.bfloat16).to(torch.float32).T @ h1.to(torch.bfloat16).to(torch.float32)
    else:
        gw2 = ga2.T @ h1
    grads = (gw1, gb1, gw2, gb2, gw3, gb3)
    # Copies: the partial-sum slices are views of one buffer, and op outputs must not alias.
    return [g.to(w.dtype, copy=True) for g, w in zip(grads, weights)]


def coupling_layer_backward(out, grad_out, grad_log_det, kept, transformed, s_weights, t_weights,
                            slope: float, precision: str, inverse: bool,
                            config: dict | None = None, fill: float | None = None,
                            context=None):  # fmt: skip
    """Launch the backward kernel and finish the weight gradients.

    Args:
        out: (N, D) layer output; grad_out (N, D); grad_log_det (N,); kept (K1,), transformed
            (K2,) int64; s_weights/t_weights (W1 (H, K1 + E), b1, W2 (H, H), b2, W3 (K2, H), b3).
            fill: when given, every buffer the kernel writes starts filled with it (tests pass
            NaN to check that every element is written). context: None or (N, E).
    Returns:
        (grad_in (N, D) in out's dtype, 6 gradients of S's weights, 6 of T's), then, when
        ``context`` is given, grad_context (N, E) in out's dtype.
    """
    out = out.contiguous()
    grad_out = grad_out.contiguous()
    grad_log_det = grad_log_det.to(torch.float32).contiguous()
    n, d = out.shape
    ctx, e = context_arg(context, out)
    k1, k2 = kept.numel(), transformed.numel()
    kin = k1 + e  # the first Linear's input width
    hidden = s_weights[2].shape[0]
    check_hidden(hidden)
    k1p, k2p = pad_k1(kin), pad_k2(k2)
    cfg = dict(config or backward_config(hidden, precision, not out.is_cuda, k1p, k2p))
    programs = triton.cdiv(n, cfg["BLOCK_M"])
    dev = out.device
    pw = partial_width(hidden, k1p, k2p)

    def buffer(*shape, like=None):
        if like is not None:
            return torch.empty_like(like) if fill is None else torch.full_like(like, fill)
        if fill is None:
            return torch.empty(*shape, device=dev, dtype=torch.float32)
        return torch.full(shape, fill, device=dev, dtype=torch.float32)

    parts = [buffer(programs, pw) for _ in range(2)]
    ga2 = [buffer(n, hidden) for _ in range(2)]
    wide = k1p > OUTER_K1_MAX
    ga1 = [buffer(n, hidden) for _ in range(2)] if wide else ga2  # unused when not wide
    grad_in = buffer(like=out)
    grad_ctx = buffer(n, e).to(out.dtype) if e else ctx
    ws = [w.detach().to(torch.float32).contiguous() for w in s_weights]
    wt = [w.detach().to(torch.float32).contiguous() for w in t_weights]
    coupling_layer_backward_kernel[(programs,)](
        out, grad_out, grad_log_det, grad_in, kept.contiguous(), transformed.contiguous(),
        n, d, k1, k2, *ws, *wt, ga2[0], ga2[1], ga1[0], ga1[1], parts[0], parts[1], float(slope),
        ctx, grad_ctx, e,
        H=hidden, BLOCK_M=cfg["BLOCK_M"], K1P=k1p, K2P=k2p, HC=cfg["HC"], KC=cfg["KC"],
        PREC=prec_code(precision, dev), INVERSE=bool(inverse), HAS_CONTEXT=e > 0,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    x1 = out.index_select(1, kept).to(torch.float32)
    if e:
        x1 = torch.cat([x1, ctx.to(torch.float32)], dim=1)  # the first Linear's input
    gs = _reduce(parts[0], ga2[0], x1, s_weights, kin, k2, k1p, k2p, slope, precision)
    gt = _reduce(parts[1], ga2[1], x1, t_weights, kin, k2, k1p, k2p, slope, precision)
    if wide:
        extra = 0
        for net, (grads, weights) in enumerate(((gs, ws), (gt, wt))):
            a, xk, w1 = ga1[net], x1, weights[0]
            if precision == "bf16":  # the kernel's dots would round these operands
                a, xk, w1 = (v.to(torch.bfloat16).to(torch.float32) for v in (a, xk, w1))
            grads[0] = (a.T @ xk).to(grads[0].dtype)
            extra = extra + a @ w1
        grad_in.index_add_(1, kept, extra[:, :k1].to(grad_in.dtype))
        if e:  # the kernel wrote 0 there: the first Linear's part of gx1 is this GEMM
            grad_ctx.copy_(extra[:, k1:])
    if e:
        return (grad_in, *gs, *gt, grad_ctx)
    return (grad_in, *gs, *gt)


def _sm90_configs() -> list[dict]:
    from fastnvp.kernels.fused_layer import shipped_layer_configs

    entries = shipped_layer_configs(
        coupling_layer_backward_kernel, stack=False, config_fn=backward_config, kind="backward"
    )
    entries = [
        e for e in entries
        if kernel_ships("backward", e["dots"][0][3], tile_tier(e["constexprs"]["K1P"],
                                                                e["constexprs"]["K2P"]))
    ]  # fmt: skip
    for entry in entries:
        c = entry["constexprs"]
        cfg = {"BLOCK_M": c["BLOCK_M"], "HC": c["HC"], "KC": c["KC"]}
        precision = entry["dots"][0][3]
        entry["dots"] = [(m, k, n, precision) for m, k, n in dot_shapes(cfg, c["K1P"], c["K2P"])]
    return entries


# What benchmarks/compile_report.py compiles for sm_90 (see fastnvp.kernels.fused_layer).
SM90_CONFIGS = _sm90_configs()
