"""The fused Triton executors of a FastRealNVP: one fused-layer op per layer, or one whole-stack
launch without gradients (docs/design.md §3.2, §4.2-4.4).

The ops themselves (``torch.ops.fastnvp.coupling_layer*``, ``coupling_stack_*``, each with its
PyTorch implementation) are in ``fastnvp.ops.fused_layer``; this module binds them to a model's
layers and caches the stacked weights of the whole-stack launch.

A conditional model (``model.embedded_features`` E > 0) passes the embedded context ``e``
(N, E), computed once per call, to every layer: layer i's nets read ``cat(h[:, kept_i], e)``
against ``W1[:, model._inputs(i)]`` (H, K1 + E), kept columns first, then the context columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnvp.engine.cache_keys import tensors_key
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


def _embedded_features(model) -> int:
    """E of a conditional model (the width of the embedded context), 0 when unconditional."""
    return int(getattr(model, "embedded_features", 0) or 0)


def _model_layer_weights(model, layer: int):
    """``(kept, transformed, s_weights, t_weights, slope)``; W1 is (H, K1 + E)."""
    from fastnvp.core.conditioner import match_standard_mlp, standard_weights

    kept, transformed = model._split(layer)
    e = _embedded_features(model)
    if e:
        inputs = model._inputs(layer)  # kept columns, then the context columns D..D+E-1
        s_mlp = match_standard_mlp(model.s[layer], model.dim, context=e)
        t_mlp = match_standard_mlp(model.t[layer], model.dim, context=e)
    else:
        inputs = kept
        s_mlp = match_standard_mlp(model.s[layer], model.dim)
        t_mlp = match_standard_mlp(model.t[layer], model.dim)
    sw = standard_weights(s_mlp, inputs, transformed)
    tw = standard_weights(t_mlp, inputs, transformed)
    return kept, transformed, sw, tw, s_mlp.negative_slope


def model_layer(
    model, layer: int, h: Tensor, inverse: bool, context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """FastRealNVP layer ``layer`` as one fused-layer op (differentiable).  (N, D) -> (out, ld).

    ``context``: the embedded context e (N, E) of a conditional model (None when unconditional);
    its gradient flows back through the op.
    """
    kept, transformed, sw, tw, slope = _model_layer_weights(model, layer)
    op = coupling_layer_inverse if inverse else coupling_layer
    return op(h, kept, transformed, *sw, *tw, slope, model.precision, context)


def _stack_key(model) -> tuple:
    tensors = (*model.parameters(), *model.buffers())  # buffers: the split, the permutations
    return tensors_key(tensors) + (
        _embedded_features(model),  # the W1 gather depends on E, never on the context values
    )


def _folded_layers(model):
    """Per layer ``_model_layer_weights`` with fixed permutations folded into the gathers,
    and the final column order (D,) (docs/design.md §4.4).

    A permutation ``y = x[:, p]`` before layer i relabels the features: with the state kept in
    its physical column order, logical feature j lives in column ``pi[j]``, and after p in
    column ``pi[p[j]]``. Layer i then reads and writes columns ``pi[kept_i]``,
    ``pi[transformed_i]``, and the flow's output is ``state[:, pi]``: no permutation is ever
    applied to the (N, D) state inside the stack.
    """
    permutations = getattr(model, "permutations", None)
    pi = torch.arange(model.dim, device=model.split_order.device)
    layers = []
    for i in range(model.num_layers):
        if permutations is not None:
            pi = pi.index_select(0, permutations[i].index)
        kept, transformed, sw, tw, slope = _model_layer_weights(model, i)
        layers.append((pi[kept], pi[transformed], sw, tw, slope))
    return layers, pi


def model_stack(model, x: Tensor, inverse: bool, context: Tensor | None = None):
    """All layers in one whole-stack launch when nothing needs a gradient, else None.

    Used when every layer takes the fused layer, no gradient is needed, and the stacked weights
    fit ``STACK_CACHE_BUDGET``; fixed permutations between the layers are folded into the
    gathers (:func:`_folded_layers`), other interleaved layers are the plan's to refuse. The
    stacked weights are cached on the model and rebuilt when a parameter or buffer changes
    (in-place updates bump their version counters). ``context``: the embedded context e
    (N, E) of a conditional model, shared by every layer.
    """
    if not all(model_uses_fused_layer(model, i, x) for i in range(model.num_layers)):
        return None
    if getattr(model, "norms", None) is not None or any(
        layer.kind != "permutation" for layer in getattr(model, "permutations", None) or ()
    ):
        raise ValueError(
            "model_stack folds only fixed permutations into the whole-stack launch; a flow "
            "with norm or LU layers runs layer by layer (the plan chooses that)"
        )
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (context is not None and context.requires_grad)
        or any(p.requires_grad for p in model.parameters())
    ):
        return None
    key = _stack_key(model)
    cache = getattr(model, "_fused_stack_cache", None)
    if cache is None or cache[0] != key:
        layers, order = _folded_layers(model)
        stacked = stack_layers([w[:4] for w in layers])
        folded = None
        if getattr(model, "permutations", None) is not None:
            folded = (order, torch.argsort(order))
        fits = stack_fits(stacked, fused_ops.STACK_CACHE_BUDGET)
        cache = (key, stacked, layers[0][4], fits, folded)
        model._fused_stack_cache = cache
    _, stacked, slope, fits, folded = cache
    if not fits:
        return None
    if inverse:
        state = x if folded is None else x.index_select(1, folded[1])  # logical -> physical
        return coupling_stack_inverse(state, *stacked, slope, model.precision, context)
    z, log_det = coupling_stack_forward(x, *stacked, slope, model.precision, context)
    return (z, log_det) if folded is None else (z.index_select(1, folded[0]), log_det)
