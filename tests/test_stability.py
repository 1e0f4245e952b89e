"""Soft clamp of the log-scale, check mode, and a deep (200-layer) flow trained without NaN."""

import math

import pytest
import torch
from torch import nn

from fastnvp import FastRealNVP, RealNVP
from fastnvp.core import checks
from fastnvp.core.conditioner import standard_net
from fastnvp.core.masks import alternating_masks
from fastnvp.training.data import two_moons

MODELS = [RealNVP, FastRealNVP]


class Scaled(nn.Module):
    """A user net whose output is ``gain`` times a Linear: large gains make |s| huge."""

    def __init__(self, dim, gain):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.gain = gain

    def forward(self, x):
        return self.gain * self.lin(x)


def user_flow(cls, dim=3, layers=4, gain=1.0, **kwargs):
    return cls(
        lambda: Scaled(dim, gain),
        lambda: Scaled(dim, 1.0),
        alternating_masks(dim, layers),
        **kwargs,
    ).double()


def brute_log_det(flow, x):
    """log|det df/dx| per row from the full Jacobian (float64 oracle)."""
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda r: flow.f(r[None])[0][0], row)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


# ----------------------------------------------------------------------------------- clamp
@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_clamp_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="clamp"):
        user_flow(FastRealNVP, clamp=bad)


@pytest.mark.parametrize("bad", [True, "2", [1.0]])
def test_clamp_rejects_bad_types(bad):
    with pytest.raises(TypeError, match="clamp"):
        user_flow(FastRealNVP, clamp=bad)


def test_check_rejects_non_bool():
    with pytest.raises(TypeError, match="check"):
        user_flow(FastRealNVP, check=1)


@pytest.mark.parametrize("cls", MODELS)
def test_clamp_bounds_log_scale_and_stays_exact(cls, backend):
    """Huge raw log-scales: the clamp keeps |s| < α per feature, and f, g, log_det stay exact."""
    dim, layers, alpha = 3, 4, 2.0
    flow = user_flow(cls, dim, layers, gain=1e4, clamp=alpha)
    x = torch.randn(5, dim, dtype=torch.float64)
    z, log_det = flow.f(x)
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all()
    # Each layer transforms at most ceil(D/2) features, each contributing |s| < α.
    assert log_det.abs().max() < layers * math.ceil(dim / 2) * alpha
    torch.testing.assert_close(flow.g(z), x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_det, brute_log_det(flow, x), rtol=1e-9, atol=1e-9)


def test_unclamped_huge_scale_overflows():
    """The failure the clamp prevents: the same nets without it overflow exp(s)."""
    flow = user_flow(FastRealNVP, gain=1e4).float()
    z, log_det = flow.f(torch.randn(64, 3))
    assert not (torch.isfinite(z).all() and torch.isfinite(log_det).all())


def test_clamp_is_identity_near_zero_and_parity_with_reference(backend):
    ref = user_flow(RealNVP, gain=1e-3, clamp=5.0)
    fast = FastRealNVP.from_reference(ref)
    assert fast.clamp == 5.0
    x = torch.randn(7, 3, dtype=torch.float64)
    z_ref, ld_ref = ref.f(x)
    z_fast, ld_fast = fast.f(x)
    torch.testing.assert_close(z_fast, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_fast, ld_ref, rtol=1e-12, atol=1e-12)
    # With |s| ~ 1e-3 << α the clamp changes s by O(s^3/α^2): the unclamped flow agrees closely.
    plain = user_flow(RealNVP, gain=1e-3)
    plain.load_state_dict(ref.state_dict())
    torch.testing.assert_close(plain.f(x)[1], ld_ref, rtol=1e-6, atol=1e-9)


def test_clamp_leaves_standard_layers_unchanged():
    dim, layers = 2, 3
    make = lambda tanh: lambda: standard_net(dim, 8, tanh=tanh)  # noqa: E731
    torch.manual_seed(1)
    plain = FastRealNVP(make(True), make(False), alternating_masks(dim, layers)).double()
    clamped = FastRealNVP(
        make(True), make(False), alternating_masks(dim, layers), clamp=0.1
    ).double()
    clamped.load_state_dict(plain.state_dict())
    x = torch.randn(9, dim, dtype=torch.float64)
    torch.testing.assert_close(clamped.f(x), plain.f(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------- checks
def poisoned(cls, layer, **kwargs):
    flow = user_flow(cls, layers=5, **kwargs)
    with torch.no_grad():
        flow.s[layer].lin.weight[1, 0] = math.nan  # feature 1 is transformed in odd layers
    return flow


@pytest.mark.parametrize("cls", MODELS)
def test_check_names_the_first_bad_layer(cls, backend):
    flow = poisoned(cls, 3, check=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(checks.NonFiniteError, match="coupling layer 3") as info:
        flow.f(x)
    assert (info.value.layer, info.value.direction) == (3, "f")
    assert info.value.name == "output of s[3].lin (Linear)"
    # g walks the layers backwards and meets layer 3 after 4.
    with pytest.raises(checks.NonFiniteError) as info:
        flow.g(x)
    assert (info.value.layer, info.value.direction) == (3, "g")


@pytest.mark.parametrize("cls", MODELS)
def test_checks_off_by_default_and_on_in_context(cls):
    flow = poisoned(cls, 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    z, _ = flow.f(x)  # no check: NaN flows through silently
    assert torch.isnan(z).any()
    assert not checks.is_enabled()
    with checks.enabled():
        assert checks.is_enabled()
        with pytest.raises(checks.NonFiniteError, match="coupling layer 3"):
            flow.f(x)
    assert not checks.is_enabled()


class HiddenOverflow(nn.Module):
    """Linear -> Linear -> Tanh: a hidden value that overflows to inf is hidden by the Tanh."""

    def __init__(self, dim):
        super().__init__()
        self.inner = nn.Linear(dim, 4)
        self.outer = nn.Linear(4, dim)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.outer(self.inner(x)))


@pytest.mark.parametrize("cls", MODELS)
def test_check_catches_a_hidden_activation_that_the_output_hides(cls):
    def build(check):
        make = lambda: HiddenOverflow(2)  # noqa: E731
        return cls(make, lambda: Scaled(2, 1.0), alternating_masks(2, 3), check=check).double()

    unchecked = build(check=False)
    with torch.no_grad():
        unchecked.s[1].inner.bias.fill_(1e300)
        unchecked.s[1].outer.weight.fill_(1e300)  # 1e300 * 1e300 overflows float64 to inf
    checked = build(check=True)
    checked.load_state_dict(unchecked.state_dict())
    x = torch.rand(4, 2, dtype=torch.float64)
    z, log_det = unchecked.f(x)
    # tanh(inf) = 1: the flow's outputs stay finite, only the module-output check sees it.
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all()
    with pytest.raises(checks.NonFiniteError) as info:
        checked.f(x)
    assert info.value.layer == 1
    assert info.value.name == "output of s[1].outer (Linear)"


@pytest.mark.parametrize("cls", MODELS)
def test_check_catches_overflow_in_output(cls):
    """Finite s = 100 and t, but exp(100) overflows float32: layer 0's output z is reported."""
    flow = user_flow(cls, gain=1.0, check=True).float()
    with torch.no_grad():
        for net in flow.s:
            net.lin.weight.zero_()
            net.lin.bias.fill_(100.0)
    with pytest.raises(checks.NonFiniteError) as info:
        flow.f(torch.ones(2, 3))
    assert info.value.name == "z" and info.value.layer == 0


@pytest.mark.parametrize("cls", MODELS)
def test_check_rejects_non_finite_input(cls):
    flow = user_flow(cls, check=True)
    x = torch.randn(3, 3, dtype=torch.float64)
    x[1, 2] = math.inf
    with pytest.raises(checks.NonFiniteError, match="the input") as info:
        flow.log_prob(x)
    assert info.value.name == "x" and info.value.layer is None


@pytest.mark.parametrize("cls", MODELS)
def test_check_catches_non_finite_gradient(cls):
    flow = user_flow(cls, layers=3, check=True)
    z, _ = flow.f(torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(checks.NonFiniteError, match="grad of z") as info:
        (z * math.inf).sum().backward()
    assert info.value.layer == 2


def test_checks_pass_on_a_healthy_model(backend):
    flow = FastRealNVP.standard(2, 6, hidden=8, check=True)
    x = torch.randn(16, 2)
    loss = -flow.log_prob(x).mean()
    loss.backward()
    torch.testing.assert_close(flow.g(flow.f(x)[0]), x, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- depth
def test_deep_flow_trains_on_two_moons_without_nan(one_thread):
    """200 standard layers, a few Adam steps on two moons with checks on: every loss finite."""
    torch.manual_seed(0)
    flow = FastRealNVP.standard(2, 200, hidden=16, check=True)
    data = torch.from_numpy(two_moons(512, seed=0)[0])
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        batch = data[step * 64 : (step + 1) * 64]
        loss = -flow.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    x = data[:64]
    err = (flow.g(flow.f(x)[0]) - x).abs().max().item()
    assert err < 1e-3, f"200-layer round trip error {err}"


def test_checks_reachable_as_package_attribute():
    import fastnvp

    assert fastnvp.core.checks.enabled is checks.enabled
    assert fastnvp.training.distributed.World().size == 1
