"""A flow as a ``torch.distributions.Distribution`` (zuko's convention; docs/design.md §1.7).

``flow.distribution(context)`` fixes the context: None or (C,) gives batch_shape (), (M, C)
gives batch_shape (M,); event_shape is (D,). ``sample`` / ``rsample`` / ``rsample_and_log_prob``
take a ``sample_shape`` and return ``sample_shape + batch_shape + (D,)``; ``log_prob`` takes any
``(..., *batch_shape, D)`` value broadcastable against the batch shape. ``expand(batch_shape)``
broadcasts the batch to any shape (what Pyro's plates ask of a distribution): every batch
element keeps its context, and an unconditional flow's batch elements are independent draws.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, constraints

from fastnvp.core.context import sample_context


class FlowDistribution(Distribution):
    """p(x | context) of a flow, as a ``torch.distributions.Distribution``.

    Args:
        flow: a ``fastnvp.RealNVP`` or ``fastnvp.FastRealNVP``.
        context: None (unconditional flows), (C,) or (M, C).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow, context=None):
        rows, batch_shape = sample_context(context, flow.context_features, flow._anchor())
        self.flow = flow
        # One context row per batch element, batch-major: (prod(batch_shape), C); (1, C) for
        # a (C,) context; None when unconditional.
        self.context = rows
        super().__init__(
            batch_shape=torch.Size(batch_shape),
            event_shape=torch.Size((flow.dim,)),
            validate_args=False,
        )

    def expand(self, batch_shape, _instance=None) -> FlowDistribution:
        """The same flow and contexts over a larger batch: ``batch_shape`` must broadcast the
        current one (new leading dimensions, or sizes 1 made larger), as
        ``torch.distributions`` expands. Returns a new distribution whose context holds one
        row per batch element (the given rows repeated)."""
        try:
            batch_shape = torch.Size(batch_shape)
            compatible = torch.broadcast_shapes(self.batch_shape, batch_shape) == batch_shape
        except (TypeError, RuntimeError):
            compatible = False
        if not compatible:
            raise ValueError(
                f"batch_shape must be a shape that broadcasts batch_shape "
                f"{tuple(self.batch_shape)}, got {batch_shape!r}"
            )
        new = self._get_checked_instance(FlowDistribution, _instance)
        new.flow = self.flow
        new.context = None
        if self.context is not None:
            features = self.context.shape[1]
            batch = self.context.reshape(*self.batch_shape, features)
            new.context = batch.expand(*batch_shape, features).reshape(-1, features)
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        return new

    def _count(self, sample_shape) -> tuple[torch.Size, int]:
        """``sample_shape`` (a shape, or an int n for (n,)) -> (the shape, its sample count)."""
        if isinstance(sample_shape, int) and not isinstance(sample_shape, bool):
            sample_shape = (sample_shape,)
        try:
            shape = torch.Size(sample_shape)
        except TypeError as error:
            raise TypeError(
                f"sample_shape must be a shape (a tuple of ints) or an int, got {sample_shape!r}"
            ) from error
        count = math.prod(shape)
        if count < 1:
            raise ValueError(f"sample_shape must have at least one sample, got {tuple(shape)}")
        return shape, count

    def _draw_args(self, count: int):
        """``flow.sample``'s arguments for ``count`` draws of the whole batch: with a context,
        ``count`` and the (C,) or (R, C) context (one draw per row and sample); without one,
        ``count`` times the batch's size, in independent rows."""
        if self.context is None:
            return count * self.batch_shape.numel(), None
        return count, (self.context if self.batch_shape else self.context[0])

    def rsample(self, sample_shape=()) -> torch.Tensor:
        """Reparameterised samples (differentiable in the flow's parameters and the context)."""
        shape, count = self._count(sample_shape)
        x = self.flow.sample(*self._draw_args(count))
        return x.reshape(shape + self.batch_shape + self.event_shape)

    def sample(self, sample_shape=()) -> torch.Tensor:
        """Samples without gradients: ``sample_shape + batch_shape + (D,)``."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample_and_log_prob(self, sample_shape=()):
        """Samples and their log-density in one pass (the inverse's log-det; no forward)."""
        shape, count = self._count(sample_shape)
        x, log_prob = self.flow.sample_and_log_prob(*self._draw_args(count))
        return (
            x.reshape(shape + self.batch_shape + self.event_shape),
            log_prob.reshape(shape + self.batch_shape),
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p(value | context): value (..., *batch_shape, D) -> (...,  *batch_shape)."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
        dim = self.flow.dim
        if value.ndim < 1 or value.shape[-1] != dim:
            raise ValueError(
                f"value must have shape (..., {dim}) (event_shape ({dim},)), "
                f"got {tuple(value.shape)}"
            )
        try:
            shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError as error:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not broadcast against batch_shape "
                f"{tuple(self.batch_shape)}"
            ) from error
        rows = value.expand(*shape, dim).reshape(-1, dim)
        context = None
        if self.context is not None:
            features = self.context.shape[1]
            batch = self.context.reshape(*self.batch_shape, features)
            context = batch.expand(*shape, features).reshape(-1, features)
        return self.flow.log_prob(rows, context).reshape(shape)

    def __repr__(self) -> str:
        return (
            f"FlowDistribution({type(self.flow).__name__}, batch_shape={tuple(self.batch_shape)}, "
            f"event_shape={tuple(self.event_shape)})"
        )
