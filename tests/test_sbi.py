"""fastnvp as sbi's density estimator (fastnvp.integrations.sbi); skipped without sbi.

The estimator's shapes follow sbi's conventions, its log_prob is the flow's log-density of the
z-scored theta plus the z-score's log-determinant (checked against the formula and by
integrating the density over a grid), and NPE with it recovers the exact posterior of a
linear-Gaussian task (C2ST <= 0.55).
"""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("sbi")

from sbi.inference import NPE  # noqa: E402
from sbi.utils.metrics import c2st  # noqa: E402
from torch.distributions import MultivariateNormal  # noqa: E402

from fastnvp import FastRealNVP  # noqa: E402
from fastnvp.integrations.sbi import RealNVPDensityEstimator, realnvp_nn  # noqa: E402


def batch(n: int, dim: int, cond: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """theta (n, dim) with mean 1, std 2 per feature; x (n, cond) a noisy function of theta."""
    g = torch.Generator().manual_seed(seed)
    theta = 1.0 + 2.0 * torch.randn(n, dim, generator=g)
    x = 3.0 * theta.sum(1, keepdim=True) + 0.5 * torch.randn(n, cond, generator=g) - 4.0
    return theta, x


@pytest.mark.parametrize("dim", [1, 3])
def test_log_prob_is_flow_density_with_z_score(dim):
    theta, x = batch(300, dim, 4)
    est = realnvp_nn(num_layers=4, hidden=16)(theta, x)
    assert isinstance(est, RealNVPDensityEstimator) and isinstance(est.net, FastRealNVP)
    assert est.input_shape == (dim,) and est.condition_shape == (4,)
    assert est.net.context_features == 4

    mean, std = theta.mean(0), theta.std(0)
    u = (theta[:20] - mean) / std
    if dim == 1:  # the padded flow runs on (u, 0)
        assert est.net.dim == 2 and torch.all(est.net.mask == torch.tensor([0.0, 1.0]))
        u = torch.cat([u, torch.zeros(20, 1)], dim=1)
    expected = est.net.log_prob(u, context=x[:20]) - std.log().sum()
    torch.testing.assert_close(est.log_prob(theta[:20], x[:20])[0], expected)
    # x reaches the conditioners z-scored by sbi's standardizing net
    x_std = (x[:20] - x.mean(0)) / x.std(0)
    torch.testing.assert_close(est.embedding_net(x[:20]), x_std)


@pytest.mark.parametrize("dim", [1, 2])
def test_density_integrates_to_one_in_theta(dim):
    """Only with the z-score's log-determinant does exp(log_prob) integrate to 1 over theta."""
    theta, x = batch(300, dim, 2)
    est = realnvp_nn(num_layers=4, hidden=16)(theta, x)
    step = 0.05 if dim == 1 else 0.1
    axis = torch.arange(-16.0, 18.0, step)  # theta has mean 1, std 2: +-8.5 std
    grid = axis[:, None] if dim == 1 else torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        log_p = est.log_prob(grid, x[:1].expand(grid.shape[0], 2))[0]
    mass = log_p.exp().sum().item() * step**dim
    assert mass == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("dim", [1, 2])
def test_shapes_follow_sbi_conventions(dim):
    theta, x = batch(200, dim, 3)
    est = realnvp_nn(num_layers=2, hidden=8)(theta, x)
    est.eval()
    with torch.no_grad():
        assert est.log_prob(theta[:5], x[:5]).shape == (1, 5)  # (batch, D): one sample
        s_b = theta[:15].reshape(3, 5, dim)
        assert est.log_prob(s_b, x[:5]).shape == (3, 5)  # (sample, batch, D)
        assert est.log_prob(s_b, x[:1]).shape == (3, 5)  # batch dims broadcast
        assert est.loss(theta[:5], x[:5]).shape == (5,)
        assert est.sample((7,), x[:4]).shape == (7, 4, dim)
        assert est.sample((2, 3), x[:4]).shape == (2, 3, 4, dim)
        samples, log_p = est.sample_and_log_prob((6,), x[:4])
        assert samples.shape == (6, 4, dim) and log_p.shape == (6, 4)
        torch.testing.assert_close(est.log_prob(samples, x[:4]), log_p, rtol=1e-4, atol=1e-4)


def test_options_embedding_and_multi_dim_condition():
    theta, x = batch(200, 2, 6)
    plain = realnvp_nn(num_layers=2, hidden=8, z_score_theta="none", z_score_x="none")(theta, x)
    assert plain.net.embedding is None and plain.embedding_net is None
    u = theta[:5]
    torch.testing.assert_close(plain.log_prob(u, x[:5])[0], plain.net.log_prob(u, context=x[:5]))

    est = realnvp_nn(num_layers=2, hidden=8, embedding_net=nn.Linear(6, 3))(theta, x)
    assert est.net.embedded_features == 3

    images = x.reshape(200, 2, 3)  # x with a 2-D event shape, flattened for the flow
    emb = nn.Sequential(nn.Flatten(1), nn.Linear(6, 4))
    est = realnvp_nn(num_layers=2, hidden=8, embedding_net=emb)(theta, images)
    assert est.condition_shape == (2, 3) and est.net.context_features == 6
    with torch.no_grad():
        assert est.log_prob(theta[:5], images[:5]).shape == (1, 5)
        assert est.sample((4,), images[:3]).shape == (4, 3, 2)

    with pytest.raises(ValueError, match="z_score_theta"):
        realnvp_nn(z_score_theta="transform_to_unconstrained")
    with pytest.raises(ValueError, match="num_layers"):
        realnvp_nn(num_layers=0)
    with pytest.raises(TypeError, match="context"):
        realnvp_nn(context=3)
    with pytest.raises(TypeError, match=r"unknown flow options \['clmap'\].*'clamp'"):
        realnvp_nn(clmap=2.0)  # at the call, before sbi has a batch to build from
    est = realnvp_nn(num_layers=2, hidden=8, clamp=2.0, negative_slope=0.1)(theta, x)
    assert est.net.clamp == 2.0


def test_import_is_lazy_and_missing_sbi_says_how_to_install(tmp_path):
    code = "import sys, fastnvp, fastnvp.integrations; print('sbi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    code = "import sys; sys.modules['sbi'] = None; import fastnvp.integrations.sbi"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "pip install fastnvp[sbi]" in out.stderr


def linear_gaussian(num: int, dim: int, sigma: float, seed: int):
    """theta ~ N(0, I), x = theta + N(0, sigma^2 I): prior, theta (num, dim), x (num, dim)."""
    torch.manual_seed(seed)
    prior = MultivariateNormal(torch.zeros(dim), torch.eye(dim))
    theta = prior.sample((num,))
    return prior, theta, theta + sigma * torch.randn_like(theta)


def exact_posterior(x_o: torch.Tensor, sigma: float) -> MultivariateNormal:
    """p(theta | x_o) = N(x_o / (1 + sigma^2), sigma^2 / (1 + sigma^2) I); x_o (dim,)."""
    var = sigma**2 / (1.0 + sigma**2)
    return MultivariateNormal(x_o / (1.0 + sigma**2), var * torch.eye(x_o.shape[0]))


@pytest.mark.parametrize("dim", [2, 1])
def test_npe_recovers_linear_gaussian_posterior(dim, one_thread):
    sigma = 0.1
    prior, theta, x = linear_gaussian(2000, dim, sigma, seed=0)
    inference = NPE(prior, density_estimator=realnvp_nn(), show_progress_bars=False)
    inference.append_simulations(theta, x).train(max_num_epochs=100)
    posterior = inference.build_posterior()

    x_o = torch.tensor([0.5, -0.3][:dim])
    samples = posterior.sample((1000,), x=x_o, show_progress_bars=False)
    assert samples.shape == (1000, dim)
    exact = exact_posterior(x_o, sigma)
    reference = exact.sample((1000,))
    score = c2st(samples, reference).item()
    assert score <= 0.55, f"C2ST {score:.3f} > 0.55"

    log_p = posterior.log_prob(samples[:200], x=x_o)
    assert log_p.shape == (200,) and torch.isfinite(log_p).all()
    # the posterior's density is close to the exact one where the mass is
    gap = (log_p - exact.log_prob(samples[:200])).abs().median().item()
    assert gap < 0.3, f"median |log q - log p| = {gap:.3f}"

    copied = copy.deepcopy(posterior)  # sbi copies the estimator; the copy samples too
    assert copied.sample((5,), x=x_o, show_progress_bars=False).shape == (5, dim)


def test_estimator_pickles():
    theta, x = batch(100, 2, 2)
    est = realnvp_nn(num_layers=2, hidden=8)(theta, x)
    again = pickle.loads(pickle.dumps(est))
    torch.testing.assert_close(again.log_prob(theta[:4], x[:4]), est.log_prob(theta[:4], x[:4]))


def test_log_abs_det_is_minus_sum_log_std():
    theta, x = batch(100, 3, 2)
    est = realnvp_nn(num_layers=2, hidden=8)(theta, x)
    assert est._log_abs_det().item() == pytest.approx(-math.fsum(theta.std(0).log().tolist()))
