"""CPU path of the standard conditioner pair (S, T) on the split halves of one coupling layer.

Same function as the two standard MLPs (docs/design.md §1.3) restricted to the kept input
columns and the transformed output rows::

    h_s = lrelu(x1 @ W1s[:, kept].T + b1s)       h_t = lrelu(x1 @ W1t[:, kept].T + b1t)
    h_s = lrelu(h_s @ W2s.T + b2s)               h_t = lrelu(h_t @ W2t.T + b2t)
    s   = tanh(h_s @ W3s[trans].T + b3s[trans])  t   = h_t @ W3t[trans].T + b3t[trans]

Why it is faster than calling the modules (measured with ``fastnvp bench``, see the commit log):

- every Linear is one ``addmm`` with the bias folded in, and every LeakyReLU runs in place on the
  GEMM's fresh output, so no (N, H) temporary is allocated for an activation (a fresh multi-MB
  buffer costs page faults on every call, comparable to the elementwise work itself);
- without autograd, the rows are processed in tiles of :data:`TILE_ROWS` through all three
  Linears of both nets, so the (tile, H) activations stay in L2 between the GEMMs instead of
  making a round trip to DRAM, and the tile buffers are reused;
- without autograd, the first Linears of S and T (same input ``x1``) are one GEMM against the
  concatenated (2H, K1) weight.

Under autograd the first Linears stay separate: the backward of a split of one (N, 2H) output
concatenates the two gradients, an extra (N, 2H) pass that costs more than the saved call.
The H x H weights are used through transposed views, never copied; the small gathers
(``W1[:, kept]``, ``W3[trans]``) are rebuilt on every call, so parameter updates are always seen.
Gradients are the plain autograd gradients of these ops, i.e. those of the reference.

Whole-stack inference (:func:`rows_parallel`): without autograd the rows of a flow are
independent through all L layers, so ``FastRealNVP.f`` / ``g`` split the batch into one
contiguous chunk per intra-op thread and run every chunk through the whole stack on its own
thread with single-threaded GEMMs. One synchronisation per call replaces the two-thread barriers
of every GEMM and elementwise op (thousands per call at L = 50, each one a scheduling wait when
the cores are shared), and each core keeps its own tile in its own L2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastnvp.core.conditioner import StandardMLP, standard_weights
from fastnvp.engine.cpu.threads import on_threads
from fastnvp.engine.first_order import first_order

#: Rows per tile in the no-grad path. 512 rows x 2H fp32 at H = 256 is 1 MiB of activations per
#: tile, the L2 of two cores; measured fastest among 256 / 512 / 1024 / untiled at H = 256.
TILE_ROWS = 512


def _lrelu_(h: torch.Tensor, slope: float) -> torch.Tensor:
    # In place is autograd-safe only for slope > 0: its backward reads the sign from the output.
    if slope > 0 or not torch.is_grad_enabled() or not h.requires_grad:
        return F.leaky_relu(h, slope, inplace=True)
    return F.leaky_relu(h, slope)


def standard_st(
    s_mlp: StandardMLP,
    t_mlp: StandardMLP,
    x1: torch.Tensor,
    kept: torch.Tensor,
    transformed: torch.Tensor,
    tile_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of a standard conditioner pair on the split halves.

    Args:
        s_mlp, t_mlp: the matched scale (with Tanh) and shift nets of one layer.
        x1: (N, K1) kept half of the layer's input.
        kept: (K1,) int64 indices of the kept features.
        transformed: (K2,) int64 indices of the transformed features.
        tile_rows: rows per tile in the no-grad path (>= 1); None for :data:`TILE_ROWS`.

    Returns:
        ``s`` (N, K2) = tanh of the scale net's transformed outputs, ``t`` (N, K2).
    """
    if tile_rows is None:
        tile_rows = TILE_ROWS
    if not isinstance(tile_rows, int) or isinstance(tile_rows, bool) or tile_rows < 1:
        raise ValueError(f"tile_rows must be an int >= 1, got {tile_rows!r}")
    if x1.ndim != 2 or x1.shape[1] != kept.numel():
        raise ValueError(
            f"x1 must have shape (N, {kept.numel()}) (one column per kept feature), "
            f"got {tuple(x1.shape)}"
        )
    if s_mlp.negative_slope != t_mlp.negative_slope:
        raise ValueError("s_mlp and t_mlp must share one LeakyReLU slope")
    slope = s_mlp.negative_slope
    sw = standard_weights(s_mlp, kept, transformed)
    tw = standard_weights(t_mlp, kept, transformed)
    needs_grad = torch.is_grad_enabled() and (
        x1.requires_grad or any(p.requires_grad for p in (*sw, *tw))
    )
    if needs_grad:
        return _autograd_pair(sw, tw, x1, slope)
    return _tiled_pair(sw, tw, x1, slope, tile_rows)


def _autograd_pair(sw, tw, x1: torch.Tensor, slope: float):
    outs = []
    for w1, b1, w2, b2, w3, b3 in (sw, tw):
        h = _lrelu_(torch.addmm(b1, x1, w1.t()), slope)
        h = _lrelu_(torch.addmm(b2, h, w2.t()), slope)
        outs.append(torch.addmm(b3, h, w3.t()))
    return torch.tanh(outs[0]), outs[1]


def _tiled_pair(sw, tw, x1: torch.Tensor, slope: float, tile_rows: int):
    w1s, b1s, w2s, b2s, w3s, b3s = sw
    w1t, b1t, w2t, b2t, w3t, b3t = tw
    hidden = w2s.shape[0]
    n = x1.shape[0]
    x1 = x1.contiguous()
    w1 = torch.cat((w1s, w1t)).t()  # (K1, 2H): both first Linears in one GEMM
    b1 = torch.cat((b1s, b1t))
    w2s_t, w2t_t, w3s_t, w3t_t = w2s.t(), w2t.t(), w3s.t(), w3t.t()
    k2 = w3s.shape[0]
    s = x1.new_empty((n, k2))
    t = x1.new_empty((n, k2))
    rows = min(tile_rows, n)
    h1_buf = x1.new_empty((rows, 2 * hidden))
    hs_buf = x1.new_empty((rows, hidden))
    ht_buf = x1.new_empty((rows, hidden))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        m = stop - start
        h1, hs, ht = h1_buf[:m], hs_buf[:m], ht_buf[:m]
        torch.addmm(b1, x1[start:stop], w1, out=h1)
        F.leaky_relu(h1, slope, inplace=True)
        torch.addmm(b2s, h1[:, :hidden], w2s_t, out=hs)
        F.leaky_relu(hs, slope, inplace=True)
        torch.addmm(b2t, h1[:, hidden:], w2t_t, out=ht)
        F.leaky_relu(ht, slope, inplace=True)
        torch.addmm(b3s, hs, w3s_t, out=s[start:stop])
        torch.addmm(b3t, ht, w3t_t, out=t[start:stop])
    return s.tanh_(), t


def rows_parallel(model, x: torch.Tensor, e: torch.Tensor | None, run_chunk):
    """Run ``model.f(x)`` (or ``model.g(x)``) as one chunk of rows per intra-op thread.

    The plan (``fastnvp.engine.plan``, stack ``rows_parallel``) has decided that it applies:
    a CPU fp32/fp64 state, standard layers on the CPU paths, no checks or autocast, several
    threads and at least ``2 * Policy.min_rows_per_thread`` rows. Each worker runs its chunk
    with ``run_chunk``, which executes the sub-plan chosen for the chunk inside a worker (a
    worker never splits again). When a gradient is needed (``f`` with ``memory="standard"``):
    one autograd graph per chunk, backward on the threads too, parameter gradients summed
    (first-order).

    The workers run with one intra-op thread (``torch.set_num_threads(1)``; the caller's
    setting is restored before returning) and the caller's grad / inference mode.

    Args:
        model: the FastRealNVP.
        x: (N, D) input of ``f`` (or ``g``).
        e: (N, E) embedded context of a conditional flow (split with the rows), or None.
        run_chunk: ``((n, D) tensor, (n, E) tensor or None) -> (out, log_det)`` on the
            worker's thread.

    Returns:
        ``(out (N, D), log_det (N,))``.
    """
    threads = torch.get_num_threads()
    per_thread = model.policy.min_rows_per_thread
    count = max(1, min(threads, x.shape[0] // per_thread))
    chunks = x.tensor_split(count)
    e_chunks = e.tensor_split(count) if e is not None else [None] * count
    grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (e is not None and e.requires_grad)
        or any(p.requires_grad for p in model.parameters())
    )
    if grad:
        params = [p for p in model.parameters() if p.requires_grad]
        return _RowParallelForward.apply(run_chunk, count, x, e, *params)
    inference = torch.is_inference_mode_enabled()

    def run(k: int):
        mode = torch.inference_mode() if inference else torch.no_grad()
        with mode:
            return run_chunk(chunks[k], e_chunks[k])

    results = on_threads(run, count)
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


class _RowParallelForward(torch.autograd.Function):
    """``f`` of a flow as one autograd graph per chunk of rows, each built on its own thread.

    Forward runs ``f`` on every chunk with grad enabled (detached, grad-requiring copies of the
    chunk and its context rows as inputs); backward runs ``torch.autograd.grad`` of every
    chunk's graph on its own thread and sums the parameter gradients. First-order only.
    """

    @staticmethod
    def forward(ctx, fn, count: int, x: torch.Tensor, e, *params: torch.Tensor):
        chunks = x.detach().tensor_split(count)
        e_chunks = e.detach().tensor_split(count) if e is not None else [None] * count
        wants_x = ctx.needs_input_grad[2]
        wants_e = e is not None and ctx.needs_input_grad[3]

        def run(k: int):
            with torch.enable_grad():
                xc = chunks[k].detach().requires_grad_(wants_x)
                ec = e_chunks[k]
                if ec is not None:
                    ec = ec.detach().requires_grad_(wants_e)
                z, log_det = fn(xc, ec)
            return xc, ec, z, log_det

        graphs = on_threads(run, count)
        ctx.graphs = graphs
        ctx.params = params
        ctx.wants = (wants_x, wants_e)
        return (
            torch.cat([g[2].detach() for g in graphs]),
            torch.cat([g[3].detach() for g in graphs]),
        )

    @staticmethod
    @first_order
    def backward(ctx, grad_z, grad_log_det):
        graphs, params = ctx.graphs, ctx.params
        wants_x, wants_e = ctx.wants
        sizes = [g[2].shape[0] for g in graphs]
        gz = grad_z.split(sizes) if grad_z is not None else [None] * len(graphs)
        gl = grad_log_det.split(sizes) if grad_log_det is not None else [None] * len(graphs)

        def run(k: int):
            xc, ec, z, log_det = graphs[k]
            outs, grads = [], []
            for out, grad in ((z, gz[k]), (log_det, gl[k])):
                if grad is not None:
                    outs.append(out)
                    grads.append(grad)
            inputs = ([xc] if wants_x else []) + ([ec] if wants_e else []) + list(params)
            return torch.autograd.grad(outs, inputs, grads, retain_graph=True, allow_unused=True)

        per_chunk = on_threads(run, len(graphs))
        offset = int(wants_x) + int(wants_e)

        def joined(j: int, which: int):
            """Chunk gradients of input ``which`` (0: x, 1: e), zeros where it was unused."""
            parts = [
                g[j] if g[j] is not None else torch.zeros_like(graphs[k][which])
                for k, g in enumerate(per_chunk)
            ]
            return torch.cat(parts)

        grad_x = joined(0, 0) if wants_x else None
        grad_e = joined(int(wants_x), 1) if wants_e else None
        grad_params = []
        for j in range(len(params)):
            parts = [g[offset + j] for g in per_chunk if g[offset + j] is not None]
            grad_params.append(torch.stack(parts).sum(0) if parts else None)
        return (None, None, grad_x, grad_e, *grad_params)
