"""The engine's no-grad caches follow every parameter update (fastnvp.engine.cache_keys).

torch's fused optimizers write parameters without bumping their version counters; a cache keyed
on (address, version) alone then serves the weights of before the step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastnvp import FastRealNVP
from fastnvp.engine import cache_keys

# D = 2: knot tables; D = 5: the GEMM stack's packed weights (uneven split); with interleaved
# layers, their stacked tensors (ActNorm's scale, the LU weight and its inverse).
FLOWS = {
    "knots": lambda: FastRealNVP.standard(2, 4, 16),
    "gemm": lambda: FastRealNVP.standard(5, 4, 16),
    "actnorm": lambda: FastRealNVP.standard(4, 4, 16, norm="actnorm"),
    "lu": lambda: FastRealNVP.standard(4, 4, 16, permutation="lu"),
    "batchnorm-eval": lambda: FastRealNVP.standard(4, 4, 16, norm="batchnorm"),
}
OPTIMIZERS = {
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.05, fused=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.05, foreach=True),
}


def _fresh_log_prob(flow, x, sample_noise):
    """log_prob and g of a deep copy: a copy starts with empty caches."""
    twin = copy.deepcopy(flow)
    with torch.no_grad():
        return twin.log_prob(x), twin.g(sample_noise)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_no_grad_calls_see_every_optimizer_step(kind, optimizer):
    torch.manual_seed(0)
    flow = FLOWS[kind]()
    dim = flow.mask.shape[1]
    x, noise = torch.randn(64, dim), torch.randn(32, dim)
    opt = OPTIMIZERS[optimizer](flow.parameters())
    for step in range(3):
        flow.train()
        opt.zero_grad()
        flow.log_prob(x).mean().neg().backward()
        opt.step()
        flow.eval()
        with torch.no_grad():  # fills (or must refresh) the caches
            log_prob, inverse = flow.log_prob(x), flow.g(noise)
        expected_log_prob, expected_inverse = _fresh_log_prob(flow, x, noise)
        assert torch.isfinite(log_prob).all()
        torch.testing.assert_close(log_prob, expected_log_prob, msg=f"step {step}")
        torch.testing.assert_close(inverse, expected_inverse, msg=f"step {step}")


def test_step_count_and_key():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p], lr=0.1, fused=True)
    before, key = cache_keys.optimizer_steps(), cache_keys.tensors_key([p])
    version = p._version
    opt.step()
    assert p._version == version  # why the step count is in the key
    assert cache_keys.optimizer_steps() == before + 1
    assert cache_keys.tensors_key([p]) != key


@pytest.mark.parametrize("kind", ["knots", "gemm", "lu"])
def test_clear_caches_after_a_write_through_data(kind):
    torch.manual_seed(1)
    flow = FLOWS[kind]().eval()
    dim = flow.mask.shape[1]
    x, noise = torch.randn(16, dim), torch.randn(16, dim)
    with torch.no_grad():
        flow.log_prob(x), flow.g(noise)
    for p in flow.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # invisible to every version counter
    flow.clear_caches()
    with torch.no_grad():
        log_prob, inverse = flow.log_prob(x), flow.g(noise)
    expected_log_prob, expected_inverse = _fresh_log_prob(flow, x, noise)
    torch.testing.assert_close(log_prob, expected_log_prob)
    torch.testing.assert_close(inverse, expected_inverse)
