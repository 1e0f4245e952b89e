"""Memory-saving (invertible) training: exact gradients, flat activation memory, the guard."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastnvp.analysis.profiling import profiler_peak_bytes, tensor_bytes, training_step
from fastnvp.core.conditioner import standard_net
from fastnvp.core.masks import alternating_masks
from fastnvp.engine.cpu import buffer_pool
from fastnvp.engine.invertible import ReconstructionError, ReconstructionReport
from fastnvp.engine.plan import Policy
from fastnvp.flows.fast_realnvp import FastRealNVP


def _pair(num_layers, hidden=8, dtype=torch.float64, seed=0):
    """The same flow twice: standard and invertible memory mode."""
    torch.manual_seed(seed)
    std = FastRealNVP.standard(2, num_layers, hidden).to(dtype)
    inv = FastRealNVP.standard(2, num_layers, hidden, memory="invertible").to(dtype)
    inv.load_state_dict(std.state_dict())
    return std, inv


def _grads(model, x, loss_fn):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    z, log_det = model.f(x)
    loss = loss_fn(z, log_det)
    loss.backward()
    return z.detach(), log_det.detach(), x.grad, [p.grad for p in model.parameters()]


LOSSES = {
    "nll": lambda z, ld: (0.5 * z.pow(2).sum(dim=1) - ld).mean(),
    "z_only": lambda z, ld: z.sin().sum(),
    "log_det_only": lambda z, ld: ld.pow(2).sum(),
}


@pytest.mark.parametrize("num_layers", [8, 50])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_gradients_match_standard_float64(num_layers, loss, one_thread):
    std, inv = _pair(num_layers)
    x = torch.randn(32, 2, dtype=torch.float64)
    z_s, ld_s, gx_s, gp_s = _grads(std, x, LOSSES[loss])
    z_i, ld_i, gx_i, gp_i = _grads(inv, x, LOSSES[loss])
    # Same function; the invertible forward runs without autograd, in the knot piece form
    # (fastnvp.engine.cpu.knots) where the standard one runs the GEMM form: equal up to rounding.
    torch.testing.assert_close(z_i, z_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_i, ld_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_i, gx_s, rtol=1e-10, atol=1e-12)
    assert len(gp_i) == len(gp_s) == 12 * num_layers
    for a, b in zip(gp_i, gp_s):
        assert a is not None
        # Standard autograd leaves None for parameters the loss does not reach (the shift net
        # under a log_det-only loss): a zero gradient.
        torch.testing.assert_close(
            a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-12
        )
    report = inv.last_reconstruction
    assert isinstance(report, ReconstructionReport)
    assert report.layer_errors.shape == (num_layers,)
    assert report.anchor_layers == tuple(range(0, num_layers, 8))
    assert report.anchor_errors.shape == (len(report.anchor_layers),)
    assert report.ok and report.max_layer_error < 1e-13 and report.drift_error < 1e-12


def test_autograd_grad_and_input_without_grad(one_thread):
    std, inv = _pair(8)
    x = torch.randn(16, 2, dtype=torch.float64)  # data: no grad; the parameters carry it
    g_s = torch.autograd.grad(-std.log_prob(x).mean(), list(std.parameters()))
    g_i = torch.autograd.grad(-inv.log_prob(x).mean(), list(inv.parameters()))
    for a, b in zip(g_i, g_s):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_parameters_shared_between_layers(one_thread):
    torch.manual_seed(0)
    s_net = standard_net(2, 8, tanh=True).double()
    t_net = standard_net(2, 8, tanh=False).double()
    masks = alternating_masks(2, 6)
    std = FastRealNVP(lambda: s_net, lambda: t_net, masks)
    inv = FastRealNVP(lambda: s_net, lambda: t_net, masks, memory="invertible")
    x = torch.randn(16, 2, dtype=torch.float64)
    _, _, gx_s, gp_s = _grads(std, x, LOSSES["nll"])
    _, _, gx_i, gp_i = _grads(inv, x, LOSSES["nll"])
    torch.testing.assert_close(gx_i, gx_s, rtol=1e-10, atol=1e-12)
    for a, b in zip(gp_i, gp_s):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_coupling_op_through_triton_backend(backend, one_thread):
    std, inv = _pair(3, dtype=torch.float32)
    x = torch.randn(8, 2)
    _, _, gx_s, gp_s = _grads(std, x, LOSSES["nll"])
    _, _, gx_i, gp_i = _grads(inv, x, LOSSES["nll"])
    torch.testing.assert_close(gx_i, gx_s, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp_i, gp_s):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert inv.last_reconstruction.max_layer_error < 1e-5


def test_no_grad_runs_the_plain_stack():
    std, inv = _pair(4)
    x = torch.randn(8, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(inv.log_prob(x), std.log_prob(x), rtol=0, atol=0)
        torch.testing.assert_close(inv.g(inv.f(x)[0]), x)
    assert inv.last_reconstruction is None


def _step_activation_bytes(model, x, monkeypatch):
    """Peak bytes allocated during a step (profiler allocator records) minus the gradients,
    without the buffer pool (a warm pool serves a step from buffers allocated before it), and
    the bytes of per-row buffers (activations, states) the pool keeps after a step with it
    (its other buffers hold parameter gradients)."""
    model.release_buffers()
    with monkeypatch.context() as patch:
        patch.setattr(buffer_pool, "MIN_BYTES", 0)  # this test's buffers are small
        training_step(model, x)
    pooled = buffer_pool.shared().buffers()
    kept = sum(tensor_bytes([t]) for t in pooled if x.shape[0] in t.shape)
    model.zero_grad(set_to_none=True)
    model.release_buffers()
    with monkeypatch.context() as patch:
        patch.setattr(buffer_pool, "POOL_MAX_BYTES", 0)
        training_step(model, x)  # warm-up: later steps allocate the same way
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            training_step(model, x)
    return profiler_peak_bytes(prof, "cpu") - tensor_bytes(model.parameters()), kept


def _forward_saved_bytes(model, x):
    """Bytes autograd keeps for backward after the forward of one step."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -model.log_prob(x).mean()
    loss.backward()
    return sum(saved)


def test_activation_memory_flat_in_depth(one_thread, monkeypatch):
    x = torch.randn(256, 2)
    measured = {}
    for mode in ("standard", "invertible"):
        for num_layers in (4, 64):
            torch.manual_seed(0)
            # The GEMM path: the knot form (fastnvp.engine.cpu.knots) saves far less per layer
            # anyway.
            model = FastRealNVP.standard(2, num_layers, 32, memory=mode, knot_tables=False)
            measured[mode, num_layers] = (
                _step_activation_bytes(model, x, monkeypatch),
                _forward_saved_bytes(model, x),
            )
    ((inv4, pool_inv4), saved_inv4) = measured["invertible", 4]
    ((inv64, pool_inv64), saved_inv64) = measured["invertible", 64]
    ((std4, pool_std4), saved_std4) = measured["standard", 4]
    ((std64, pool_std64), saved_std64) = measured["standard", 64]
    # Standard grows ~linearly (16x the layers); invertible stays within 25 % of L = 4, and
    # so do the buffers the pool keeps between steps.
    assert std64 > 10 * std4
    assert 0 < inv64 <= 1.25 * inv4
    assert inv64 < std64 / 20
    assert pool_std64 > 10 * pool_std4
    assert 0 < pool_inv64 <= 1.25 * pool_inv4
    # Autograd-saved bytes after forward: the stack's input and output (and what the prior and
    # the loss keep, a few (N, D) tensors), plus one (N, D) anchor per 8 layers (7 at L = 64).
    row_bytes = x.numel() * x.element_size()
    assert saved_inv4 <= 4 * row_bytes
    assert saved_inv64 == saved_inv4 + 7 * row_bytes
    assert saved_std64 > 10 * saved_std4


def test_guard_raises_and_keeps_gradients_untouched():
    _, inv = _pair(6, dtype=torch.float32)
    inv.reconstruction_tolerance = 1e-30  # float32 round trips cannot meet this
    x = torch.randn(64, 2)
    loss = -inv.log_prob(x).mean()
    with pytest.raises(ReconstructionError, match="reconstruction_tolerance=1e-30"):
        loss.backward()
    assert all(p.grad is None for p in inv.parameters())
    report = inv.last_reconstruction
    assert not report.ok and report.tolerance == 1e-30 and report.max_layer_error > 0


def test_guard_catches_non_finite_reconstruction():
    _, inv = _pair(3, dtype=torch.float32)
    inv.policy = Policy(gemm_stack=False)  # the generic stack recomputes with live weights
    x = torch.randn(16, 2)
    loss = -inv.log_prob(x).mean()
    with torch.no_grad():  # change a weight after forward: recomputation no longer matches
        inv.s[2][0].bias.fill_(float("nan"))
    with pytest.raises(ReconstructionError, match="first failing layer 2"):
        loss.backward()
    assert not inv.last_reconstruction.ok


def test_default_tolerance_by_dtype():
    std, inv = _pair(2, dtype=torch.float32)
    x = torch.randn(8, 2)
    (-inv.log_prob(x).mean()).backward()
    assert inv.last_reconstruction.tolerance == 1e-3
    inv = inv.double()
    (-inv.log_prob(x.double()).mean()).backward()
    assert inv.last_reconstruction.tolerance == 1e-6


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"memory": "checkpoint"}, ValueError, "memory must be one of"),
        ({"memory": None}, TypeError, "memory must be a str"),
        ({"reconstruction_tolerance": -1.0}, ValueError, "reconstruction_tolerance must be"),
        ({"anchor_every": 0}, ValueError, "anchor_every must be >= 1"),
        ({"anchor_every": 2.0}, TypeError, "anchor_every must be an int"),
        ({"reconstruction_tolerance": float("nan")}, ValueError, "reconstruction_tolerance"),
        ({"reconstruction_tolerance": "1e-3"}, TypeError, "reconstruction_tolerance must be"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    masks = alternating_masks(2, 2)
    with pytest.raises(exc, match=match):
        FastRealNVP(
            lambda: standard_net(2, 4, tanh=True),
            lambda: standard_net(2, 4, tanh=False),
            masks,
            **kwargs,
        )


def test_memory_mode_checked_when_changed_after_construction():
    _, inv = _pair(2)
    inv.memory = "cheap"
    with pytest.raises(ValueError, match="memory must be one of"):
        inv.log_prob(torch.randn(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("share", [False, True])
def test_generic_and_shared_conditioner_steps_agree(share, one_thread):
    std, inv = _pair(8)
    _check_invertible_flow(std, inv, share, rtol=1e-10, atol=1e-12)


def _check_invertible_flow(std, inv, share: bool, rtol: float, atol: float) -> None:
    """``invertible_flow`` of ``inv`` gives ``std``'s standard-autograd gradients (float64)."""
    from fastnvp.engine.invertible import invertible_flow

    x = torch.randn(32, 2, dtype=torch.float64)
    _, _, gx_s, gp_s = _grads(std, x, LOSSES["nll"])
    xi = x.clone().requires_grad_(True)
    z, log_det = invertible_flow(inv, xi, share_conditioner=share)
    LOSSES["nll"](z, log_det).backward()
    torch.testing.assert_close(xi.grad, gx_s, rtol=rtol, atol=atol)
    for a, b in zip(inv.parameters(), gp_s):
        torch.testing.assert_close(a.grad, b, rtol=rtol, atol=atol)
    assert inv.last_reconstruction.max_layer_error < 1e-13


def test_shared_conditioner_needs_fast_model():
    from fastnvp.engine.invertible import invertible_flow

    _, inv = _pair(2)
    inv.check = True  # checks live in layer_forward: the shared step would skip them
    with pytest.raises(ValueError, match="share_conditioner=True"):
        invertible_flow(inv, torch.randn(4, 2, dtype=torch.float64), share_conditioner=True)
    with pytest.raises(TypeError, match="share_conditioner must be a bool"):
        invertible_flow(inv, torch.randn(4, 2, dtype=torch.float64), share_conditioner=1)


def test_anchors_measure_drift_and_restart_the_walk():
    _, inv = _pair(6)
    inv.policy = Policy(gemm_stack=False)  # the generic stack recomputes with live weights
    inv.anchor_every = 2
    x = torch.randn(32, 2, dtype=torch.float64)
    loss = -inv.log_prob(x).mean()
    with torch.no_grad():  # layer 3 now inverts to another input than the forward saw
        inv.t[3][4].bias.add_(1e-2)
    with pytest.raises(ReconstructionError, match="drift at anchor layer 2"):
        loss.backward()
    report = inv.last_reconstruction
    assert report.anchor_layers == (0, 2, 4)
    # Round trips of each layer stay exact; only layer 2's stored input disagrees, and the walk
    # restarted from it, so the stack input is recovered exactly again.
    assert report.max_layer_error < 1e-13
    assert report.anchor_errors[1] > 1e-4
    assert report.anchor_errors[0] < 1e-13 and report.anchor_errors[2] < 1e-13


def test_without_anchors_only_the_stack_input_is_kept():
    std, inv = _pair(5)
    inv.anchor_every = None
    x = torch.randn(16, 2, dtype=torch.float64)
    _, _, gx_s, gp_s = _grads(std, x, LOSSES["nll"])
    _, _, gx_i, gp_i = _grads(inv, x, LOSSES["nll"])
    torch.testing.assert_close(gx_i, gx_s, rtol=1e-10, atol=1e-12)
    assert inv.last_reconstruction.anchor_layers == (0,)


def test_infinite_tolerance_reports_without_raising():
    _, inv = _pair(4, dtype=torch.float32)
    inv.reconstruction_tolerance = float("inf")
    (-inv.log_prob(torch.randn(16, 2)).mean()).backward()
    assert inv.last_reconstruction.ok
    assert all(p.grad is not None for p in inv.parameters())


@pytest.mark.parametrize("share", [False, True])
def test_through_the_fused_layer_ops(share, one_thread):
    # fused="layer" runs each layer as the fused-layer ops (their PyTorch path on CPU), as
    # fused="auto" does on CUDA: the generic step goes through them, the shared step through the
    # unfused conditioner and the coupling op.
    std, inv = _pair(8)
    std.fused = inv.fused = "layer"
    _check_invertible_flow(std, inv, share, rtol=1e-8, atol=1e-10)
