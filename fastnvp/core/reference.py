"""Reference Real NVP in plain PyTorch: the definition of "correct" for every fast path.

Convention (docs/design.md §1.1): ``f`` maps data -> latent, layer 0 first. With mask ``m``
(1 = kept)::

    s = S(x * m) * (1 - m),  t = T(x * m) * (1 - m)
    z = x * m + (1 - m) * (x * exp(s) + t),   log_det += sum(s)

``g`` inverts layer by layer from the last: ``x = z * m + (1 - m) * (z - t) * exp(-s)``.
A conditional flow (``context=C``) feeds the nets ``cat([x * m, e])`` with e the (embedded)
context (docs/design.md §1.7).
The module holds the nets as ``nn.ModuleList``s named ``s`` and ``t`` and the masks under the
state_dict key ``mask``, so state_dicts of the widely copied PyTorch notebook load.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from fastnvp.core import checks
from fastnvp.core.conditioner import is_standard_pair, standard_net
from fastnvp.core.context import (
    check_context,
    check_context_features,
    embedded_width,
    sample_context,
)
from fastnvp.core.interleave import build_norms, build_permutations, step_layers
from fastnvp.core.masks import alternating_masks, check_masks, half_masks
from fastnvp.core.prior import prior_log_prob, prior_sample
from fastnvp.core.sampling import DrawsFromPrior
from fastnvp.core.validation import (
    check_generator,
    check_input_dtype,
    ensure_batch,
    ensure_num_samples,
)


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


def _first_parameter(module: nn.Module) -> torch.Tensor | None:
    """``next(module.parameters(), None)`` read from the modules' dicts: the module's own
    parameters, then its children's depth first, as ``parameters()`` orders them. Every call
    of a flow asks for it (input checks, sampling); the generator chain of ``parameters()``
    took 5.6 us of a 0.9 ms ``log_prob`` at B = 256, the dicts under 1 us."""
    for param in module._parameters.values():
        if param is not None:
            return param
    for child in module._modules.values():
        if child is not None:
            param = _first_parameter(child)
            if param is not None:
                return param
    return None


class FlowBase(DrawsFromPrior, nn.Module, ABC):
    """Shared constructor, validation and prior handling of the reference and fast flows.

    ``clamp=α`` bounds the log-scale of user-supplied scale nets softly, ``s <- α·tanh(s/α)``
    (slope 1 at 0, |s| <= α), so a deep stack cannot overflow ``exp(s)``. Layers whose nets
    are the standard conditioner pair (docs/design.md §1.3) are left as they are: their Tanh
    already bounds |s| <= 1. ``check=True`` turns on :mod:`fastnvp.core.checks` for this model.
    """

    def __init__(
        self,
        nets,
        nett,
        masks,
        prior=None,
        *,
        context=None,
        embedding=None,
        clamp=None,
        check=False,
        norm=None,
        permutation=None,
    ):
        super().__init__()
        masks = check_masks(masks)
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {type(check).__name__}")
        self.clamp = check_clamp(clamp)
        self.check = check
        self.context_features = check_context_features(context)
        self.embedded_features = embedded_width(embedding, self.context_features)
        self.register_buffer("mask", masks)
        self.prior = check_prior(prior)
        self.s = build_nets(nets, masks.shape[0], "nets")
        self.t = build_nets(nett, masks.shape[0], "nett")
        # Interleaved layers (docs/design.md §1.8): registered only when asked for, so a flow
        # without them keeps its state_dict keys.
        dim, num_layers = masks.shape[1], masks.shape[0]
        self.norms = build_norms(norm, dim, num_layers)
        self.permutations = build_permutations(permutation, dim, num_layers)
        self.norm, self.permutation = norm, permutation
        if embedding is not None:  # registered last: unconditional state_dict keys stay as they are
            self.embedding = embedding
        else:
            self.embedding = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A loaded mask passes the constructor's checks too: a non-0/1 mask, or a row that
        # keeps or transforms nothing, would load into a flow that is no longer invertible.
        loaded = state_dict.get(prefix + "mask")
        if isinstance(loaded, torch.Tensor) and not loaded.is_meta:
            try:
                check_masks(loaded)
            except (TypeError, ValueError) as error:
                raise ValueError(f"state_dict[{prefix + 'mask'!r}]: {error}") from error
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def dim(self) -> int:
        """Number of features D."""
        return self.mask.shape[1]

    @property
    def num_layers(self) -> int:
        """Number of coupling layers L."""
        return self.mask.shape[0]

    def _anchor(self) -> torch.Tensor:
        """A tensor with the model's parameter dtype and device: its first parameter, in
        ``parameters()`` order, else the mask."""
        first = _first_parameter(self)
        return self.mask if first is None else first

    def _check_input(self, x, name: str) -> torch.Tensor:
        ensure_batch(x, name, self.dim)
        anchor = self._anchor()
        if x.device != anchor.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {anchor.device}")
        check_input_dtype(x, name, anchor.dtype)
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
        return self.clamp is not None and not is_standard_pair(
            self.s[i], self.t[i], self.dim, self.embedded_features
        )

    @property
    def conditional(self) -> bool:
        """Whether the flow models p(x | context) (built with ``context=C``)."""
        return self.context_features is not None

    def _embed(self, context, rows: int) -> torch.Tensor | None:
        """Validate a call's ``context`` (rows, C) and embed it once: -> e (rows, E) or None."""
        check_context(context, self.context_features, rows, self._anchor())
        if context is None:
            return None
        if self._checking():
            checks.check_finite(context, "context", None, "f")
        if self.embedding is None:
            return context
        e = self.embedding(context)
        if not isinstance(e, torch.Tensor) or e.shape != (rows, self.embedded_features):
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(
                f"embedding must map context ({rows}, {self.context_features}) to "
                f"({rows}, {self.embedded_features}), got {shape}"
            )
        return e

    @staticmethod
    def _with_context(inputs: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        """The conditioner input ``cat([inputs, e])`` (inputs alone when unconditional)."""
        return inputs if e is None else torch.cat([inputs, e.to(inputs.dtype)], dim=1)

    def _soft_clamp(self, s: torch.Tensor) -> torch.Tensor:
        """``α·tanh(s/α)``: |result| <= α (equal once tanh saturates), slope 1 at 0."""
        return self.clamp * torch.tanh(s / self.clamp)

    def _nets_checked(self, i: int, direction: str):
        """A context that checks every module output of layer ``i``'s nets (in check mode)."""
        if not self._checking():
            return contextlib.nullcontext()
        nets = {f"s[{i}]": self.s[i], f"t[{i}]": self.t[i]}
        return checks.module_outputs_checked(nets, i, direction)

    def _scale_shift(self, i: int, inputs: torch.Tensor):
        """Layer ``i``'s user nets on ``inputs`` (N, D + E) -> (s, t), each checked to be
        (N, D): a net of another output width would broadcast against the masks (width 1) or
        have the wrong columns picked, a wrong density without an error."""
        s = self.s[i](inputs)
        t = self.t[i](inputs)
        expected = (inputs.shape[0], self.dim)
        tensors = isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor)
        if not tensors or s.shape != expected or t.shape != expected:
            got = [
                tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in (s, t)
            ]
            raise ValueError(
                f"nets[{i}] and nett[{i}] must map (N, D + E) -> (N, D) = {expected} "
                f"(D = {self.dim} features), got s {got[0]} and t {got[1]}"
            )
        return s, t

    def _check_layer(self, i: int, direction: str, **tensors: torch.Tensor) -> None:
        """Raise ``NonFiniteError`` naming layer ``i`` if any given tensor is not finite."""
        for name, tensor in tensors.items():
            checks.check_finite(tensor, name, i, direction)

    @property
    def interleaved(self) -> bool:
        """Whether the flow has norm or mixing layers between its couplings (§1.8)."""
        return self.norms is not None or self.permutations is not None

    def _pre_forward(self, i: int, h: torch.Tensor, log_det):
        """Step ``i``'s interleaved layers, data -> latent (docs/design.md §1.8): h (N, D) ->
        (h, log_det + theirs). ``log_det`` may be None (then theirs, or None without any)."""
        for layer in step_layers(self, i):
            h, ld = layer(h)
            log_det = ld if log_det is None else log_det + ld
            if self._checking():
                self._check_layer(i, "f", **{f"{layer.kind}_output": h})
        return h, log_det

    def _pre_inverse(self, i: int, h: torch.Tensor, log_det):
        """Inverse of :meth:`_pre_forward`, latent -> data: (h, log_det + theirs)."""
        for layer in reversed(step_layers(self, i)):
            h, ld = layer.inverse(h)
            log_det = ld if log_det is None else log_det + ld
            if self._checking():
                self._check_layer(i, "g", **{f"{layer.kind}_output": h})
        return h, log_det

    @classmethod
    def standard(
        cls,
        dim: int,
        num_layers: int,
        hidden: int = 256,
        negative_slope: float = 0.01,
        *,
        context: int | None = None,
        embedding: nn.Module | None = None,
        norm: str | None = None,
        permutation: str | None = None,
        **options,
    ):
        """The standard conditioner (docs/design.md §1.3) with alternating checkerboard masks
        (with a ``permutation``: every layer keeps the first ceil(D/2) features and the mixing
        layer alternates them, ``masks.half_masks``, docs/design.md §1.8).

        Args:
            dim: D, the number of features.
            num_layers: L, the number of coupling layers.
            hidden: H, the conditioner's hidden width.
            negative_slope: the LeakyReLU slope.
            context: None (unconditional) or C, the width of the context (N, C) of every call.
            embedding: None or a module (N, C) -> (N, E) applied once per call to the context;
                each conditioner's first Linear is then ``Linear(D + E, H)`` (E = C without).
            norm: None, ``"actnorm"`` or ``"batchnorm"``: a normalization layer before every
                coupling (docs/design.md §1.8).
            permutation: None, ``"reverse"``, ``"random"`` (fixed permutations) or ``"lu"``
                (a learned invertible linear layer) before every coupling, after the norm.
            options: the class's keyword arguments (e.g. ``check=True``; for FastRealNVP also
                ``memory``, ``fused``, ``precision``).
        """
        masks = (alternating_masks if permutation is None else half_masks)(dim, num_layers)
        width = embedded_width(embedding, check_context_features(context))
        return cls(
            lambda: standard_net(
                dim, hidden, tanh=True, negative_slope=negative_slope, context=width
            ),
            lambda: standard_net(
                dim, hidden, tanh=False, negative_slope=negative_slope, context=width
            ),
            masks,
            context=context,
            embedding=embedding,
            norm=norm,
            permutation=permutation,
            **options,
        )

    # ------------------------------------------------------------------ the public API
    def f(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Data -> latent.  x: (N, D), context: (N, C) -> (z (N, D), log_det (N,)).

        ``log_det = log|det dz/dx|``; ``context`` is required exactly when the flow is
        conditional (docs/design.md §1.7).
        """
        self._check_input(x, "x")
        return self._forward(x, self._embed(context, x.shape[0]))

    def g(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Latent -> data, the exact inverse of :meth:`f`.  z: (N, D), context: (N, C) -> (N, D).

        With BatchNorm layers the inverse of :meth:`f` in eval mode: in train mode ``f``
        normalizes with the batch's statistics and ``g`` with the running ones (docs/design.md
        §1.8)."""
        self._check_input(z, "z")
        return self._inverse(z, self._embed(context, z.shape[0]))[0]

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """Latent -> data with the log-det of that map.  z (N, D), context (N, C) ->
        (x (N, D), log|det dx/dz| (N,)): the :class:`fastnvp.core.flow_layer.FlowLayer`
        protocol, so a flow composes with other layers (``fastnvp.SequentialFlow``)."""
        self._check_input(z, "z")
        return self._inverse(z, self._embed(context, z.shape[0]), with_log_det=True)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log-density: ``log N(f(x); 0, I) + log_det``.  x (N, D), context (N, C) -> (N,)."""
        z, log_det = self.f(x, context)
        return prior_log_prob(self.prior, z) + log_det

    def _draw(self, num_samples, context, generator, with_log_prob: bool):
        """(samples, log_prob or None) shaped (n, *batch, D) and (n, *batch)."""
        ensure_num_samples(num_samples)
        anchor = self._anchor()
        check_generator(generator, anchor.device)
        rows_context, batch_shape = sample_context(context, self.context_features, anchor)
        per_sample = 1 if rows_context is None else rows_context.shape[0]
        e = None
        if rows_context is not None:  # embedded once per distinct context row, then repeated
            e = self._embed(rows_context, per_sample).repeat(num_samples, 1)
        z = prior_sample(self.prior, num_samples * per_sample, self.dim, anchor, generator)
        if self._checking():
            checks.check_finite(z, "z", None, "g")
        x, log_det_g = self._inverse(z, e, with_log_det=with_log_prob)
        shape = (num_samples, *batch_shape)
        x = x.reshape(*shape, self.dim)
        if not with_log_prob:
            return x, None
        log_prob = prior_log_prob(self.prior, z) - log_det_g
        return x, log_prob.reshape(shape)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Same as :meth:`f`."""
        return self.f(x, context)

    # ------------------------------------------------------------------ implemented per class
    @abstractmethod
    def _forward(self, x: torch.Tensor, e: torch.Tensor | None):
        """(z, log_det) of validated x (N, D) and embedded context e (N, E) or None."""

    @abstractmethod
    def _inverse(self, z: torch.Tensor, e: torch.Tensor | None, with_log_det: bool = False):
        """(x, log|det dx/dz| or None) of validated z (N, D) and embedded context e."""


class RealNVP(FlowBase):
    """Real NVP in plain PyTorch.

    Args:
        nets: zero-argument factory returning the scale net S: (N, D) -> (N, D).
        nett: zero-argument factory returning the shift net T: (N, D) -> (N, D).
        masks: (L, D) 0/1 tensor, 1 = kept (conditioning) feature; one row per coupling layer.
        prior: a ``torch.distributions`` object with ``log_prob``/``sample`` over (N, D), or None
            for the standard normal N(0, I).
        context: None (unconditional) or C, the width of the context (N, C) each call takes:
            the flow then models p(x | c) and the nets take ``cat([x * m, e])`` (N, D + E).
        embedding: None or a module (N, C) -> (N, E) applied once per call to the context.
        clamp: None, or α > 0 to soft-clamp user nets' log-scale to (-α, α) (see FlowBase).
        check: raise ``fastnvp.core.checks.NonFiniteError`` at the first non-finite layer.

    ``f(x, context) -> (z, log_det)``, ``g(z, context) -> x``, ``log_prob(x, context) -> (N,)``,
    ``sample(n, context)``, ``sample_and_log_prob(n, context)``, ``distribution(context)``.
    """

    def _forward(self, x: torch.Tensor, e: torch.Tensor | None):
        checking = self._checking()
        z = x
        log_det = x.new_zeros(x.shape[0])
        for i in range(self.num_layers):
            z, log_det = self._pre_forward(i, z, log_det)
            m = self.mask[i]
            z_kept = z * m
            inputs = self._with_context(z_kept, e)
            with self._nets_checked(i, "f"):
                s, t = self._scale_shift(i, inputs)
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

    def _inverse(self, z: torch.Tensor, e: torch.Tensor | None, with_log_det: bool = False):
        checking = self._checking()
        x = z
        log_det = z.new_zeros(z.shape[0]) if with_log_det else None
        for i in reversed(range(self.num_layers)):
            m = self.mask[i]
            x_kept = x * m
            inputs = self._with_context(x_kept, e)
            with self._nets_checked(i, "g"):
                s, t = self._scale_shift(i, inputs)
            if checking:
                self._check_layer(i, "g", s=s, t=t)
            if self._clamps(i):
                s = self._soft_clamp(s)
            s = s * (1 - m)
            t = t * (1 - m)
            x = x_kept + (1 - m) * (x - t) * torch.exp(-s)
            if with_log_det:
                log_det = log_det - s.sum(dim=1)
            if checking:
                self._check_layer(i, "g", x=x)
                checks.watch_grad(x, "x", i, "g")
            x, log_det_pre = self._pre_inverse(i, x, None)
            if with_log_det and log_det_pre is not None:
                log_det = log_det + log_det_pre
        return x, log_det
