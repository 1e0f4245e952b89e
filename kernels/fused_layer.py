"""Fully fused coupling layer (forward f / inverse g) and whole-stack inference.

Math (docs/design.md §1.1, §4.2), per row with kept half x1 (K1 features) and transformed
half x2 (K2 features), for each conditioner net P in {S, T} with weights W1 (H, K1), W2 (H, H),
W3 (K2, H) and slope a::

    a1 = x1 @ W1^T + b1        h1 = leaky(a1)          (the first Linear, K = K1, often 1)
    a2 = h1 @ W2^T + b2        h2 = leaky(a2)          (the H x H Linear: ~98% of the FLOPs)
    u  = h2 @ W3^T + b3                                (the last Linear, N = K2)
    s = tanh(u_S), t = u_T
    forward:  z2 = x2 * exp(s) + t,    log_det = +sum(s)
    inverse:  x2 = (z2 - t) * exp(-s), log_det = -sum(s)

Memory traffic per row: D inputs, D outputs, one log_det (~24 B at D = 2); the weights
(2 * (H*H + H*(K1+K2+2) + K2) floats) are read once per program and stay in L2. At H = 256 the
layer is compute bound (~266 kFLOP per row), so the kernel's job is to keep the H x H Linear on
the tensor cores and every intermediate in registers.

Design: one program owns BLOCK_M rows and runs both nets. The H x H Linear is chunked over its
output columns (HC) and its K dimension (KC): the accumulator is (BLOCK_M, HC), the first Linear
is recomputed per K chunk (it is K1 FMAs per element, far cheaper than keeping (BLOCK_M, H)
activations live), and each finished output chunk is folded straight into the last Linear, so no
(BLOCK_M, H) tensor is ever live. The first Linear is an outer product on CUDA cores when
K1 <= 4 (fp32 always) and a tl.dot for wider halves; the last Linear is a dot padded to
K2P >= 16 columns. The kernel reads the full (N, D) input with kept/transformed index vectors and
writes the full output, so one launch does gather + layer + scatter for any mask. The whole-stack
kernel keeps a row tile's state in the output buffer (L1/L2 resident; a barrier orders the layers)
and walks all L layers in one launch.

Context (conditional flows, docs/design.md §4.2): with HAS_CONTEXT the first Linear's input is
``cat(x1, c)`` of width K1 + E, c the (N, E) row-major context, against W1 (H, K1 + E) (kept
columns first, then the E context columns). The input tile is loaded from two sources (columns
< K1 from the state at the kept indices, columns K1..K1+E-1 from the context) and the nets run
with K1 := K1 + E, padded to K1P as without context; only the K1 kept columns are stored back.
Without context (HAS_CONTEXT = False) the kernels compile to exactly the unconditional code.

Limits: fp32 weights; x in fp32/bf16/fp16 (math in fp32). H must be a power of two (>= 16); the
tf32/bf16 modes need the dot shapes of ``dot_shapes`` to meet the tensor-core minimums, which the
config tables guarantee. Tanh is ``2 / (1 + exp(-2u)) - 1`` (the interpreter has no tanh). Every
shipped config compiles for sm_90 with 0 spills (benchmarks/compile_report.py: D = 2, 16, 128);
halves wider than 16 take smaller tiles (``wide_halves``), since the (rows, K) tensors then
compete with the H x H chunks for registers -- fewer rows or shorter K chunks per program. Halves
wider than 64 (D > 128) are not compiled by the report. Whole-stack inference needs the stacked
weights to stay cache resident; the caller falls back to per-layer launches above a budget
(fastnvp.ops.fused_layer.STACK_CACHE_BUDGET).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastnvp.kernels.triton_limits import dot_k_min, tile_override

PRECISIONS = {"ieee": 0, "tf32": 1, "bf16": 2}
# Triton's interpreter mis-computes bf16 dots (and truncates on conversion), so on CPU tensors
# bf16 runs as mode 3: operands rounded to bf16 (round-to-nearest-even, in integer bit math),
# products and sums in fp32 -- the same numbers a bf16 tensor-core dot with fp32 accumulation gives.
PREC_BF16_EMULATED = 3
# The outer-product first Linear is used up to this padded K1; wider halves use tl.dot.
OUTER_K1_MAX = 4
_OUTER_K1_MAX = tl.constexpr(OUTER_K1_MAX)  # the same bound, visible inside @triton.jit
# Padded halves wider than this take the wide-data tiles of layer_config / backward_config.
WIDE_HALF_MIN = 16


# --------------------------------------------------------------------------------- jit helpers
@triton.jit
def _round_bf16(v):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b; PREC: 0 ieee fp32, 1 tf32, 2 bf16 operands / fp32 acc, 3 bf16 emulated."""
    if PREC == 3:
        out = tl.dot(_round_bf16(a), _round_bf16(b), acc, input_precision="ieee")
    elif PREC == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
    elif PREC == 1:
        out = tl.dot(a, b, acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, acc, input_precision="ieee")
    return out


@triton.jit
def _leaky(v, slope):
    return tl.where(v > 0, v, v * slope)


@triton.jit
def _tanh(u):
    # tanh(u) = 2 * sigmoid(2u) - 1; exp overflow to inf gives the correct limit -1.
    return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0


@triton.jit
def _layer1(x1, k1cols, K1, w1_ptr, w1_stride, b1_ptr, hcols,
            BLOCK_M: tl.constexpr, KC: tl.constexpr, K1P: tl.constexpr,
            PREC: tl.constexpr):  # fmt: skip
    """Pre-activation a1[:, hcols] = x1 @ W1[hcols, :]^T + b1[hcols]: (BLOCK_M, KC) fp32."""
    b1 = tl.load(b1_ptr + hcols)
    if K1P > _OUTER_K1_MAX:
        w = tl.load(
            w1_ptr + hcols[None, :] * w1_stride + k1cols[:, None],
            mask=(k1cols < K1)[:, None],
            other=0.0,
        )  # (K1P, KC) = W1[hcols, :]^T
        acc = _dot(x1, w, tl.zeros((BLOCK_M, KC), tl.float32), PREC)
    else:
        # K1 <= 4: a few outer products in fp32 on CUDA cores beat a 16-wide padded dot.
        acc = tl.zeros((BLOCK_M, KC), tl.float32)
        for k in tl.static_range(K1P):
            xk = tl.sum(tl.where(k1cols[None, :] == k, x1, 0.0), axis=1)
            wk = tl.load(w1_ptr + hcols * w1_stride + k, mask=(hcols * 0 + k) < K1, other=0.0)
            acc += xk[:, None] * wk[None, :]
    return acc + b1[None, :]


@triton.jit
def _hidden2(x1, k1cols, K1, w1_ptr, w1_stride, b1_ptr, w2_ptr, b2_ptr, ncols, slope,
             H: tl.constexpr, BLOCK_M: tl.constexpr, K1P: tl.constexpr, HC: tl.constexpr,
             KC: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Pre-activation a2[:, ncols] of the H x H Linear: (BLOCK_M, HC) fp32, K chunked by KC."""
    acc = tl.zeros((BLOCK_M, HC), tl.float32)
    for k0 in range(0, H, KC):
        kcols = k0 + tl.arange(0, KC)
        h1 = _leaky(
            _layer1(x1, k1cols, K1, w1_ptr, w1_stride, b1_ptr, kcols, BLOCK_M, KC, K1P, PREC),
            slope,
        )
        w2t = tl.load(w2_ptr + ncols[None, :] * H + kcols[:, None])  # (KC, HC) = W2^T chunk
        acc = _dot(h1, w2t, acc, PREC)
    b2 = tl.load(b2_ptr + ncols)
    return acc + b2[None, :]


@triton.jit
def _net(x1, k1cols, K1, K2, w1_ptr, w1_stride, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, slope,
         H: tl.constexpr, BLOCK_M: tl.constexpr, K1P: tl.constexpr, K2P: tl.constexpr,
         HC: tl.constexpr, KC: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One conditioner net on a row tile: u = Linear3(leaky(Linear2(leaky(Linear1(x1))))).

    x1: (BLOCK_M, K1P) fp32 (padded columns are 0). Returns (BLOCK_M, K2P) fp32; padded columns
    are 0 because the padded rows of W3 and b3 load as 0.
    """
    k2cols = tl.arange(0, K2P)
    u = tl.zeros((BLOCK_M, K2P), tl.float32)
    for n0 in range(0, H, HC):
        ncols = n0 + tl.arange(0, HC)
        a2 = _hidden2(x1, k1cols, K1, w1_ptr, w1_stride, b1_ptr, w2_ptr, b2_ptr, ncols, slope,
                      H, BLOCK_M, K1P, HC, KC, PREC)  # fmt: skip
        w3t = tl.load(
            w3_ptr + k2cols[None, :] * H + ncols[:, None],
            mask=(k2cols < K2)[None, :],
            other=0.0,
        )  # (HC, K2P) = W3[:, ncols]^T
        u = _dot(_leaky(a2, slope), w3t, u, PREC)
    b3 = tl.load(b3_ptr + k2cols, mask=k2cols < K2, other=0.0)
    return u + b3[None, :]


@triton.jit
def _context_cols(k1cols, K1, E):
    """Which of the first-Linear input columns are context columns (K1 <= col < K1 + E), and
    each column's offset into a context row (0 elsewhere, so no address is negative)."""
    is_ctx = (k1cols >= K1) & (k1cols < K1 + E)
    return is_ctx, tl.where(is_ctx, k1cols - K1, 0)


@triton.jit
def _with_context(x1, k1cols, K1, rows, row_ok, ctx_ptr, E):
    """x1 (BLOCK_M, K1P) with columns K1..K1+E-1 loaded from the (N, E) context: cat(x1, c)."""
    is_ctx, coff = _context_cols(k1cols, K1, E)
    c = tl.load(
        ctx_ptr + rows.to(tl.int64)[:, None] * E + coff[None, :],
        mask=row_ok[:, None] & is_ctx[None, :],
        other=0.0,
    ).to(tl.float32)
    return tl.where(is_ctx[None, :], c, x1)


@triton.jit
def _coupling_tile(src_ptr, dst_ptr, rows, row_ok, D, kept_ptr, trans_ptr, K1, K2,
                   w1s, w1_stride, b1s, w2s, b2s, w3s, b3s,
                   w1t, b1t, w2t, b2t, w3t, b3t, slope, ctx_ptr, E,
                   H: tl.constexpr, BLOCK_M: tl.constexpr, K1P: tl.constexpr, K2P: tl.constexpr,
                   HC: tl.constexpr, KC: tl.constexpr, PREC: tl.constexpr,
                   INVERSE: tl.constexpr, STORE_KEPT: tl.constexpr,
                   HAS_CONTEXT: tl.constexpr):  # fmt: skip
    """One coupling layer on BLOCK_M rows of a (N, D) buffer; returns the rows' log_det (fp32).

    With HAS_CONTEXT the nets' input is cat(x1, c) (K1 + E columns, c from the (N, E) ctx_ptr).
    """
    k1cols = tl.arange(0, K1P)
    k2cols = tl.arange(0, K2P)
    kidx = tl.load(kept_ptr + k1cols, mask=k1cols < K1, other=0)
    tidx = tl.load(trans_ptr + k2cols, mask=k2cols < K2, other=0)
    m1 = row_ok[:, None] & (k1cols < K1)[None, :]
    m2 = row_ok[:, None] & (k2cols < K2)[None, :]
    base = rows.to(tl.int64)[:, None] * D
    x1 = tl.load(src_ptr + base + kidx[None, :], mask=m1, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + base + tidx[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_CONTEXT:
        xin = _with_context(x1, k1cols, K1, rows, row_ok, ctx_ptr, E)
        kin = K1 + E
    else:
        xin = x1
        kin = K1
    s = _tanh(
        _net(xin, k1cols, kin, K2, w1s, w1_stride, b1s, w2s, b2s, w3s, b3s, slope,
             H, BLOCK_M, K1P, K2P, HC, KC, PREC)
    )  # fmt: skip
    t = _net(xin, k1cols, kin, K2, w1t, w1_stride, b1t, w2t, b2t, w3t, b3t, slope,
             H, BLOCK_M, K1P, K2P, HC, KC, PREC)  # fmt: skip
    s = tl.where(m2, s, 0.0)
    if INVERSE:
        y2 = (x2 - t) * tl.exp(-s)
        log_det = -tl.sum(s, axis=1)
    else:
        y2 = x2 * tl.exp(s) + t
        log_det = tl.sum(s, axis=1)
    tl.store(dst_ptr + base + tidx[None, :], y2.to(dst_ptr.dtype.element_ty), mask=m2)
    if STORE_KEPT:
        tl.store(dst_ptr + base + kidx[None, :], x1.to(dst_ptr.dtype.element_ty), mask=m1)
    return log_det


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def coupling_layer_kernel(x_ptr, out_ptr, ld_ptr, kept_ptr, trans_ptr, N, D, K1, K2,
                          w1s, b1s, w2s, b2s, w3s, b3s, w1t, b1t, w2t, b2t, w3t, b3t, slope,
                          ctx_ptr, E,
                          H: tl.constexpr, BLOCK_M: tl.constexpr, K1P: tl.constexpr,
                          K2P: tl.constexpr, HC: tl.constexpr, KC: tl.constexpr,
                          PREC: tl.constexpr, INVERSE: tl.constexpr,
                          HAS_CONTEXT: tl.constexpr):  # fmt: skip
    """One coupling layer, grid = cdiv(N, BLOCK_M); x, out: (N, D) contiguous; ld: (N,) fp32.

    W1 is (H, K1 + E) with HAS_CONTEXT (ctx (N, E) contiguous), else (H, K1) and ctx/E unused.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    if HAS_CONTEXT:
        w1_stride = K1 + E
    else:
        w1_stride = K1
    log_det = _coupling_tile(
        x_ptr, out_ptr, rows, row_ok, D, kept_ptr, trans_ptr, K1, K2,
        w1s, w1_stride, b1s, w2s, b2s, w3s, b3s, w1t, b1t, w2t, b2t, w3t, b3t, slope, ctx_ptr, E,
        H, BLOCK_M, K1P, K2P, HC, KC, PREC, INVERSE, True, HAS_CONTEXT,
    )  # fmt: skip
    tl.store(ld_ptr + rows, log_det, mask=row_ok)


@triton.jit
def coupling_stack_kernel(x_ptr, out_ptr, ld_ptr, kept_ptr, trans_ptr, k1_ptr, k2_ptr, N, D, L,
                          w1s, b1s, w2s, b2s, w3s, b3s, w1t, b1t, w2t, b2t, w3t, b3t, slope,
                          ctx_ptr, E,
                          H: tl.constexpr, BLOCK_M: tl.constexpr, K1P: tl.constexpr,
                          K2P: tl.constexpr, HC: tl.constexpr, KC: tl.constexpr,
                          DP: tl.constexpr, PREC: tl.constexpr, INVERSE: tl.constexpr,
                          STATIC_L: tl.constexpr, HAS_CONTEXT: tl.constexpr):  # fmt: skip
    """All L layers on one row tile (forward: 0..L-1, inverse: L-1..0).

    Stacked, zero-padded weights: w1 (L, H, K1P), b1 (L, H), w2 (L, H, H), b2 (L, H),
    w3 (L, K2P, H), b3 (L, K2P); kept (L, K1P) / trans (L, K2P) int64 with per-layer counts
    k1/k2 (L,) int32. The tile's state lives in ``out`` (its rows are private to this program).
    With HAS_CONTEXT every layer's W1 row holds its K1 kept columns, then the E context columns
    of the one (N, E) context ``ctx`` all layers share, then zeros.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = tl.arange(0, DP)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    ok = row_ok[:, None] & (cols < D)[None, :]
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=ok), mask=ok)
    tl.debug_barrier()
    log_det = tl.zeros((BLOCK_M,), tl.float32)
    # The interpreters of Triton <= 3.6 pass runtime scalars as 1-element arrays, which NumPy
    # >= 2.4 refuses as a range bound, so the interpreter gets the depth as a constexpr
    # (STATIC_L > 0). On a GPU STATIC_L = 0 and the loop is an scf.for over the runtime L (a
    # while loop here makes Triton 3.3's fence-insertion pass fail).
    for i in range(L if STATIC_L == 0 else STATIC_L):
        if INVERSE:
            layer = L - 1 - i
        else:
            layer = i
        K1 = tl.load(k1_ptr + layer)
        K2 = tl.load(k2_ptr + layer)
        hk1 = layer * H * K1P
        hh = layer * H * H
        hk2 = layer * K2P * H
        log_det += _coupling_tile(
            out_ptr, out_ptr, rows, row_ok, D, kept_ptr + layer * K1P, trans_ptr + layer * K2P,
            K1, K2,
            w1s + hk1, K1P, b1s + layer * H, w2s + hh, b2s + layer * H, w3s + hk2,
            b3s + layer * K2P,
            w1t + hk1, b1t + layer * H, w2t + hh, b2t + layer * H, w3t + hk2, b3t + layer * K2P,
            slope, ctx_ptr, E, H, BLOCK_M, K1P, K2P, HC, KC, PREC, INVERSE, False, HAS_CONTEXT,
        )  # fmt: skip
        # The next layer reads columns other threads of this program just wrote.
        tl.debug_barrier()
    tl.store(ld_ptr + rows, log_det, mask=row_ok)


# ------------------------------------------------------------------------------------- configs
def padded(k: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(k, minimum)."""
    return max(triton.next_power_of_2(int(k)), minimum)


def pad_k1(k1: int) -> int:
    """Padded kept width: exact power of two for the outer product, >= 16 when it is a dot."""
    p = padded(k1)
    return p if p <= OUTER_K1_MAX else max(p, 16)


def pad_k2(k2: int) -> int:
    """Padded transformed width: the last Linear is a dot, so N >= 16."""
    return padded(k2, 16)


def wide_halves(k1p: int, k2p: int) -> bool:
    """Whether a layer's padded halves take the wide-data tiles (see layer_config)."""
    return max(k1p, k2p) > WIDE_HALF_MIN


def tile_tier(k1p: int, k2p: int) -> str:
    """Which tile table a layer's padded halves take: "narrow", "outer", "dot_k1" or "wide".

    "narrow" is one first-Linear input column (K1P = 1); "outer" 2-4 columns (the outer-product
    first Linear with more FMAs per element, e.g. D = 2 with a context column), which on some
    Tritons needs smaller tiles; where a version has no "outer" tile it takes the "narrow" one
    (``fastnvp.kernels.triton_limits.TIER_FALLBACK``).
    """
    if wide_halves(k1p, k2p):
        return "wide"
    if k1p > OUTER_K1_MAX:
        return "dot_k1"
    return "narrow" if k1p == 1 else "outer"


def for_this_triton(cfg: dict, kernel: str, precision: str, hidden: int, k1p: int, k2p: int):
    """Apply the installed Triton's limits to a default tile (``fastnvp.kernels.triton_limits``):
    its override for this (kernel, precision, tier) if it has one, and K chunks no shorter than
    its smallest dot K."""
    tile = tile_override(kernel, precision, tile_tier(k1p, k2p), hidden)
    cfg = dict(cfg if tile is None else tile)
    cfg["HC"] = min(cfg["HC"], hidden)
    cfg["KC"] = min(max(cfg["KC"], dot_k_min(16 if precision == "bf16" else 32)), hidden)
    return cfg


def layer_config(
    hidden: int,
    precision: str,
    interpret: bool,
    k1p: int = 1,
    k2p: int = 16,
    kernel: str = "layer",
) -> dict:
    """Tile sizes for the forward/inverse/stack kernels (all measured 0-spill on sm_90).

    tf32/bf16 (wgmma): 128 output columns x 32-row (bf16) / 16-row (tf32) K chunks of W2
    (docs/design.md §4.5), 128 rows (64 rows x 64 columns when the first Linear is a dot too). ieee:
    Triton lowers fp32 dots to FMAs that hold each thread's whole K slice of both operands in
    registers, so the chunks are narrow (32 columns, 16-row K) and the tile is 64 rows (32 with a
    dot first Linear).
    Wide halves (padded K1 or K2 above 16, D = 128 compiled): the (rows, K) x1/x2/s/t tiles and
    the K2-wide last Linear take the registers the H x H chunks had, so bf16 drops to 16-row K
    chunks (32 spilled 12 B at 255 registers) and ieee to 16-row tiles (32 rows spilled 16 B in
    the stack kernel).
    These are the tiles measured on Triton 3.9; ``for_this_triton`` adapts them to the installed
    Triton (``kernel``: "layer" for the forward / inverse kernel, "stack" for the whole stack).
    Interpreter: tiny tiles with several chunks, so every loop and mask is exercised.
    """
    if interpret:
        return {"BLOCK_M": 16, "HC": min(hidden, 32), "KC": 16, "num_warps": 1}
    wide_k1 = k1p > OUTER_K1_MAX
    wide = wide_halves(k1p, k2p)
    if precision == "ieee":
        cfg = {
            "BLOCK_M": 16 if wide else 32 if wide_k1 else 64,
            "HC": min(hidden, 32),
            "KC": 8 if wide_k1 or wide else 16,
            "num_warps": 4,
        }
    else:
        kc = 16 if precision == "tf32" or wide else 32  # tf32 operands: twice bf16's registers
        cfg = {
            "BLOCK_M": 64 if wide_k1 or wide else 128,
            "HC": min(hidden, 64 if wide_k1 or wide else 128),
            "KC": min(hidden, kc),
            "num_warps": 8 if hidden >= 64 else 4,
        }
    return for_this_triton(cfg, kernel, precision, hidden, k1p, k2p)


def dot_shapes(cfg: dict, k1p: int, k2p: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every tl.dot the forward/inverse/stack kernels issue for a config."""
    shapes = [(cfg["BLOCK_M"], cfg["KC"], cfg["HC"]), (cfg["BLOCK_M"], cfg["HC"], k2p)]
    if k1p > OUTER_K1_MAX:
        shapes.append((cfg["BLOCK_M"], k1p, cfg["KC"]))
    return shapes


def check_hidden(hidden: int) -> None:
    if hidden < 16 or hidden & (hidden - 1):
        raise ValueError(f"the fused layer needs a power-of-two hidden width >= 16, got {hidden}")


# ----------------------------------------------------------------------------------- launchers
def prec_code(precision: str, device: torch.device) -> int:
    """The kernels' PREC constexpr for a precision name on a device (see PREC_BF16_EMULATED)."""
    code = PRECISIONS[precision]
    if code == PRECISIONS["bf16"] and device.type != "cuda":
        return PREC_BF16_EMULATED
    return code


def _prep(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def context_arg(context, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer tensor, E) for the kernels' ctx_ptr / E: the contiguous context, or ``like`` as
    an unused stand-in with E = 0 when there is none (HAS_CONTEXT = E > 0)."""
    if context is None or context.shape[1] == 0:
        return like, 0
    return context.contiguous(), int(context.shape[1])


def coupling_layer(x, kept, transformed, s_weights, t_weights, slope: float, precision: str,
                   inverse: bool, config: dict | None = None,
                   out=None, log_det=None, context=None):  # fmt: skip
    """Launch one fused coupling layer.

    Args:
        x: (N, D) float32/bfloat16/float16. kept (K1,), transformed (K2,): int64 indices that
            partition range(D). s_weights/t_weights: (W1 (H, K1 + E), b1 (H,), W2 (H, H),
            b2 (H,), W3 (K2, H), b3 (K2,)). precision: "ieee" | "tf32" | "bf16".
            context: None (E = 0) or (N, E), the last E columns of the first Linear's input.
    Returns:
        (out (N, D) in x's dtype, log_det (N,) float32).
    """
    x = x.contiguous()
    n, d = x.shape
    ctx, e = context_arg(context, x)
    k1, k2 = kept.numel(), transformed.numel()
    hidden = s_weights[2].shape[0]
    check_hidden(hidden)
    interpret = not x.is_cuda
    k1p = pad_k1(k1 + e)
    cfg = dict(config or layer_config(hidden, precision, interpret, k1p, pad_k2(k2)))
    # Callers (tests) may pass the output buffers, e.g. NaN-poisoned, to check every write.
    out = torch.empty_like(x) if out is None else out
    log_det = torch.empty(n, device=x.device, dtype=torch.float32) if log_det is None else log_det
    ws = [_prep(w) for w in s_weights]
    wt = [_prep(w) for w in t_weights]
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    coupling_layer_kernel[grid](
        x, out, log_det, kept.contiguous(), transformed.contiguous(), n, d, k1, k2,
        *ws, *wt, float(slope), ctx, e,
        H=hidden, BLOCK_M=cfg["BLOCK_M"], K1P=k1p, K2P=pad_k2(k2), HC=cfg["HC"],
        KC=cfg["KC"], PREC=prec_code(precision, x.device), INVERSE=bool(inverse),
        HAS_CONTEXT=e > 0, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out, log_det


def coupling_stack(x, kept, transformed, k1, k2, s_weights, t_weights, slope: float,
                   precision: str, inverse: bool, config: dict | None = None,
                   out=None, log_det=None, context=None):  # fmt: skip
    """Launch the whole-stack kernel.

    Args:
        x: (N, D). kept (L, K1P) / transformed (L, K2P) int64, zero-padded; k1/k2 (L,) counts.
        s_weights/t_weights: stacked, zero-padded (W1 (L, H, K1P), b1 (L, H), W2 (L, H, H),
            b2 (L, H), W3 (L, K2P, H), b3 (L, K2P)); K1P = pad_k1, K2P = pad_k2 of the widest layer
            (with context: of the widest K1 + E; layer l's W1 holds its K1 kept columns, then E
            context columns). context: None or (N, E), shared by every layer.
    Returns:
        (out (N, D) in x's dtype, log_det (N,) float32 summed over the layers).
    """
    x = x.contiguous()
    n, d = x.shape
    ctx, e = context_arg(context, x)
    num_layers, k1p = kept.shape
    k2p = transformed.shape[1]
    hidden = s_weights[2].shape[1]
    check_hidden(hidden)
    interpret = not x.is_cuda
    cfg = dict(config or layer_config(hidden, precision, interpret, k1p, k2p, kernel="stack"))
    # Callers (tests) may pass the output buffers, e.g. NaN-poisoned, to check every write.
    out = torch.empty_like(x) if out is None else out
    log_det = torch.empty(n, device=x.device, dtype=torch.float32) if log_det is None else log_det
    ws = [_prep(w) for w in s_weights]
    wt = [_prep(w) for w in t_weights]
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    coupling_stack_kernel[grid](
        x, out, log_det, kept.contiguous(), transformed.contiguous(),
        k1.to(torch.int32).contiguous(), k2.to(torch.int32).contiguous(), n, d, num_layers,
        *ws, *wt, float(slope), ctx, e,
        H=hidden, BLOCK_M=cfg["BLOCK_M"], K1P=k1p, K2P=k2p, HC=cfg["HC"], KC=cfg["KC"],
        DP=padded(d), PREC=prec_code(precision, x.device), INVERSE=bool(inverse),
        STATIC_L=num_layers if interpret else 0, HAS_CONTEXT=e > 0, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out, log_det


# --------------------------------------------------------------------- sm_90 compile registry
# Argument types of every kernel argument that is not an fp32 pointer or a constexpr.
ARG_TYPES = {
    "kept_ptr": "*i64", "trans_ptr": "*i64", "k1_ptr": "*i32", "k2_ptr": "*i32",
    "N": "i32", "D": "i32", "K1": "i32", "K2": "i32", "L": "i32", "E": "i32", "slope": "fp32",
}  # fmt: skip
# Shapes every shipped config is compiled for: (D, H), kept half K1 = D - D // 2. D = 2 takes the
# outer-product first Linear, D = 16 the dot one with K2P = 16, D = 128 (K1 = K2 = 64) the
# wide-data tiles. All compile with 0 spills.
SHIPPED_HIDDEN = (64, 256, 512)
SHIPPED_DIMS = (2, 16, 128)
# Conditional shapes (D, E) compiled at H = 256 with HAS_CONTEXT: the first Linear's input is
# K1 + E wide, so D = 2 with E = 1 stays on the outer product (K1P = 2), D = 2 with E = 8
# (K1P = 16) and D = 16 with E = 8 (K1P = 16) take the dot first Linear.
SHIPPED_CONTEXT = ((2, 1), (2, 8), (16, 8))
SHIPPED_CONTEXT_HIDDEN = 256


def shipped_shapes() -> list[tuple[int, int, int]]:
    """(D, E, H) of every compiled config: the unconditional ones (E = 0), then the context ones."""
    plain = [
        (dim, 0, hidden)
        for dim in SHIPPED_DIMS
        for hidden in SHIPPED_HIDDEN
        if dim == 2 or hidden == 256
    ]
    return plain + [(dim, e, SHIPPED_CONTEXT_HIDDEN) for dim, e in SHIPPED_CONTEXT]


def signature_of(kernel, constexprs: dict) -> dict:
    """ASTSource signature: constexprs as "constexpr", ARG_TYPES as given, the rest "*fp32"."""
    return {
        name: "constexpr" if name in constexprs else ARG_TYPES.get(name, "*fp32")
        for name in kernel.arg_names
    }


def shipped_layer_configs(kernel, stack: bool, config_fn=None, kind=None) -> list[dict]:
    """One compile entry per (precision, D, H) the launchers choose on a GPU.

    ``kind``: the ``kernel`` argument of ``config_fn`` ("layer", "stack" or "backward").
    """
    kind = kind or ("stack" if stack else "layer")
    config_fn = config_fn or functools.partial(layer_config, kernel=kind)
    entries = []
    for precision in PRECISIONS:
        for dim, context, hidden in shipped_shapes():
            # The first Linear's input: the kept half, then the context columns.
            k1p, k2p = pad_k1(dim - dim // 2 + context), pad_k2(dim // 2)
            cfg = config_fn(hidden, precision, interpret=False, k1p=k1p, k2p=k2p)
            constexprs = {
                "H": hidden, "BLOCK_M": cfg["BLOCK_M"], "K1P": k1p, "K2P": k2p,
                "HC": cfg["HC"], "KC": cfg["KC"], "PREC": PRECISIONS[precision],
                "INVERSE": False, "HAS_CONTEXT": context > 0,
            }  # fmt: skip
            if stack:
                constexprs["DP"] = padded(dim)
                constexprs["STATIC_L"] = 0  # the runtime depth, as on a GPU
            shape = f"D={dim},E={context}" if context else f"D={dim}"
            entries.append(
                {
                    "name": f"{kernel.__name__}[{precision},{shape},H={hidden}]",
                    "kernel": kernel,
                    "signature": signature_of(kernel, constexprs),
                    "constexprs": constexprs,
                    "num_warps": cfg["num_warps"],
                    "dots": [(m, k, n, precision) for m, k, n in dot_shapes(cfg, k1p, k2p)],
                }
            )
    return entries


def _sm90_configs() -> list[dict]:
    return shipped_layer_configs(coupling_layer_kernel, stack=False) + shipped_layer_configs(
        coupling_stack_kernel, stack=True
    )


# What benchmarks/compile_report.py compiles for sm_90: name, kernel, signature, constexprs,
# num_warps, and the (M, K, N, precision) of each tl.dot.
SM90_CONFIGS = _sm90_configs()
