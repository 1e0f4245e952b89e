"""FastRealNVP with the fused coupling layer (``fused="layer"``) equals the reference RealNVP."""

from __future__ import annotations

import pytest
import torch

import fastnvp.engine.gpu.fused as gpu_fused
import fastnvp.ops.fused_layer as fl
from fastnvp import FastRealNVP, RealNVP
from fastnvp.core.conditioner import standard_net
from fastnvp.core.masks import alternating_masks


def models(dim=3, layers=2, hidden=16, precision="ieee"):
    ref = RealNVP.standard(dim, layers, hidden=hidden)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = FastRealNVP(
        lambda: standard_net(dim, hidden, tanh=True),
        lambda: standard_net(dim, hidden, tanh=False),
        ref.mask,
        fused="layer",
        precision=precision,
    )
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def rel_err(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max()).item()


def test_fused_layer_model_matches_reference(backend):
    ref, fast = models()
    x = torch.randn(21, 3)
    ref64 = RealNVP.standard(3, 2, hidden=16).double()
    ref64.load_state_dict(ref.state_dict())
    calls = {"layer": 0}
    real_layer = gpu_fused.model_layer

    def counting_layer(*args, **kwargs):
        calls["layer"] += 1
        return real_layer(*args, **kwargs)

    fl_model_layer, gpu_fused.model_layer = gpu_fused.model_layer, counting_layer
    try:
        # Training path (gradients needed): one fused-layer op per layer.
        nll = -fast.log_prob(x).mean()
        grads = torch.autograd.grad(nll, list(fast.parameters()))
    finally:
        gpu_fused.model_layer = fl_model_layer
    assert calls["layer"] == fast.num_layers
    nll_ref = -ref64.log_prob(x.double()).mean()
    grads_ref = torch.autograd.grad(nll_ref, list(ref64.parameters()))
    assert rel_err(nll, nll_ref) <= 1e-5
    for g, r in zip(grads, grads_ref):
        assert rel_err(g, r) <= 1e-5
    # Inference (no gradients): the whole-stack op.
    with torch.no_grad():
        z, log_det = fast.f(x)
        z_ref, log_det_ref = ref64.f(x.double())
        back = fast.g(z)
    assert rel_err(z, z_ref) <= 1e-5
    assert rel_err(log_det, log_det_ref) <= 1e-5
    assert rel_err(back, x) <= 1e-5
    assert fast._fused_stack_cache is not None


def test_stack_cache_follows_parameter_updates(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    ref, fast = models()
    x = torch.randn(8, 3)
    with torch.no_grad():
        before = fast.log_prob(x)
        for p in fast.parameters():
            p.mul_(1.1)
        after = fast.log_prob(x)
        ref.load_state_dict(fast.state_dict())
        expected = ref.log_prob(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=1e-5)


def test_auto_keeps_cpu_on_the_unfused_path(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    _, fast = models()
    fast.fused = "auto"
    assert not gpu_fused.model_uses_fused_layer(fast, 0, torch.randn(4, 3))
    fast.fused = "layer"
    assert gpu_fused.model_uses_fused_layer(fast, 0, torch.randn(4, 3))


def test_fused_and_precision_are_validated():
    nets = (lambda: standard_net(2, 16, tanh=True), lambda: standard_net(2, 16, tanh=False))
    masks = alternating_masks(2, 2)
    with pytest.raises(ValueError, match="fused"):
        FastRealNVP(*nets, masks, fused="kernel")
    with pytest.raises(ValueError, match="precision"):
        FastRealNVP(*nets, masks, precision="fp16")


def test_stack_over_the_cache_budget_falls_back_to_per_layer(monkeypatch):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    monkeypatch.setattr(fl, "STACK_CACHE_BUDGET", 0)
    ref, fast = models()
    x = torch.randn(8, 3)
    with torch.no_grad():
        assert gpu_fused.model_stack(fast, x, inverse=False) is None
        assert torch.allclose(fast.log_prob(x), ref.log_prob(x), atol=1e-5)
        assert torch.allclose(fast.g(x), ref.g(x), atol=1e-5)
