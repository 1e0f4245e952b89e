"""CPU GEMM stack executor: a whole stack of standard coupling layers as one autograd node.

docs/design.md §3.2. Every layer ``i`` has the standard conditioner pair (S, T), docs/design.md
§1.3, on the split halves ``x1 = h[:, kept_i]`` (N, K1), ``x2 = h[:, trans_i]`` (N, K2). The two
nets run side by side as batched matmuls over a leading net axis of size 2 (S, T)::

    h1 = lrelu(x1 @ W1[i]^T + b1[i])        (2, N, H)   W1[i] (2, H, K1)
    h2 = lrelu(h1 @ W2[i]^T + b2[i])        (2, N, H)   W2[i] (2, H, H)
    o  = h2 @ W3[i]^T + b3[i]               (2, N, K2)  W3[i] (2, K2, H)
    s  = tanh(o[0]),  t = o[1]
    f:  z2 = x2 * exp(s) + t,   log_det += sum_k s          g:  x2 = (z2 - t) * exp(-s)

so a layer is 3 batched GEMMs (instead of 6 Linear calls) and a handful of elementwise ops. The
weights of all layers are packed once per call: one ``gather`` for the kept columns of W1 and
the transformed rows of W3, never a per-layer gather. The flow keeps each parameter kind in one
(L, 2, ...) tensor, every parameter lying in it (:mod:`fastnvp.engine.param_bank`), so the
pack reads those as they are; parameters that are not in the bank (rebound, stand-ins)
are stacked per call instead, one ``stack`` per kind and one per layer's H x H pair.

Backward is written out by hand (the formulas below) and runs as ONE autograd node for the
whole flow call: no per-layer autograd graph, no per-op saved-tensor bookkeeping. With upstream
gradients ``G`` (N, D) of the layer output and ``gl`` (N,) of log_det::

    gx2 = g2 * exp(s)                  gs = g2 * x2 * exp(s) + gl      go = (gs * (1 - s^2), g2)
    gW3 = go^T h2    gh2 = go W3       ga2 = gh2 * lrelu'(h2)          gW2 = ga2^T h1
    gh1 = ga2 W2     ga1 = gh1 * lrelu'(h1)     gW1 = ga1^T x1         gx1 = g1 + sum_P ga1_P W1_P

``lrelu'`` is read from the sign of the activation's output (valid for slope >= 0, a plan fact).
Parameter gradients are written in place into per-call (L, 2, ...) buffers with ``out=`` and
scattered once into the full parameter shapes at the end; the (2, N, H) backward temporaries are
two workspaces reused by every layer.

Memory modes:

- ``standard``: forward keeps per layer ``x1``, ``x2``, ``h1``, ``h2`` and ``s``;
- ``invertible`` (docs/design.md §5): forward keeps only the anchors (the input of every
  ``anchor_every``-th layer) and the output. Backward walks from the output: the kept half is
  exact (``x1 = z1``), the nets are recomputed from it into two reused (2, N, H) workspaces, the
  transformed half is recovered as ``x2 = (z2 - t) exp(-s)``, and the layer's backward runs on
  those. The same workspaces serve every layer, so the allocation pattern is steady and the peak
  does not grow with depth. Round-trip residuals and anchor drift are measured as in
  :mod:`fastnvp.engine.invertible` and reported as ``model.last_reconstruction``.

The same GEMMs run without autograd (:func:`forward_no_grad`, :func:`inverse_no_grad`) with the
(2, N, H) activations in two reused workspaces and the state updated in place.

Every walk takes its buffers (states, activations, net outputs, backward's temporaries) from
the process's :class:`~fastnvp.engine.cpu.buffer_pool.BufferPool`, which reuses a buffer once
nothing holds it, so the steps of a loop touch memory that is already mapped instead of pages
the C library handed back to the kernel; outputs are always new tensors.

Conditional flows (docs/design.md §1.7): the first Linear's input is ``x_in = cat(x1, e)``
(N, K1 + E) with e the embedded context, against W1 packed over the kept columns and the E
context columns (L, P, H, K1 + E). The context's contribution is part of that one batched GEMM
for S and T, and its gradient ``ge = sum_i sum_P ga1_P W1_P[:, K1:]`` is summed over the layers
(only where it is wanted: an embedding net's output, or a context that requires grad).

Bias column: wherever the first input has more than one column it is built per layer anyway
(the cat with the context, or a copy of the kept half), so it also gets a column of ones and
b1 rides in the GEMM as W1's last column: ``h1 = [x_in, 1] @ [W1, b1]^T``. That saves the
broadcast copy of b1 into the (2, N, H) output that ``baddbmm`` makes before its GEMM, and
``gW1`` comes with ``gb1`` as its last column (no row sum of ``ga1``).

Unequal halves (odd D): the split is padded to K1 = max kept and K2 = max transformed
features per layer with a zero column of the walk state (``fastnvp.engine.cpu.columns``): the
padding entries' gathered weights are zeroed in :func:`pack`, so they give s = t = 0 and add
nothing, and their weight gradients are dropped in :meth:`_Grads.unpacked`.

Norm layers take the padding column as an identity that keeps it zero
(``interleaved.walk_views``), and BatchNorm leaves its statistics out of the log-det and the
running averages.

Limit: every layer must have its own parameters, a slope >= 0 and the model's dtype, and a
padded split runs without mixing layers (a permutation or an LU product would move the padding
column); the plan (``fastnvp.engine.plan``) checks this once and sends other flows down the
per-layer path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fastnvp.engine import interleaved
from fastnvp.engine.cache_keys import tensors_key
from fastnvp.engine.cpu import buffer_pool
from fastnvp.engine.cpu.buffer_pool import BufferPool
from fastnvp.engine.cpu.columns import SplitLayouts, StackLayout, split_layouts
from fastnvp.engine.first_order import first_order
from fastnvp.engine.invertible import (
    ReconstructionError,
    ReconstructionReport,
    _failure_message,
    _relative_error,
)
from fastnvp.engine.param_bank import ParameterBank

#: Parameters per layer, in the order :func:`layer_parameters` returns them:
#: S (W1, b1, W2, b2, W3, b3), then T (W1, b1, W2, b2, W3, b3).
PARAMS_PER_LAYER = 12

#: The most bytes of H x H weights of which the cached pack of the calls without a gradient
#: keeps a copy, as the :func:`with_inference_operands` (b2 inside the second GEMM, W1 and
#: W3 contiguous: 1.005-1.129x faster calls; built on the pack's second call). Above it (deep,
#: wide flows) the copy would cost more memory than it saves time: the pack then reads the
#: pairs from the parameter bank (views, no copy) or, without a bank, stacks each where it
#: runs (46 us a layer at H = 256, 10 % of a call at B = 256).
CACHED_W2_MAX_BYTES = 64 * 2**20

_lrelu_backward = torch.ops.aten.leaky_relu_backward
_tanh_backward = torch.ops.aten.tanh_backward

_NO_RANGE = contextlib.nullcontext()


def _profiling() -> bool:
    """Whether a ``torch.profiler`` session records: then each layer gets its own range."""
    return torch.autograd.profiler._is_profiler_enabled


def _mark(on: bool, i: int, kind: str):
    """``record_function("layer{i}.{kind}")`` under a profiler (``fastnvp.analysis.profiling`` reads
    per-layer time from these ranges), else a no-op."""
    return torch.autograd.profiler.record_function(f"layer{i}.{kind}") if on else _NO_RANGE


def layer_parameters(model) -> list[Tensor]:
    """The 12 L parameters of a standard-conditioner flow, layer by layer (S then T)."""
    params: list[Tensor] = []
    for pair in zip(model.s, model.t, strict=True):
        for net in pair:
            # Positional (Linear, act, Linear, act, Linear, ...), as the plan matched them; read
            # from the module dict once per call (indexing a Sequential costs 3x more), and each
            # Linear's weights from its parameter dict: ``Module.__getattr__`` made the 96 reads
            # of an 8-layer flow 130 us a call, against 21 us (the plan matched exact
            # ``nn.Linear`` types, whose weight and bias live in that dict).
            first, _, second, _, third, *_ = net._modules.values()
            a, b, c = first._parameters, second._parameters, third._parameters
            params += [a["weight"], a["bias"], b["weight"], b["bias"], c["weight"], c["bias"]]
    return params


class LayerViews(NamedTuple):
    """Layer ``i``'s weights as the views its GEMMs take, built once per call (P = 2 nets)."""

    w1t: Tensor  # (P, K1 + E + 1, H) with b1 as its last row (bias column), else (P, K1, H)
    b1: Tensor  # (P, 1, H)
    w2: tuple[Tensor, Tensor]  # (H, H) each, the parameters themselves
    w2_stacked: Tensor | None  # (P, H, H), kept by a cached pack (:func:`cached_pack`), else None
    b2: Tensor  # (P, 1, H)
    w3t: Tensor  # (P, H, K2)
    w3: Tensor  # (P, K2, H)
    b3: Tensor  # (P, 1, K2)
    inference: InferenceOperands | None = None  # :func:`with_inference_operands`


class InferenceOperands(NamedTuple):
    """One layer's operands of :func:`with_inference_operands`, copies: w1t (P, K, H + 1)
    and b1 (P, 1, H + 1), contiguous, whose last output column is 1 for every row; w2t_bias
    (P, H + 1, H), W2^T with b2 as its last row (the transposed view of a contiguous
    [W2 | b2]); w3t (P, H, K2), contiguous."""

    w1t: Tensor
    b1: Tensor
    w2t_bias: Tensor
    w3t: Tensor


@dataclasses.dataclass(frozen=True)
class Packed:
    """The weights of all L layers for both nets, restricted to the split halves.

    Shapes (P = 2 nets, S then T): ``w1`` (L, P, H, K1 + E), ``b1`` (L, P, 1, H), ``b2`` (L, P,
    1, H), ``w3`` (L, P, K2, H), ``b3`` (L, P, 1, K2): ``w1``, ``w3``, ``b3`` gathered copies
    (O(L H D) values), ``b1`` and ``b2`` views of the parameter bank (stacked copies without
    one; ``b1`` also rides in ``layers[i].w1t``, a copy); the
    H x H weights are never copied for a call: ``layers[i].w2`` are the parameters themselves
    (most of a flow's parameters; a packed copy would make the memory of the invertible mode
    grow with depth) and ``layers[i].w2_stacked`` the bank's (P, H, H) view of the pair. Without
    a bank a layer stacks its pair into one (P, H, H) temporary where it runs
    (:func:`_stacked_w2`). Only the pack cached for the calls without a gradient keeps a copy
    of them, in its ``layers[i].inference`` (:func:`with_inference_operands`;
    ``inference`` tells whether it has them). ``kept`` (L, K1) and ``trans``
    (L, K2) int64, the columns of W1 and rows of W3 gathered for each layer (a padding entry of
    unequal halves reads index 0 and is zeroed: ``layouts.padding``); ``slope`` the LeakyReLU
    slope; ``features`` D.
    """

    w1: Tensor
    b1: Tensor
    b2: Tensor
    w3: Tensor
    b3: Tensor
    kept: Tensor
    trans: Tensor
    slope: float
    layers: list[LayerViews]
    layouts: SplitLayouts  # the walks' column orders, each half a range where it can be
    inputs: Tensor  # (L, K1 + E): W1's packed columns, the kept ones then the context ones
    in_features: int  # D + E, the full width of W1
    bias_column: bool  # b1 rides in the first GEMM as a column of ones (K1 + E > 1)
    features: int  # D (the walk state of a padded split has D + 1 columns)
    inference: bool = False  # layers[i].inference are there (:func:`with_inference_operands`)
    # Refills w1 (with b1's column), w3 and b3 in place from the bank as it is now; None
    # without a bank (the stacked copies would be stale). :func:`grad_pack` calls it.
    refresh: Callable[[], None] | None = None

    @property
    def num_layers(self) -> int:
        return self.w1.shape[0]

    def walk_layout(self, inter) -> StackLayout:
        """The layout of a walk: reordered columns, unless mixing layers run in it (a norm
        layer's per-feature tensors are reordered with the state; a mixing layer indexes
        features)."""
        mixing = inter is not None and inter.mix is not None
        return self.layouts.plain if mixing else self.layouts.reordered

    @property
    def hidden(self) -> int:
        return self.w1.shape[2]


def pack(
    params: list[Tensor],
    kept: Tensor,
    trans: Tensor,
    slope: float,
    layouts: SplitLayouts,
    bank: ParameterBank | None = None,
) -> Packed:
    """Pack the parameters of :func:`layer_parameters` for the batched GEMMs.

    Called where nothing is recorded (inside the autograd node's forward, or without a
    gradient), so the parameters are read as they are, without ``detach`` calls.

    Args:
        params: 12 L tensors in :func:`layer_parameters` order.
        kept: (L, K1) int64, the kept features of each layer.
        trans: (L, K2) int64, the transformed features of each layer.
        slope: the LeakyReLU slope shared by every net.
        layouts: the split's :class:`SplitLayouts` (:func:`cached_layouts`).
        bank: the :class:`~fastnvp.engine.param_bank.ParameterBank` that holds ``params``
            (:func:`bank_of`), or None: its tensors are read as they are, with no ``stack``.
    """
    num_layers, k1 = kept.shape
    k2 = trans.shape[1]
    # Leading axis 2 L: (layer, net) flattened. Everything but the H x H weights is stacked
    # (or, with a bank, already is).
    if bank is None:
        w1_full, b1, b2, w3_full, b3_full = (torch.stack(params[j::6]) for j in (0, 1, 3, 4, 5))
    else:
        w1_full, b1, b2, w3_full, b3_full = (bank.kinds[j].flatten(0, 1) for j in (0, 1, 3, 4, 5))
    w2 = params[2::6]
    hidden = w1_full.shape[1]
    dim = w1_full.shape[-1]
    in_features = dim
    dim = w3_full.shape[1]  # D; a conditional flow's W1 also has E = in_features - D columns
    # A padded split gathers column / row 0 for its padding entries, zeroed below.
    padding = layouts.padding
    gather_kept, gather_trans = (kept, trans) if padding is None else padding[:2]
    inputs = gather_kept
    if in_features > dim:
        columns = torch.arange(dim, in_features, device=kept.device)
        inputs = torch.cat([gather_kept, columns.expand(num_layers, in_features - dim)], dim=1)
    k_in = inputs.shape[1]
    # The bias column (module doc; at B = 4096, H = 256 it saves 0.9 ms a layer). A single
    # input column keeps the broadcast multiply-add (an outer product, no GEMM).
    bias_column = k_in > 1
    w1_full = w1_full.view(num_layers, 2, hidden, in_features)
    w3_full = w3_full.view(num_layers, 2, dim, hidden)
    b3_full = b3_full.view(num_layers, 2, dim)
    w1_columns = inputs[:, None, None, :].expand(num_layers, 2, hidden, k_in)
    w3_rows = gather_trans[:, None, :, None].expand(num_layers, 2, k2, hidden)
    b3_rows = gather_trans[:, None, :].expand(num_layers, 2, k2)
    b1 = b1.view(num_layers, 2, 1, hidden)
    like = w1_full
    w1_in = like.new_empty((num_layers, 2, hidden, k_in + bias_column))
    w1 = w1_in[..., :k_in]
    w3 = like.new_empty((num_layers, 2, k2, hidden))
    b3 = like.new_empty((num_layers, 2, 1, k2))
    b3_rows_out = b3[:, :, 0]

    def gather() -> None:
        """(Re)fill the gathered copies from the parameters (or the bank) as they are now."""
        torch.gather(w1_full, 3, w1_columns, out=w1)  # W1's columns of w1_in
        torch.gather(w3_full, 2, w3_rows, out=w3)
        torch.gather(b3_full, 2, b3_rows, out=b3_rows_out)
        if padding is not None:  # the padding column: no input weight, s = t = 0 (module doc)
            w1[..., :k1].masked_fill_(padding.kept_mask[:, None, None, :], 0.0)
            w3.masked_fill_(padding.trans_mask[:, None, :, None], 0.0)
            b3_rows_out.masked_fill_(padding.trans_mask[:, None, :], 0.0)
        if bias_column:
            w1_in[..., k_in:].copy_(b1.transpose(2, 3))

    gather()
    b2 = b2.view(num_layers, 2, 1, hidden)
    w2_pairs = list(zip(w2[0::2], w2[1::2]))
    if bank is not None:
        w2_stacked = list(bank.kinds[2].unbind(0))
    else:
        w2_stacked = [None] * num_layers
    # Per-layer views, made once per call: a layer's loop body then indexes Python lists.
    layers = [
        LayerViews(w1t, b1_i, w2_pair, w2s, b2_i, w3t, w3_i, b3_i)
        for w1t, b1_i, w2_pair, w2s, b2_i, w3t, w3_i, b3_i in zip(
            w1_in.transpose(2, 3).unbind(0),
            b1.unbind(0),
            w2_pairs,
            w2_stacked,
            b2.unbind(0),
            w3.transpose(2, 3).unbind(0),
            w3.unbind(0),
            b3.unbind(0),
        )
    ]
    return Packed(
        w1=w1,
        b1=b1,
        b2=b2,
        w3=w3,
        b3=b3,
        kept=gather_kept,
        trans=gather_trans,
        slope=slope,
        layers=layers,
        layouts=layouts,
        inputs=inputs,
        in_features=in_features,
        bias_column=bias_column,
        features=dim,
        refresh=gather if bank is not None else None,
    )


def grad_pack(
    model,
    params: list[Tensor],
    kept: Tensor,
    trans: Tensor,
    slope: float,
    layouts: SplitLayouts,
) -> Packed:
    """:func:`pack` for a call with a gradient, its views kept on the model between calls.

    With a parameter bank, everything :func:`pack` builds but the gathered copies is views of
    the bank, valid for as long as the bank is (optimizer steps write into it); a later call
    on the same bank and split only refills the copies (``Packed.refresh``: three gathers
    and b1's column instead of ~110 us of packing at L = 8). Refilling in place is safe for a
    graph of an earlier call still waiting for its backward: with the parameters unchanged
    the values are the same, and a backward after they changed raises anyway
    (:func:`_check_unmodified`). Without a bank every call packs afresh.
    """
    bank = bank_of(model, params)
    if bank is None:
        return pack(params, kept, trans, slope, layouts)
    key = (kept._version, trans._version, slope)
    cached = model.__dict__.get("_gemm_grad_pack")
    if (
        cached is not None
        and cached[0] is bank
        and cached[1] is kept
        and cached[2] is trans
        and cached[3] == key
    ):
        packed = cached[4]
        packed.refresh()
        return packed
    packed = pack(params, kept, trans, slope, layouts, bank=bank)
    model.__dict__["_gemm_grad_pack"] = (bank, kept, trans, key, packed)
    return packed


def with_inference_operands(packed: Packed, bank: ParameterBank | None = None) -> Packed:
    """``packed`` with :class:`InferenceOperands` in every layer (``layers[i].inference``),
    for the calls without a gradient (:func:`cached_pack`): copies of the weights, with b2
    inside the second GEMM. The first GEMM's weights gain an output column that is 1 for every
    row (its weight is 1 on the bias column of ones, or its bias is 1 where there is a single
    input), so h1 is (2, N, H + 1) with a last column of ones (LeakyReLU keeps 1), against
    [W2^T; b2] (P, H + 1, H): no bias pass over (2, N, H), and W1 and W3 contiguous.
    ``benchmarks/inference_operands_ab.py`` (paired, D = 8, C = 8, L = 8, H = 64 and 256,
    N = 16 to 4096): ``log_prob`` and ``sample`` 1.005-1.129x faster, median 1.033x (1.12x
    at H = 64, N = 256). Costs a copy of the H x H weights, kept with the pack (its caller
    bounds it). ``bank``: the parameter bank ``packed`` read its H x H pairs from, or None.
    """
    w1_in = packed.w1
    if packed.bias_column:  # b1 as the last input column, as in ``layers[i].w1t``
        w1_in = torch.cat([packed.w1, packed.b1.transpose(2, 3)], dim=3)
    w2_all = None if bank is None else bank.kinds[2]
    w2_pairs = [v.w2 for v in packed.layers]
    operands = _inference_operands(
        w1_in.transpose(2, 3), packed.b1, packed.b2, w2_pairs, w2_all, packed.w3.transpose(2, 3)
    )
    layers = [v._replace(inference=op) for v, op in zip(packed.layers, operands, strict=True)]
    return dataclasses.replace(packed, layers=layers, inference=True)


def _inference_operands(w1t: Tensor, b1: Tensor, b2: Tensor, w2_pairs, w2_all, w3t):
    """Per layer, the :class:`InferenceOperands` from w1t (L, P, K, H), b1 and b2
    (L, P, 1, H), the H x H pairs and w3t (L, P, H, K2); ``w2_all``: the bank's (L, P, H, H)
    of the pairs, or None."""
    num_layers, nets, k, hidden = w1t.shape
    w1t_ones = w1t.new_zeros((num_layers, nets, k, hidden + 1))
    w1t_ones[..., :hidden] = w1t
    b1_ones = torch.nn.functional.pad(b1, (0, 1), value=1.0)
    if k > 1:  # the bias column of ones is the first input's last column (b1's row)
        w1t_ones[..., -1, hidden] = 1.0
        b1_ones[..., hidden] = 0.0  # unused: b1 rides in the GEMM
    w3t = w3t.contiguous()
    # All layers' [W2 | b2] in one buffer, by two copies where the pairs lie in the bank. The
    # GEMM reads it transposed: a transposing copy cost 580 us at L = 8, H = 256 against
    # 210 us straight, and the transposed operand runs as fast from 256 rows (4-6 us slower
    # per layer at 16 rows).
    w2_bias = b2.new_empty((num_layers, nets, hidden, hidden + 1))
    w2_bias[..., hidden:].copy_(b2.transpose(2, 3))
    if w2_all is not None:
        w2_bias[..., :hidden].copy_(w2_all)
    else:
        for i, pair in enumerate(w2_pairs):
            for net, weight in enumerate(pair):
                w2_bias[i, net, :, :hidden].copy_(weight)
    w2t_bias = w2_bias.transpose(2, 3)
    return [
        InferenceOperands(w1t_ones[i], b1_ones[i], w2t_bias[i], w3t[i]) for i in range(num_layers)
    ]


def bank_of(model, params: list[Tensor]) -> ParameterBank | None:
    """The model's :class:`~fastnvp.engine.param_bank.ParameterBank` if it holds ``params``
    now, else None (parameters moved from outside the flow, or stand-ins such as
    ``functional_call``'s: the bank is kept, and serves again once they are back)."""
    bank = getattr(model, "_param_bank", None)
    return bank if bank is not None and bank.holds(params) else None


def _input_tail(packed: Packed, x: Tensor, e: Tensor | None) -> Tensor | None:
    """What every layer appends to its kept half, built once per call: the context (N, E) if
    any, then the bias column of ones (N, 1) (``packed.bias_column``); None when nothing."""
    if not packed.bias_column:
        return e
    ones = x.new_ones((x.shape[0], 1))
    return ones if e is None else torch.cat([e, ones], dim=1)


def _first_input(x1: Tensor, tail: Tensor | None, pool: BufferPool | None = None) -> Tensor:
    """The first Linear's input: the kept half (N, K1), then :func:`_input_tail` if any (a
    new tensor, from ``pool`` when given)."""
    if tail is None:
        return x1
    out = None if pool is None else pool.take((x1.shape[0], x1.shape[1] + tail.shape[1]), x1)
    return torch.cat([x1, tail], dim=1, out=out)


def _stacked_w2(v: LayerViews) -> Tensor:
    """Layer ``v``'s two H x H weights as one (2, H, H) tensor, so one batched GEMM replaces
    two matmuls in each direction: the bank's view of the pair (no copy), or, without a bank,
    a temporary stack that lives for one layer, so no copy of the H x H weights outlives its
    layer (the invertible mode's memory stays flat in depth); that copy of 2 H^2 values costs
    2-70 us at H = 64-256 in context (about 1.1 ms of the 14 ms forward and backward at
    B = 256, H = 256, L = 8). The cached pack of the calls without a gradient keeps its own
    copies in its inference operands instead (:data:`CACHED_W2_MAX_BYTES`)."""
    return torch.stack(v.w2) if v.w2_stacked is None else v.w2_stacked


def _nets(
    packed: Packed,
    i: int,
    x1: Tensor,
    h1: Tensor | None = None,
    h2: Tensor | None = None,
    inference: bool = False,
    o: Tensor | None = None,
):
    """Layer ``i``'s conditioner pair on its first input ``x1`` (:func:`_first_input`:
    (N, K1 + E + 1) with the bias column, else (N, 1)) -> (h1, h2, s, t); h1, h2 (2, N, H).

    ``h1``/``h2`` are optional workspaces written in place (:func:`_workspaces`); else fresh
    tensors. ``inference``: run on the pack's :class:`InferenceOperands` (h1 is then
    (2, N, H + 1), its last column 1). ``o``: an optional (2, N, K2) buffer for the output
    (s and t are views of it).
    """
    v = packed.layers[i]
    w = v.inference if inference else v
    if not packed.bias_column:  # one input: an outer product, 2x faster as a broadcast FMA
        h1 = torch.addcmul(w.b1, x1, w.w1t, out=h1)
    else:  # b1 is the last row of w1t, against x1's column of ones
        h1 = torch.bmm(x1.expand(2, *x1.shape), w.w1t, out=h1)
    torch.nn.functional.leaky_relu_(h1, packed.slope)
    if inference:  # h1's last column is 1, b2 the last row of W2^T
        h2 = torch.bmm(h1, w.w2t_bias, out=h2)
    else:  # bmm, then the bias: 4-5 us faster than baddbmm at (2, 256, 64), the same from
        # ~1 k rows (baddbmm first broadcasts the bias into its output, then adds onto it)
        h2 = torch.bmm(h1, _stacked_w2(v).transpose(1, 2), out=h2).add_(v.b2)
    torch.nn.functional.leaky_relu_(h2, packed.slope)
    w3t = w.w3t
    if w3t.shape[2] == 1:
        # One transformed feature: (P, N, 1) and (P, 1, N) are the same memory, and the
        # product W3 h2^T, wide in its last dimension, runs 2-3x faster than h2 W3^T (30
        # against 79 us at N = 4096, H = 64; 139 against 251 us at H = 256). Wider outputs keep
        # h2 W3^T: their (K2, N) form would need a transposing copy and was slower from K2 = 8.
        rows = h2.shape[1]
        if o is None:
            o = h2.new_empty((2, rows, 1))
        torch.baddbmm(v.b3, w3t.transpose(1, 2), h2.transpose(1, 2), out=o.view(2, 1, rows))
    else:  # bmm, then the bias: as fast as baddbmm or faster for these K2-wide outputs (up to
        # 1.29x at (2, 4096, 64) @ (2, 64, K2 <= 8); baddbmm first broadcasts b3 into the output)
        o = torch.bmm(h2, w3t, out=o).add_(v.b3)
    s = o[0].tanh_()
    return h1, h2, s, o[1]


class _LogDet:
    """The log-det of a walk, summed over layers as (N, K2) and over features once at the end:
    one call per layer (``add_``) instead of two (a row sum, then its ``add_``). Every layer of
    a GEMM stack transforms K2 features (a padding entry's s is exactly 0), so the layers'
    ``s`` add up."""

    def __init__(self, buffer: Tensor | None = None):
        self.total: Tensor | None = None
        self._buffer = buffer  # (N, K2) to sum into (a pooled buffer), else a new tensor

    def add_(self, s: Tensor) -> None:
        """Add a layer's s (N, K2); s itself is neither kept nor changed."""
        if self.total is None:
            self.total = s.clone() if self._buffer is None else self._buffer.copy_(s)
        else:
            self.total.add_(s)

    def rows(self) -> Tensor:
        """Σ over layers and features, (N,)."""
        return self.total.sum(1)


def _advance(state: Tensor, new: Tensor, spare: Tensor) -> tuple[Tensor, Tensor]:
    """After an interleaved step of a walk without a gradient: (the new state, the next
    spare). The step wrote into ``spare`` (then the old state is free) or elsewhere."""
    return new, (state if new is spare else spare)


def _workspaces(
    x: Tensor, packed: Packed, inference: bool = False, pool: BufferPool | None = None
) -> tuple[Tensor, Tensor]:
    """(2, N, H) buffers for h1 and h2 (h1 (2, N, H + 1) for ``inference``: :func:`_nets`),
    from ``pool`` when given."""
    rows, hidden = x.shape[0], packed.hidden
    if pool is not None:
        return pool.take((2, rows, hidden + inference), x), pool.take((2, rows, hidden), x)
    return x.new_empty((2, rows, hidden + inference)), x.new_empty((2, rows, hidden))


class _NoGradWalk:
    """The buffers of a walk without a gradient, taken from the shared :class:`BufferPool`
    (reused from call to call: :mod:`fastnvp.engine.cpu.buffer_pool`), and the walk's state.

    ``state`` (N, W): the input in the walk's layout (a new tensor only for a padded state
    in feature order); ``spare``: an (N, W) buffer the interleaved steps alternate with it;
    ``h1``, ``h2``: :func:`_workspaces`; ``o`` (2, N, K2): each layer's net output (s, t),
    s turned into exp(±s) in place; ``log_det`` (N, K2): the sum of s; ``first``
    (N, K1 + E + 1): the first GEMM's input with the bias column, its tail (context, ones)
    written once per call and each layer's kept half copied in front (None for single-input
    layers, whose kept column is read in place).
    """

    def __init__(self, packed: Packed, layout: StackLayout, x: Tensor, e, inter, pool):
        rows, width = x.shape[0], layout.trans[0].index.shape[0]
        shape = (rows, x.shape[1] + layout.padded)
        self.state = layout.enter(x, out=pool.take(shape, x))
        self.spare = pool.take(shape, x) if inter is not None else None
        self.h1, self.h2 = _workspaces(x, packed, packed.inference, pool)
        self.o = pool.take((2, rows, width), x)
        self.log_det = _LogDet(pool.take((rows, width), x))
        self.first = None
        if packed.bias_column:
            kept = layout.kept[0].index.shape[0]
            tail = 1 if e is None else e.shape[1] + 1
            self.first = pool.take((rows, kept + tail), x)
            if e is not None:
                self.first[:, kept:-1].copy_(e)
            self.first[:, -1].fill_(1.0)

    def first_input(self, x1: Tensor) -> Tensor:
        """The first GEMM's input for kept half x1 (N, K1) (:func:`_first_input`)."""
        if self.first is None:
            return x1
        self.first[:, : x1.shape[1]].copy_(x1)
        return self.first

    @staticmethod
    def output(layout: StackLayout, h: Tensor) -> Tensor:
        """The walk's result in feature order, a new tensor (never a pooled buffer)."""
        out = layout.leave(h)
        return out.clone() if out is h else out


def forward_no_grad(
    packed: Packed, x: Tensor, e: Tensor | None, inter, pool: BufferPool
) -> tuple[Tensor, Tensor]:
    """``f`` without autograd.  x (N, D), e (N, E) or None -> (z (N, D), log_det (N,)).

    ``inter``: the call's :class:`~fastnvp.engine.interleaved.Interleave` or None; its
    parameter-only log-det is the caller's to add. ``pool``: the shared buffer pool
    (:func:`buffer_pool.shared`) the walk's buffers come from.
    """
    layout = packed.walk_layout(inter)
    walk = _NoGradWalk(packed, layout, x, e, inter, pool)
    z, spare = walk.state, walk.spare
    kept, trans = layout.kept, layout.trans
    views = (
        interleaved.walk_views(inter, layout.order, padded=layout.padded)
        if inter is not None
        else None
    )
    # The walk owns z and one spare (N, D) buffer: the interleaved steps write into the two
    # in turn (interleaved.forward_step) instead of new tensors.
    stats: list = []
    on = _profiling()
    for i in range(packed.num_layers):
        with _mark(on, i, "forward"):
            if inter is not None:
                new = interleaved.forward_step(inter, i, z, views[i], None, stats, spare)
                z, spare = _advance(z, new, spare)
            with _mark(on, i, "conditioner"):
                x_in = walk.first_input(kept[i].take(z))
                _, _, s, t = _nets(packed, i, x_in, walk.h1, walk.h2, packed.inference, walk.o)
            walk.log_det.add_(s)
            trans[i].scale_shift_(z, s.exp_(), t)  # s is the walk's buffer, summed already
    log_det = walk.log_det.rows()
    interleaved.finish_batch_stats(inter, stats, x.shape[0], log_det, layout.restore)
    return walk.output(layout, z), log_det


def inverse_no_grad(
    packed: Packed, z: Tensor, e: Tensor | None, inter, pool: BufferPool
) -> tuple[Tensor, Tensor]:
    """``g`` without autograd.  z (N, D), e (N, E) or None -> (x (N, D), log|det dx/dz| (N,)).

    ``inter``: as for :func:`forward_no_grad` (prepared for ``g``: no batch statistics);
    ``pool``: as there.
    """
    layout = packed.walk_layout(inter)
    walk = _NoGradWalk(packed, layout, z, e, inter, pool)
    x, spare = walk.state, walk.spare
    kept, trans = layout.kept, layout.trans
    views = (
        interleaved.walk_views(inter, layout.order, padded=layout.padded)
        if inter is not None
        else None
    )
    on = _profiling()
    for i in reversed(range(packed.num_layers)):
        with _mark(on, i, "inverse"):
            x_in = walk.first_input(kept[i].take(x))
            _, _, s, t = _nets(packed, i, x_in, walk.h1, walk.h2, packed.inference, walk.o)
            walk.log_det.add_(s.neg_())
            trans[i].shift_scale_(x, t, s.exp_())
            if inter is not None:
                new = interleaved.inverse_step(inter, i, x, views[i], spare=spare)
                x, spare = _advance(x, new, spare)
    return walk.output(layout, x), walk.log_det.rows()


class _Grads:
    """Per-call gradient buffers of all layers' packed parameters, filled in place, from the
    shared buffer pool: the parameters' ``.grad`` hold them until ``zero_grad`` lets go."""

    def __init__(self, packed: Packed, like: Tensor, pool: BufferPool):
        num_layers, hidden = packed.num_layers, packed.hidden
        self.pool = pool
        w1 = packed.w1
        # Held as (L, 2, K, H) and read as its transpose (L, 2, H, K): the per-layer GEMM is
        # then x1^T gh1, a (K, H) result that is wide in its last dimension, 1.5-3.5x faster
        # than gh1^T x1 with its K-wide rows (K = K1 + E + 1, often a handful of columns:
        # 18 against 64 us at N = 4096, H = 64, K = 3; 171 against 331 us at H = 256).
        k_in = w1.shape[-1] + packed.bias_column
        self.w1 = pool.take((*w1.shape[:-2], k_in, w1.shape[-2]), like).transpose(2, 3)
        if packed.bias_column:  # b1's gradient is W1's last column: one GEMM gives both
            self.b1 = self.w1[..., -1:].transpose(2, 3)
        else:
            self.b1 = pool.take(packed.b1.shape, like)
        # One (2, H, H) buffer per layer, not one (L, 2, H, H): glibc maps every allocation
        # above 32 MB afresh (page faults on each call), and the H x H gradients of a deep or
        # wide stack pass that (L = 100, H = 256: 52 MB; L = 8, H = 1024: 64 MB) while a
        # layer's stays below it. A training step at D = 4, H = 1024, L = 8, B = 1 ran at
        # 0.64x the reference with the one buffer, 1.02x with all memory from the heap.
        self.w2 = [pool.take((2, hidden, hidden), like) for _ in range(num_layers)]
        self.b2 = pool.take(packed.b2.shape, like)
        self.w3 = pool.take(packed.w3.shape, like)
        self.b3 = pool.take(packed.b3.shape, like)
        self.layers = list(
            zip(
                self.w1.unbind(0),
                self.b1.unbind(0),
                self.w2,
                self.b2.unbind(0),
                self.w3.unbind(0),
                self.b3.unbind(0),
            )
        )

    def unpacked(self, packed: Packed) -> list[Tensor]:
        """The gradients in :func:`layer_parameters` order and the parameters' full shapes."""
        num_layers, _, hidden, k_in = packed.w1.shape
        k1, k2 = packed.kept.shape[1], packed.w3.shape[2]
        dim, trans = packed.features, packed.trans
        scatter = Tensor.scatter_
        padding = packed.layouts.padding
        if padding is not None:
            # The padding entries' gradients are dropped: zeroed here, then added (not
            # written) at the gather index 0 they share with a real entry.
            self.w1[..., :k1].masked_fill_(padding.kept_mask[:, None, None, :], 0.0)
            self.w3.masked_fill_(padding.trans_mask[:, None, :, None], 0.0)
            self.b3.masked_fill_(padding.trans_mask[:, None, None, :], 0.0)
            scatter = Tensor.scatter_add_

        def zeros(shape: tuple[int, ...]) -> Tensor:
            return self.pool.take(shape, self.w1).zero_()

        w1 = zeros((num_layers, 2, hidden, packed.in_features))
        index = packed.inputs[:, None, None, :].expand(num_layers, 2, hidden, k_in)
        scatter(w1, 3, index, self.w1[..., :k_in])
        w3 = zeros((num_layers, 2, dim, hidden))
        scatter(w3, 2, trans[:, None, :, None].expand(num_layers, 2, k2, hidden), self.w3)
        b3 = zeros((num_layers, 2, dim))
        scatter(b3, 2, trans[:, None, :].expand(num_layers, 2, k2), self.b3[:, :, 0])
        # (L, 2, ...) -> 2 L views each, in (layer, net) order, then interleaved by kind.
        b1 = self.b1[:, :, 0].contiguous()  # the bias rows of the (L, 2, K, H) buffer
        per_kind = [kind.flatten(0, 1).unbind(0) for kind in (w1, b1, self.b2[:, :, 0], w3, b3)]
        per_kind.insert(2, [g for layer in self.w2 for g in layer.unbind(0)])  # per layer
        return [g for net in zip(*per_kind) for g in net]


def _layer_backward(packed, layout, i, G, gl, x1, x2, h1, h2, s, grads, gh1, gh2, GE, pool):
    """Backprop layer ``i``: ``G`` (N, D) becomes the gradient of the layer input, in place.

    ``layout``: the walk's :class:`StackLayout` (G's columns are in its order).

    x1: the first Linear's input (:func:`_first_input`: the kept half, the context, the bias
    column of ones, (N, K1 + E + 1), or the kept half alone, (N, 1)); x2 (N, K2): the
    transformed half; h1, h2 (2, N, H) and s (N, K2) its activations; ``grads`` a
    :class:`_Grads` or None; gh1, gh2 (2, N, H) workspaces; ``GE`` (N, E): the context gradient
    accumulated over layers, added to in place (None when unconditional, or when nothing wants
    the context's gradient); ``pool``: the :class:`BufferPool` of the layer's temporaries.
    """
    kept, trans = layout.kept[i], layout.trans[i]
    slope = packed.slope
    rows, width = G.shape[0], trans.index.shape[0]
    e = torch.exp(s, out=pool.take((rows, width), G))
    # go = (gs * (1 - s^2), g2) (2, N, K2); g2, the upstream gradient of z2, is read into go[1].
    go = pool.take((2, rows, width), G)
    g2 = go[1]
    if trans.start is None:
        torch.index_select(G, 1, trans.index, out=g2)
        gx2 = torch.mul(g2, e)  # put into G at the end
    else:  # g2 is a copy now, so gx2 = g2 e goes straight into G's own columns
        g2.copy_(trans.take(G))
        gx2 = torch.mul(g2, e, out=trans.take(G))
    torch.addcmul(gl[:, None], gx2, x2, out=go[0])  # gs = g2 x2 exp(s) + gl
    _tanh_backward.grad_input(go[0], s, grad_input=go[0])  # d tanh: (1 - s^2)
    v = packed.layers[i]
    torch.bmm(go, v.w3, out=gh2)
    _lrelu_backward.grad_input(gh2, h2, slope, True, grad_input=gh2)
    torch.bmm(gh2, _stacked_w2(v), out=gh1)
    _lrelu_backward.grad_input(gh1, h1, slope, True, grad_input=gh1)
    if grads is not None:
        w1, b1, w2, b2, w3, b3 = grads.layers[i]
        torch.bmm(go.transpose(1, 2), h2, out=w3)
        torch.sum(go, 1, keepdim=True, out=b3)
        # One batched GEMM for both nets: 2x faster than two mm(gh2_P^T, h1_P) at 256 x 64.
        torch.bmm(gh2.transpose(1, 2), h1, out=w2)
        torch.sum(gh2, 1, keepdim=True, out=b2)
        # W1's (and b1's) gradient, as (x1^T gh1)^T into _Grads' transposed buffer.
        torch.bmm(x1.expand(2, *x1.shape).transpose(1, 2), gh1, out=w1.transpose(1, 2))
        if not packed.bias_column:
            torch.sum(gh1, 1, keepdim=True, out=b1)
    # gx1 = g1 + sum_P ga1_P W1_P (module doc); G's halves are rewritten in place. Both nets'
    # products in one batched GEMM, then their sum: the output is K1 + E columns narrow, and
    # two mm (the second accumulating) ran 1.4x slower at N = 4096, H = 64 (a training step
    # at D = 2, C = 1 went from 13.4 to 12.7 ms). The context's columns only where its
    # gradient is wanted (``GE``); else W1's kept columns alone.
    k1 = kept.index.shape[0]
    w1_pair = packed.w1[i] if GE is not None else packed.w1[i, :, :, :k1]
    g_pair = torch.bmm(gh1, w1_pair, out=pool.take((2, rows, w1_pair.shape[2]), G))
    g_in = g_pair[0].add_(g_pair[1])  # (N, K1 + E) or (N, K1): the two nets' sum, in place
    if GE is not None:
        GE.add_(g_in[:, k1:])
        g_in = g_in[:, :k1]
    if kept.start is None:
        G.index_add_(1, kept.index, g_in)
    else:  # straight into G's kept columns (a view)
        kept.take(G).add_(g_in)
    if trans.start is None:
        trans.put_(G, gx2)


def _check_unmodified(params, versions) -> None:
    """Raise as autograd does when a parameter changed in place between forward and backward.

    The backward reads packed copies of the small weights and the H x H weights themselves:
    after an in-place update the two would disagree, and the gradient would be of neither.
    """
    for k, (p, version) in enumerate(zip(params, versions)):
        if p._version != version:
            layer, slot = divmod(k, PARAMS_PER_LAYER)
            net = "s" if slot < 6 else "t"
            name = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")[slot % 6]
            raise RuntimeError(
                f"one of the parameters needed for gradient computation has been modified by an "
                f"inplace operation: {net}.{layer}.{name} is at version {p._version}, expected "
                f"{version} (run backward before changing the parameters, e.g. before "
                "optimizer.step())"
            )


class _GemmStack(torch.autograd.Function):
    """``(x, *params) -> (z, log_det)`` over the whole stack; hand-written backward (module doc)."""

    @staticmethod
    def forward(ctx, model, setup, x, e, *tensors):
        kept, trans, slope, memory, anchor_every, tolerance, inter = setup
        num_params = PARAMS_PER_LAYER * kept.shape[0]
        params, extra = tensors[:num_params], list(tensors[num_params:])
        params = list(params)
        layouts = cached_layouts(model, kept, trans)
        packed = grad_pack(model, params, kept, trans, slope, layouts)
        layout = packed.walk_layout(inter)
        views = (
            interleaved.walk_views(inter, layout.order, extra, layout.padded)
            if inter is not None
            else None
        )
        pre_saved: list[list] = []
        batch_stats: list[tuple[Tensor, Tensor]] = []
        kept_i, trans_i = layout.kept, layout.trans
        num_layers = packed.num_layers
        z = layout.enter(x, copy=False)  # the autograd walk builds new states, never writes z
        pool = buffer_pool.shared()
        rows, width = x.shape[0], layout.trans[0].index.shape[0]
        log_det = _LogDet(pool.take((rows, width), x))
        tail = _input_tail(packed, x, e)
        saved: list[tuple[Tensor, ...]] = []
        anchors: list[Tensor] = []
        anchor_layers: tuple[int, ...] = ()
        if memory == "invertible":
            anchor_layers = (
                (0,) if anchor_every is None else tuple(range(0, num_layers, anchor_every))
            )
            ws1, ws2 = _workspaces(x, packed, pool=pool)
        on = _profiling()
        for i in range(num_layers):
            if i in anchor_layers:
                anchors.append(z)
            with _mark(on, i, "forward"):
                if inter is not None:
                    kept_for_backward = None if memory == "invertible" else []
                    z = interleaved.forward_step(
                        inter, i, z, views[i], kept_for_backward, batch_stats, pool=pool
                    )
                    if kept_for_backward is not None:
                        pre_saved.append(kept_for_backward)
                # Views of z for range halves: z is never written in place here.
                x1 = _first_input(kept_i[i].take(z), tail, pool)
                x2 = trans_i[i].take(z)
                o = pool.take((2, rows, width), x)
                with _mark(on, i, "conditioner"):
                    if memory == "invertible":
                        _, _, s, t = _nets(packed, i, x1, ws1, ws2, o=o)
                    else:
                        h1, h2 = _workspaces(x, packed, pool=pool)
                        h1, h2, s, t = _nets(packed, i, x1, h1, h2, o=o)
                if memory != "invertible":
                    saved.append((x1, x2, h1, h2, s))
                new = torch.exp(s, out=pool.take((rows, width), x))
                new = torch.addcmul(t, x2, new, out=new)
                # The last state is returned when it is in feature order: a new tensor then.
                last = i == num_layers - 1 and layout.restore is None
                z = trans_i[i].replaced(z, new, kept_i[i], None if last else pool.take(z.shape, z))
                log_det.add_(s)
        log_det = log_det.rows()
        keep = memory == "invertible"  # only the invertible walk inverts with them
        interleaved.finish_batch_stats(
            inter, batch_stats, x.shape[0], log_det, layout.restore, keep=keep
        )
        if not keep:
            batch_stats = []
        ctx.model = model
        ctx.packed = packed
        ctx.layout = layout
        ctx.embedded = e
        ctx.params = params
        ctx.inter, ctx.inter_tensors, ctx.inter_views = inter, extra, views
        # The interleaved tensors are built per call by autograd ops, which check their own
        # inputs' versions; the parameters read here directly are checked in backward.
        ctx.versions = [p._version for p in params]
        ctx.memory = memory
        ctx.anchor_layers = anchor_layers
        ctx.tolerance = tolerance
        # Through save_for_backward, so autograd frees them after backward (unless retained).
        ctx.num_anchors = len(anchors)
        # The interleaved layers' state: (N, D) inputs of the standard mode, the (D,) batch
        # statistics of BatchNorm in invertible mode.
        pre_flat = [] if inter is None else interleaved.flatten_saved(pre_saved)
        stats_flat = [t for pair in batch_stats for t in pair]
        ctx.num_pre, ctx.num_stats = len(pre_flat), len(stats_flat)
        ctx.save_for_backward(
            z, *anchors, *pre_flat, *stats_flat, *(t for layer in saved for t in layer)
        )
        return layout.leave(z), log_det

    @staticmethod
    @first_order
    def backward(ctx, grad_z, grad_log_det):
        packed: Packed = ctx.packed
        _check_unmodified(ctx.params, ctx.versions)
        inter = ctx.inter
        z, *rest = ctx.saved_tensors
        anchors, rest = rest[: ctx.num_anchors], rest[ctx.num_anchors :]
        pre_flat, rest = rest[: ctx.num_pre], rest[ctx.num_pre :]
        stats_flat, activations = rest[: ctx.num_stats], rest[ctx.num_stats :]
        pre_saved = None
        if inter is not None and ctx.memory != "invertible":
            pre_saved = interleaved.unflatten_saved(inter, pre_flat)
        batch_stats = [tuple(stats_flat[k : k + 2]) for k in range(0, len(stats_flat), 2)]
        n = z.shape[0]
        layout: StackLayout = ctx.layout
        pool = buffer_pool.shared()
        # G becomes grad_x: a pooled buffer only where leaving the walk's layout copies it.
        G = pool.take(z.shape, z) if layout.restore is not None else torch.empty_like(z)
        G = G.zero_() if grad_z is None else layout.enter(grad_z.contiguous(), out=G)
        gl = z.new_zeros(n) if grad_log_det is None else grad_log_det
        num_params = len(ctx.params)
        wants_params = any(ctx.needs_input_grad[4:])
        wants_grads = any(ctx.needs_input_grad[4 : 4 + num_params])
        grads = _Grads(packed, z, pool) if wants_grads else None
        inter_grads, inter_grad_views = [], None
        if inter is not None and wants_params:
            width = z.shape[1] if layout.padded else None  # the padding column's too
            inter_grads, inter_grad_views = interleaved.grad_buffers(
                inter, ctx.inter_tensors, width
            )
        gh1, gh2 = _workspaces(z, packed, pool=pool)
        num_layers = packed.num_layers
        e = ctx.embedded
        # The context's gradient, summed over layers, only where it is wanted (an embedding
        # net's output, a context that requires grad).
        GE = e.new_zeros(e.shape) if e is not None and ctx.needs_input_grad[3] else None
        if ctx.memory == "invertible":
            G = _invertible_walk(
                ctx, packed, z, anchors, G, gl, grads, gh1, gh2, e, GE, inter_grad_views,
                batch_stats,
            )  # fmt: skip
        else:
            on = _profiling()
            inter_sums = interleaved.backward_sums(inter, gl)
            for i in reversed(range(num_layers)):
                layer = activations[5 * i : 5 * i + 5]
                with _mark(on, i, "backward"):
                    _layer_backward(packed, layout, i, G, gl, *layer, grads, gh1, gh2, GE, pool)
                    if inter is not None:
                        G = interleaved.backward_step(
                            inter, i, G, inter_sums, ctx.inter_views[i], pre_saved[i],
                            inter_grad_views, pool,
                        )  # fmt: skip
        grad_x = layout.leave(G) if ctx.needs_input_grad[2] else None
        grad_e = GE if ctx.needs_input_grad[3] else None
        needs = ctx.needs_input_grad[4:]
        flat = [None] * num_params if grads is None else grads.unpacked(packed)
        flat = [g if need else None for g, need in zip(flat, needs)]
        if layout.restore is not None:  # written in the walk's column order
            inter_grads = [g.index_select(1, layout.restore) for g in inter_grads]
        extra = inter_grads or [None] * len(ctx.inter_tensors or [])
        extra = [g if need else None for g, need in zip(extra, needs[num_params:])]
        return (None, None, grad_x, grad_e, *flat, *extra)


def _invertible_walk(
    ctx, packed, z, anchors, G, gl, grads, gh1, gh2, e=None, GE=None, igrads=None, stats=()
):
    """Backward by inversion, from the output to the input (module doc); fills ``grads`` and
    returns the gradient of the stack input. Each step inverts its coupling, then its
    interleaved layers (``ctx.inter``; a ``batchnorm`` step with the statistics its forward
    kept)."""
    kept, trans = ctx.layout.kept, ctx.layout.trans
    inter, views = ctx.inter, ctx.inter_views
    stored = dict(zip(ctx.anchor_layers, anchors))
    sums = interleaved.backward_sums(inter, gl)
    pool = buffer_pool.shared()
    ws1, ws2 = _workspaces(z, packed, pool=pool)
    tail = _input_tail(packed, z, e)
    h = z.clone()
    errors: list[Tensor] = []
    anchor_errors: list[Tensor] = []
    on = _profiling()
    for i in reversed(range(packed.num_layers)):
        with _mark(on, i, "inverse"):
            # Copies, not views: h is rewritten in place below.
            x1 = _first_input(h.index_select(1, kept[i].index), tail, pool)
            z2 = h.index_select(1, trans[i].index)
            h1, h2, s, t = _nets(packed, i, x1, ws1, ws2)
            x2 = (z2 - t).mul_(torch.exp(-s))
            # Round trip of the transformed half: f(g(z)) against z.
            errors.append(_relative_error(torch.addcmul(t, x2, s.exp()), z2))
            trans[i].put_(h, x2)  # h: the coupling's input
            pre_saved: list = []
            bn_stats = stats[i] if inter is not None and inter.norm == "batchnorm" else None
            if inter is not None:
                h = interleaved.inverse_step(inter, i, h, views[i], bn_stats, pre_saved)
            if i in stored:
                anchor_errors.append(_relative_error(h, stored[i]))
                h = stored[i].clone()
                if inter is not None:  # replay the step's interleaved layers from the anchor
                    pre_saved = []
                    coupling_in = interleaved.forward_step(
                        inter, i, h, views[i], pre_saved, bn_stats
                    )
                    x2 = coupling_in.index_select(1, trans[i].index)
                else:
                    x2 = h.index_select(1, trans[i].index)
        with _mark(on, i, "backward"):
            _layer_backward(
                packed, ctx.layout, i, G, gl, x1, x2, h1, h2, s, grads, gh1, gh2, GE, pool
            )
            if inter is not None:
                G = interleaved.backward_step(inter, i, G, sums, views[i], pre_saved, igrads, pool)
    errors.reverse()
    anchor_errors.reverse()
    summary = torch.stack([*errors, *anchor_errors]).cpu()
    num_layers = packed.num_layers
    report = ReconstructionReport(
        summary[:num_layers].clone(), ctx.anchor_layers, summary[num_layers:].clone(), ctx.tolerance
    )
    ctx.model.last_reconstruction = report
    if not report.ok:
        raise ReconstructionError(_failure_message(report))
    return G


def run_forward(
    model,
    x: Tensor,
    kept: Tensor,
    trans: Tensor,
    slope: float,
    e: Tensor | None = None,
    *,
    grad: bool,
    memory: str = "standard",
    anchor_every: int | None = None,
    tolerance: float = 1e-3,
    batch_stats: bool = False,
) -> tuple[Tensor, Tensor]:
    """``model.f(x)`` on this executor.  x (N, D) -> (z (N, D), log_det (N,)).

    Args:
        model: a flow of standard layers (the plan has checked the executor's limits).
        kept, trans: (L, K1), (L, K2) int64 split indices of every layer, padded with D
            where the layers' halves differ in size (``FastRealNVP._stack_split``).
        slope: the shared LeakyReLU slope (>= 0).
        e: (N, E) embedded context of a conditional flow (its gradient is returned), or None.
        grad: build the autograd node (else the no-grad forward).
        memory, anchor_every, tolerance: the memory mode (module doc) and, for ``invertible``,
            the anchor spacing and the reconstruction tolerance.
        batch_stats: BatchNorm layers use batch statistics (the plan's call context).
    """
    inter = interleaved.prepare(model, "f", batch_stats=batch_stats)
    if not grad:
        with torch.no_grad():
            packed = cached_pack(model, kept, trans, slope)
            z, log_det = forward_no_grad(packed, x, e, inter, buffer_pool.shared())
    else:
        params = layer_parameters(model)
        extra = inter.tensors if inter is not None else []
        setup = (kept, trans, slope, memory, anchor_every, tolerance, inter)
        z, log_det = _GemmStack.apply(model, setup, x, e, *params, *extra)
    return z, log_det if inter is None else inter.add_log_det(log_det)


def run_inverse(
    model, z: Tensor, kept: Tensor, trans: Tensor, slope: float, e: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``model.g(z)`` without autograd.  z (N, D) -> (x (N, D), log|det dx/dz| (N,))."""
    with torch.no_grad():
        inter = interleaved.prepare(model, "g", batch_stats=False)
        packed = cached_pack(model, kept, trans, slope)
        x, log_det = inverse_no_grad(packed, z, e, inter, buffer_pool.shared())
        return x, log_det if inter is None else inter.add_log_det(log_det)


def cached_layouts(model, kept: Tensor, trans: Tensor) -> SplitLayouts:
    """The :class:`SplitLayouts` of the split ``kept``/``trans``, kept on the model: they
    depend only on the masks, so a training step does not rebuild them. Rebuilt when the
    split tensors are other objects or were changed in place. Entries equal to D
    (``model.dim``) are the padding column of unequal halves (``FastRealNVP._stack_split``)."""
    key = (kept._version, trans._version)
    cache = getattr(model, "_gemm_layouts", None)
    if cache is None or cache[0] is not kept or cache[1] is not trans or cache[2] != key:
        cache = (kept, trans, key, split_layouts(kept, trans, model.dim))
        model._gemm_layouts = cache
    return cache[3]


def cached_pack(model, kept: Tensor, trans: Tensor, slope: float) -> Packed:
    """:func:`pack` for calls without a gradient, kept on the model between calls.

    Rebuilt when a parameter may have changed (an optimizer step, fused or not, a
    ``load_state_dict``, ``.to()``: :mod:`fastnvp.engine.cache_keys`), so inference after
    training always sees the new weights.
    Packing costs about 20 small ops per layer, a third of a no-grad call at B = 256, H = 32.
    A pack's first call runs on the plain operands (the H x H pairs from the parameter bank or
    stacked where they run); its second call adds :func:`with_inference_operands`, a
    copy of the H x H weights, while they take at most :data:`CACHED_W2_MAX_BYTES`. That
    second call takes 0.2 ms (H = 64) to 0.5 ms (H = 256; 1.2 ms at B = 4096) longer at
    L = 8, which the faster calls repay after 2 to 8 of them
    (``benchmarks/inference_operands_ab.py``); a single call
    after each optimizer step (a training metric) does not pay it, and sampling or an
    evaluation loop on fixed weights runs 1.005-1.129x faster.
    """
    params = layer_parameters(model)
    key = (
        tensors_key(params),
        kept.data_ptr(),
        trans.data_ptr(),
        slope,
    )
    cache = getattr(model, "_gemm_pack", None)
    if cache is not None and cache[0] == key:
        packed, calls = cache[1], cache[2] + 1
        if calls == 2 and _copy_fits(params):
            packed = with_inference_operands(packed, bank_of(model, params))
        model._gemm_pack = (key, packed, calls)
        return packed
    layouts = cached_layouts(model, kept, trans)
    packed = pack(params, kept, trans, slope, layouts, bank=bank_of(model, params))
    model._gemm_pack = (key, packed, 1)
    return packed


def _copy_fits(params: list[Tensor]) -> bool:
    """Whether the H x H weights fit the inference operands' copy (CACHED_W2_MAX_BYTES)."""
    return sum(w.nelement() * w.element_size() for w in params[2::6]) <= CACHED_W2_MAX_BYTES
