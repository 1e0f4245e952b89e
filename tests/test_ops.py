"""The fused coupling ops vs the float64 formula, on both backends (Triton via the interpreter)."""

import pytest
import torch

import fastnvp.ops  # noqa: F401 - registers torch.ops.fastnvp.*

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SHAPES = [(1, 1), (3, 3), (1000, 1), (37, 37), (5, 37), (1000, 3)]


def oracle(a, s, t, inverse):
    a, s, t = a.double(), s.double(), t.double()
    if inverse:
        return (a - t) * torch.exp(-s), -s.sum(1)
    return a * torch.exp(s) + t, s.sum(1)


def op(inverse):
    return (
        torch.ops.fastnvp.affine_coupling_inverse if inverse else torch.ops.fastnvp.affine_coupling
    )


def assert_close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    err = ((actual.double() - expected) / (expected.abs() + 1)).abs().max().item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def inputs(n, k, dtype, scale=1.0):
    a = torch.randn(n, k, dtype=torch.float64).to(dtype)
    s = (scale * torch.randn(n, k, dtype=torch.float64)).to(dtype)
    t = torch.randn(n, k, dtype=torch.float64).to(dtype)
    return a, s, t


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64_formula(backend, inverse, shape):
    a, s, t = inputs(*shape, torch.float32)
    out, log_det = op(inverse)(a, s, t)
    ref_out, ref_ld = oracle(a, s, t, inverse)
    assert out.dtype == torch.float32 and log_det.dtype == torch.float32
    assert out.shape == shape and log_det.shape == (shape[0],)
    assert_close(out, ref_out, TOL[torch.float32], "out")
    assert_close(log_det, ref_ld, TOL[torch.float32], "log_det")


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_every_dtype(backend, dtype, inverse):
    a, s, t = inputs(33, 5, dtype)
    out, log_det = op(inverse)(a, s, t)
    ref_out, ref_ld = oracle(a, s, t, inverse)
    assert out.dtype == dtype
    assert log_det.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Low-precision I/O rounds the output once; log_det is accumulated in fp32 from exact inputs.
    assert_close(out, ref_out, TOL[dtype], "out")
    assert_close(log_det, ref_ld, 1e-5 if dtype != torch.float64 else 1e-12, "log_det")


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_non_contiguous_inputs(backend, inverse):
    base = torch.randn(3, 40, 11)
    a = base[0, ::2, 1:8]  # strided rows, offset columns
    s = base[1].t()[1:8, ::2].t()  # transposed view
    t = base[2, 1::2, 3:10]
    assert not a.is_contiguous() and not s.is_contiguous()
    out, log_det = op(inverse)(a, s, t)
    ref_out, ref_ld = oracle(a, s, t, inverse)
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(log_det, ref_ld, 1e-5, "log_det")


def test_every_output_element_is_written(backend, monkeypatch):
    """Poison the allocator's memory with NaN: any element a kernel skips shows up as NaN."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    a, s, t = inputs(1000, 37, torch.float32)
    for inverse in (False, True):
        out, log_det = op(inverse)(a, s, t)
        assert torch.isfinite(out).all() and torch.isfinite(log_det).all()
        g = torch.randn_like(a)
        gl = torch.randn(1000)
        grads = torch.ops.fastnvp.affine_coupling_backward(g, gl, a, s, inverse)
        assert all(torch.isfinite(x).all() for x in grads)


def test_round_trip(backend):
    a, s, t = inputs(257, 7, torch.float32)
    z, ld = torch.ops.fastnvp.affine_coupling(a, s, t)
    back, ld_inv = torch.ops.fastnvp.affine_coupling_inverse(z, s, t)
    assert (back - a).abs().max() < 1e-5
    assert torch.equal(ld, -ld_inv)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gradcheck(backend, inverse):
    a, s, t = (x.requires_grad_() for x in inputs(7, 3, torch.float64, scale=0.5))
    assert torch.autograd.gradcheck(lambda *xs: op(inverse)(*xs), (a, s, t))


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_backward_matches_autograd_of_formula(backend, inverse):
    a, s, t = (x.requires_grad_() for x in inputs(129, 5, torch.float32))
    out, ld = op(inverse)(a, s, t)
    g_out, g_ld = torch.randn_like(out), torch.randn_like(ld)
    grads = torch.autograd.grad((out, ld), (a, s, t), (g_out, g_ld))
    a64, s64, t64 = (x.detach().double().requires_grad_() for x in (a, s, t))
    ref_out, ref_ld = oracle(a64, s64, t64, inverse)
    ref = torch.autograd.grad((ref_out, ref_ld), (a64, s64, t64), (g_out.double(), g_ld.double()))
    for name, got, want in zip("ast", grads, ref):
        assert_close(got, want, 1e-5, f"grad {name}")


def test_gradient_through_one_output_only(backend):
    a, s, t = (x.requires_grad_() for x in inputs(9, 4, torch.float32))
    _, ld = torch.ops.fastnvp.affine_coupling(a, s, t)
    (gs,) = torch.autograd.grad(ld.sum(), (s,))
    assert torch.allclose(gs, torch.ones_like(s))


@pytest.mark.parametrize(
    "name", ["affine_coupling", "affine_coupling_inverse", "affine_coupling_backward"]
)
def test_opcheck(backend, name):
    a, s, t = inputs(6, 3, torch.float32)
    if name == "affine_coupling_backward":
        args = (torch.randn(6, 3), torch.randn(6), a, s, False)
    else:
        args = (a.requires_grad_(), s.requires_grad_(), t.requires_grad_())
    torch.library.opcheck(getattr(torch.ops.fastnvp, name).default, args)


def _bad(x2, s, t, exc, match):
    return pytest.param((x2, s, t), exc, match, id=match)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        _bad(torch.randn(4), torch.randn(4), torch.randn(4), ValueError, r"x2 must have shape"),
        _bad(torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, 2), ValueError, "s must have"),
        _bad(torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2).double(), TypeError, "t must"),
        _bad(*(torch.ones(4, 2, dtype=torch.long),) * 3, TypeError, "x2 must have a floating"),
        _bad(*(torch.randn(4, 0),) * 3, ValueError, "K >= 1"),
        _bad(torch.randn(4, 2), torch.randn(4, 2, device="meta"), torch.randn(4, 2), ValueError,
             "s must be on cpu"),
    ],
)  # fmt: skip
def test_bad_input_is_named(args, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.fastnvp.affine_coupling(*args)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.fastnvp.affine_coupling(*inputs(2, 2, torch.float32))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTNVP_BACKEND must be one of"):
        torch.ops.fastnvp.affine_coupling(*inputs(2, 2, torch.float32))
