"""Mixed precision: torch.autocast through FastRealNVP and the coupling ops.

Contract: matmuls run in the autocast dtype; the coupling update, the flow's state and log_det
are fp32, and the result stays within low-precision rounding of the fp32 model.
"""

import pytest
import torch

from fastnvp import FastRealNVP, RealNVP
from fastnvp.core.masks import alternating_masks

CPU_BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max()).item()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FastRealNVP.standard(2, 8, hidden=64)


def test_forward_matmuls_low_precision_coupling_fp32(model, backend):
    x = torch.randn(256, 2)
    z32, ld32 = model.f(x)
    with torch.autocast(**CPU_BF16):
        z, log_det = model.f(x)
    assert z.dtype == torch.float32 and log_det.dtype == torch.float32
    # The standard path calls F.linear, which autocast lowers to bf16: the result moves off the
    # fp32 one by bf16 rounding (a zero difference would mean autocast never reached the matmuls).
    assert 1e-4 < rel_err(z, z32) < 5e-2
    assert rel_err(log_det, ld32) < 5e-2


def test_generic_nets_run_matmuls_in_bf16():
    torch.manual_seed(0)
    dims = 4
    proj = lambda: torch.nn.Sequential(torch.nn.Linear(dims, dims))  # noqa: E731
    flow = FastRealNVP(proj, proj, alternating_masks(dims, 4), clamp=2.0)
    seen = []
    flow.s[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(64, dims)
    z32, ld32 = flow.f(x)
    with torch.autocast(**CPU_BF16):
        z, log_det = flow.f(x)
    assert seen == [torch.float32, torch.bfloat16]
    assert z.dtype == torch.float32 and log_det.dtype == torch.float32
    assert rel_err(z, z32) < 5e-2 and rel_err(log_det, ld32) < 5e-2


def test_inverse_and_round_trip_under_autocast(model, backend):
    x = torch.randn(128, 2)
    with torch.autocast(**CPU_BF16):
        z, _ = model.f(x)
        x_back = model.g(z)
        samples = model.sample(16)
    assert x_back.dtype == torch.float32 and samples.dtype == torch.float32
    # f and g each see bf16-rounded s and t at slightly different inputs: not an exact inverse,
    # but within bf16 rounding of it.
    assert (x_back - x).abs().max().item() < 0.1


def test_bf16_input_to_fp32_model_under_autocast(model):
    x = torch.randn(64, 2)
    with torch.autocast(**CPU_BF16):
        z, log_det = model.f(x.bfloat16())
    assert z.dtype == torch.float32 and log_det.dtype == torch.float32
    assert rel_err(z, model.f(x)[0]) < 5e-2
    # Outside autocast the dtype mismatch is still an error naming the argument.
    with pytest.raises(TypeError, match="x has dtype"):
        model.f(x.bfloat16())


def test_training_step_under_autocast(model, backend):
    x = torch.randn(128, 2)
    with torch.autocast(**CPU_BF16):
        loss = -model.log_prob(x).mean()
    assert loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(
        g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads
    )
    # The gradient agrees with fp32 to bf16 accuracy.
    ref = FastRealNVP.standard(2, 8, hidden=64)
    ref.load_state_dict(model.state_dict())
    (-ref.log_prob(x).mean()).backward()
    g_amp = torch.cat([p.grad.flatten() for p in model.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert rel_err(g_amp, g_ref) < 0.1


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_ops_cast_mixed_inputs_to_fp32(backend, inverse):
    op = torch.ops.fastnvp.affine_coupling_inverse if inverse else torch.ops.fastnvp.affine_coupling
    a = torch.randn(7, 3)
    s, t = torch.randn(7, 3).bfloat16(), torch.randn(7, 3).bfloat16()
    with pytest.raises(TypeError, match="dtype"):
        op(a, s, t)  # outside autocast, mixed dtypes are an error
    with torch.autocast(**CPU_BF16):
        out, log_det = op(a, s, t)
    expected, expected_ld = op(a, s.float(), t.float())
    assert out.dtype == torch.float32 and log_det.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(log_det, expected_ld)
    # Gradients flow back to the bf16 inputs in their own dtype.
    s.requires_grad_(True)
    with torch.autocast(**CPU_BF16):
        out, log_det = op(a, s, t)
    (out.sum() + log_det.sum()).backward()
    assert s.grad.dtype == torch.bfloat16


def test_float64_stays_float64_under_autocast():
    ref = RealNVP.standard(2, 3, hidden=8).double()
    fast = FastRealNVP.from_reference(ref)
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.autocast(**CPU_BF16):
        z, log_det = fast.f(x)
    assert z.dtype == torch.float64 and log_det.dtype == torch.float64
    torch.testing.assert_close(z, ref.f(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast(dtype):
    model = FastRealNVP.standard(2, 8, hidden=64).cuda()
    x = torch.randn(4096, 2, device="cuda")
    z32, ld32 = model.f(x)
    with torch.autocast("cuda", dtype=dtype):
        z, log_det = model.f(x)
        loss = -model.log_prob(x).mean()
    loss.backward()
    assert z.dtype == torch.float32 and log_det.dtype == torch.float32
    assert rel_err(z, z32) < 5e-2 and rel_err(log_det, ld32) < 5e-2
