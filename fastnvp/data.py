"""Data sets for flows, in one public place.

- The 2-D toys (``make_dataset(name, n)`` over :data:`DATASETS`: two moons, circles, eight
  Gaussians, checkerboard, pinwheel, two spirals): x (n, 2) float32 and labels (n,) int64
  (``fastnvp.training.data``; ``moons_log_density`` is the exact density of two moons).
- scikit-learn's 8 x 8 digits, 64-D real data (``pip install fastnvp[data]``):
  :func:`load_digits_split` (a seeded train / validation / test split of the 1 797 images,
  pixels 0-16), :class:`LogitTransform` (uniform dequantization ``u = (x + w) / 17`` and the
  logit ``y = logit(α + (1 - 2α) u)`` with the log-det of that change of variables),
  :func:`nats_per_image` and :func:`bits_per_dim` (results in units of the discrete data),
  :func:`fit_gaussian` (the full-covariance Gaussian baseline) and :func:`evaluate_nll`
  (``fastnvp.training.digits``, whose docstring has the math; docs/digits.md).

Example (a flow ``flow`` on D = 64)::

    from fastnvp.data import LogitTransform, bits_per_dim, load_digits_split, nats_per_image

    split = load_digits_split()           # train (1350, 64), val (150, 64), test (297, 64)
    transform = LogitTransform()          # α = 0.05, 17 levels
    u = transform.dequantize(split.test)  # (x + w) / 17, (297, 64)
    y, log_det = transform.forward(u)     # logit space (297, 64); log|det ∂y/∂v| (297,)
    nats = nats_per_image(flow.log_prob(y), log_det).mean()
    print(nats, bits_per_dim(nats))
"""

from __future__ import annotations

from fastnvp.training.data import DATASETS, make_dataset, moons_log_density, two_moons
from fastnvp.training.digits import (
    LEVELS,
    NUM_CLASSES,
    PIXELS,
    DigitsSplit,
    LogitTransform,
    bits_per_dim,
    evaluate_nll,
    fit_gaussian,
    load_digits_split,
    nats_per_image,
)

__all__ = [
    "DATASETS",
    "LEVELS",
    "NUM_CLASSES",
    "PIXELS",
    "DigitsSplit",
    "LogitTransform",
    "bits_per_dim",
    "evaluate_nll",
    "fit_gaussian",
    "load_digits_split",
    "make_dataset",
    "moons_log_density",
    "nats_per_image",
    "two_moons",
]
