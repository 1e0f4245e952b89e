"""SequentialFlow: invertible layers composed by hand, in the order the user gives.

docs/design.md §1.8. Every member follows the :class:`fastnvp.core.flow_layer.FlowLayer`
protocol, ``forward(x) -> (y, log|det dy/dx|)`` and ``inverse(y) -> (x, log|det dx/dy|)``:
the layers of :mod:`fastnvp.core.normalization` and :mod:`fastnvp.core.mixing`, and whole
coupling flows (``RealNVP``, ``FastRealNVP``, which run their own engine inside)::

    flow = SequentialFlow(
        ActNorm(8),
        FastRealNVP.standard(8, 4, 64),
        LULinear(8),
        FastRealNVP.standard(8, 4, 64),
    )
    z, log_det = flow.f(x)          # members 0, 1, 2, 3 in order
    x = flow.g(z)                   # members 3, 2, 1, 0, each inverted

A conditional member (built with ``context=C``) receives the call's context; the others
ignore it. The prior is over the last member's output: N(0, I) in closed form by default.
The members' own priors are not used.
"""

from __future__ import annotations

import torch
from torch import nn

from fastnvp.core.context import sample_context
from fastnvp.core.prior import prior_log_prob, prior_sample
from fastnvp.core.reference import FlowBase, check_prior
from fastnvp.core.sampling import DrawsFromPrior
from fastnvp.core.validation import check_generator, ensure_batch, ensure_num_samples


def _member_dim(layer: nn.Module, k: int) -> int:
    dim = getattr(layer, "dim", None)
    if not isinstance(dim, int):
        raise TypeError(
            f"layers[{k}] ({type(layer).__name__}) must be an invertible layer with an int "
            "attribute dim, forward(x) -> (y, log_det) and inverse(y) -> (x, log_det)"
        )
    if not callable(getattr(layer, "inverse", None)):
        raise TypeError(f"layers[{k}] ({type(layer).__name__}) has no inverse(y) method")
    return dim


class SequentialFlow(DrawsFromPrior, nn.Module):
    """A flow made of invertible layers applied in the given order (module docstring).

    Args:
        *layers: FlowLayer modules or coupling flows, all over the same D features.
        prior: None for N(0, I), or an object with ``log_prob`` and ``sample`` over (N, D).

    ``f(x, context) -> (z (N, D), log_det (N,))``, ``g(z, context) -> x (N, D)``,
    ``inverse(z, context) -> (x, log|det dx/dz|)``, ``log_prob(x, context) -> (N,)``,
    ``sample(n, context) -> (n, D)`` or ``(n, M, D)`` for an (M, C) context,
    ``sample_and_log_prob(n, context)`` (the samples and their (n,) or (n, M) log-density in
    one pass) and ``distribution(context)``, as for the coupling flows.
    """

    def __init__(self, *layers: nn.Module, prior=None):
        super().__init__()
        if not layers:
            raise ValueError("layers must hold at least one invertible layer")
        for k, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                raise TypeError(f"layers[{k}] must be an nn.Module, got {type(layer).__name__}")
        dims = {_member_dim(layer, k) for k, layer in enumerate(layers)}
        if len(dims) != 1:
            raise ValueError(f"every layer must act on the same D features, got D in {dims}")
        self.dim = dims.pop()
        self.layers = nn.ModuleList(layers)
        self.prior = check_prior(prior)
        widths = {
            layer.context_features
            for layer in layers
            if isinstance(layer, FlowBase) and layer.conditional
        }
        if len(widths) > 1:
            raise ValueError(f"conditional members must share one context width, got {widths}")
        self.context_features = widths.pop() if widths else None

    @property
    def conditional(self) -> bool:
        """Whether a member models a context (the flow then needs one on every call)."""
        return self.context_features is not None

    def _anchor(self) -> torch.Tensor:
        """A floating tensor with the flow's dtype and device (samples are drawn like it)."""
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point():
                return tensor
        device = next(self.buffers(), torch.empty(0)).device  # a flow of permutations only
        return torch.empty(0, dtype=torch.get_default_dtype(), device=device)

    def _call(self, layer, h, context, inverse: bool):
        method = layer.inverse if inverse else layer
        if isinstance(layer, FlowBase) and layer.conditional:
            return method(h, context)
        return method(h)

    def _check_context(self, context) -> None:
        if context is not None and not self.conditional:
            raise ValueError(
                "context was given, but no layer of this SequentialFlow is conditional: "
                "context must be None"
            )

    def f(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Data -> latent.  x (N, D), context (N, C) -> (z (N, D), log|det dz/dx| (N,))."""
        ensure_batch(x, "x", self.dim)
        self._check_context(context)
        log_det = None
        for layer in self.layers:
            x, ld = self._call(layer, x, context, inverse=False)
            log_det = ld if log_det is None else log_det + ld
        return x, log_det

    forward = f

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """Latent -> data.  z (N, D), context (N, C) -> (x (N, D), log|det dx/dz| (N,))."""
        ensure_batch(z, "z", self.dim)
        self._check_context(context)
        log_det = None
        for layer in reversed(self.layers):
            z, ld = self._call(layer, z, context, inverse=True)
            log_det = ld if log_det is None else log_det + ld
        return z, log_det

    def g(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Latent -> data, the exact inverse of :meth:`f`.  z (N, D) -> x (N, D)."""
        return self.inverse(z, context)[0]

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``log p_Z(f(x)) + log|det dz/dx|``.  x (N, D), context (N, C) -> (N,)."""
        z, log_det = self.f(x, context)
        return prior_log_prob(self.prior, z) + log_det

    def _draw(self, num_samples, context, generator, with_log_prob: bool):
        """(samples (n, *batch, D), log-density (n, *batch) or None)."""
        ensure_num_samples(num_samples)
        self._check_context(context)
        anchor = self._anchor()
        check_generator(generator, anchor.device)
        rows, batch_shape = sample_context(context, self.context_features, anchor)
        per_sample = 1 if rows is None else rows.shape[0]
        repeated = None if rows is None else rows.repeat(num_samples, 1)
        z = prior_sample(self.prior, num_samples * per_sample, self.dim, anchor, generator)
        shape = (num_samples, *batch_shape)
        if not with_log_prob:  # g: members may skip their log-dets
            return self.g(z, repeated).reshape(*shape, self.dim), None
        x, log_det = self.inverse(z, repeated)
        log_prob = prior_log_prob(self.prior, z) - log_det
        return x.reshape(*shape, self.dim), log_prob.reshape(shape)
