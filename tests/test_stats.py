"""KS distance to N(0, 1) and the latent Gaussianity summary."""

import math

import pytest
import torch

from fastnvp.analysis.stats import ks_distance_normal, latent_gaussianity, normal_cdf


def brute_force_ks(sample: torch.Tensor) -> float:
    """sup |F_n - Φ| over the sample points, approached from both sides of each jump."""
    xs = sorted(sample.tolist())
    n = len(xs)
    best = 0.0
    for i, v in enumerate(xs):
        phi = 0.5 * (1 + math.erf(v / math.sqrt(2)))
        best = max(best, abs((i + 1) / n - phi), abs(i / n - phi))
    return best


def test_ks_matches_the_definition():
    z = torch.randn(37, 3, dtype=torch.float64) * 1.3 + 0.2
    got = ks_distance_normal(z)
    for d in range(3):
        assert got[d].item() == pytest.approx(brute_force_ks(z[:, d]), abs=1e-12)


def test_ks_small_for_normal_and_large_for_shifted():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20_000, 2, generator=g)
    assert ks_distance_normal(z).max() < 0.015
    shifted = ks_distance_normal(z + 0.5)
    # sup |Φ(u - 0.5) - Φ(u)| = Φ(0.25) - Φ(-0.25) ≈ 0.197.
    expected = float(normal_cdf(torch.tensor(0.25)) - normal_cdf(torch.tensor(-0.25)))
    assert torch.allclose(shifted, torch.full((2,), expected, dtype=torch.float64), atol=0.015)


def test_latent_gaussianity_summary():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(50_000, 2, generator=g) * torch.tensor([1.0, 2.0]) + torch.tensor([0.0, 1.0])
    out = latent_gaussianity(z)
    assert out["mean"] == pytest.approx([0.0, 1.0], abs=0.03)
    assert out["cov"][1][1] == pytest.approx(4.0, rel=0.03)
    assert out["mean_norm"] == pytest.approx(1.0, abs=0.03)
    assert out["cov_err"] == pytest.approx(3.0, abs=0.1)
    assert out["ks_max"] == max(out["ks"])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="z must have shape"):
        ks_distance_normal(torch.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        ks_distance_normal(torch.tensor([[float("nan")], [0.0]]))
    with pytest.raises(ValueError, match="at least 2 rows"):
        latent_gaussianity(torch.zeros(1, 2))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        latent_gaussianity([[0.0, 1.0]])
