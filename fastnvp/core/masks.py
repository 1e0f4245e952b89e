"""Coupling masks: construction, validation and the index split they imply.

A mask is a 0/1 vector over the D features; 1 marks a *kept* (conditioning) feature that passes
through a coupling layer unchanged, 0 marks a *transformed* feature.
"""

from __future__ import annotations

import torch

from fastnvp.core.validation import ensure_tensor


def _check_shape(dim, num_layers) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an int >= 2 (a coupling layer needs two parts), got {dim!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")


def alternating_masks(dim: int, num_layers: int) -> torch.Tensor:
    """Checkerboard masks that swap roles every layer.

    Layer ``l`` keeps feature ``j`` when ``(j + l) % 2 == 1``, so layer 0 of a 2-D flow is
    ``[0, 1]`` and layer 1 is ``[1, 0]`` (the masks of the widely copied PyTorch notebook).

    Returns:
        (num_layers, dim) float32 tensor of 0/1.
    """
    _check_shape(dim, num_layers)
    j = torch.arange(dim)
    rows = [((j + layer) % 2 == 1).float() for layer in range(num_layers)]
    return torch.stack(rows)


def half_masks(dim: int, num_layers: int) -> torch.Tensor:
    """The same mask in every layer: keep the first ``ceil(D / 2)`` features, transform the rest.

    Glow's arrangement: with a permutation or LU layer before every coupling
    (docs/design.md §1.8) the mixing layer decides which features each coupling keeps, so the
    mask does not alternate. Alternating masks would undo a ``reverse`` permutation's swap of
    halves (at even D it maps odd positions to even ones) and transform the same features in
    every layer.

    Returns:
        (num_layers, dim) float32 tensor of 0/1.
    """
    _check_shape(dim, num_layers)
    row = (torch.arange(dim) < (dim + 1) // 2).float()
    return row.expand(num_layers, dim).clone()


def check_masks(masks) -> torch.Tensor:
    """Validate an (L, D) 0/1 mask tensor and return it as float32 (a copy, on CPU if given so).

    Raises:
        TypeError: ``masks`` is not a tensor / array-like of numbers.
        ValueError: wrong ndim, D < 2, values other than 0/1, or a row that keeps nothing or
            transforms nothing.
    """
    if not isinstance(masks, torch.Tensor):
        try:
            masks = torch.as_tensor(masks)
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(f"masks must be a tensor of shape (L, D), got {type(masks)}") from exc
    ensure_tensor(masks, "masks", allow_bool=True, allow_int=True)
    if masks.ndim != 2:
        raise ValueError(
            f"masks must have shape (L, D) with L >= 1 layers, got {tuple(masks.shape)}"
        )
    if masks.shape[0] < 1 or masks.shape[1] < 2:
        raise ValueError(
            f"masks must have L >= 1 rows and D >= 2 columns, got {tuple(masks.shape)}"
        )
    m = masks.detach().to(torch.float32)
    if not torch.all((m == 0) | (m == 1)):
        raise ValueError("masks must contain only 0 and 1 (1 = kept, 0 = transformed)")
    kept = m.sum(dim=1)
    for layer, k in enumerate(kept.tolist()):
        if k == 0:
            raise ValueError(
                f"masks[{layer}] keeps no feature; each layer needs >= 1 kept (1) entry"
            )
        if k == m.shape[1]:
            raise ValueError(
                f"masks[{layer}] transforms no feature; each layer needs >= 1 transformed (0) entry"
            )
    return m.clone()


def split_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of kept and transformed features of one (D,) mask, as int64 tensors."""
    kept = torch.nonzero(mask > 0.5, as_tuple=False).flatten()
    transformed = torch.nonzero(mask <= 0.5, as_tuple=False).flatten()
    return kept, transformed
