"""FastRealNVP: a drop-in replacement for :class:`fastnvp.reference.RealNVP`.

Same constructor, methods, return shapes and ``state_dict`` keys as the reference; the same
function (docs/design.md §1). What differs is how it is computed:

- each layer works on the split halves ``x1 = x[:, kept]``, ``x2 = x[:, transformed]``; no
  multiply-by-mask on full-width tensors and no discarded conditioner outputs;
- a standard conditioner (detected by module types and shapes) runs on the halves directly:
  its first Linear sees only the kept columns and its last Linear produces only the
  transformed rows;
- the coupling update and log_det are the fused custom op ``fastnvp::affine_coupling``;
- the standard-normal prior is computed in closed form.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fastnvp import checks, cpu_conditioner, fused_layer, knots, ops
from fastnvp.conditioner import is_standard_pair, match_standard_mlp
from fastnvp.invertible import (
    DEFAULT_ANCHOR_EVERY,
    check_anchor_every,
    check_memory,
    check_tolerance,
    invertible_flow,
)
from fastnvp.reference import FlowBase, RealNVP


class FastRealNVP(FlowBase):
    """Real NVP with fused coupling kernels; a drop-in for :class:`fastnvp.RealNVP`.

    Args:
        nets: zero-argument factory returning the scale net S: (N, D) -> (N, D).
        nett: zero-argument factory returning the shift net T: (N, D) -> (N, D).
        masks: (L, D) 0/1 tensor, 1 = kept (conditioning) feature; one row per coupling layer.
        prior: a ``torch.distributions`` object over (N, D), or None for N(0, I) (closed form).
        memory: ``"standard"`` (autograd stores every layer's activations) or ``"invertible"``
            (backward recovers them by inversion, so activation memory does not grow with depth;
            see ``fastnvp.invertible``).
        reconstruction_tolerance: relative error allowed for the activations recovered in
            invertible backward; None for the dtype's default.
        anchor_every: invertible mode keeps every ``anchor_every``-th layer's input, (N, D), and
            restarts the reconstruction there, bounding drift; None keeps only the stack input.
        clamp: None, or α > 0 to soft-clamp user nets' log-scale, ``s <- α·tanh(s/α)``; layers
            with the standard conditioner keep their Tanh unchanged (see ``FlowBase``).
        check: raise ``fastnvp.checks.NonFiniteError`` at the first non-finite layer.
        fused: ``"auto"`` (default: on CUDA with Triton, each standard-conditioner layer is one
            fused-layer kernel and inference without gradients is one whole-stack launch),
            ``"layer"`` (the fused-layer ops on every device), ``"op"`` / ``"none"`` (only the
            elementwise coupling op). See ``fastnvp.fused_layer``.
        precision: matmul precision of the fused layer: ``"ieee"`` (fp32), ``"tf32"``, ``"bf16"``.
        knot_tables: on the CPU, evaluate standard-conditioner layers that keep a single feature
            (every layer at D = 2) in their exact piecewise-linear form, O(H) per row instead of
            the O(H²) GEMM (see ``fastnvp.knots``); the tables are cached for calls without
            autograd. False always uses the GEMM path.

    ``f(x) -> (z, log_det)``, ``g(z) -> x``, ``log_prob(x) -> (N,)``, ``sample(n) -> (n, D)``.

    Under ``torch.autocast`` the conditioner matmuls run in the autocast dtype while the coupling
    update, the flow's state and ``log_det`` stay fp32 (the ops are registered to autocast to fp32).
    """

    def __init__(
        self,
        nets,
        nett,
        masks,
        prior=None,
        *,
        clamp=None,
        check=False,
        memory="standard",
        reconstruction_tolerance=None,
        anchor_every=DEFAULT_ANCHOR_EVERY,
        fused="auto",
        precision="ieee",
        knot_tables=True,
    ):
        super().__init__(nets, nett, masks, prior, clamp=clamp, check=check)
        self.fused = fused_layer.check_fused(fused)
        self.precision = fused_layer.check_precision(precision)
        if not isinstance(knot_tables, bool):
            raise TypeError(f"knot_tables must be a bool, got {type(knot_tables).__name__}")
        self.knot_tables = knot_tables
        self._knot_cache = knots.TableCache()
        self.memory = check_memory(memory)
        self.reconstruction_tolerance = check_tolerance(reconstruction_tolerance)
        self.anchor_every = check_anchor_every(anchor_every)
        self.last_reconstruction = None  # set by each invertible backward
        self.register_buffer("split_order", torch.empty(0, dtype=torch.long), persistent=False)
        self._refresh_split()
        # Loading a state_dict may bring other masks: rebuild the split each time.
        self.register_load_state_dict_post_hook(
            lambda module, _incompatible: module._refresh_split()
        )

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_reference(cls, model: RealNVP) -> FastRealNVP:
        """A FastRealNVP computing the same function as ``model`` (deep copies of its nets)."""
        if not isinstance(model, FlowBase):
            raise TypeError(f"model must be a RealNVP, got {type(model).__name__}")
        s_nets = iter(copy.deepcopy(list(model.s)))
        t_nets = iter(copy.deepcopy(list(model.t)))
        fast = cls(
            lambda: next(s_nets),
            lambda: next(t_nets),
            model.mask.detach().cpu(),
            model.prior,
            clamp=model.clamp,
            check=model.check,
        )
        anchor = model._anchor()
        return fast.to(device=anchor.device)

    def _refresh_split(self) -> None:
        """Per layer: kept indices then transformed ones, and how many are kept."""
        mask = self.mask.detach()
        order = torch.argsort(1 - mask, dim=1, stable=True)  # kept (1) first, each in order
        self.split_order = order.to(device=mask.device)
        self._num_kept = [int(k) for k in mask.sum(dim=1).round().tolist()]
        self._standard = [
            is_standard_pair(self.s[i], self.t[i], self.dim) for i in range(self.num_layers)
        ]
        self._clamped = [self.clamp is not None and not std for std in self._standard]

    def _split(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.split_order[i]
        k1 = self._num_kept[i]
        return order[:k1], order[k1:]

    # ----------------------------------------------------------------------------- conditioner
    def _conditioner(self, i: int, h: torch.Tensor, x1: torch.Tensor, kept, transformed):
        """(s, t) of layer i for the transformed half, each (N, K2); x1 (N, K1) is the kept half."""
        if self._standard[i]:
            return self._standard_st(i, x1, kept, transformed)
        masked = h * self.mask[i].to(h.dtype)
        s = self.s[i](masked).index_select(1, transformed)
        t = self.t[i](masked).index_select(1, transformed)
        return s, t

    def _standard_st(self, i: int, x1, kept, transformed):
        s_mlp = match_standard_mlp(self.s[i], self.dim)
        t_mlp = match_standard_mlp(self.t[i], self.dim)
        if cpu_conditioner.applies(x1):
            weights = knots.net_weights(s_mlp, t_mlp)
            grad = torch.is_grad_enabled() and any(p.requires_grad for p in weights)
            hidden = s_mlp.lin2.weight.shape[0]
            if self.knot_tables and knots.applies(kept, x1.shape[0], hidden, grad):
                if not grad and not (torch.is_grad_enabled() and x1.requires_grad):
                    pieces = self._knot_cache.pieces(i, s_mlp, t_mlp, kept, transformed)
                    if pieces is not None:
                        return knots.evaluate_pieces(pieces, x1)
                tables = self._knot_cache.pair(i, s_mlp, t_mlp, kept, transformed)
                return knots.evaluate_pair(*tables, x1)
            return cpu_conditioner.standard_st(s_mlp, t_mlp, x1, kept, transformed)
        slope = s_mlp.negative_slope
        outs = []
        for mlp in (s_mlp, t_mlp):
            h = F.linear(x1, mlp.lin1.weight.index_select(1, kept), mlp.lin1.bias)
            h = F.leaky_relu(h, slope)
            h = F.leaky_relu(F.linear(h, mlp.lin2.weight, mlp.lin2.bias), slope)
            outs.append(
                F.linear(
                    h,
                    mlp.lin3.weight.index_select(0, transformed),
                    mlp.lin3.bias.index_select(0, transformed),
                )
            )
        return torch.tanh(outs[0]), outs[1]

    def _layer_st(self, i: int, h: torch.Tensor, kept, transformed, direction: str):
        """(s, t) of layer ``i`` in ``h``'s dtype, soft-clamped where configured; checked."""
        x1 = h.index_select(1, kept)
        with self._nets_checked(i, direction):
            s, t = self._conditioner(i, h, x1, kept, transformed)
        if self._checking():
            self._check_layer(i, direction, s=s, t=t)
        # Under autocast the nets return low precision; the coupling runs in the state's dtype.
        s, t = s.to(h.dtype), t.to(h.dtype)
        if self._clamped[i]:
            s = self._soft_clamp(s)
        return s, t

    def _layer_out(self, i, h, transformed, h2, log_det, direction: str):
        """Write the new transformed half ``h2`` into ``h``; check the layer's outputs."""
        # Under autocast the op returns fp32 for a half-precision state: the state follows it.
        out = h.to(h2.dtype).index_copy(1, transformed, h2)
        if self._checking():
            self._check_layer(i, direction, **{"z" if direction == "f" else "x": out})
            self._check_layer(i, direction, log_det=log_det)
            checks.watch_grad(out, "z" if direction == "f" else "x", i, direction)
        return out, log_det

    # ----------------------------------------------------------------------------- one layer
    def layer_forward(self, i: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupling layer ``i`` in the data -> latent direction.  (N, D) -> ((N, D), (N,))."""
        self._check_layer_args(i, z, "z")
        if fused_layer.model_uses_fused_layer(self, i, z):
            return fused_layer.model_layer(self, i, z, inverse=False)
        kept, transformed = self._split(i)
        s, t = self._layer_st(i, z, kept, transformed, "f")
        z2, log_det = ops.coupling(z.index_select(1, transformed), s, t)
        return self._layer_out(i, z, transformed, z2, log_det, "f")

    def layer_inverse(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupling layer ``i`` in the latent -> data direction.  (N, D) -> ((N, D), (N,))."""
        self._check_layer_args(i, x, "x")
        if fused_layer.model_uses_fused_layer(self, i, x):
            return fused_layer.model_layer(self, i, x, inverse=True)
        kept, transformed = self._split(i)
        s, t = self._layer_st(i, x, kept, transformed, "g")
        x2, log_det = ops.coupling(x.index_select(1, transformed), s, t, inverse=True)
        return self._layer_out(i, x, transformed, x2, log_det, "g")

    # ----------------------------------------------------------------------------- the flow
    def f(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> latent.  x: (N, D) -> (z (N, D), log_det (N,)), ``log_det = log|det dz/dx|``."""
        self._check_input(x, "x")
        stacked = fused_layer.model_stack(self, x, inverse=False)
        if stacked is not None:
            return stacked
        parallel = cpu_conditioner.rows_parallel(self, x, inverse=False)
        if parallel is not None:
            return parallel
        if check_memory(self.memory) == "invertible" and torch.is_grad_enabled():
            return invertible_flow(
                self, x, self.reconstruction_tolerance, anchor_every=self.anchor_every
            )
        tables = {} if torch.compiler.is_compiling() else self._knot_tables_for_training(x)
        if tables:
            with self._knot_cache.prebuilt(tables):
                return self._layers_forward(x)
        return self._layers_forward(x)

    def _layers_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = x
        log_det = None
        for i in range(self.num_layers):
            z, ld = self.layer_forward(i, z)
            log_det = ld if log_det is None else log_det + ld
        return z, log_det

    def _knot_tables_for_training(self, x: torch.Tensor) -> dict:
        """Under autograd, the knot tables of every layer that will take the knot form, built
        at once with the work split across threads (``fastnvp.knots.build_many``); else {}."""
        if not (
            self.knot_tables
            and torch.is_grad_enabled()
            and cpu_conditioner.applies(x)
            and getattr(self, "fused", "auto") != "layer"
            and 1 in self._num_kept  # no single-input layer: skip the per-layer checks
        ):
            return {}
        layers, nets = [], []
        for i in range(self.num_layers):
            if not self._standard[i]:
                continue
            s_mlp = match_standard_mlp(self.s[i], self.dim)
            t_mlp = match_standard_mlp(self.t[i], self.dim)
            kept, transformed = self._split(i)
            hidden = s_mlp.lin2.weight.shape[0]
            trained = any(p.requires_grad for p in knots.net_weights(s_mlp, t_mlp))
            if trained and knots.applies(kept, x.shape[0], hidden, True):
                layers.append(i)
                nets += [(s_mlp, kept, transformed), (t_mlp, kept, transformed)]
        if len(layers) < 2 or len({mlp.negative_slope for mlp, _, _ in nets}) != 1:
            return {}
        tables = knots.build_many(nets)
        return {i: (tables[2 * k], tables[2 * k + 1]) for k, i in enumerate(layers)}

    def g(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> data, the exact inverse of :meth:`f`.  (N, D) -> (N, D)."""
        self._check_input(z, "z")
        stacked = fused_layer.model_stack(self, z, inverse=True)
        if stacked is not None:
            return stacked[0]
        parallel = cpu_conditioner.rows_parallel(self, z, inverse=True)
        if parallel is not None:
            return parallel
        x = z
        for i in reversed(range(self.num_layers)):
            x, _ = self.layer_inverse(i, x)
        return x
