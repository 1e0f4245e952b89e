"""fastnvp.training.optim: the trainers' Adam is torch's update, fused where the kernel exists."""

from __future__ import annotations

import pytest
import torch

from fastnvp import FastRealNVP
from fastnvp.training import optim


def _flow_and_batch():
    torch.manual_seed(0)
    return FastRealNVP.standard(2, 4, 16), torch.randn(64, 2)


@pytest.mark.parametrize("decoupled", [False, True])
def test_same_update_as_the_default_loop(decoupled):
    """Twenty steps of the fused optimizer track torch's default for-loop Adam / AdamW."""
    flow, x = _flow_and_batch()
    twin = FastRealNVP.standard(2, 4, 16)
    twin.load_state_dict(flow.state_dict())
    fused = optim.adam(flow.parameters(), 1e-2, 1e-3, decoupled=decoupled)
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    default = kind(twin.parameters(), lr=1e-2, weight_decay=1e-3, foreach=False)
    assert fused.defaults["fused"] is True
    assert isinstance(fused, kind)
    for _ in range(20):
        for model, opt in ((flow, fused), (twin, default)):
            opt.zero_grad()
            model.log_prob(x).mean().neg().backward()
            opt.step()
    for (name, a), b in zip(flow.state_dict().items(), twin.state_dict().values()):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # The state is torch's own: it loads into the default implementation.
    kind(twin.parameters(), lr=1e-2).load_state_dict(fused.state_dict())


def test_fused_only_where_the_kernel_exists():
    cpu = [torch.zeros(3, requires_grad=True)]
    assert optim.fused_available(cpu)
    assert not optim.fused_available([])
    meta = [torch.zeros(3, device="meta", requires_grad=True)]
    assert not optim.fused_available(meta)
    assert optim.adam(cpu, 1e-3).defaults["fused"] is True


def test_no_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="params must hold at least one tensor"):
        optim.adam([], 1e-3)
