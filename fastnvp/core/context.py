"""The context of a conditional flow: its width, the optional embedding, and input checks.

A conditional flow models p(x | c) (docs/design.md §1.7). The caller passes a context c of
shape (N, C); an optional embedding module maps it once per call to e (N, E) (E = C without
one), and every coupling's conditioner sees ``cat([x * m, e])``. This module decides, in one
place, what a valid context is and how sample shapes follow from it.
"""

from __future__ import annotations

import torch
from torch import nn

from fastnvp.core.validation import FLOAT_DTYPES, check_input_dtype


def check_context_features(context) -> int | None:
    """Validate the constructor's ``context``: None (unconditional) or an int C >= 1."""
    if context is None:
        return None
    if isinstance(context, bool) or not isinstance(context, int):
        raise TypeError(
            "context must be None or an int C >= 1 (the context width), "
            f"got {type(context).__name__}"
        )
    if context < 1:
        raise ValueError(
            f"context must be None or an int C >= 1 (the context width), got {context}"
        )
    return context


def embedded_width(embedding, context_features: int | None) -> int:
    """E, the width the embedding gives a (N, C) context; C without an embedding; 0 without context.

    The embedding is run once on a (2, C) zero batch, in eval mode and without gradients, so
    a BatchNorm inside it keeps its statistics.
    """
    if embedding is None:
        return context_features or 0
    if context_features is None:
        raise ValueError("embedding needs context=C: an unconditional flow has no context to embed")
    if not isinstance(embedding, nn.Module):
        raise TypeError(
            f"embedding must be None or an nn.Module mapping (N, {context_features}) -> (N, E), "
            f"got {type(embedding).__name__}"
        )
    anchor = next(iter(embedding.parameters()), None)
    probe = torch.zeros(
        2,
        context_features,
        device=anchor.device if anchor is not None else None,
        dtype=anchor.dtype if anchor is not None and anchor.is_floating_point() else None,
    )
    was_training = embedding.training
    embedding.eval()
    try:
        with torch.no_grad():
            out = embedding(probe)
    except Exception as error:  # report which argument is wrong, with the cause chained
        raise TypeError(
            f"embedding must accept a (N, {context_features}) context "
            f"(context={context_features}); calling it on a (2, {context_features}) batch "
            f"failed: {error}"
        ) from error
    finally:
        embedding.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"embedding must map (N, {context_features}) -> (N, E), got {shape} for N = 2"
        )
    return int(out.shape[1])


def check_context(context, features: int | None, rows: int, like: torch.Tensor) -> None:
    """Check a call's ``context`` against the flow: present iff conditional, (rows, C), like x.

    Args:
        context: the caller's context, or None.
        features: the flow's C (None for an unconditional flow).
        rows: N, the rows of the call's x / z.
        like: the model's anchor tensor (dtype and device the context must have).
    """
    if features is None:
        if context is not None:
            raise ValueError(
                "context was given, but this flow is unconditional (built without context=C); "
                "call it without context"
            )
        return
    if context is None:
        raise ValueError(
            f"context is required: this flow is conditional on C = {features} features; pass "
            f"context of shape ({rows}, {features})"
        )
    if not isinstance(context, torch.Tensor):
        raise TypeError(
            f"context must be a torch.Tensor of shape ({rows}, {features}), "
            f"got {type(context).__name__}"
        )
    if context.dtype not in FLOAT_DTYPES:
        raise TypeError(f"context must have a floating dtype like the model's, got {context.dtype}")
    if context.ndim != 2 or context.shape[1] != features:
        raise ValueError(
            f"context must have shape ({rows}, {features}) (N rows of C = {features} features), "
            f"got {tuple(context.shape)}"
        )
    if context.shape[0] != rows:
        raise ValueError(
            f"context must have one row per input row: expected shape ({rows}, {features}), "
            f"got {tuple(context.shape)}"
        )
    if context.device != like.device:
        raise ValueError(f"context is on {context.device} but the model is on {like.device}")
    check_input_dtype(context, "context", like.dtype)


def sample_context(context, features: int | None, like: torch.Tensor):
    """The per-sample context rows and batch shape of ``sample(n, context)``.

    Returns:
        ``(rows_context, batch_shape)``: None and () for an unconditional flow; for context
        (C,) the context as (1, C) and (); for (M, C) the context itself and (M,). Samples are
        drawn as (n * M, D) rows, sample-major, and viewed as (n, *batch_shape, D).
    """
    if features is None:
        check_context(context, None, 1, like)
        return None, ()
    expected = f"({features},) for one context or (M, {features}) for M contexts"
    if context is None:
        raise ValueError(
            f"context is required: this flow is conditional on C = {features} "
            f"features; pass context of shape {expected}"
        )
    if not isinstance(context, torch.Tensor):
        raise TypeError(
            f"context must be a torch.Tensor of shape {expected}, got {type(context).__name__}"
        )
    if context.ndim not in (1, 2) or context.shape[-1] != features:
        raise ValueError(f"context must have shape {expected}, got {tuple(context.shape)}")
    if context.ndim == 2 and context.shape[0] == 0:
        raise ValueError(f"context must have at least one row (M >= 1), got {tuple(context.shape)}")
    rows = context[None] if context.ndim == 1 else context
    check_context(rows, features, rows.shape[0], like)  # dtype and device
    return rows, (() if context.ndim == 1 else (context.shape[0],))
