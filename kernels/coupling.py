"""Elementwise affine coupling: the transform and its log-determinant in one pass.

Math (docs/design.md §1.1, §1.5), per row n and transformed feature k, with sign σ = +1
(forward f, data -> latent) or σ = -1 (inverse g):

    forward:  z2 = x2 * exp(s) + t            log_det[n] =  Σ_k s[n, k]
    inverse:  x2 = (z2 - t) * exp(-s)         log_det[n] = -Σ_k s[n, k]

Backward, given the upstream gradient g of the output and gl of log_det, with ``a`` the
data-side half (x2: the forward's input, the inverse's output):

    forward:  gx2 = g * exp(s),   gs = gx2 * a + gl,       gt = g
    inverse:  gz2 = g * exp(-s),  gs = -(g * a + gl),      gt = -gz2

(``gx2 * a`` equals docs/design.md §1.5's ``g * (z2 - t)`` without the cancellation of ``z2 - t``.)

Memory traffic: forward/inverse read 3 and write 1 element per (n, k) plus one log_det per
row; backward reads 3 (+1 per row) and writes 3. Each kernel is one pass over memory; math is
fp32 (fp64 for float64 inputs), I/O in the inputs' dtype, log_det in fp32 (fp64 for float64).

Design: one program owns BLOCK_N whole rows and loops over the K features in BLOCK_K chunks, so
the row sum for log_det stays in registers and needs no atomics (deterministic). Arbitrary 2-D
strides are honoured, so non-contiguous inputs need no copy. Limit: these kernels are memory
bound by construction; at small K they are launch-latency bound, which is why the fused
coupling layer (``fused_layer*``) exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnvp.kernels.triton_limits import elementwise_warps

# Elements per program: 8 per thread at 4 warps (4 for fp64). The sm_90 compile report showed
# 16 per thread using all 255 registers and spilling in the backward and fp64 kernels.
ELEMENTS_PER_PROGRAM = 1024
MAX_BLOCK_K = 64


@triton.jit
def _load_tile(ptr, rows64, cols, stride_n, stride_k, ok, F64: tl.constexpr):
    """Load a (BLOCK_N, BLOCK_K) tile of a strided 2-D tensor in the compute dtype."""
    v = tl.load(ptr + rows64[:, None] * stride_n + cols[None, :] * stride_k, mask=ok)
    if F64:
        v = v.to(tl.float64)
    else:
        v = v.to(tl.float32)
    return v


@triton.jit
def _coupling_fwd_kernel(
    a_ptr, s_ptr, t_ptr, out_ptr, ld_ptr,
    n_rows, n_cols,
    stride_an, stride_ak, stride_sn, stride_sk, stride_tn, stride_tk,
    INVERSE: tl.constexpr, F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATIC_COLS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    if F64:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # The interpreters of Triton <= 3.6 pass runtime scalars as 1-element arrays, which NumPy
    # >= 2.4 refuses as a range bound: the interpreter gets the width as a constexpr
    # (STATIC_COLS > 0); on a GPU STATIC_COLS = 0 and the loop runs to the runtime n_cols.
    for k0 in range(0, n_cols if STATIC_COLS == 0 else STATIC_COLS, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        a = _load_tile(a_ptr, rows64, cols, stride_an, stride_ak, ok, F64)
        s = _load_tile(s_ptr, rows64, cols, stride_sn, stride_sk, ok, F64)
        t = _load_tile(t_ptr, rows64, cols, stride_tn, stride_tk, ok, F64)
        if INVERSE:
            out = (a - t) * tl.exp(-s)
        else:
            out = a * tl.exp(s) + t
        acc += tl.sum(tl.where(ok, s, 0.0), axis=1)
        out_offs = rows64[:, None] * n_cols + cols[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=ok)
    if INVERSE:
        acc = -acc
    tl.store(ld_ptr + rows64, acc.to(ld_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _coupling_bwd_kernel(
    g_ptr, gl_ptr, a_ptr, s_ptr, gin_ptr, gs_ptr, gt_ptr,
    n_rows, n_cols,
    stride_gn, stride_gk, stride_an, stride_ak, stride_sn, stride_sk,
    INVERSE: tl.constexpr, F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATIC_COLS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    gl = tl.load(gl_ptr + rows64, mask=row_ok)
    if F64:
        gl = gl.to(tl.float64)
    else:
        gl = gl.to(tl.float32)
    # STATIC_COLS: the interpreter's bound (see _coupling_fwd_kernel).
    for k0 in range(0, n_cols if STATIC_COLS == 0 else STATIC_COLS, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        g = _load_tile(g_ptr, rows64, cols, stride_gn, stride_gk, ok, F64)
        a = _load_tile(a_ptr, rows64, cols, stride_an, stride_ak, ok, F64)
        s = _load_tile(s_ptr, rows64, cols, stride_sn, stride_sk, ok, F64)
        if INVERSE:
            gin = g * tl.exp(-s)
            gs = -(g * a + gl[:, None])
            gt = -gin
        else:
            gin = g * tl.exp(s)
            gs = gin * a + gl[:, None]
            gt = g
        offs = rows64[:, None] * n_cols + cols[None, :]
        tl.store(gin_ptr + offs, gin.to(gin_ptr.dtype.element_ty), mask=ok)
        tl.store(gs_ptr + offs, gs.to(gs_ptr.dtype.element_ty), mask=ok)
        tl.store(gt_ptr + offs, gt.to(gt_ptr.dtype.element_ty), mask=ok)


def block_sizes(n_cols: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a K-feature problem: whole rows per program, ~1024 elements."""
    elements = ELEMENTS_PER_PROGRAM // 2 if dtype == torch.float64 else ELEMENTS_PER_PROGRAM
    block_k = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_K)
    block_n = max(elements // block_k, 8)
    return block_n, block_k


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _log_det_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def coupling_forward(
    a: torch.Tensor, s: torch.Tensor, t: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward (``inverse=False``) or inverse coupling kernel.

    Args:
        a: (N, K) x2 for the forward, z2 for the inverse; s, t: (N, K), same dtype and device.
    Returns:
        out (N, K) contiguous in ``a``'s dtype, log_det (N,) fp32 (fp64 for float64 input).
    """
    n, k = a.shape
    out = torch.empty((n, k), dtype=a.dtype, device=a.device)
    log_det = torch.empty((n,), dtype=_log_det_dtype(a.dtype), device=a.device)
    if n == 0:
        return out, log_det
    block_n, block_k = block_sizes(k, a.dtype)
    grid = (triton.cdiv(n, block_n),)
    _coupling_fwd_kernel[grid](
        a, s, t, out, log_det, n, k,
        a.stride(0), a.stride(1), s.stride(0), s.stride(1), t.stride(0), t.stride(1),
        INVERSE=inverse, F64=a.dtype == torch.float64, BLOCK_N=block_n, BLOCK_K=block_k,
        STATIC_COLS=0 if a.is_cuda else k,
        num_warps=elementwise_warps(block_k),
    )  # fmt: skip
    return out, log_det


def coupling_backward(
    grad_out: torch.Tensor,
    grad_log_det: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel.

    Args:
        grad_out: (N, K) gradient of the op's first output; grad_log_det: (N,) of log_det.
        a: (N, K) the data-side half (forward: its input x2; inverse: its output x2).
        s: (N, K) log-scale.
    Returns:
        (grad of the op's first input, grad of s, grad of t), each (N, K) in ``a``'s dtype.
    """
    n, k = a.shape
    grads = [torch.empty((n, k), dtype=a.dtype, device=a.device) for _ in range(3)]
    if n == 0:
        return tuple(grads)
    grad_log_det = grad_log_det.contiguous()
    block_n, block_k = block_sizes(k, a.dtype)
    grid = (triton.cdiv(n, block_n),)
    _coupling_bwd_kernel[grid](
        grad_out, grad_log_det, a, s, *grads, n, k,
        grad_out.stride(0), grad_out.stride(1), a.stride(0), a.stride(1), s.stride(0), s.stride(1),
        INVERSE=inverse, F64=a.dtype == torch.float64, BLOCK_N=block_n, BLOCK_K=block_k,
        STATIC_COLS=0 if a.is_cuda else k, num_warps=elementwise_warps(block_k),
    )  # fmt: skip
    return tuple(grads)


# --------------------------------------------------------------------- sm_90 compile registry
_PTR = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float64: "*fp64",
}


def _sm90_configs() -> list[dict]:
    """Every (kernel, direction, dtype, block shape) the launchers can choose on a GPU."""
    entries = []
    for dtype, ptr in _PTR.items():
        ld = "*fp64" if dtype == torch.float64 else "*fp32"
        for n_cols in (1, 3, 37, 128):
            block_n, block_k = block_sizes(n_cols, dtype)
            for inverse in (False, True):
                common = {
                    "INVERSE": inverse, "F64": dtype == torch.float64,
                    "BLOCK_N": block_n, "BLOCK_K": block_k, "STATIC_COLS": 0,
                }  # fmt: skip
                direction = "inverse" if inverse else "forward"
                warps = elementwise_warps(block_k)
                tag = f"{_name(dtype)},BLOCK={block_n}x{block_k}"
                fwd_sig = dict.fromkeys(("a_ptr", "s_ptr", "t_ptr", "out_ptr"), ptr)
                fwd_sig["ld_ptr"] = ld
                bwd_sig = dict.fromkeys(
                    ("g_ptr", "a_ptr", "s_ptr", "gin_ptr", "gs_ptr", "gt_ptr"), ptr
                )
                bwd_sig["gl_ptr"] = ld
                for kernel, sig in (
                    (_coupling_fwd_kernel, fwd_sig),
                    (_coupling_bwd_kernel, bwd_sig),
                ):
                    signature = {
                        name: "constexpr" if name in common else sig.get(name, "i32")
                        for name in kernel.arg_names
                    }
                    entries.append(
                        {
                            "name": f"{kernel.__name__}[{direction},{tag}]",
                            "kernel": kernel,
                            "signature": signature,
                            "constexprs": common,
                            "num_warps": warps,
                            "dots": [],
                        }
                    )
    # Block shapes repeat across K (e.g. K = 128 and 1000 share one); compile each once.
    unique = {}
    for entry in entries:
        unique.setdefault(entry["name"], entry)
    return list(unique.values())


# What benchmarks/compile_report.py compiles for sm_90 (no tl.dot in these kernels).
SM90_CONFIGS = _sm90_configs()
