"""Custom ops for the affine coupling transform: the only dispatch point to the kernels.

``torch.ops.fastnvp.affine_coupling(x2, s, t) -> (z2, log_det)``::

    z2 = x2 * exp(s) + t,      log_det = Σ_k s[:, k]          (N, K) x3 -> (N, K), (N,)

``torch.ops.fastnvp.affine_coupling_inverse(z2, s, t) -> (x2, log_det)``::

    x2 = (z2 - t) * exp(-s),   log_det = -Σ_k s[:, k]

Both are differentiable in all three inputs (a custom backward op, one pass over memory).
Math is fp32 (fp64 for float64 inputs); outputs keep the input dtype; ``log_det`` is fp32
(fp64 for float64 inputs). CUDA tensors run the Triton kernels of ``fastnvp.kernels.coupling``,
CPU tensors the PyTorch code below; ``FASTNVP_BACKEND`` overrides (see ``fastnvp.ops.backend``).
Registered with ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``, so the
ops pass ``torch.library.opcheck`` and trace under ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnvp.core.validation import ensure_same, ensure_tensor
from fastnvp.ops.backend import use_triton


def _check_coupling_inputs(a: Tensor, s: Tensor, t: Tensor, a_name: str) -> None:
    ensure_tensor(a, a_name)
    if a.ndim != 2:
        raise ValueError(f"{a_name} must have shape (N, K), got {tuple(a.shape)}")
    if a.shape[1] < 1:
        raise ValueError(f"{a_name} must have K >= 1 features, got shape {tuple(a.shape)}")
    ensure_tensor(s, "s")
    ensure_same(a, a_name, s, "s")
    ensure_tensor(t, "t")
    ensure_same(a, a_name, t, "t")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_coupling(a: Tensor, s: Tensor, t: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    cd = _compute_dtype(a.dtype)
    a32, s32, t32 = a.to(cd), s.to(cd), t.to(cd)
    if inverse:
        out = (a32 - t32) * torch.exp(-s32)
        log_det = -s32.sum(dim=1)
    else:
        out = a32 * torch.exp(s32) + t32
        log_det = s32.sum(dim=1)
    return out.to(a.dtype), log_det


def _coupling(a: Tensor, s: Tensor, t: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    if use_triton(a):
        from fastnvp.kernels.coupling import coupling_forward

        return coupling_forward(a, s, t, inverse)
    return _torch_coupling(a, s, t, inverse)


def _fake_coupling(a: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(a, memory_format=torch.contiguous_format), a.new_empty(
        (a.shape[0],), dtype=_compute_dtype(a.dtype)
    )


@torch.library.custom_op("fastnvp::affine_coupling", mutates_args=())
def affine_coupling(x2: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Forward coupling.  x2, s, t: (N, K) -> z2 (N, K), log_det (N,)."""
    _check_coupling_inputs(x2, s, t, "x2")
    return _coupling(x2, s, t, inverse=False)


@torch.library.custom_op("fastnvp::affine_coupling_inverse", mutates_args=())
def affine_coupling_inverse(z2: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse coupling.  z2, s, t: (N, K) -> x2 (N, K), log_det (N,) (= -Σ s)."""
    _check_coupling_inputs(z2, s, t, "z2")
    return _coupling(z2, s, t, inverse=True)


@affine_coupling.register_fake
def _(x2, s, t):
    _check_coupling_inputs(x2, s, t, "x2")
    return _fake_coupling(x2)


@affine_coupling_inverse.register_fake
def _(z2, s, t):
    _check_coupling_inputs(z2, s, t, "z2")
    return _fake_coupling(z2)


@torch.library.custom_op("fastnvp::affine_coupling_backward", mutates_args=())
def affine_coupling_backward(
    grad_out: Tensor, grad_log_det: Tensor, a: Tensor, s: Tensor, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of either coupling op w.r.t. (its first input, s, t).

    Args:
        grad_out: (N, K) upstream gradient of the op's first output.
        grad_log_det: (N,) upstream gradient of log_det.
        a: (N, K) data-side half: x2 (the forward's input, or the inverse's output).
        s: (N, K) log-scale.
        inverse: which op is being differentiated.
    """
    if use_triton(a):
        from fastnvp.kernels.coupling import coupling_backward

        return coupling_backward(grad_out, grad_log_det, a, s, inverse)
    cd = _compute_dtype(a.dtype)
    g, gl, a32, s32 = grad_out.to(cd), grad_log_det.to(cd)[:, None], a.to(cd), s.to(cd)
    if inverse:
        gin = g * torch.exp(-s32)
        gs = -(g * a32 + gl)
        gt = -gin
    else:
        gin = g * torch.exp(s32)
        gs = gin * a32 + gl
        gt = g
    # copy=True: in the forward case gt is the upstream gradient itself, and outputs of a
    # custom op may not alias its inputs.
    return gin.to(a.dtype), gs.to(a.dtype), gt.to(a.dtype, copy=True)


@affine_coupling_backward.register_fake
def _(grad_out, grad_log_det, a, s, inverse):
    return tuple(torch.empty_like(a, memory_format=torch.contiguous_format) for _ in range(3))


def _grads_or_zeros(ctx_like: Tensor, grad_out, grad_log_det):
    if grad_out is None:
        grad_out = torch.zeros_like(ctx_like)
    if grad_log_det is None:
        grad_log_det = ctx_like.new_zeros(ctx_like.shape[0], dtype=_compute_dtype(ctx_like.dtype))
    return grad_out, grad_log_det


def _setup_forward(ctx, inputs, output):
    x2, s, _ = inputs
    ctx.save_for_backward(x2, s)


def _backward_forward(ctx, grad_z2, grad_log_det):
    x2, s = ctx.saved_tensors
    grad_z2, grad_log_det = _grads_or_zeros(x2, grad_z2, grad_log_det)
    return tuple(torch.ops.fastnvp.affine_coupling_backward(grad_z2, grad_log_det, x2, s, False))


def _setup_inverse(ctx, inputs, output):
    _, s, _ = inputs
    x2, _ = output
    ctx.save_for_backward(x2, s)


def _backward_inverse(ctx, grad_x2, grad_log_det):
    x2, s = ctx.saved_tensors
    grad_x2, grad_log_det = _grads_or_zeros(x2, grad_x2, grad_log_det)
    return tuple(torch.ops.fastnvp.affine_coupling_backward(grad_x2, grad_log_det, x2, s, True))


affine_coupling.register_autograd(_backward_forward, setup_context=_setup_forward)
affine_coupling_inverse.register_autograd(_backward_inverse, setup_context=_setup_inverse)


# Under torch.autocast the conditioner's matmuls hand s and t over in bf16/fp16. The coupling
# (an exp and a row sum that becomes log_det) is precision-sensitive, so, like torch.exp in
# autocast's fp32 list, it runs in fp32: autocast casts the ops' half-precision inputs to fp32
# (float64 inputs stay as they are) and the outputs come back fp32.
for _op in (affine_coupling, affine_coupling_inverse):
    for _device_type in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _device_type, torch.float32)


def coupling(x2: Tensor, s: Tensor, t: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """The coupling update as the flows call it: the custom op, or its math inline in eager CPU.

    Same contract as ``affine_coupling`` / ``affine_coupling_inverse``. When the PyTorch backend
    is chosen and nothing is being compiled, the update runs as plain tensor ops with autograd's
    own backward: a custom op's Python dispatch and autograd wrapper cost ~0.5 ms per layer for
    forward + backward on the CPU, which made an 8-layer, H = 64, 512-row training step 17%
    slower than the reference (22.8 vs 19.5 ms; 18.5 ms inline). Triton, ``torch.compile`` and
    ``FASTNVP_BACKEND=triton`` go through the registered op, except inside a ``torch.func``
    transform (``vmap``, ``grad``, ``jacrev``, ...), which needs the inline math: the op has no
    batching rule and its backward is first order (docs/design.md §3.1).
    """
    inline_only = torch._C._are_functorch_transforms_active()
    if (use_triton(x2) or torch.compiler.is_compiling()) and not inline_only:
        op = affine_coupling_inverse if inverse else affine_coupling
        return op(x2, s, t)
    _check_coupling_inputs(x2, s, t, "z2" if inverse else "x2")
    if torch.is_autocast_enabled(x2.device.type) and x2.dtype in (torch.float16, torch.bfloat16):
        # What the op's autocast registration does: the coupling and its outputs are fp32.
        x2, s, t = x2.float(), s.float(), t.float()
    return _torch_coupling(x2, s, t, inverse)
