"""Normalization layers of a flow: ActNorm (Glow) and batch normalization (Real NVP).

Both are per-feature affine maps, so their Jacobian is diagonal (docs/design.md §1.8)::

    ActNorm     y = x * exp(log_scale) + shift                log|det| = Σ_j log_scale_j
    BatchNorm   y = (x - μ) / sqrt(σ² + ε) * exp(log_gamma) + beta
                                                  log|det| = Σ_j (log_gamma_j - ½ log(σ²_j + ε))

ActNorm's parameters are initialized from the first batch ``forward`` sees, so that batch
leaves the layer with zero mean and unit variance per feature (Kingma & Dhariwal 2018); the
``initialized`` buffer is in the state_dict, so a loaded model is never re-initialized.

BatchNorm as flows define it (Dinh et al. 2017, §3.7): in train mode ``forward`` uses the
batch's mean and (biased) variance and updates running averages (momentum, the unbiased
variance, as ``torch.nn.BatchNorm1d``); in eval mode it uses the running averages, so a row's
output and log-density do not depend on the rows beside it. The log-determinant treats the
statistics as constants (the flow's Jacobian of one row given the batch's statistics); the
gradient of a loss still flows through the batch statistics, as in any batch-normalized net.
``inverse`` always uses the running averages: it is the exact inverse of ``forward`` in eval
mode. The engine's inverse of a train-mode forward (invertible memory mode) uses the statistics
that forward saved (:meth:`BatchNorm.forward_with`, :meth:`BatchNorm.inverse_with`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastnvp.core.flow_layer import FlowLayer


def _check_positive(value, name: str, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a finite float > 0{bound}, got {value}")
    return float(value)


def _rows_constant(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar log-determinant as the (N,) per-row vector (in x's dtype)."""
    return value.to(x.dtype).expand(x.shape[0])


class ActNorm(FlowLayer):
    """Per-feature affine layer with data-dependent initialization (Glow's ActNorm).

    ``y = x * exp(log_scale) + shift``; parameters ``log_scale`` (D,) and ``shift`` (D,),
    buffer ``initialized``. The first ``forward`` on a batch of >= 2 rows sets them so that
    batch comes out standardized: ``log_scale = -log(std + eps)``, ``shift = -mean *
    exp(log_scale)``; ``inverse`` never initializes (a sample from an untrained model passes
    through the identity).

    Args:
        dim: D.
        eps: added to the standard deviation at initialization (a constant feature).
    """

    kind = "actnorm"

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim)
        self.eps = _check_positive(eps, "eps")
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))
        # A Python mirror of the buffer: the branch below must not read a tensor (it would
        # synchronise a GPU and break a torch.compile graph).
        self._ready = False

    @property
    def is_initialized(self) -> bool:
        """Whether the data-dependent initialization has run (or a state_dict was loaded)."""
        return self._ready

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the parameters from a batch x (N, D), N >= 2, so it comes out standardized."""
        self._check(x, "x")
        if x.shape[0] < 2:
            raise ValueError(
                f"x must have at least 2 rows to initialize ActNorm from its statistics, got "
                f"{x.shape[0]}"
            )
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        log_scale = -torch.log(std + self.eps)
        self.log_scale.copy_(log_scale)
        self.shift.copy_(-mean * log_scale.exp())
        self.initialized.fill_(True)
        self._ready = True

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(log_scale), shift)``, each (D,), differentiable in the parameters."""
        return self.log_scale.exp(), self.shift

    def log_det_constant(self) -> torch.Tensor:
        """log|det dy/dx| of one row, a 0-d tensor: ``Σ log_scale``."""
        return self.log_scale.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (y, Σ log_scale per row (N,)); initializes on the first batch."""
        self._check(x, "x")
        if not self._ready and x.shape[0] >= 2:
            self.initialize(x.detach())
        scale, shift = self.scale_shift()
        return torch.addcmul(shift, x, scale), _rows_constant(self.log_det_constant(), x)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y (N, D) -> (x = (y - shift) exp(-log_scale), -Σ log_scale per row (N,))."""
        self._check(y, "y")
        x = (y - self.shift) * torch.exp(-self.log_scale)
        return x, _rows_constant(-self.log_det_constant(), y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, initialized={self._ready}"


class BatchNorm(FlowLayer):
    """Batch normalization as a flow layer (Dinh et al. 2017): module docstring.

    Parameters ``log_gamma`` (D,) and ``beta`` (D,) (identity at construction); buffers
    ``running_mean`` (D,) and ``running_var`` (D,).

    Args:
        dim: D.
        momentum: weight of the new batch in the running averages, in (0, 1].
        eps: added to the variance.
    """

    kind = "batchnorm"

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__(dim)
        self.momentum = _check_positive(momentum, "momentum", upper=1.0)
        self.eps = _check_positive(eps, "eps")
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    @property
    def uses_batch_statistics(self) -> bool:
        """``forward`` normalizes with the batch's statistics (train mode)."""
        return self.training

    def batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance of a batch x (N, D), N >= 2: each (D,), differentiable."""
        if x.shape[0] < 2:
            raise ValueError(
                f"x must have at least 2 rows for BatchNorm in train mode (batch statistics), "
                f"got {x.shape[0]}; call model.eval() to use the running statistics"
            )
        mean = x.mean(0)
        return mean, (x - mean).square().mean(0)

    @torch.no_grad()
    def update_running(self, mean: torch.Tensor, var: torch.Tensor, rows: int | None) -> None:
        """Fold a batch's mean and biased variance (rows >= 2) into the running averages;
        ``rows=None``: ``var`` is already the unbiased variance."""
        unbiased = var if rows is None else var * (rows / (rows - 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode map as ``y = x * scale + shift``: each (D,), differentiable."""
        scale = self.log_gamma.exp() * torch.rsqrt(self.running_var + self.eps)
        return scale, self.beta - self.running_mean * scale

    def forward_with(
        self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The map with given statistics (D,) each: x (N, D) -> (y, log|det| per row (N,))."""
        inv_std = torch.rsqrt(var + self.eps)
        y = (x - mean) * (inv_std * self.log_gamma.exp()) + self.beta
        log_det = (self.log_gamma + torch.log(inv_std)).sum()
        return y, _rows_constant(log_det, x)

    def inverse_with(
        self, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`forward_with`: y (N, D) -> (x, -log|det| per row (N,))."""
        std = torch.sqrt(var + self.eps)
        x = (y - self.beta) * (torch.exp(-self.log_gamma) * std) + mean
        log_det = (self.log_gamma - torch.log(std)).sum()
        return x, _rows_constant(-log_det, y)

    def forward_batch(self, x: torch.Tensor):
        """The train-mode map: x (N, D), N >= 2 -> (y, log|det| per row (N,), (mean, var)), the
        batch's statistics folded into the running averages and returned (the invertible
        memory mode inverts with them)."""
        mean, var = self.batch_statistics(x)
        self.update_running(mean.detach(), var.detach(), x.shape[0])
        return (*self.forward_with(x, mean, var), (mean, var))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (y, log|det| per row (N,)): batch statistics in train mode (updating
        the running averages), the running averages in eval mode."""
        self._check(x, "x")
        if self.training:
            return self.forward_batch(x)[:2]
        return self.forward_with(x, self.running_mean, self.running_var)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y (N, D) -> (x, log|det dx/dy| per row (N,)) with the running averages."""
        self._check(y, "y")
        return self.inverse_with(y, self.running_mean, self.running_var)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, momentum={self.momentum}, eps={self.eps}"
