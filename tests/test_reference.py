"""The reference Real NVP: log_det vs the brute-force Jacobian, round trips, notebook compat."""

import numpy as np
import pytest
import torch
from torch import nn

from fastnvp import RealNVP
from fastnvp.core.masks import alternating_masks


@pytest.mark.parametrize("dim", [2, 5])
def test_log_det_matches_brute_force_jacobian(dim):
    model = RealNVP.standard(dim, num_layers=4, hidden=16).double()
    x = torch.randn(6, dim, dtype=torch.float64)
    _, log_det = model.f(x)
    for n in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda row: model.f(row[None])[0][0], x[n])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0
        assert abs(logabs.item() - log_det[n].item()) < 1e-10


@pytest.mark.parametrize("depth", [1, 8, 50])
def test_round_trip(depth):
    model = RealNVP.standard(3, num_layers=depth, hidden=32)
    x = torch.randn(200, 3)
    z, _ = model.f(x)
    err = (model.g(z) - x).abs().max().item()
    assert err < 1e-4 * max(1, depth // 8), f"|g(f(x)) - x| = {err}"


def test_log_prob_is_prior_plus_log_det():
    model = RealNVP.standard(2, num_layers=3, hidden=8).double()
    x = torch.randn(10, 2, dtype=torch.float64)
    z, log_det = model.f(x)
    prior = torch.distributions.MultivariateNormal(torch.zeros(2).double(), torch.eye(2).double())
    expected = prior.log_prob(z) + log_det
    assert torch.allclose(model.log_prob(x), expected, atol=1e-12)


def test_user_prior_and_sampling():
    prior = torch.distributions.MultivariateNormal(torch.zeros(2), 4 * torch.eye(2))
    masks = alternating_masks(2, 2)
    model = RealNVP(
        lambda: nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2), nn.Tanh()),
        lambda: nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)),
        masks,
        prior,
    )
    x = model.sample(50)
    assert x.shape == (50, 2) and torch.isfinite(x).all()
    z, log_det = model.f(x)
    assert torch.allclose(model.log_prob(x), prior.log_prob(z) + log_det)
    with pytest.raises(ValueError, match="generator"):
        model.sample(3, generator=torch.Generator())


def test_notebook_state_dict_loads():
    """The widely copied notebook stores nets as ModuleLists `s`/`t` and masks as `mask`."""
    nets = lambda: nn.Sequential(
        nn.Linear(2, 256), nn.LeakyReLU(), nn.Linear(256, 256), nn.LeakyReLU(),
        nn.Linear(256, 2), nn.Tanh(),
    )  # fmt: skip
    nett = lambda: nn.Sequential(
        nn.Linear(2, 256), nn.LeakyReLU(), nn.Linear(256, 256), nn.LeakyReLU(), nn.Linear(256, 2)
    )
    masks = torch.from_numpy(np.array([[0, 1], [1, 0]] * 3).astype(np.float32))

    class Notebook(nn.Module):
        def __init__(self):
            super().__init__()
            self.mask = nn.Parameter(masks, requires_grad=False)
            self.t = nn.ModuleList([nett() for _ in range(len(masks))])
            self.s = nn.ModuleList([nets() for _ in range(len(masks))])

    saved = Notebook().state_dict()
    model = RealNVP(nets, nett, masks)
    model.load_state_dict(saved)
    assert torch.equal(model.mask, masks)
    assert torch.equal(model.s[3][2].weight, saved["s.3.2.weight"])


def test_standard_masks_alternate_for_any_dim():
    for dim in (2, 3, 7):
        masks = alternating_masks(dim, 4)
        assert torch.equal(masks[0] + masks[1], torch.ones(dim))
        assert torch.equal(masks[0], masks[2])
    assert torch.equal(alternating_masks(2, 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_first_parameter_is_the_first_of_parameters():
    """The flows' anchor (dtype and device of every input check) is ``next(parameters())``,
    read from the module dicts: the same tensor for every layout of modules."""
    from fastnvp import FastRealNVP
    from fastnvp.core.reference import _first_parameter

    no_params = nn.Sequential(nn.Tanh(), nn.Sequential(nn.ReLU()))
    late = nn.Sequential(nn.Tanh(), nn.Sequential(nn.ReLU(), nn.Linear(2, 3)))
    late.register_parameter("own", None)  # a None entry is skipped, as parameters() does
    flows = [
        RealNVP.standard(4, 2, 8),
        FastRealNVP.standard(4, 2, 8, context=3, embedding=nn.Linear(3, 2)),
        RealNVP.standard(4, 2, 8, norm="actnorm", permutation="lu"),
    ]
    for module in (*flows, late):
        assert _first_parameter(module) is next(module.parameters())
    assert _first_parameter(no_params) is None
    frozen = RealNVP.standard(4, 2, 8).requires_grad_(False)
    assert frozen._anchor() is next(frozen.parameters())
