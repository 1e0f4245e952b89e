"""Real-data study: scikit-learn's 8×8 handwritten digits, dequantized and logit-transformed.

The data are 1797 grey-level images of D = 64 pixels x_i ∈ {0, ..., 16} (17 levels). A flow
is a density on R^D, so the discrete images are turned into continuous data in two steps:

1. Uniform dequantization: v = x + w with w ~ U[0, 1)^D, then u = v / L ∈ [0, 1)^D (L = 17
   levels). For any density p_V on [0, L)^D, Jensen's inequality gives the variational bound

       -log P(x) <= -E_w[log p_V(x + w)],   P(x) = ∫_{[0,1)^D} p_V(x + w) dw

   (Theis et al. 2016, "A note on the evaluation of generative models"), so the dequantized
   negative log-likelihood is an upper bound on the discrete one.
2. Logit: p = α + (1 - 2α) u, y = log p - log(1 - p) (Dinh et al. 2017, Real NVP). The squeeze
   α keeps p away from 0 and 1, where the logit diverges.

The model is fitted to y and gives log p_Y(y). By the change of variables v -> y (elementwise),

    log p_V(v) = log p_Y(y) + log|det ∂y/∂v|,
    log|det ∂y/∂v| = Σ_i [log(1 - 2α) - log L - log p_i - log(1 - p_i)],

the log-det including the 1/L of u = v / L. The bound in nats per image is
-E_w[log p_V(x + w)] (estimated by averaging over a few independent draws of w), and in bits per
dimension it is nats / (D ln 2). A model that is uniform on [0, L)^D scores exactly D ln L nats,
i.e. log2(17) ≈ 4.09 bits per dimension.

:func:`fit_gaussian` is the baseline: the maximum-likelihood full-covariance Gaussian on y.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fastnvp.training.data import _check_n, _check_seed

LEVELS = 17  # pixel values 0..16
SIDE = 8  # images are SIDE × SIDE
PIXELS = SIDE * SIDE  # D = 64
NUM_IMAGES = 1797  # size of sklearn's digits data set
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    """Train / validation / test split of the 8×8 digits.

    ``train``, ``val``, ``test``: float32 (n, 64) tensors of the integer pixel values 0..16 (the
    discrete data, stored as floats; row-major 8×8 images). ``train_labels``, ``val_labels``,
    ``test_labels``: int64 (n,) tensors of the digit class 0..9.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    test_labels: torch.Tensor

    LEVELS: ClassVar[int] = LEVELS
    PIXELS: ClassVar[int] = PIXELS
    SIDE: ClassVar[int] = SIDE


def load_digits_split(n_val: int = 150, n_test: int = 297, seed: int = 0) -> DigitsSplit:
    """Load sklearn's digits, shuffle them and split into train / validation / test.

    The 1797 images are permuted with ``numpy.random.default_rng(seed).permutation``; the first
    ``n_val`` go to validation, the next ``n_test`` to test and the remaining
    ``1797 - n_val - n_test`` (1350 with the defaults) to training. -> :class:`DigitsSplit`.

    Needs scikit-learn (its digits ship inside the package: no download).
    """
    n_val = _check_n(n_val, "n_val")
    n_test = _check_n(n_test, "n_test")
    if n_val + n_test >= NUM_IMAGES:
        raise ValueError(
            f"n_val + n_test must be < {NUM_IMAGES} to leave training images, "
            f"got n_val={n_val}, n_test={n_test}"
        )
    seed = _check_seed(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits data set needs scikit-learn: pip install scikit-learn "
            "(or pip install fastnvp[data])"
        ) from exc

    digits = load_digits()
    images = np.asarray(digits.data)
    labels = np.asarray(digits.target)
    if images.shape != (NUM_IMAGES, PIXELS):
        raise RuntimeError(f"sklearn's digits have shape {images.shape}, expected (1797, 64)")
    order = np.random.default_rng(seed).permutation(NUM_IMAGES)
    parts = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }

    def pixels(idx):
        return torch.from_numpy(images[idx].astype(np.float32))

    def classes(idx):
        return torch.from_numpy(labels[idx].astype(np.int64))

    return DigitsSplit(
        train=pixels(parts["train"]),
        val=pixels(parts["val"]),
        test=pixels(parts["test"]),
        train_labels=classes(parts["train"]),
        val_labels=classes(parts["val"]),
        test_labels=classes(parts["test"]),
    )


def _check_float_2d(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(t.shape)}")
    return t


class LogitTransform:
    """Uniform dequantization and the logit transform of discrete pixels (module docstring).

    ``alpha`` ∈ [0, 0.5): squeeze p = α + (1 - 2α) u before the logit. With α = 0 the logit of
    u = 0 is -inf, so :meth:`forward` then needs u ∈ (0, 1). ``levels`` >= 2: number of pixel
    values, the data being integers 0..levels-1.

    Shapes: x, u, y are (N, D); log_det is (N,). Every method keeps the input's dtype and device.
    """

    def __init__(self, alpha: float = 0.05, levels: int = LEVELS):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)):
            raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
            raise TypeError(f"levels must be an int, got {type(levels).__name__}")
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.alpha = float(alpha)
        self.levels = int(levels)

    def __repr__(self) -> str:
        return f"LogitTransform(alpha={self.alpha}, levels={self.levels})"

    def dequantize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Discrete x (N, D), integer values in [0, levels - 1] -> u = (x + w) / levels (N, D).

        w ~ U[0, 1) is drawn with ``torch.rand(..., generator=generator)`` in x's dtype, so
        u ∈ [0, 1).
        """
        x = _check_float_2d(x, "x")
        xd = x.detach()
        if not bool(torch.isfinite(xd).all()):
            raise ValueError("x must be finite, got NaN or infinity")
        if xd.numel() and (float(xd.min()) < 0 or float(xd.max()) > self.levels - 1):
            raise ValueError(
                f"x must hold pixel values in [0, {self.levels - 1}], "
                f"got {float(xd.min())}..{float(xd.max())}"
            )
        if not bool((xd == torch.floor(xd)).all()):
            raise ValueError("x must hold integer pixel values (discrete data stored as floats)")
        w = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        u = (x + w) / self.levels
        # In float32, (levels - 1) + w rounds up to levels for w within ~1e-6 of 1; keep u < 1.
        below_one = torch.nextafter(torch.ones((), dtype=x.dtype), torch.zeros((), dtype=x.dtype))
        return torch.clamp(u, max=below_one.to(x.device))

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (N, D) in [0, 1] -> (y (N, D), log_det (N,)), log_det = log|det ∂y/∂v|, v = L u."""
        u = _check_float_2d(u, "u")
        if not bool(torch.isfinite(u).all()):
            raise ValueError("u must be finite, got NaN or infinity")
        if u.numel():
            # detach: the checks read values only (forward may sit inside an autograd graph).
            lo, hi = float(u.detach().min()), float(u.detach().max())
            # With alpha = 0 the ends of [0, 1] map to ±inf; reject them instead of returning inf.
            if self.alpha == 0.0 and (lo <= 0.0 or hi >= 1.0):
                raise ValueError(f"u must lie in (0, 1) when alpha = 0, got {lo}..{hi}")
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"u must lie in [0, 1], got {lo}..{hi}")
        p = self.alpha + (1.0 - 2.0 * self.alpha) * u
        log_p, log_q = torch.log(p), torch.log1p(-p)
        y = log_p - log_q
        const = math.log(1.0 - 2.0 * self.alpha) - math.log(self.levels)
        log_det = (const - log_p - log_q).sum(dim=1)
        return y, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y (N, D) -> u (N, D): sigmoid, then undo the α squeeze (u ∈ [0, 1] up to rounding)."""
        y = _check_float_2d(y, "y")
        if bool(torch.isnan(y).any()):
            raise ValueError("y must not hold NaN")
        return (torch.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)

    def to_pixels(self, y: torch.Tensor) -> torch.Tensor:
        """y (N, D) -> pixels (N, D) floats in {0, ..., levels - 1}: floor(u · levels), clamped.

        The clamp maps model samples outside the squeezed range (u < 0 or u >= 1) to the end
        levels. Exact inverse of :meth:`dequantize` + :meth:`forward` except when the noise w
        lies within rounding of 0 (float32: about 1e-6), where the pixel may come back one less.
        """
        u = self.inverse(y)
        return torch.clamp(torch.floor(u * self.levels), 0, self.levels - 1)


def nats_per_image(log_prob_y: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """-(log p_Y(y) + log|det ∂y/∂v|), elementwise: (N,), (N,) -> (N,) nats per image."""
    for name, t in (("log_prob_y", log_prob_y), ("log_det", log_det)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D (N,) tensor, got {_describe(t)}")
    if log_prob_y.shape != log_det.shape:
        raise ValueError(
            f"log_prob_y and log_det must have the same shape (N,), got "
            f"{tuple(log_prob_y.shape)} and {tuple(log_det.shape)}"
        )
    return -(log_prob_y + log_det)


def bits_per_dim(nats, dim: int = PIXELS):
    """Nats per image (float or tensor) -> bits per dimension, nats / (dim · ln 2)."""
    dim = _check_n(dim, "dim")
    if isinstance(nats, bool) or not isinstance(nats, (int, float, np.floating, torch.Tensor)):
        raise TypeError(f"nats must be a float or a tensor, got {type(nats).__name__}")
    return nats / (dim * math.log(2.0))


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}"
    return type(t).__name__


def evaluate_nll(
    log_prob_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    transform: LogitTransform,
    samples: int = 4,
    generator: torch.Generator | None = None,
    batch: int = 1024,
) -> float:
    """Mean dequantized NLL in nats per image of the discrete images x (N, D).

    Averages -log p_V(x + w) over the N images and ``samples`` independent dequantizations w
    (an estimate of the bound -E_w[log p_V(x + w)] >= -log P(x)). Each draw dequantizes all of x
    (so the result does not depend on ``batch``), then runs :meth:`LogitTransform.forward` and
    ``log_prob_fn`` (float (n, D) -> (n,) log p_Y) under ``torch.no_grad()`` on ``batch`` rows at
    a time. Sums are accumulated in float64. Divide by D ln 2 (:func:`bits_per_dim`) for bits
    per dimension.
    """
    if not callable(log_prob_fn):
        raise TypeError(f"log_prob_fn must be callable, got {type(log_prob_fn).__name__}")
    if not isinstance(transform, LogitTransform):
        raise TypeError(f"transform must be a LogitTransform, got {type(transform).__name__}")
    samples = _check_n(samples, "samples")
    batch = _check_n(batch, "batch")
    x = _check_float_2d(x, "x")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one image, got shape (0, D)")
    total = 0.0
    with torch.no_grad():
        for _ in range(samples):
            u = transform.dequantize(x, generator=generator)
            for start in range(0, u.shape[0], batch):
                y, log_det = transform.forward(u[start : start + batch])
                log_prob = log_prob_fn(y)
                if not isinstance(log_prob, torch.Tensor) or log_prob.shape != log_det.shape:
                    raise ValueError(
                        f"log_prob_fn must map ({y.shape[0]}, {y.shape[1]}) to "
                        f"({y.shape[0]},), got {_describe(log_prob)}"
                    )
                if bool(torch.isnan(log_prob).any()):
                    raise ValueError("log_prob_fn returned NaN")
                total += float(nats_per_image(log_prob, log_det).double().sum())
    return total / (samples * x.shape[0])


def fit_gaussian(
    y: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.distributions.MultivariateNormal:
    """Maximum-likelihood full-covariance Gaussian of transformed data y (N, D), N > D.

    Mean and covariance (divided by N) are computed in float64; a ridge 1e-6 · I is added only if
    the Cholesky factorization fails. The distribution is built from that float64 Cholesky
    factor cast to ``dtype`` (default float32, to score the float32 y of :class:`DigitsSplit`;
    pass torch.float64 for float64 inputs), so its ``log_prob`` maps (n, D) -> (n,).
    """
    y = _check_float_2d(y, "y")
    n, d = y.shape
    if n <= d:
        raise ValueError(f"y needs more rows than columns for a full covariance, got {n}×{d}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y must be finite, got NaN or infinity")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    y64 = y.detach().to(torch.float64)
    mean = y64.mean(dim=0)
    centred = y64 - mean
    cov = centred.T @ centred / n
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        # A constant column (or collinear ones) makes the covariance singular.
        cov = cov + 1e-6 * torch.eye(d, dtype=torch.float64, device=cov.device)
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise ValueError("y's covariance is not positive definite even with a 1e-6 ridge")
    return torch.distributions.MultivariateNormal(mean.to(dtype), scale_tril=chol.to(dtype))


def image_grid(x, rows: int, cols: int) -> np.ndarray:
    """Pixel rows (rows·cols, 64) -> one float64 (rows·9 - 1, cols·9 - 1) array for plotting.

    Image k goes to grid cell (k // cols, k % cols), each 8×8 image row-major; the values are
    copied as given (0..16 for pixels). Neighbouring images are separated by a 1-pixel gap of
    NaN (drawn as the colormap's "bad" colour by matplotlib's imshow; there is no outer border).
    ``x`` may be a tensor or a numpy array.
    """
    rows = _check_n(rows, "rows")
    cols = _check_n(cols, "cols")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (rows * cols, PIXELS):
        raise ValueError(
            f"x must have shape (rows*cols, {PIXELS}) = ({rows * cols}, {PIXELS}), got {x.shape}"
        )
    step = SIDE + 1
    grid = np.full((rows * step - 1, cols * step - 1), np.nan)
    for k, image in enumerate(x.reshape(-1, SIDE, SIDE)):
        r, c = divmod(k, cols)
        grid[r * step : r * step + SIDE, c * step : c * step + SIDE] = image
    return grid
