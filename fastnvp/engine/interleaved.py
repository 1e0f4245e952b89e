"""The interleaved layers of a flow in the engine's own forms (docs/design.md §1.8, §3.2).

Step ``i`` runs a norm and a mixing layer before coupling ``i`` (``fastnvp.core.interleave``).
The CPU GEMM stack runs them inside its one autograd node, and the layer loop without a gradient
(knot pieces, fused layers) between its couplings, in one of four forms:

=============  =========================================  =========================================
form           forward (data -> latent), per row          backward (G: upstream gradient (N, D))
=============  =========================================  =========================================
``affine``     y = x * scale + shift                      gx = G scale, gscale = Σ_r G x,
                                                          gshift = Σ_r G
``batchnorm``  c = x - μ_B, y = c a + β with              gx = a (G - mean_r G) - c (a Σ_r G c
               a = γ inv_std, inv_std = (σ²_B + ε)^-½,    + Σ_r gl) / (N (σ²_B + ε)),
               log-det -½ Σ log(σ²_B + ε) per row         gγ = inv_std Σ_r G c, gβ = Σ_r G
``permutation``  y = x[:, index]                          gx = G[:, argsort(index)]
``linear``     y = x W^T                                  gx = G W, gW = G^T x
=============  =========================================  =========================================

ActNorm is ``affine`` with ``scale = exp(log_scale)``; BatchNorm is ``batchnorm`` where it uses
batch statistics (``f`` in train mode) and ``affine`` with the running statistics otherwise;
the LU layer is ``linear`` with ``W = (L U)[row_order]``. The per-call tensors (scale, shift,
γ = exp(log γ), β, W; one (L, ...) stack per kind) are built once per call *outside* the node
with autograd (:func:`prepare`), so the node returns their gradients and autograd carries them
to the layers' parameters; the part of the log-determinant that depends only on parameters
(Σ log_scale, Σ log γ, Σ log|u_ii|) is added outside too. The ``batchnorm`` term
-½ Σ log(σ²_B + ε) depends on the batch and is the node's; its gradient is the last term of gx.

A ``batchnorm`` step's log-det term and running-average update are done once for all layers
after the walk (:func:`finish_batch_stats`: a few batched ops instead of a few per layer). In
invertible memory mode it keeps its batch mean and variance, (D,) each, to invert
(docs/design.md §5). ``linear`` inverts with W^-1 of every layer, built once per call from the
LU factors by two batched triangular solves (:meth:`Interleave.inverse_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastnvp.core.mixing import LULinear, Permutation, permute_columns
from fastnvp.core.normalization import ActNorm, BatchNorm
from fastnvp.engine.cache_keys import tensors_key
from fastnvp.engine.first_order import first_order


@dataclass
class Interleave:
    """The interleaved layers of one call, in the forms the node runs (module docstring).

    Attributes:
        num_layers: L.
        norm: ``"affine"``, ``"batchnorm"`` or None (the form of every step's norm layer).
        mix: ``"permutation"``, ``"linear"`` or None (the form of every step's mixing layer).
        tensors: the node's extra inputs, stacked over layers: ``affine``: scale, shift (L, D);
            ``batchnorm``: γ, β (L, D); then ``linear``: W (L, D, D).
        log_det: 0-d differentiable tensor, the parameter-only log-determinant of all the
            interleaved layers in the call's direction, or None.
        index, inverse_index: per layer, its (D,) int64 permutation and the inverse one
            (``permutation``), else None.
        reversal: per layer, whether its permutation is D-1, ..., 0 (applied by ``flip``).
        modules: the BatchNorm modules (running averages; ``batchnorm``), else [].
        eps: per-layer ε of the BatchNorm modules.
    """

    num_layers: int
    norm: str | None
    mix: str | None
    tensors: list[Tensor]
    log_det: Tensor | None
    index: tuple[Tensor, ...] | None = None
    inverse_index: tuple[Tensor, ...] | None = None
    reversal: list[bool] = field(default_factory=list)
    modules: list[BatchNorm] = field(default_factory=list)
    eps: list[float] = field(default_factory=list)
    factors: tuple[Tensor, Tensor, Tensor] | None = None  # LU: L, U (L, D, D), row order (L, D)
    _inverse: Tensor | None = None
    _eps_values: tuple[Tensor, ...] | None = None
    _own_views: list[dict[str, Tensor]] | None = None
    _walk_views: tuple[Tensor | None, bool, list[dict[str, Tensor]]] | None = None  # order, padded

    def views(self, tensors: list[Tensor]) -> list[dict[str, Tensor]]:
        """Per layer, the node's copies of :attr:`tensors` as ``{name: (D,) or (D, D)}``."""
        names = []
        if self.norm == "affine":
            names += ["scale", "shift"]
        elif self.norm == "batchnorm":
            names += ["gamma", "beta"]
        if self.mix == "linear":
            names.append("weight")
        per_name = [t.unbind(0) for t in tensors]
        return [{n: rows[i] for n, rows in zip(names, per_name)} for i in range(self.num_layers)]

    def layer_views(self) -> list[dict[str, Tensor]]:
        """:meth:`views` of :attr:`tensors` itself, made once (a cached form serves many calls)."""
        if self._own_views is None:
            self._own_views = self.views(self.tensors)
        return self._own_views

    def eps_values(self) -> tuple[Tensor, ...]:
        """Per layer, :attr:`eps` as a 0-d tensor of the layers' dtype (made once)."""
        if self._eps_values is None:
            like = self.tensors[0]
            values = torch.tensor(self.eps, dtype=like.dtype, device=like.device)
            self._eps_values = values.unbind(0)
        return self._eps_values

    def add_log_det(self, log_det: Tensor) -> Tensor:
        """``log_det`` (N,) plus the parameter-only log-det of the layers (if any)."""
        return log_det if self.log_det is None else log_det + self.log_det.to(log_det.dtype)

    def inverse_weights(self) -> Tensor:
        """W^-1 of every ``linear`` layer, (L, D, D), computed once per call (no autograd)
        from the LU factors, ``U^-1 L^-1 P^T`` (two batched triangular solves: better
        conditioned than inverting W)."""
        if self._inverse is None:
            lower, upper, order = self.factors
            with torch.no_grad():
                eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
                p_t = eye[order].transpose(1, 2)  # W = P L U with P = eye[row_order]
                m = torch.linalg.solve_triangular(
                    lower.detach(), p_t, upper=False, unitriangular=True
                )
                self._inverse = torch.linalg.solve_triangular(upper.detach(), m, upper=True)
        return self._inverse


def _stack(values) -> Tensor:
    return torch.stack(list(values))


def prepare(model, direction: str, batch_stats: bool) -> Interleave | None:
    """The :class:`Interleave` of a call on ``model`` (None without interleaved layers).

    ``batch_stats``: BatchNorm layers normalize with batch statistics (``f`` in train mode).
    Built with autograd: differentiable in the layers' parameters. Without a gradient the
    result is cached on the model (``_interleave_cache``) and rebuilt when a parameter or
    buffer of the layers changes (version counters), so repeated inference (sampling, a
    validation loop) pays neither the stacking nor an LU layer's W^-1 again.
    """
    norms = getattr(model, "norms", None)
    mixes = getattr(model, "permutations", None)
    if norms is None and mixes is None:
        return None
    if torch.is_grad_enabled():
        return _prepare(model, norms, mixes, direction, batch_stats)
    # Every parameter and buffer of the layers, read from each layer's own dicts (the layers
    # have no children): 2.7 us for 8 ActNorm layers, against 15 us for a state_dict.
    tensors = [
        t
        for layers in (norms, mixes)
        if layers is not None
        for layer in layers
        for t in (*layer._parameters.values(), *layer._buffers.values())
    ]
    # BatchNorm's eps is a plain attribute, which no version counter sees: part of the key.
    eps = tuple(m.eps for m in norms) if norms is not None and norms[0].kind == "batchnorm" else ()
    key = (direction, batch_stats, eps, *tensors_key(tensors))
    cache = getattr(model, "_interleave_cache", None) or {}
    if key not in cache:
        # One entry per (direction, statistics): a sampling loop and a log_prob loop alternate.
        cache = {k: v for k, v in cache.items() if k[2:] == key[2:]}
        cache[key] = _prepare(model, norms, mixes, direction, batch_stats)
        model._interleave_cache = cache
    return cache[key]


def _prepare(model, norms, mixes, direction: str, batch_stats: bool) -> Interleave:
    sign = 1.0 if direction == "f" else -1.0
    tensors: list[Tensor] = []
    terms: list[Tensor] = []
    inter = Interleave(model.num_layers, None, None, tensors, None)
    if norms is not None:
        first = norms[0]
        if isinstance(first, BatchNorm) and batch_stats:
            inter.norm = "batchnorm"
            inter.modules = list(norms)
            inter.eps = [m.eps for m in norms]
            log_gamma = _stack(m.log_gamma for m in norms)
            tensors += [log_gamma.exp(), _stack(m.beta for m in norms)]
            terms.append(log_gamma.sum())
        else:
            inter.norm = "affine"
            if isinstance(first, ActNorm):
                log_scale = _stack(m.log_scale for m in norms)
                scale, shift = log_scale.exp(), _stack(m.shift for m in norms)
                terms.append(log_scale.sum())
            else:  # BatchNorm with its running statistics: a fixed per-feature affine map
                pairs = [m.scale_shift() for m in norms]
                scale, shift = _stack(p[0] for p in pairs), _stack(p[1] for p in pairs)
                terms.append(scale.log().sum())
            tensors += [scale, shift]
    if mixes is not None:
        if isinstance(mixes[0], Permutation):
            # Each layer's own buffers, read from its dict: ``Module.__getattr__`` costs about
            # 1 us a read, more than the rest of this branch.
            inter.mix = "permutation"
            inter.index = tuple(m._buffers["index"] for m in mixes)
            inter.inverse_index = tuple(m._buffers["inverse_index"] for m in mixes)
            inter.reversal = [m.is_reversal for m in mixes]
        else:
            inter.mix = "linear"
            weight, log_det, inter.factors = _lu_weights(mixes, _kept_lu_rows(model, mixes))
            tensors.append(weight)
            terms.append(log_det)
    if terms:
        total = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        inter.log_det = total if sign > 0 else -total
    return inter


def _lu_weights(layers: list[LULinear], rows: _LURows | None = None):
    """W of every LU layer at once, (L, D, D), their log-determinant Σ log|u_ii| (0-d) and
    their factors (L, U, row order): a few batched ops instead of a few per layer, in one
    autograd node (:class:`_LUWeights`). ``rows``: the layers' :class:`_LURows` (built here
    when not given)."""
    rows = _lu_rows(layers) if rows is None else rows
    count = len(layers)
    params = [m.lower for m in layers] + [m.upper for m in layers]
    params += [m.log_abs_diag for m in layers]
    weight, log_det, lower, upper = _LUWeights.apply(rows, count, *params)
    return weight, log_det, (lower, upper, rows.order)


@dataclass(frozen=True)
class _LURows:
    """What the LU layers' buffers give the weights node, built once per buffer version
    (:func:`_kept_lu_rows`): ``order`` (L, D), each layer's row order; ``sign`` (L, D);
    ``gather`` and ``scatter`` (L D,) int64, the rows of the (L D, D) stack of the unit
    lower factors that make P L (``order`` offset by D per layer) and the inverse map."""

    order: Tensor
    sign: Tensor
    gather: Tensor
    scatter: Tensor


def _kept_lu_rows(model, layers: list[LULinear]) -> _LURows:
    """The LU layers' :class:`_LURows`, built once and kept on the model (``_mixing_cache``)
    while their buffers hold the same values (``tensors_key``): the row orders and signs are
    fixed, and a training step would otherwise stack them and rebuild the row maps on every
    call (six small ops)."""
    buffers = [m._buffers[name] for m in layers for name in ("row_order", "sign")]
    key = None if torch.compiler.is_compiling() else (len(layers), *tensors_key(buffers))
    cache = getattr(model, "_mixing_cache", None)
    if key is not None and cache is not None and cache[0] == key:
        return cache[1]
    rows = _lu_rows(layers)
    if key is not None:
        model._mixing_cache = (key, rows)
    return rows


def _lu_rows(layers: list[LULinear]) -> _LURows:
    order, sign = _stack(m.row_order for m in layers), _stack(m.sign for m in layers)
    offsets = torch.arange(0, order.numel(), order.shape[1], device=order.device)
    gather = (order + offsets[:, None]).flatten()
    return _LURows(order, sign, gather, torch.argsort(gather))


class _LUWeights(torch.autograd.Function):
    """``(rows (:class:`_LURows`), L, lower_1..L, upper_1..L, log|diag|_1..L) ->
    (W, Σ log|diag|, Lm, Um)``, W, Lm and Um (L, D, D): ``Lm = tril(lower, -1) + I``,
    ``Um = triu(upper, 1) + diag(sign exp(log|diag|))``, ``W = (P Lm) Um`` with
    ``P Lm = Lm[row order]`` (W's rows are those of Lm Um in row order).

    Built with autograd, the same map records a dozen nodes plus two per layer (300 us for
    eight layers at D = 16, most of an LU layer's cost in a B = 256 training step); here it
    is one node with the backward written out, with A = P Lm:
    ``g Lm = (gW Um^T)[inverse row order]`` below the diagonal, ``g upper = triu(A^T gW, 1)``,
    ``g log|diag| = diag(A^T gW) sign exp(log|diag|) + g`` with g the gradient of the
    log-determinant. The row order is applied to Lm's rows before the product (one
    ``index_select`` over the (L D, D) stack, a row copy) rather than to the product with a
    ``gather``, and undone in backward the same way rather than by a ``scatter_`` into zeros:
    at D = 64 those two took 66 and 84 us.
    Lm and Um are returned for the inverse (W^-1, no gradient).
    """

    @staticmethod
    def forward(ctx, rows, count, *params):
        lower = torch.stack(params[:count]).tril_(-1)
        lower.diagonal(dim1=1, dim2=2).fill_(1.0)
        log_diag = torch.stack(params[2 * count :])
        diag = log_diag.exp().mul_(rows.sign)
        upper = torch.stack(params[count : 2 * count]).triu_(1)
        upper.diagonal(dim1=1, dim2=2).copy_(diag)
        shape = lower.shape
        permuted = lower.view(-1, shape[2]).index_select(0, rows.gather).view(shape)
        weight = torch.bmm(permuted, upper)
        ctx.save_for_backward(permuted, upper, diag)
        ctx.scatter = rows.scatter
        ctx.mark_non_differentiable(lower, upper)
        return weight, log_diag.sum(), lower, upper

    @staticmethod
    @first_order
    def backward(ctx, grad_weight, grad_log_det, _grad_lower, _grad_upper):
        permuted, upper, diag = ctx.saved_tensors
        if grad_weight is None:
            grad_weight = torch.zeros_like(permuted)
        shape = permuted.shape
        grad_permuted = torch.bmm(grad_weight, upper.transpose(1, 2))
        grad_lower = grad_permuted.view(-1, shape[2]).index_select(0, ctx.scatter)
        grad_lower = grad_lower.view(shape).tril_(-1)
        grad_upper = torch.bmm(permuted.transpose(1, 2), grad_weight)
        grad_log_diag = grad_upper.diagonal(dim1=1, dim2=2) * diag
        if grad_log_det is not None:
            grad_log_diag.add_(grad_log_det)
        grad_upper.triu_(1)
        return (
            None,
            None,
            *grad_lower.unbind(0),
            *grad_upper.unbind(0),
            *grad_log_diag.unbind(0),
        )


def _new(pool, like: Tensor) -> Tensor | None:
    """The ``out=`` of a new tensor shaped like ``like``: from ``pool`` when given (a
    :class:`~fastnvp.engine.cpu.buffer_pool.BufferPool`), else None (the op allocates)."""
    return None if pool is None else pool.take(like.shape, like)


def forward_step(inter, i, z, view, saved, stats=None, spare=None, pool=None) -> Tensor:
    """Step ``i``'s interleaved layers on z (N, D), no autograd: the coupling's input.

    ``saved``: a list that receives what backward needs (None: keep nothing); ``stats``: for a
    ``batchnorm`` step, a list that receives the batch's (Σ_r x, Σ_r (x - μ)², σ² + ε)
    (:func:`finish_batch_stats` turns them into the log-det term, the running averages and,
    where asked, (mean, var)), or a (mean, var) pair to use instead of the batch's
    (replaying an anchored step). ``spare``: an (N, D) buffer of a walk
    that owns both it and z (a walk without a gradient); the step then writes into z or spare
    instead of new tensors (a fresh (N, D) tensor costs up to 0.25 ms at 1 MB on the CPU),
    and the caller keeps the one not returned as its next spare. ``pool``: the shared
    :class:`~fastnvp.engine.cpu.buffer_pool.BufferPool`, for the new tensors of a walk that
    does not own its state (a walk with a gradient), or None.
    """
    owned = spare is not None and saved is None  # z and spare are the walk's own buffers

    if inter.norm == "affine":
        if saved is not None:
            saved.append(z)
        z = torch.addcmul(view["shift"], z, view["scale"], out=z if owned else _new(pool, z))
    elif inter.norm == "batchnorm":
        # Every (D,) factor from tensors and Scalar arguments (alpha=, value=), never a Python
        # number as an operand: on the CPU such an operand is wrapped into a tensor and cast,
        # which costs more than the op's arithmetic at B = 256 (3 vs 1.3 us for a (16,) mul).
        eps = inter.eps_values()[i]
        if isinstance(stats, tuple):
            mean, var = stats
            centred = torch.sub(z, mean, out=z if owned else _new(pool, z))
            var_eps = torch.add(eps, var)
        else:
            n = z.shape[0]
            if n < 2:  # the message of BatchNorm.batch_statistics, before any kernel
                inter.modules[i].batch_statistics(z)
            # Two passes (the column sums, then the centred squares), not torch.var_mean: its
            # column reduction over a row-major (N, D) was 4-5x slower on the CPU (256 x 64:
            # 113 vs 20 us), and not Σ x² - n μ², which cancels where |μ| >> σ.
            total = z.sum(0)
            centred = torch.sub(z, total, alpha=1.0 / n, out=z if owned else _new(pool, z))
            squares = torch.linalg.vecdot(centred, centred, dim=0)
            var_eps = torch.add(eps, squares, alpha=1.0 / n)
            stats.append((total, squares, var_eps))  # finish_batch_stats takes them from here
        inv_std = torch.rsqrt(var_eps)
        scale = torch.mul(view["gamma"], inv_std)  # y = (x - μ) γ inv_std + β
        if saved is not None:
            saved.append((centred, inv_std, scale, var_eps))
        out = centred if saved is None else _new(pool, centred)  # centred is not kept: reuse it
        z = torch.addcmul(view["beta"], centred, scale, out=out)
    if inter.mix == "permutation":
        out = spare if owned else _new(pool, z)
        z = permute_columns(z, inter.index[i], inter.reversal[i], out=out)
    elif inter.mix == "linear":
        if saved is not None:
            saved.append(z)
        z = torch.mm(z, view["weight"].t(), out=spare if owned else _new(pool, z))
    return z


def finish_batch_stats(inter, stats, rows: int, log_det: Tensor, restore=None, keep=False):
    """After a walk with ``batchnorm`` steps: subtract ½ Σ_layers Σ_j log(σ²_j + ε) from every
    row of ``log_det`` (in place) and fold each layer's (mean, var) into its running averages.

    ``stats``: what :func:`forward_step` appended, per layer (Σ_r x, Σ_r (x - μ)², σ² + ε),
    in the walk's order. ``keep``: replace them, in place, by each layer's (mean, var), still
    in the walk's order (the invertible walk inverts with them).
    ``restore``: (D,) int64 when the walk ran on reordered or padded columns
    (:func:`walk_views`): the statistics are put back in feature order (the padding column
    left out) before the log-det and the running averages take them.
    """
    if inter is None or inter.norm != "batchnorm" or not stats:
        return
    # A few batched ops over every layer's (D,) vectors instead of a few per layer.
    sums, squares, var_eps = (torch.stack(kind) for kind in zip(*stats))
    if keep:
        means, variances = sums / rows, squares / rows
        stats[:] = list(zip(means.unbind(0), variances.unbind(0)))
    if restore is not None:
        sums, squares = sums.index_select(1, restore), squares.index_select(1, restore)
        var_eps = var_eps.index_select(1, restore)
    log_det.sub_(var_eps.log_().sum().mul_(0.5))
    means = sums.div_(rows).unbind(0)
    unbiased = squares.div_(rows - 1).unbind(0)  # the running variance is unbiased
    momenta = {m.momentum for m in inter.modules}
    if len(momenta) == 1:  # the usual case: two multi-tensor updates for every layer
        with torch.no_grad():
            momentum = momenta.pop()
            torch._foreach_lerp_([m.running_mean for m in inter.modules], means, momentum)
            torch._foreach_lerp_([m.running_var for m in inter.modules], unbiased, momentum)
        return
    for module, mean, var in zip(inter.modules, means, unbiased):
        module.update_running(mean, var, None)


def walk_views(inter, order, tensors=None, padded=False) -> list[dict[str, Tensor]]:
    """Per-layer views of ``tensors`` (default :attr:`Interleave.tensors`) for a walk whose
    state is ``x[:, order]`` (None: feature order). Only norm forms reorder: their tensors
    are per feature, (L, D) each, and are gathered into the walk's order (one op per kind).

    ``padded``: the walk's state has the zero padding column D of a split with unequal
    halves (``fastnvp.engine.cpu.columns``); the per-feature tensors get that column too, as
    an identity that keeps it zero (scale / γ 1, shift / β 0; BatchNorm's statistics of it
    are left out of the log-det and the running averages by :func:`finish_batch_stats`)."""
    if order is None and not padded:
        return inter.layer_views() if tensors is None else inter.views(tensors)
    if inter.mix is not None:
        raise ValueError("a walk with mixing layers runs in feature order, unpadded")

    def walk_order(kinds: list[Tensor]) -> list[Tensor]:
        if padded:  # (scale, shift) or (γ, β): the padding column is 1, then 0
            kinds = [torch.nn.functional.pad(t, (0, 1), value=v) for t, v in zip(kinds, (1, 0))]
        return kinds if order is None else [t.index_select(1, order) for t in kinds]

    if tensors is not None:
        return inter.views(walk_order(tensors))
    # The Interleave's own tensors: gathered once per order, so a cached form (calls without
    # a gradient) does not gather again on every call.
    cached = inter._walk_views
    if cached is None or cached[0] is not order or cached[1] != padded:
        inter._walk_views = cached = (order, padded, inter.views(walk_order(inter.tensors)))
    return cached[2]


def inverse_step(inter, i, h, view, stats=None, saved=None, spare=None) -> Tensor:
    """Invert step ``i``'s interleaved layers: the coupling's input h (N, D) -> the step's input.

    ``stats``: the (mean, var) a ``batchnorm`` forward used (required for that form).
    ``saved``: receives, in forward order, what :func:`backward_step` needs.
    ``spare``: as for :func:`forward_step` (a walk without a gradient that owns h and spare).
    """
    record: list = []
    owned = spare is not None and saved is None  # h and spare are the walk's own buffers
    if inter.mix == "permutation":
        out = spare if owned else None
        h = permute_columns(h, inter.inverse_index[i], inter.reversal[i], out=out)
    elif inter.mix == "linear":
        h = torch.mm(h, inter.inverse_weights()[i].t(), out=spare if owned else None)
        record.append(h)
    if inter.norm == "affine":
        if owned:
            h = h.sub_(view["shift"]).div_(view["scale"])
        else:
            h = (h - view["shift"]).div_(view["scale"])
        record.append(h)
    elif inter.norm == "batchnorm":
        mean, var = stats
        var_eps = torch.add(inter.eps_values()[i], var)
        inv_std = torch.rsqrt(var_eps)
        scale = torch.mul(view["gamma"], inv_std)
        centred = (h - view["beta"]).div_(scale)
        record.append((centred, inv_std, scale, var_eps))
        h = centred + mean
    if saved is not None:
        saved.extend(reversed(record))
    return h


def backward_step(inter, i, G, sums, view, saved, grads, pool=None) -> Tensor:
    """Backprop step ``i``'s interleaved layers: G (N, D) of the coupling's input -> of the
    step's input. ``sums``: the walk's :func:`backward_sums`; ``saved``: from
    :func:`forward_step` (forward order); ``grads``: per layer
    ``{name: (D,) or (D, D)}`` buffers written in place, or None; ``pool``: as for
    :func:`forward_step`, for the new G."""
    k = len(saved)

    if inter.mix == "permutation":
        G = permute_columns(G, inter.inverse_index[i], inter.reversal[i], out=_new(pool, G))
    elif inter.mix == "linear":
        k -= 1
        if grads is not None:
            torch.mm(G.t(), saved[k], out=grads[i]["weight"])
        G = torch.mm(G, view["weight"], out=_new(pool, G))
    if inter.norm == "affine":
        k -= 1
        if grads is not None:
            # vecdot: the product and its column sum in one call (one dispatch, not two).
            torch.linalg.vecdot(G, saved[k], dim=0, out=grads[i]["scale"])
            torch.sum(G, 0, out=grads[i]["shift"])
        G = G.mul_(view["scale"])  # G is the walk's own buffer (never the caller's gradient)
    elif inter.norm == "batchnorm":
        k -= 1
        centred, inv_std, scale, var_eps = saved[k]
        n = G.shape[0]
        out = grads[i] if grads is not None else {"beta": None, "gamma": None}
        g_beta = torch.sum(G, 0, out=out["beta"])
        products = torch.linalg.vecdot(G, centred, dim=0)  # Σ_r G (x - μ) = g_γ / inv_std
        if grads is not None:
            torch.mul(products, inv_std, out=out["gamma"])
        # d/dx of y = (x - μ) γ inv_std + β through the batch statistics, and of the log-det
        # term -½ Σ log(σ² + ε) (module docstring), with a = γ inv_std and c = x - μ:
        # gx = a G - a Σ_r G / n - c (a Σ_r G c + Σ_r gl) / ((σ² + ε) n).
        # Each (D,) factor in one call: at B = 256 a call costs more than its arithmetic.
        per_row = torch.addcmul(sums.log_det_grad, scale, products).div_(var_eps)
        shift = torch.addcmul(sums.zero, scale, g_beta, value=-1.0 / n)
        G = torch.addcmul(shift, G, scale, out=_new(pool, G))
        G = G.addcmul_(centred, per_row, value=-1.0 / n)
    return G


@dataclass
class BackwardSums:
    """0-d tensors a walk's :func:`backward_step` shares over its layers: ``log_det_grad``,
    Σ_r of the upstream gradient of the log-det (each ``batchnorm`` step's term depends on
    it), and ``zero``, a 0-d operand that keeps Python numbers out of the (D,) ops."""

    log_det_grad: Tensor
    zero: Tensor


def backward_sums(inter, gl: Tensor) -> BackwardSums | None:
    """The :class:`BackwardSums` of a walk's backward on ``inter`` with log-det gradient
    ``gl`` (N,); None where no step needs them (no ``batchnorm`` form)."""
    if inter is None or inter.norm != "batchnorm":
        return None
    return BackwardSums(gl.sum(), gl.new_zeros(()))


def _per_layer_count(inter) -> int:
    """Tensors :func:`forward_step` keeps per layer for backward (standard memory)."""
    norm = {"affine": 1, "batchnorm": 4}.get(inter.norm, 0)
    return norm + (1 if inter.mix == "linear" else 0)


def flatten_saved(saved: list[list]) -> list[Tensor]:
    """The per-layer lists of :func:`forward_step` as one flat tensor list (for
    ``save_for_backward``, so autograd frees them after backward unless the graph is kept)."""
    flat: list[Tensor] = []
    for layer in saved:
        for item in layer:
            flat.extend(item if isinstance(item, tuple) else (item,))
    return flat


def unflatten_saved(inter, flat) -> list[list]:
    """Inverse of :func:`flatten_saved`."""
    count = _per_layer_count(inter)
    out = []
    for i in range(inter.num_layers):
        chunk = list(flat[count * i : count * (i + 1)])
        if inter.norm == "batchnorm":
            chunk = [tuple(chunk[:4]), *chunk[4:]]
        out.append(chunk)
    return out


def grad_buffers(
    inter, tensors: list[Tensor], width: int | None = None
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Gradient buffers like ``tensors`` and their per-layer views; every layer's
    :func:`backward_step` writes all of its rows, so they start uninitialized. ``width``: the
    columns of a padded walk's per-feature tensors (D + 1), else those of ``tensors``."""
    if width is None:
        buffers = [torch.empty_like(t) for t in tensors]
    else:
        buffers = [t.new_empty((t.shape[0], width)) for t in tensors]
    return buffers, inter.views(buffers)
