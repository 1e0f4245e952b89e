"""Exact piecewise-linear form of a standard conditioner net with a single input feature.

When a coupling layer keeps one feature (every layer of a D = 2 flow, half the layers at D = 3),
its conditioner nets are functions of one scalar ``x``. The first hidden layer
``h1(x) = lrelu(x·w1 + b1)`` (H units) is then piecewise linear in ``x``: unit ``j`` changes
slope only where ``x·w1_j + b1_j = 0``, at the *knot* ``β_j = −b1_j / w1_j``. Between two
consecutive sorted knots every unit's gate (1 or the LeakyReLU slope ``a``) is fixed, so the
second layer's pre-activation is an affine function of ``x``::

    W2·h1(x) + b2 = A_k·x + C_k        for β_(k) <= x < β_(k+1),   k = 0..H

    A_0 = W2·(g0 ⊙ w1),   C_0 = W2·(g0 ⊙ b1) + b2      (g0: the gates as x -> -inf)
    A_k = A_(k-1) + (1 − a)·|w1_j|·W2[:, j]            (j: the unit whose knot is the k-th)
    C_k = C_(k-1) + (1 − a)·sign(w1_j)·b1_j·W2[:, j]

The table ``[A | C]`` of shape (H + 1, 2H) costs O(H²) to build (a sort and a cumulative sum),
once per layer and call, independent of the batch. Each row then costs a binary search, a
row gather, one FMA per unit, the second LeakyReLU and the (H -> K2) output layer: O(H) work
instead of the O(H²) of the H x H GEMM, which is what dominates the GEMM path (at H = 256 the
GEMM is about 98% of the FLOPs).

It is the same function, not an approximation: outputs differ from the GEMM form by rounding
only (the table is accumulated in float64 and rounded once, so it is usually the more accurate
of the two), and autograd through the table gives the same gradients almost everywhere (at a
knot both adjacent rows give the same value). The knot order is piecewise constant in the
weights, so it carries no gradient, exactly as the LeakyReLU's gate does not.

Without autograd one more level is tabulated (:func:`build_pieces`): inside interval k,
second-layer unit i changes its gate only at its zero crossing ``−C_ki / A_ki``, so the net's
whole output is affine between the first layer's knots and those crossings (about 2H pieces
per net at random initialisation). Each row is then a binary search and one multiply-add per
output. Tables built without autograd are cached (:class:`TableCache`).

When a layer takes this form is the plan's decision (``fastnvp.engine.plan.Policy``:
``knot_min_hidden``, ``knot_min_work_grad``).

Memory: the interval table is (H + 1)·2H values per net (0.5 MiB at H = 256 in fp32), and each
row reads one 2H slice of it. Limit: only layers with one kept feature; wider inputs make the
linear regions a hyperplane arrangement with far too many cells to tabulate.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastnvp.core.conditioner import StandardMLP
from fastnvp.engine.cache_keys import tensors_key
from fastnvp.engine.cpu.threads import over_shares
from fastnvp.engine.first_order import first_order

#: Rows per tile of :func:`evaluate_pair`, forward and backward: 512 x 2H fp32 gathered rows at
#: H = 256 are 1 MiB, the L2 of two cores.
TILE_ROWS = 512

#: Fewest rows per thread when :func:`evaluate_pair` splits rows across intra-op threads.
MIN_ROWS_PER_THREAD = 1024

#: Most pieces of a net in the piece form, per hidden unit (bounds its build's temporaries:
#: (P, H) float64 values); a net with more zero crossings keeps the interval form.
MAX_PIECES_PER_UNIT = 16

#: Bytes of knot tables a :class:`TableCache` keeps (a layer at H = 256 in fp32 takes 1 MiB).
CACHE_BUDGET = 64 * 1024 * 1024


class KnotTable(NamedTuple):
    """One conditioner net of a single-input layer in knot form.

    Attributes:
        knots: (H,) sorted knot positions ``−b1_j / w1_j`` (``+inf`` where ``w1_j = 0``).
        table: (H + 1, 2H) rows ``[A_k | C_k]``, in the weights' dtype.
        w3: (K2, H) output weight rows of the transformed features.
        b3: (K2,) their biases.
        slope: the LeakyReLU negative slope.
    """

    knots: torch.Tensor
    table: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor
    slope: float


def build(mlp: StandardMLP, kept: torch.Tensor, transformed: torch.Tensor) -> KnotTable:
    """The knot table of a standard net whose input is the single kept feature.

    Differentiable with respect to the net's parameters (autograd records the build).

    Args:
        mlp: the net's Linear layers and slope.
        kept: (1,) int64 index of the kept feature.
        transformed: (K2,) int64 indices of the transformed features.
    """
    if kept.numel() != 1:
        raise ValueError(f"kept must hold exactly one index, got {kept.numel()}")
    w1 = mlp.lin1.weight.index_select(1, kept).reshape(-1)
    knots, table = _BuildTable.apply(
        w1, mlp.lin1.bias, mlp.lin2.weight, mlp.lin2.bias, mlp.negative_slope
    )
    w3 = mlp.lin3.weight.index_select(0, transformed)
    b3 = mlp.lin3.bias.index_select(0, transformed)
    return KnotTable(knots, table, w3, b3, mlp.negative_slope)


class _Intervals(NamedTuple):
    knots: torch.Tensor  # (H,) float64, sorted (+inf for w1 = 0)
    order: torch.Tensor  # (H,) unit of each sorted knot
    gated: torch.Tensor  # (2, H) gates·w1 and gates·b1 as x -> -inf
    gates: torch.Tensor  # (H,)
    sign: torch.Tensor  # (H,) sign(w1)
    coef: torch.Tensor  # (2, H) (1 - a)·(|w1|, sign·b1) in knot order
    steps: torch.Tensor  # (2, H, H + 1) float64 scratch: [A | C] transposed, after the running sum


@torch.no_grad()
def _intervals(w1, b1, w2, b2, slope: float) -> _Intervals:
    """The affine form ``A_k·x + C_k`` of the second layer's pre-activation on every interval."""
    hidden = w1.numel()
    w1, b1 = w1.double(), b1.double()
    knots = torch.where(w1 != 0, -b1 / w1, torch.full_like(w1, float("inf")))
    knots, order = torch.sort(knots)
    # Gates as x -> -inf: a unit with w1 < 0 is then active; with w1 = 0 it is constant.
    active = (w1 < 0) | ((w1 == 0) & (b1 > 0))
    gates = torch.full_like(w1, slope).masked_fill_(active, 1.0)  # float64, exact slope
    gated = torch.stack((gates * w1, gates * b1))  # (2, H)
    sign = torch.sign(w1)
    coef = (1.0 - slope) * torch.stack((w1.abs(), sign * b1)).index_select(1, order)  # (2, H)
    # Transposed layout (2, H, H + 1): column 0 holds A_0 / C_0, column k the k-th knot's
    # step, so one running sum along the contiguous last dimension gives every interval
    # (torch's CPU cumsum is about 5x faster along the last dimension than the first).
    steps = scratch("build_steps", (2, hidden, hidden + 1), torch.float64)
    w2_64 = scratch("build_w2", (hidden, hidden), torch.float64)
    w2_64.copy_(w2)
    torch.mm(gated, w2_64.t(), out=steps[:, :, 0])  # A_0 and C_0 - b2
    steps[1, :, 0] += b2
    # Step k: the W2 column of the k-th knot's unit, scaled (float64 by promotion).
    # (gather with an expanded index: 3x faster than index_select along dim 1 here)
    columns = order.expand(hidden, hidden)
    w2_ordered = torch.gather(w2_64, 1, columns, out=scratch("build_w2o", w2_64.shape, w2_64.dtype))
    torch.mul(coef.unsqueeze(1), w2_ordered.unsqueeze(0), out=steps[:, :, 1:])
    steps.cumsum_(2)
    return _Intervals(knots, order, gated, gates, sign, coef, steps)


class _BuildTable(torch.autograd.Function):
    """``(knots, table)`` from ``w1, b1 (H,)``, ``W2 (H, H)``, ``b2 (H,)``; backward by hand.

    Built in float64 and rounded once to the weights' dtype. The backward maps the table's
    gradient ``G`` (H + 1, 2H) back with one reverse running sum ``R_k = Σ_(k' >= k) G_k'``
    (the gradient of the k-th step) and a few O(H²) products, instead of autograd's flips,
    concatenations and zero-filled slice gradients (about 3x slower, measured at H = 256).
    """

    @staticmethod
    def forward(ctx, w1, b1, w2, b2, slope):
        knots, table, saved = _table_forward(w1, b1, w2, b2, slope)
        ctx.save_for_backward(w2, *saved)
        ctx.slope = slope
        ctx.mark_non_differentiable(knots)
        return knots, table

    @staticmethod
    @first_order
    def backward(ctx, _grad_knots, grad_table):
        w2, *saved = ctx.saved_tensors
        return (*_table_backward(w2, saved, grad_table, ctx.slope), None)


class _BuildTables(torch.autograd.Function):
    """:class:`_BuildTable` for many nets at once, split across intra-op threads.

    Inputs: ``slope`` and, per net, ``w1, b1, w2, b2``; outputs, per net, ``knots, table``.
    With several threads each builds (and, in the backward, differentiates) a contiguous share
    of the nets with single-threaded ops: a flow's tables do not depend on the data, so a
    training step can build all of them up front and use both cores for the O(H²) work that
    otherwise runs layer by layer on one.
    """

    @staticmethod
    def forward(ctx, slope, *flat):
        nets = [flat[k : k + 4] for k in range(0, len(flat), 4)]

        @torch.no_grad()  # grad mode is per thread
        def share(first: int, last: int):
            return [_table_forward(*nets[k], slope) for k in range(first, last)]

        built = [b for part in over_shares(len(nets), share) for b in part]
        ctx.save_for_backward(*(net[2] for net in nets))
        ctx.saved = [saved for _, _, saved in built]
        ctx.slope = slope
        outputs = []
        for knots, table, _ in built:
            ctx.mark_non_differentiable(knots)
            outputs += [knots, table]
        return tuple(outputs)

    @staticmethod
    @first_order
    def backward(ctx, *grads):
        w2s, saved, slope = ctx.saved_tensors, ctx.saved, ctx.slope
        tables = grads[1::2]

        @torch.no_grad()
        def share(first: int, last: int):
            return [
                _table_backward(w2s[k], saved[k], tables[k], slope)
                if tables[k] is not None
                else (None, None, None, None)
                for k in range(first, last)
            ]

        out: list = [None]
        for part in over_shares(len(w2s), share):
            for grads_k in part:
                out += list(grads_k)
        return tuple(out)


def _table_forward(w1, b1, w2, b2, slope: float):
    """``(knots, table, saved)`` of one net; ``saved`` is what :func:`_table_backward` needs."""
    dtype = w2.dtype
    hidden = w1.numel()
    intervals = _intervals(w1, b1, w2, b2, slope)
    table = torch.empty((hidden + 1, 2 * hidden), dtype=dtype)
    table.copy_(intervals.steps.view(2 * hidden, hidden + 1).t())  # (H + 1, 2H), rounded once
    saved = (intervals.order, intervals.gated, intervals.gates, intervals.sign, intervals.coef)
    return intervals.knots.to(dtype).contiguous(), table, saved


def _table_backward(w2, saved, grad_table, slope: float):
    """``(d w1, d b1, d W2, d b2)`` of one net from the gradient of its table (H + 1, 2H)."""
    order, gated, gates, sign, coef = saved
    hidden = w2.shape[0]
    grad = scratch("build_grad", (2, hidden, hidden + 1), torch.float64)
    grad.view(2 * hidden, hidden + 1).copy_(grad_table.t())
    # Reverse running sum along the knots: R_k = total - (sum up to k) + G_k.
    reverse = scratch("build_reverse", (2, hidden, hidden + 1), torch.float64)
    torch.cumsum(grad, 2, out=reverse)
    torch.sub(grad.sum(2, keepdim=True), reverse, out=reverse).add_(grad)
    grad_row0 = reverse[:, :, 0]  # (2, H): d A_0, d C_0
    grad_steps = reverse[:, :, 1:]  # (2, H, H): d step_k
    columns = order.expand(hidden, hidden)
    w2_64 = scratch("build_w2", (hidden, hidden), torch.float64)
    w2_64.copy_(w2)
    w2_ordered = torch.gather(w2_64, 1, columns, out=scratch("build_w2o", w2_64.shape, w2_64.dtype))
    # d W2[:, unit of knot k] = Σ_c d step_k[c] · coef[c, k]; the A_0 / C_0 row adds an outer
    # product. d coef[c, k] = Σ_i d step_k[c, i] · W2[i, unit of knot k].
    grad_w2_ordered = scratch("build_gw2", (hidden, hidden), torch.float64)
    torch.mul(grad_steps[0], coef[0], out=grad_w2_ordered).addcmul_(grad_steps[1], coef[1])
    grad_w2 = torch.empty((hidden, hidden), dtype=torch.float64)
    grad_w2.scatter_(1, columns, grad_w2_ordered).addmm_(grad_row0.t(), gated)
    grad_coef = torch.stack(
        [torch.mul(grad_steps[c], w2_ordered, out=grad_w2_ordered).sum(0) for c in range(2)]
    )  # (2, H), knot order
    grad_gated = grad_row0 @ w2_64  # (2, H)
    grad_coef_units = torch.empty_like(grad_coef)
    grad_coef_units[:, order] = grad_coef
    scale = (1.0 - slope) * sign
    grad_w1 = gates * grad_gated[0] + scale * grad_coef_units[0]
    grad_b1 = gates * grad_gated[1] + scale * grad_coef_units[1]
    dtype = grad_table.dtype
    return (
        grad_w1.to(dtype),
        grad_b1.to(dtype),
        grad_w2.to(dtype),
        grad_row0[1].to(dtype, copy=True),  # not a view of the scratch buffer
    )


def build_many(nets: list[tuple[StandardMLP, torch.Tensor, torch.Tensor]]) -> list[KnotTable]:
    """:func:`build` for several nets ``(mlp, kept, transformed)`` sharing one slope, the O(H²)
    table work split across the intra-op threads (see :class:`_BuildTables`)."""
    slopes = {mlp.negative_slope for mlp, _, _ in nets}
    if len(slopes) != 1:
        raise ValueError(f"nets must share one LeakyReLU slope, got {sorted(slopes)}")
    (slope,) = slopes
    flat = []
    for mlp, kept, _ in nets:
        if kept.numel() != 1:
            raise ValueError(f"kept must hold exactly one index, got {kept.numel()}")
        w1 = mlp.lin1.weight.index_select(1, kept).reshape(-1)
        flat += [w1, mlp.lin1.bias, mlp.lin2.weight, mlp.lin2.bias]
    outputs = _BuildTables.apply(slope, *flat)
    tables = []
    for k, (mlp, _, transformed) in enumerate(nets):
        w3 = mlp.lin3.weight.index_select(0, transformed)
        b3 = mlp.lin3.bias.index_select(0, transformed)
        tables.append(KnotTable(outputs[2 * k], outputs[2 * k + 1], w3, b3, slope))
    return tables


_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread work buffer, reused across calls (contents undefined).

    Fresh multi-hundred-KB tensors are returned to the OS when freed and page-faulted back on
    the next allocation; in a VM that can cost more than the arithmetic on them (measured at
    H = 256: the reverse running sum of the build's backward, three ops on (2, H, H + 1)
    float64, took ~3-4 ms amid other allocations and ~0.35 ms on its own; with these buffers
    and gathers for the column permutations, the build's forward + backward went from 5.3 to
    3.7 ms).
    Callers must not keep a buffer beyond their own call, nor take the same name twice at once.
    """
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < math.prod(shape):
        buf = torch.empty(math.prod(shape), dtype=dtype)
        buffers[name] = buf
    return buf[: math.prod(shape)].view(shape)


class PieceTable(NamedTuple):
    """Both nets of a single-input layer as one piecewise-linear function of ``x`` (no autograd).

    Attributes:
        knots: (P,) sorted positions where either net's output changes slope: the first
            layers' finite knots and the second layers' zero crossings, of both nets.
        anchors: (P + 1,) a point of each piece: its left knot (the first piece: its right one).
        table: (P + 1, 4·K2) rows ``[S value | T value | S slope | T slope]`` at the anchor
            (S before its Tanh).
    """

    knots: torch.Tensor
    anchors: torch.Tensor
    table: torch.Tensor


@torch.no_grad()
def _net_pieces(mlp: StandardMLP, kept: torch.Tensor, transformed: torch.Tensor):
    """One net as ``(knots (P,), slopes (P + 1, K2), intercepts (P + 1, K2))`` in float64, or
    None past ``MAX_PIECES_PER_UNIT·H`` pieces. Piece ``p`` covers ``[knots[p-1], knots[p])``.

    Inside interval ``k`` of the first layer, second-layer unit ``i`` is ``A_ki·x + C_ki`` and
    changes its LeakyReLU gate only at its zero crossing ``−C_ki / A_ki`` if that falls inside
    the interval; the first layer's knots and these crossings split the line into pieces on
    which ``w3·lrelu(A_k·x + C_k) + b3`` is affine, with the gates of any interior point.
    """
    slope = mlp.negative_slope
    w1 = mlp.lin1.weight.index_select(1, kept).reshape(-1)
    intervals = _intervals(w1, mlp.lin1.bias, mlp.lin2.weight, mlp.lin2.bias, slope)
    slopes_a = intervals.steps[0].t().contiguous()  # (H + 1, H): A_k
    offsets_c = intervals.steps[1].t().contiguous()  # (H + 1, H): C_k
    inf = intervals.knots.new_full((1,), float("inf"))
    low = torch.cat((-inf, intervals.knots)).unsqueeze(1)
    high = torch.cat((intervals.knots, inf)).unsqueeze(1)
    crossing = -offsets_c / slopes_a  # A = 0: ±inf or nan, never strictly inside
    crossings = crossing[(crossing > low) & (crossing < high)]
    if crossings.numel() > MAX_PIECES_PER_UNIT * w1.numel():
        return None
    first = intervals.knots[torch.isfinite(intervals.knots)]
    knots = torch.sort(torch.cat((first, crossings))).values
    inside = _interior_points(knots)
    interval = torch.searchsorted(intervals.knots, inside)
    a_k, c_k = slopes_a.index_select(0, interval), offsets_c.index_select(0, interval)
    gate = torch.full_like(a_k, slope).masked_fill_(a_k * inside.unsqueeze(1) + c_k > 0, 1.0)
    w3 = mlp.lin3.weight.index_select(0, transformed).double()  # (K2, H)
    b3 = mlp.lin3.bias.index_select(0, transformed).double()
    return knots, (gate * a_k) @ w3.t(), torch.addmm(b3, gate * c_k, w3.t())


def _interior_points(knots: torch.Tensor) -> torch.Tensor:
    """(P + 1,) one point inside each piece cut by the sorted ``knots`` (P,)."""
    if knots.numel() == 0:
        return knots.new_zeros(1)
    return torch.cat((knots[:1] - 1, (knots[:-1] + knots[1:]) / 2, knots[-1:] + 1))


@torch.no_grad()
def build_pieces(
    s_mlp: StandardMLP, t_mlp: StandardMLP, kept: torch.Tensor, transformed: torch.Tensor
) -> PieceTable | None:
    """Both nets of a single-input layer, up to their output layers, as one piece table.

    Each net's pieces are computed in float64 (O(P·H), see :func:`_net_pieces`), then merged
    on the union of their knots with a common anchor per piece, so evaluating a row is one
    binary search, one row gather and one FMA per output. No autograd: for inference only.

    Returns:
        The table, or None when a net has more than ``MAX_PIECES_PER_UNIT·H`` pieces (then the
        interval form of :func:`build` is used).
    """
    if kept.numel() != 1:
        raise ValueError(f"kept must hold exactly one index, got {kept.numel()}")
    nets = [_net_pieces(mlp, kept, transformed) for mlp in (s_mlp, t_mlp)]
    if any(net is None for net in nets):
        return None
    dtype = s_mlp.lin2.weight.dtype
    knots = torch.sort(torch.cat([net[0] for net in nets])).values
    anchors = torch.cat((knots[:1], knots)) if knots.numel() else knots.new_zeros(1)
    # Anchors as stored (rounded to the weights' dtype), so evaluation is consistent with them.
    anchors = anchors.to(dtype).double()
    inside = _interior_points(knots)
    values, slopes = [], []
    for net_knots, net_slopes, net_intercepts in nets:
        piece = torch.searchsorted(net_knots, inside)
        slope = net_slopes.index_select(0, piece)
        values.append(torch.addcmul(net_intercepts.index_select(0, piece), slope, anchors[:, None]))
        slopes.append(slope)
    table = torch.cat(values + slopes, dim=1).to(dtype)
    return PieceTable(knots.to(dtype).contiguous(), anchors.to(dtype), table)


def evaluate_pieces(table: PieceTable, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tanh(S(x1)), T(x1))`` from a layer's piece table (no autograd).

    Args:
        table: the layer's :class:`PieceTable`.
        x1: (N, 1) the kept feature.

    Returns:
        ``s`` (N, K2) and ``t`` (N, K2) (views of one (N, 2·K2) result).
    """
    if x1.ndim != 2 or x1.shape[1] != 1:
        raise ValueError(f"x1 must have shape (N, 1), got {tuple(x1.shape)}")
    x = x1.reshape(-1).contiguous()
    piece = torch.searchsorted(table.knots, x)
    rows = table.table.index_select(0, piece)
    half = rows.shape[1] // 2
    offset = (x - table.anchors.index_select(0, piece)).unsqueeze(1)
    out = torch.addcmul(rows[:, :half], rows[:, half:], offset)
    k2 = half // 2
    return out[:, :k2].tanh_(), out[:, k2:]


class TableCache:
    """Knot tables of a flow's layers for calls without autograd, rebuilt when a weight changes.

    An entry is keyed on the storage address and version counter of each weight of the layer's
    two nets and of the split indices; in-place updates (optimizer steps, ``load_state_dict``,
    ``copy_`` under ``no_grad``) bump the version, so they are always seen. Writes through
    ``.data`` bypass version counters and are not seen: call :meth:`clear` after them.
    Layers are cached while the total stays within ``budget`` bytes; the others are rebuilt on
    every call. A deep copy or pickle of the cache is empty.

    Under autograd :meth:`prebuilt` lends, for the duration of one call on this thread, tables
    built for all layers at once (:func:`build_many`).
    """

    def __init__(self, budget: int = CACHE_BUDGET):
        self.budget = budget
        self._entries: dict[tuple[str, int], tuple[tuple, tuple | None, int]] = {}
        self._lent: dict[int, dict[int, tuple[KnotTable, KnotTable]]] = {}  # thread -> layers

    def __deepcopy__(self, memo):
        return TableCache(self.budget)

    def __getstate__(self):
        return {"budget": self.budget, "_entries": {}, "_lent": {}}

    @contextlib.contextmanager
    def prebuilt(self, tables: dict[int, tuple[KnotTable, KnotTable]]):
        """Serve ``tables`` (layer -> (S, T) tables, built with autograd) to :meth:`pair` on
        this thread while the block runs."""
        thread = threading.get_ident()
        self._lent[thread] = tables
        try:
            yield
        finally:
            self._lent.pop(thread, None)

    def clear(self) -> None:
        """Drop every cached table."""
        self._entries.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tables."""
        return sum(size for *_, size in self._entries.values())

    def pair(
        self,
        layer: int,
        s_mlp: StandardMLP,
        t_mlp: StandardMLP,
        kept: torch.Tensor,
        transformed: torch.Tensor,
    ) -> tuple[KnotTable, KnotTable]:
        """The interval tables of layer ``layer``'s scale and shift nets.

        Built fresh (and recorded by autograd) when grad mode is on and a weight requires a
        gradient; otherwise served from the cache, built on a miss.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in net_weights(s_mlp, t_mlp)):
            lent = self._lent.get(threading.get_ident(), {}).get(layer)
            if lent is not None:
                return lent
            return build(s_mlp, kept, transformed), build(t_mlp, kept, transformed)
        return self._cached(("intervals", layer), build, s_mlp, t_mlp, kept, transformed)

    def pieces(
        self,
        layer: int,
        s_mlp: StandardMLP,
        t_mlp: StandardMLP,
        kept: torch.Tensor,
        transformed: torch.Tensor,
    ) -> PieceTable | None:
        """The piece table of layer ``layer`` (cached), or None when a net has too many pieces
        (see :func:`build_pieces`)."""
        return self._cached(("pieces", layer), build_pieces, s_mlp, t_mlp, kept, transformed, True)

    def _cached(self, slot, builder, s_mlp, t_mlp, kept, transformed, joint=False):
        key = tensors_key(net_weights(s_mlp, t_mlp)) + (
            kept.data_ptr(),
            kept._version,
            transformed.data_ptr(),
        )
        entry = self._entries.get(slot)
        if entry is not None and entry[0] == key:
            return entry[1]
        # Plain tensors even under inference_mode, so a later autograd call may save them.
        with torch.inference_mode(False), torch.no_grad():
            if joint:
                tables = builder(s_mlp, t_mlp, kept, transformed)
                parts = [tables] if tables is not None else []
            else:
                tables = (builder(s_mlp, kept, transformed), builder(t_mlp, kept, transformed))
                parts = list(tables)
        size = sum(x.nbytes for t in parts for x in t if isinstance(x, torch.Tensor))
        others = self.nbytes - (entry[2] if entry is not None else 0)
        if others + size <= self.budget:
            self._entries[slot] = (key, tables, size)
        elif entry is not None:
            del self._entries[slot]
        return tables


def net_weights(s_mlp: StandardMLP, t_mlp: StandardMLP) -> list[torch.Tensor]:
    """The 12 weights and biases of a layer's two standard nets."""
    linears = (s_mlp.lin1, s_mlp.lin2, s_mlp.lin3, t_mlp.lin1, t_mlp.lin2, t_mlp.lin3)
    return [p for lin in linears for p in (lin.weight, lin.bias)]


def evaluate_pair(
    s_net: KnotTable, t_net: KnotTable, x1: torch.Tensor, tile_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tanh(S(x1)), T(x1))`` on the transformed features, from the two nets' knot tables.

    Differentiable in ``x1`` and in each table, ``w3`` and ``b3`` (hence, through :func:`build`,
    in every weight of both nets); the backward is first-order.

    Rows are processed in tiles of ``tile_rows`` through reused buffers, forward and backward, so
    the (tile, 2H) gathered rows and (tile, H) activations stay in cache and no multi-MB
    temporary is allocated per call (a fresh buffer's page faults cost as much as the arithmetic
    on it). Nothing of size (N, H) is saved for the backward: it gathers the rows again and
    recomputes the activations (one gather and one FMA per unit), keeping only the interval
    index (N,) per net and ``s`` (N, K2).

    Args:
        s_net, t_net: knot tables of the scale net (with Tanh) and the shift net.
        x1: (N, 1) the kept feature.
        tile_rows: rows per tile (>= 1); None for :data:`TILE_ROWS`.

    Returns:
        ``s`` (N, K2) and ``t`` (N, K2): ``lrelu(A_k·x1 + C_k) @ w3.T + b3``, with Tanh for
        ``s``, where ``k`` is each row's knot interval in that net.
    """
    if x1.ndim != 2 or x1.shape[1] != 1:
        raise ValueError(f"x1 must have shape (N, 1), got {tuple(x1.shape)}")
    if s_net.slope != t_net.slope:
        raise ValueError("s_net and t_net must share one LeakyReLU slope")
    if tile_rows is None:
        tile_rows = TILE_ROWS
    if not isinstance(tile_rows, int) or isinstance(tile_rows, bool) or tile_rows < 1:
        raise ValueError(f"tile_rows must be an int >= 1, got {tile_rows!r}")
    return _KnotPair.apply(x1, tile_rows, s_net.slope, *s_net[:4], *t_net[:4])


class _KnotPair(torch.autograd.Function):
    """Both conditioner nets of one layer from their knot tables; tiled forward and backward.

    With several intra-op threads and enough rows, the rows are split into one contiguous
    range per thread (``fastnvp.engine.cpu.threads``), each run through the same tile loop with
    single-threaded ops; the backward sums the per-thread table and ``w3`` gradients.
    """

    @staticmethod
    def forward(ctx, x1, tile_rows, slope, *nets_flat):
        nets = (nets_flat[:4], nets_flat[4:])  # (knots, table, w3, b3) per net
        x = x1.reshape(-1).contiguous()
        indices = [torch.searchsorted(knots, x) for knots, *_ in nets]
        n = x.shape[0]
        outs = [x1.new_empty((n, net[2].shape[0])) for net in nets]
        over_shares(
            n,
            lambda a, b: _forward_rows(x, indices, nets, outs, slope, tile_rows, a, b),
            MIN_ROWS_PER_THREAD,
        )
        s, t = outs
        s.tanh_()
        ctx.save_for_backward(x, s, *indices, nets[0][1], nets[0][2], nets[1][1], nets[1][2])
        ctx.tile_rows, ctx.slope = tile_rows, slope
        return s, t

    @staticmethod
    @first_order
    def backward(ctx, grad_s, grad_t):
        x, s, s_idx, t_idx, s_table, s_w3, t_table, t_w3 = ctx.saved_tensors
        needs = ctx.needs_input_grad  # x1, tile_rows, slope, then (knots, table, w3, b3) x 2
        n = x.shape[0]
        grad_x = x.new_zeros((n, 1)) if needs[0] else None
        grad_s_pre = grad_s * (1 - s * s)  # through the Tanh
        nets = ((grad_s_pre, s_idx, s_table, s_w3), (grad_t, t_idx, t_table, t_w3))
        wanted = [needs[4 + 4 * k : 6 + 4 * k] for k in range(2)]  # (table, w3) per net

        def rows(a: int, b: int):
            partial = []
            for (grad_out, idx, table, w3), (need_table, need_w3) in zip(nets, wanted, strict=True):
                grad_table = torch.zeros_like(table) if need_table else None
                grad_w3 = torch.zeros_like(w3) if need_w3 else None
                if grad_x is not None or need_table or need_w3:
                    _backward_rows(
                        x, idx, table, w3, grad_out, ctx.slope, ctx.tile_rows, a, b,
                        grad_x, grad_table, grad_w3,
                    )  # fmt: skip
                partial.append((grad_table, grad_w3))
            return partial

        per_range = over_shares(n, rows, MIN_ROWS_PER_THREAD)
        grads: list[torch.Tensor | None] = [grad_x, None, None]
        for k, (grad_out, *_) in enumerate(nets):
            summed = [_sum_parts([p[k][j] for p in per_range]) for j in range(2)]
            grad_b3 = grad_out.sum(0) if needs[6 + 4 * k] else None
            grads += [None, summed[0], summed[1], grad_b3]
        return tuple(grads)


def _sum_parts(parts: list) -> torch.Tensor | None:
    if parts[0] is None:
        return None
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


@torch.no_grad()  # grad mode is per thread: worker threads must turn it off themselves
def _forward_rows(x, indices, nets, outs, slope, tile_rows, first, last):
    """Rows ``first..last`` of both nets' outputs into ``outs``, tile by tile."""
    hidden = nets[0][1].shape[1] // 2
    rows = max(1, min(tile_rows, last - first))
    gathered = x.new_empty((rows, 2 * hidden))
    h_buf = x.new_empty((rows, hidden))
    column = x.unsqueeze(1)
    for start in range(first, last, rows):
        stop = min(start + rows, last)
        g, h = gathered[: stop - start], h_buf[: stop - start]
        for (_, table, w3, b3), idx, out in zip(nets, indices, outs, strict=True):
            torch.index_select(table, 0, idx[start:stop], out=g)
            torch.addcmul(g[:, hidden:], g[:, :hidden], column[start:stop], out=h)
            F.leaky_relu(h, slope, inplace=True)
            torch.addmm(b3, h, w3.t(), out=out[start:stop])


@torch.no_grad()
def _backward_rows(
    x, idx, table, w3, grad_out, slope, tile_rows, first, last, grad_x, grad_table, grad_w3
):
    """Accumulate one net's gradients over rows ``first..last``, tile by tile, into ``grad_x``
    (N, 1), ``grad_table`` (H + 1, 2H) and ``grad_w3`` (K2, H), each None when not wanted.

    Per tile: gather ``[A_k | C_k]`` again, recompute ``pre = A_k·x + C_k``; then
    ``d pre = (d out @ w3) · lrelu'(pre)``, ``d x = Σ_j d pre_j · A_kj``,
    ``d [A_k | C_k] += [d pre · x | d pre]`` (index_add over the rows of each interval) and
    ``d w3 += d out^T @ lrelu(pre)``.
    """
    hidden = table.shape[1] // 2
    rows = max(1, min(tile_rows, last - first))
    gathered = x.new_empty((rows, 2 * hidden))
    pre_buf = x.new_empty((rows, hidden))
    grad_h_buf = x.new_empty((rows, hidden))
    grad_rows_buf = x.new_empty((rows, 2 * hidden))
    dot_buf = x.new_empty((rows,))
    column = x.unsqueeze(1)
    for start in range(first, last, rows):
        stop = min(start + rows, last)
        m = stop - start
        g, pre, grad_h, grad_rows = gathered[:m], pre_buf[:m], grad_h_buf[:m], grad_rows_buf[:m]
        col = column[start:stop]
        torch.index_select(table, 0, idx[start:stop], out=g)
        torch.addcmul(g[:, hidden:], g[:, :hidden], col, out=pre)
        torch.mm(grad_out[start:stop], w3, out=grad_h)
        grad_pre = grad_rows[:, hidden:]  # d C_k is d pre itself
        torch.ops.aten.leaky_relu_backward.grad_input(
            grad_h, pre, slope, False, grad_input=grad_pre
        )
        if grad_x is not None:
            torch.mul(grad_pre, g[:, :hidden], out=grad_h)
            torch.sum(grad_h, 1, out=dot_buf[:m])
            grad_x[start:stop, 0] += dot_buf[:m]
        if grad_table is not None:
            torch.mul(grad_pre, col, out=grad_rows[:, :hidden])
            grad_table.index_add_(0, idx[start:stop], grad_rows)
        if grad_w3 is not None:
            F.leaky_relu(pre, slope, inplace=True)
            grad_w3.addmm_(grad_out[start:stop].t(), pre)
