"""Reference Real NVP in plain PyTorch: the definition of "correct" for every fast path.

Convention (docs/design.md §1.1): ``f`` maps data -> latent, layer 0 first. With mask ``m``
(1 = kept)::

    s = S(x * m) * (1 - m),  t = T(x * m) * (1 - m)
    z = x * m + (1 - m) * (x * exp(s) + t),   log_det += sum(s)

``g`` inverts layer by layer from the last: ``x = z * m + (1 - m) * (z - t) * exp(-s)``.
The module holds the nets as ``nn.ModuleList``s named ``s`` and ``t`` and the masks under the
state_dict key ``mask``, so state_dicts of the widely copied PyTorch notebook load.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from fastnvp.core import checks
from fastnvp.core.conditioner import is_standard_pair, standard_net
from fastnvp.core.masks import alternating_masks, check_masks
from fastnvp.core.prior import prior_log_prob, prior_sample
from fastnvp.core.validation import ensure_batch, ensure_num_samples


def build_nets(factory: Callable[[], nn.Module], count: int, name: str) -> nn.ModuleList:
    """Call a zero-argument net factory ``count`` times, checking it returns modules."""
    if not callable(factory):
        raise TypeError(f"{name} must be a zero-argument callable returning an nn.Module")
    if isinstance(factory, nn.Module):
        # A module is callable too, but calling it with no input fails obscurely.
        raise TypeError(
            f"{name} must be a zero-argument callable returning an nn.Module (e.g. "
            f"lambda: nn.Linear(D, D)), not a module ({type(factory).__name__})"
        )
    nets = []
    for _ in range(count):
        net = factory()
        if not isinstance(net, nn.Module):
            raise TypeError(f"{name}() must return an nn.Module, got {type(net).__name__}")
        nets.append(net)
    return nn.ModuleList(nets)


def check_clamp(clamp) -> float | None:
    """Validate the soft-clamp bound: None (no clamp) or a finite number > 0."""
    if clamp is None:
        return None
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)):
        raise TypeError(f"clamp must be None or a float > 0, got {type(clamp).__name__}")
    if not math.isfinite(clamp) or clamp <= 0:
        raise ValueError(f"clamp must be None or a finite float > 0, got {clamp}")
    return float(clamp)


def check_prior(prior):
    """Validate a prior: None (standard normal) or an object with ``log_prob`` and ``sample``."""
    if prior is not None and not (
        callable(getattr(prior, "log_prob", None)) and callable(getattr(prior, "sample", None))
    ):
        raise TypeError(
            "prior must be None or a distribution with log_prob and sample methods (e.g. a "
            f"torch.distributions object over (N, D)), got {type(prior).__name__}"
        )
    return prior


class FlowBase(nn.Module):
    """Shared constructor, validation and prior handling of the reference and fast flows.

    ``clamp=α`` bounds the log-scale of user-supplied scale nets softly, ``s <- α·tanh(s/α)``
    (slope 1 at 0, |s| <= α), so a deep stack cannot overflow ``exp(s)``. Layers whose nets
    are the standard conditioner pair (docs/design.md §1.3) are left as they are: their Tanh
    already bounds |s| <= 1. ``check=True`` turns on :mod:`fastnvp.core.checks` for this model.
    """

    def __init__(self, nets, nett, masks, prior=None, *, clamp=None, check=False):
        super().__init__()
        masks = check_masks(masks)
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {type(check).__name__}")
        self.clamp = check_clamp(clamp)
        self.check = check
        self.register_buffer("mask", masks)
        self.prior = check_prior(prior)
        self.s = build_nets(nets, masks.shape[0], "nets")
        self.t = build_nets(nett, masks.shape[0], "nett")

    @property
    def dim(self) -> int:
        """Number of features D."""
        return self.mask.shape[1]

    @property
    def num_layers(self) -> int:
        """Number of coupling layers L."""
        return self.mask.shape[0]

    def _anchor(self) -> torch.Tensor:
        """A tensor with the model's parameter dtype and device."""
        for p in self.parameters():
            return p
        return self.mask

    def _check_input(self, x, name: str) -> torch.Tensor:
        ensure_batch(x, name, self.dim)
        anchor = self._anchor()
        if x.device != anchor.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {anchor.device}")
        if x.dtype != anchor.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} has dtype {x.dtype} but the model's parameters are {anchor.dtype}"
            )
        if self._checking():
            checks.check_finite(x, name, None, "f" if name == "x" else "g")
        return x

    def _check_layer_args(self, i, h, name: str) -> None:
        """Validate a per-layer call: ``i`` a layer index, ``h`` an (N, D) batch on our device."""
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"i must be an int layer index, got {type(i).__name__}")
        if not 0 <= i < self.num_layers:
            raise ValueError(f"i must be a layer index in [0, {self.num_layers}), got {i}")
        ensure_batch(h, name, self.dim)
        anchor = self._anchor()
        if h.device != anchor.device:
            raise ValueError(f"{name} is on {h.device} but the model is on {anchor.device}")

    def _checking(self) -> bool:
        """Whether numerical checks run (``check=True`` or inside
        ``fastnvp.core.checks.enabled()``)."""
        return self.check or checks.is_enabled()

    def _clamps(self, i: int) -> bool:
        """Whether layer ``i``'s log-scale goes through the soft clamp (see the class docstring)."""
        return self.clamp is not None and not is_standard_pair(self.s[i], self.t[i], self.dim)

    def _soft_clamp(self, s: torch.Tensor) -> torch.Tensor:
        """``α·tanh(s/α)``: |result| <= α (equal once tanh saturates), slope 1 at 0."""
        return self.clamp * torch.tanh(s / self.clamp)

    def _nets_checked(self, i: int, direction: str):
        """A context that checks every module output of layer ``i``'s nets (in check mode)."""
        if not self._checking():
            return contextlib.nullcontext()
        nets = {f"s[{i}]": self.s[i], f"t[{i}]": self.t[i]}
        return checks.module_outputs_checked(nets, i, direction)

    def _check_layer(self, i: int, direction: str, **tensors: torch.Tensor) -> None:
        """Raise ``NonFiniteError`` naming layer ``i`` if any given tensor is not finite."""
        for name, tensor in tensors.items():
            checks.check_finite(tensor, name, i, direction)

    @classmethod
    def standard(
        cls,
        dim: int,
        num_layers: int,
        hidden: int = 256,
        negative_slope: float = 0.01,
        **options,
    ):
        """The standard conditioner (docs/design.md §1.3) with alternating checkerboard masks.

        ``options`` are the class's keyword arguments (e.g. ``check=True``; for FastRealNVP also
        ``memory``, ``fused``, ``precision``).
        """
        masks = alternating_masks(dim, num_layers)
        return cls(
            lambda: standard_net(dim, hidden, tanh=True, negative_slope=negative_slope),
            lambda: standard_net(dim, hidden, tanh=False, negative_slope=negative_slope),
            masks,
            **options,
        )

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density: ``log N(f(x); 0, I) + log_det``.  (N, D) -> (N,)."""
        z, log_det = self.f(x)
        return prior_log_prob(self.prior, z) + log_det

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``num_samples`` points: ``g(z)`` with ``z`` from the prior.  -> (num_samples, D)."""
        ensure_num_samples(num_samples)
        anchor = self._anchor()
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(
                    f"generator must be a torch.Generator or None, got {type(generator).__name__}"
                )
            if generator.device.type != anchor.device.type:
                raise ValueError(
                    f"generator is on {generator.device} but the model is on {anchor.device}"
                )
        z = prior_sample(self.prior, num_samples, self.dim, anchor, generator)
        return self.g(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`f`."""
        return self.f(x)


class RealNVP(FlowBase):
    """Real NVP in plain PyTorch.

    Args:
        nets: zero-argument factory returning the scale net S: (N, D) -> (N, D).
        nett: zero-argument factory returning the shift net T: (N, D) -> (N, D).
        masks: (L, D) 0/1 tensor, 1 = kept (conditioning) feature; one row per coupling layer.
        prior: a ``torch.distributions`` object with ``log_prob``/``sample`` over (N, D), or None
            for the standard normal N(0, I).
        clamp: None, or α > 0 to soft-clamp user nets' log-scale to (-α, α) (see FlowBase).
        check: raise ``fastnvp.core.checks.NonFiniteError`` at the first non-finite layer.
    """

    def f(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> latent.  x: (N, D) -> (z (N, D), log_det (N,)), ``log_det = log|det dz/dx|``."""
        self._check_input(x, "x")
        checking = self._checking()
        z = x
        log_det = x.new_zeros(x.shape[0])
        for i in range(self.num_layers):
            m = self.mask[i]
            z_kept = z * m
            with self._nets_checked(i, "f"):
                s = self.s[i](z_kept)
                t = self.t[i](z_kept)
            if checking:
                self._check_layer(i, "f", s=s, t=t)
            if self._clamps(i):
                s = self._soft_clamp(s)
            s = s * (1 - m)
            t = t * (1 - m)
            z = z_kept + (1 - m) * (z * torch.exp(s) + t)
            log_det = log_det + s.sum(dim=1)
            if checking:
                self._check_layer(i, "f", z=z, log_det=log_det)
                checks.watch_grad(z, "z", i, "f")
        return z, log_det

    def g(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> data, the exact inverse of :meth:`f`.  (N, D) -> (N, D)."""
        self._check_input(z, "z")
        checking = self._checking()
        x = z
        for i in reversed(range(self.num_layers)):
            m = self.mask[i]
            x_kept = x * m
            with self._nets_checked(i, "g"):
                s = self.s[i](x_kept)
                t = self.t[i](x_kept)
            if checking:
                self._check_layer(i, "g", s=s, t=t)
            if self._clamps(i):
                s = self._soft_clamp(s)
            s = s * (1 - m)
            t = t * (1 - m)
            x = x_kept + (1 - m) * (x - t) * torch.exp(-s)
            if checking:
                self._check_layer(i, "g", x=x)
                checks.watch_grad(x, "x", i, "g")
        return x
