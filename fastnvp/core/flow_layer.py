"""The protocol of an invertible layer with a tractable log-determinant (docs/design.md §1.8).

A :class:`FlowLayer` maps (N, D) -> (N, D) in both directions and reports the log-determinant
of the map it ran, per row, with the sign convention of docs/design.md §1.1::

    forward(x) -> (y, log|det dy/dx|)      data -> latent, the ``f`` direction
    inverse(y) -> (x, log|det dx/dy|)      latent -> data, the ``g`` direction

so ``inverse(forward(x)[0])[0] == x`` and the two log-determinants are negatives of each other
(for BatchNorm in train mode see :class:`fastnvp.core.normalization.BatchNorm`). The layers of
:mod:`fastnvp.core.normalization` and :mod:`fastnvp.core.mixing` follow it; the coupling flows
(``RealNVP``, ``FastRealNVP``) follow it too (``forward`` is ``f``, ``inverse`` returns the
inverse's log-det), so :class:`fastnvp.flows.sequential.SequentialFlow` composes any of them in
the order a user gives.

Each layer names its ``kind`` (one of :data:`KINDS`): the plan's facts record the kinds of
every step (docs/design.md §3.1), and ``fastnvp.engine.interleaved`` runs each kind in the
engine's own form (an affine map, batch normalization, a gather or a dense product) without
calling the module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from fastnvp.core.validation import check_input_dtype, ensure_batch

#: The forms the engine knows: a per-feature affine map (ActNorm; BatchNorm with fixed
#: statistics), batch normalization with batch statistics, a fixed permutation of the features
#: and a dense invertible linear map (the LU layer).
KINDS = ("actnorm", "batchnorm", "permutation", "lu")


class FlowLayer(nn.Module, ABC):
    """Base class of the invertible layers placed between couplings (module docstring).

    Subclasses set ``kind`` and implement the abstract :meth:`forward` and :meth:`inverse`.
    ``dim`` is D.
    """

    kind: str = ""

    def __init__(self, dim: int):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.dim = dim

    def _check(self, x, name: str) -> torch.Tensor:
        """``x`` must be an (N, D) floating tensor on the layer's device, with the dtype of its
        parameters (as a flow's inputs: ``fastnvp.core.validation.check_input_dtype``)."""
        ensure_batch(x, name, self.dim)
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.device != x.device:
                raise ValueError(
                    f"{name} is on {x.device} but the {type(self).__name__} layer is on "
                    f"{tensor.device}"
                )
            break
        for tensor in self.parameters():  # a permutation has none: any dtype passes through
            check_input_dtype(x, name, tensor.dtype, f"the {type(self).__name__} layer's")
            break
        return x

    @abstractmethod
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> latent.  x (N, D) -> (y (N, D), log|det dy/dx| (N,))."""

    @abstractmethod
    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent -> data.  y (N, D) -> (x (N, D), log|det dx/dy| (N,))."""

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
