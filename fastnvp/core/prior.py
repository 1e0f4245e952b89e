"""The standard-normal prior in closed form, and helpers shared by the flow modules."""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per row: ``-0.5 * (|z|^2 + D log 2π)``.  (N, D) -> (N,)."""
    return -0.5 * (z.square().sum(dim=1) + z.shape[1] * LOG_2PI)


def prior_log_prob(prior, z: torch.Tensor) -> torch.Tensor:
    """Row log-density of ``z`` under ``prior`` (None = standard normal). (N, D) -> (N,)."""
    if prior is None:
        return standard_normal_log_prob(z)
    lp = prior.log_prob(z)
    if lp.ndim == 2:  # a factorised prior (e.g. Normal) returns per-feature log-densities
        lp = lp.sum(dim=1)
    return lp


def prior_sample(
    prior, num_samples: int, dim: int, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw (num_samples, dim) latents on ``like``'s device and dtype.

    With ``prior=None`` the draw is ``torch.randn`` and honours ``generator``; a user prior draws
    through its own ``sample`` (which takes no generator).
    """
    if prior is None:
        return torch.randn(
            num_samples, dim, generator=generator, device=like.device, dtype=like.dtype
        )
    if generator is not None:
        raise ValueError("generator is only supported with the default standard-normal prior")
    z = prior.sample((num_samples,))
    if z.ndim != 2 or z.shape[1] != dim:
        raise ValueError(f"prior.sample((n,)) must return shape (n, {dim}), got {tuple(z.shape)}")
    return z.to(device=like.device, dtype=like.dtype)
