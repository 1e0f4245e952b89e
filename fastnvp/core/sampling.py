"""The sampling API every flow shares: ``sample``, ``sample_and_log_prob``, ``distribution``.

docs/design.md §1.4 and §1.7. A flow draws z from its prior and runs one inverse pass, which
also yields the log-det, so samples and their log-density come together (no second forward).
Each flow class gives :meth:`DrawsFromPrior._draw`: the coupling flows
(``fastnvp.core.reference.FlowBase``) embed each distinct context row once, a by-hand
composition (``fastnvp.SequentialFlow``) hands the rows to its members.
"""

from __future__ import annotations

from abc import abstractmethod

import torch


class DrawsFromPrior:
    """``sample`` / ``sample_and_log_prob`` / ``distribution`` on top of ``_draw``."""

    def sample(
        self,
        num_samples: int,
        context: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw samples: ``g(z, context)`` with ``z`` from the prior.

        Shapes: unconditional -> (num_samples, D); context (C,) -> (num_samples, D);
        context (M, C) -> (num_samples, M, D), ``[k, j]`` drawn given context row j.
        """
        return self._draw(num_samples, context, generator, with_log_prob=False)[0]

    def sample_and_log_prob(
        self,
        num_samples: int,
        context: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples and their log-density in one pass: the inverse yields its log-det.

        ``log p(x) = log p_z(z) - log|det dx/dz|``; no second forward is run. Shapes as in
        :meth:`sample`, with the log-density (num_samples,) or (num_samples, M).
        """
        return self._draw(num_samples, context, generator, with_log_prob=True)

    def distribution(self, context: torch.Tensor | None = None):
        """``torch.distributions`` view of p(x | context) (zuko's convention).

        Context None or (C,): batch_shape (); (M, C): batch_shape (M,). event_shape (D,).
        See :class:`fastnvp.core.distribution.FlowDistribution`.
        """
        from fastnvp.core.distribution import FlowDistribution

        return FlowDistribution(self, context)

    @abstractmethod
    def _draw(self, num_samples, context, generator, with_log_prob: bool):
        """(samples (n, *batch, D), log-density (n, *batch) or None)."""
