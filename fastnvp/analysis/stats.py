"""How Gaussian is a latent sample: mean, covariance and Kolmogorov–Smirnov distance to N(0, 1).

A perfect flow maps the data distribution onto N(0, I), so ``z = f(x_test)`` should have mean 0,
covariance I and each coordinate should follow N(0, 1). The KS distance of one coordinate is
``sup_u |F_n(u) - Φ(u)|`` with ``F_n`` the empirical CDF; it is implemented here with
``torch.erf`` (no SciPy).
"""

from __future__ import annotations

import math

import torch

from fastnvp.core.validation import ensure_batch


def normal_cdf(u: torch.Tensor) -> torch.Tensor:
    """Φ(u) of the standard normal, elementwise."""
    return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))


def ks_distance_normal(z: torch.Tensor) -> torch.Tensor:
    """Per-column KS distance between the sample ``z`` (N, D) and N(0, 1).  -> (D,) float64.

    With the column sorted, ``D_n = max_i max(i/n - Φ(z_(i)), Φ(z_(i)) - (i-1)/n)``: the
    empirical CDF jumps at each sample, so the supremum is attained just before or at a jump.
    """
    ensure_batch(z, "z")
    z = z.detach().to(torch.float64)
    if not torch.isfinite(z).all():
        raise ValueError("z must be finite to measure its distance to N(0, 1)")
    n = z.shape[0]
    cdf = normal_cdf(torch.sort(z, dim=0).values)
    i = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    above = (i / n - cdf).amax(dim=0)
    below = (cdf - (i - 1) / n).amax(dim=0)
    return torch.maximum(above, below)


def latent_gaussianity(z: torch.Tensor) -> dict:
    """Summary of how close the sample ``z`` (N, D) is to N(0, I).

    Returns a JSON-ready dict: ``mean`` (D,), ``cov`` (D, D), ``ks`` (D,) per-dimension KS
    distance, and the scalars ``mean_norm`` = |mean|₂, ``cov_err`` = ‖cov - I‖_F and
    ``ks_max`` = max KS over dimensions.
    """
    ensure_batch(z, "z")
    if z.shape[0] < 2:
        raise ValueError(f"z needs at least 2 rows for a covariance, got {z.shape[0]}")
    z64 = z.detach().to(torch.float64)
    ks = ks_distance_normal(z64)
    mean = z64.mean(dim=0)
    cov = torch.cov(z64.T).reshape(z.shape[1], z.shape[1])
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    return {
        "mean": mean.tolist(),
        "cov": cov.tolist(),
        "ks": ks.tolist(),
        "mean_norm": float(mean.norm()),
        "cov_err": float((cov - eye).norm()),
        "ks_max": float(ks.max()),
    }
