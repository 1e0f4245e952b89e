"""The fused Triton executors of a FastRealNVP: one fused-layer op per layer, or one whole-stack
launch without gradients (docs/design.md §3.2, §4.2-4.4).

The ops themselves (``torch.ops.fastnvp.coupling_layer*``, ``coupling_stack_*``, each with its
PyTorch implementation) are in ``fastnvp.ops.fused_layer``; this module binds them to a model's
layers and caches the stacked weights of the whole-stack launch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnvp.ops import fused_layer as fused_ops
from fastnvp.ops.fused_layer import (
    coupling_layer,
    coupling_layer_inverse,
    coupling_stack_forward,
    coupling_stack_inverse,
    stack_fits,
    stack_layers,
)


def model_uses_fused_layer(model, layer: int, h: Tensor) -> bool:
    """Whether FastRealNVP layer ``layer`` runs as one fused-layer op on state ``h``.

    The plan decides it (``fastnvp.engine.plan.layer_path``, docs/design.md §3).
    """
    return model._plan(h, "f").layers[layer] == "fused_layer"


def _model_layer_weights(model, layer: int):
    from fastnvp.core.conditioner import match_standard_mlp, standard_weights

    kept, transformed = model._split(layer)
    s_mlp = match_standard_mlp(model.s[layer], model.dim)
    t_mlp = match_standard_mlp(model.t[layer], model.dim)
    sw = standard_weights(s_mlp, kept, transformed)
    tw = standard_weights(t_mlp, kept, transformed)
    return kept, transformed, sw, tw, s_mlp.negative_slope


def model_layer(model, layer: int, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """FastRealNVP layer ``layer`` as one fused-layer op (differentiable).  (N, D) -> (out, ld)."""
    kept, transformed, sw, tw, slope = _model_layer_weights(model, layer)
    op = coupling_layer_inverse if inverse else coupling_layer
    return op(h, kept, transformed, *sw, *tw, slope, model.precision)


def _stack_key(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters()) + (
        model.split_order.data_ptr(),
        model.split_order._version,
    )


def model_stack(model, x: Tensor, inverse: bool):
    """All layers in one whole-stack launch when nothing needs a gradient, else None.

    Used when every layer takes the fused layer, no gradient is needed, and the stacked weights
    fit ``STACK_CACHE_BUDGET``. The stacked weights are cached on the model and rebuilt when a
    parameter changes (in-place updates bump the parameters' version counters).
    """
    if not all(model_uses_fused_layer(model, i, x) for i in range(model.num_layers)):
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in model.parameters())
    ):
        return None
    key = _stack_key(model)
    cache = getattr(model, "_fused_stack_cache", None)
    if cache is None or cache[0] != key:
        layers = [_model_layer_weights(model, i) for i in range(model.num_layers)]
        stacked = stack_layers([w[:4] for w in layers])
        cache = (key, stacked, layers[0][4], stack_fits(stacked, fused_ops.STACK_CACHE_BUDGET))
        model._fused_stack_cache = cache
    _, stacked, slope, fits = cache
    if not fits:
        return None
    op = coupling_stack_inverse if inverse else coupling_stack_forward
    return op(x, *stacked, slope, model.precision)
