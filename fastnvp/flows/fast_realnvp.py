"""FastRealNVP: a drop-in replacement for :class:`fastnvp.core.reference.RealNVP`.

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

from fastnvp import ops
from fastnvp.core import checks
from fastnvp.core.conditioner import is_standard_pair, match_standard_mlp
from fastnvp.core.reference import FlowBase, RealNVP
from fastnvp.engine import plan as plan_mod
from fastnvp.engine.cpu import conditioner_pair, gemm_stack, knots
from fastnvp.engine.cpu.threads import in_worker
from fastnvp.engine.gpu import fused as gpu_fused
from fastnvp.engine.invertible import (
    DEFAULT_ANCHOR_EVERY,
    check_anchor_every,
    check_memory,
    check_tolerance,
    invertible_flow,
    resolve_tolerance,
)
from fastnvp.ops import fused_layer
from fastnvp.ops.backend import use_triton


class FastRealNVP(FlowBase):
    """Real NVP with fused coupling kernels; a drop-in for :class:`fastnvp.RealNVP`.

    Args:
        nets: zero-argument factory returning the scale net S: (N, D) -> (N, D).
        nett: zero-argument factory returning the shift net T: (N, D) -> (N, D).
        masks: (L, D) 0/1 tensor, 1 = kept (conditioning) feature; one row per coupling layer.
        prior: a ``torch.distributions`` object over (N, D), or None for N(0, I) (closed form).
        memory: ``"standard"`` (autograd stores every layer's activations) or ``"invertible"``
            (backward recovers them by inversion, so activation memory does not grow with depth;
            see ``fastnvp.engine.invertible``).
        reconstruction_tolerance: relative error allowed for the activations recovered in
            invertible backward; None for the dtype's default.
        anchor_every: invertible mode keeps every ``anchor_every``-th layer's input, (N, D), and
            restarts the reconstruction there, bounding drift; None keeps only the stack input.
        clamp: None, or α > 0 to soft-clamp user nets' log-scale, ``s <- α·tanh(s/α)``; layers
            with the standard conditioner keep their Tanh unchanged (see ``FlowBase``).
        check: raise ``fastnvp.core.checks.NonFiniteError`` at the first non-finite layer.
        fused: ``"auto"`` (default: on CUDA with Triton, each standard-conditioner layer is one
            fused-layer kernel and inference without gradients is one whole-stack launch),
            ``"layer"`` (the fused-layer ops on every device), ``"op"`` / ``"none"`` (only the
            elementwise coupling op). See ``fastnvp.ops.fused_layer``.
        precision: matmul precision of the fused layer: ``"ieee"`` (fp32), ``"tf32"``, ``"bf16"``.
        knot_tables: on the CPU, evaluate standard-conditioner layers that keep a single feature
            (every layer at D = 2) in their exact piecewise-linear form, O(H) per row instead of
            the O(H²) GEMM (see ``fastnvp.engine.cpu.knots``); the tables are cached for calls
            without
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
        self._policy = plan_mod.DEFAULT_POLICY
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
        # What the plan needs to know of the flow, once (docs/design.md §3.1); plans follow.
        self._facts = plan_mod.flow_facts(self)
        self._plans = {}

    def _split(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.split_order[i]
        k1 = self._num_kept[i]
        return order[:k1], order[k1:]

    # ----------------------------------------------------------------------------- conditioner
    def _conditioner(self, i: int, h: torch.Tensor, x1: torch.Tensor, kept, transformed, path):
        """(s, t) of layer i for the transformed half, each (N, K2); x1 (N, K1) is the kept half.

        ``path`` is the layer's path from the plan (``fastnvp.engine.plan.LAYER_PATHS``).
        """
        if path == "modules":
            masked = h * self.mask[i].to(h.dtype)
            s = self.s[i](masked).index_select(1, transformed)
            t = self.t[i](masked).index_select(1, transformed)
            return s, t
        s_mlp = match_standard_mlp(self.s[i], self.dim)
        t_mlp = match_standard_mlp(self.t[i], self.dim)
        if path == "cpu_knots":
            grad = torch.is_grad_enabled() and (
                x1.requires_grad or any(p.requires_grad for p in knots.net_weights(s_mlp, t_mlp))
            )
            if not grad:
                pieces = self._knot_cache.pieces(i, s_mlp, t_mlp, kept, transformed)
                if pieces is not None:
                    return knots.evaluate_pieces(pieces, x1)
            tables = self._knot_cache.pair(i, s_mlp, t_mlp, kept, transformed)
            return knots.evaluate_pair(*tables, x1)
        if path == "cpu_pair":
            return conditioner_pair.standard_st(s_mlp, t_mlp, x1, kept, transformed)
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

    def _layer_st(self, i: int, h: torch.Tensor, kept, transformed, direction: str, path: str):
        """(s, t) of layer ``i`` in ``h``'s dtype, soft-clamped where configured; checked."""
        x1 = h.index_select(1, kept)
        with self._nets_checked(i, direction):
            s, t = self._conditioner(i, h, x1, kept, transformed, path)
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

    # ----------------------------------------------------------------------------- the plan
    def _context(self, h: torch.Tensor, direction: str) -> plan_mod.CallContext:
        """The :class:`~fastnvp.engine.plan.CallContext` of a call on state ``h`` (N, D)."""
        device = h.device.type
        grad = torch.is_grad_enabled() and (
            h.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        compiling = torch.compiler.is_compiling()
        if compiling:
            # Thread counts and the environment are not traceable; a traced plan is the layer
            # loop whatever they are (plan.choose), so only what picks layer paths matters.
            threads, worker, triton = 1, False, h.is_cuda
        else:
            threads, worker, triton = torch.get_num_threads(), in_worker(), use_triton(h)
        return plan_mod.CallContext(
            direction=direction,
            device=device,
            dtype=h.dtype,
            rows=h.shape[0],
            grad=grad,
            autocast=torch.is_autocast_enabled(device),
            compiling=compiling,
            checking=self._checking(),
            threads=threads,
            in_worker=worker,
            triton=triton,
            memory=check_memory(self.memory),
            fused=self.fused,
            knot_tables=self.knot_tables,
        )

    def _plan(self, h: torch.Tensor, direction: str) -> plan_mod.Plan:
        """The plan of a call on ``h``, cached per context (docs/design.md §3)."""
        ctx = self._context(h, direction)
        if ctx.compiling:  # traced once per graph: no cache lookups inside the trace
            return plan_mod.choose(self._facts, ctx, self.policy)
        plan = self._plans.get(ctx)
        if plan is None:
            plan = self._plans[ctx] = plan_mod.choose(self._facts, ctx, self.policy)
        return plan

    def explain(self, x: torch.Tensor, direction: str = "f") -> plan_mod.Plan:
        """The plan a call ``f(x)`` (or ``g(x)`` with ``direction="g"``) would run, unrun.

        Args:
            x: (N, D) input of the call, on the model's device and dtype.
            direction: ``"f"`` (data -> latent, also ``log_prob`` and training) or ``"g"``
                (latent -> data, ``sample``).

        Returns:
            A frozen :class:`fastnvp.engine.plan.Plan`: ``stack`` (the stack strategy),
            ``layers`` (one path per layer) and ``reason``; ``str(plan)`` is one line.
        """
        if direction not in plan_mod.DIRECTIONS:
            raise ValueError(f"direction must be one of {plan_mod.DIRECTIONS}, got {direction!r}")
        self._check_input(x, "x" if direction == "f" else "z")
        return self._plan(x, direction)

    @property
    def policy(self) -> plan_mod.Policy:
        """The :class:`~fastnvp.engine.plan.Policy` whose thresholds the plans follow."""
        return self._policy

    @policy.setter
    def policy(self, value: plan_mod.Policy) -> None:
        if not isinstance(value, plan_mod.Policy):
            raise TypeError(
                f"policy must be a fastnvp.engine.plan.Policy, got {type(value).__name__}"
            )
        self._policy = value
        self._plans = {}

    # ----------------------------------------------------------------------------- one layer
    def _layer(self, i: int, h: torch.Tensor, path: str, inverse: bool):
        """Layer ``i`` on ``path`` (f, or g when ``inverse``).  (N, D) -> ((N, D), (N,))."""
        if path == "fused_layer":
            return gpu_fused.model_layer(self, i, h, inverse=inverse)
        direction = "g" if inverse else "f"
        kept, transformed = self._split(i)
        s, t = self._layer_st(i, h, kept, transformed, direction, path)
        h2, log_det = ops.coupling(h.index_select(1, transformed), s, t, inverse=inverse)
        return self._layer_out(i, h, transformed, h2, log_det, direction)

    def layer_forward(self, i: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupling layer ``i`` in the data -> latent direction.  (N, D) -> ((N, D), (N,))."""
        self._check_layer_args(i, z, "z")
        return self._layer(i, z, self._plan(z, "f").layers[i], inverse=False)

    def layer_inverse(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupling layer ``i`` in the latent -> data direction.  (N, D) -> ((N, D), (N,))."""
        self._check_layer_args(i, x, "x")
        return self._layer(i, x, self._plan(x, "g").layers[i], inverse=True)

    # ----------------------------------------------------------------------------- the flow
    def f(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> latent.  x: (N, D) -> (z (N, D), log_det (N,)), ``log_det = log|det dz/dx|``.

        Runs the plan of the call (:meth:`explain`; docs/design.md §3).
        """
        self._check_input(x, "x")
        return self._run(self._plan(x, "f"), x)

    def g(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> data, the exact inverse of :meth:`f`.  (N, D) -> (N, D)."""
        self._check_input(z, "z")
        return self._run(self._plan(z, "g"), z)

    def _run(self, plan: plan_mod.Plan, h: torch.Tensor):
        """Execute ``plan`` on ``h``: ``f`` returns (z, log_det), ``g`` returns x."""
        inverse = plan.context.direction == "g"
        stack = plan.stack
        if stack == "gpu_fused_stack":
            stacked = gpu_fused.model_stack(self, h, inverse=inverse)
            if stacked is not None:  # None: the stacked weights exceed the cache budget
                return stacked[0] if inverse else stacked
        elif stack == "rows_parallel":
            return conditioner_pair.rows_parallel(
                self,
                h,
                inverse,
                lambda chunk: self._run(self._plan(chunk, plan.context.direction), chunk),
            )
        elif stack == "cpu_gemm_stack":
            kept, transformed = self._uniform_split()
            slope = self._facts.one_slope
            if inverse:
                return gemm_stack.run_inverse(self, h, kept, transformed, slope)
            return gemm_stack.run_forward(
                self,
                h,
                kept,
                transformed,
                slope,
                grad=plan.context.grad,
                memory=plan.context.memory,
                anchor_every=self.anchor_every,
                tolerance=resolve_tolerance(self.reconstruction_tolerance, h.dtype),
            )
        elif stack == "invertible":
            return invertible_flow(
                self, h, self.reconstruction_tolerance, anchor_every=self.anchor_every
            )
        if inverse:
            x = h
            for i in reversed(range(self.num_layers)):
                x, _ = self._layer(i, x, plan.layers[i], inverse=True)
            return x
        tables = self._knot_tables_for_training(plan)
        if tables:
            with self._knot_cache.prebuilt(tables):
                return self._layers_forward(plan, h)
        return self._layers_forward(plan, h)

    def _uniform_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, K1) kept and (L, K2) transformed indices of a flow whose layers keep K1 each."""
        order = self.split_order
        cache = getattr(self, "_uniform_split_cache", None)
        if cache is None or cache[0] != (order.data_ptr(), order._version):
            k1 = self._num_kept[0]
            halves = order[:, :k1].contiguous(), order[:, k1:].contiguous()
            cache = self._uniform_split_cache = ((order.data_ptr(), order._version), halves)
        return cache[1]

    def _layers_forward(self, plan: plan_mod.Plan, x: torch.Tensor):
        z = x
        log_det = None
        for i in range(self.num_layers):
            z, ld = self._layer(i, z, plan.layers[i], inverse=False)
            log_det = ld if log_det is None else log_det + ld
        return z, log_det

    def _knot_tables_for_training(self, plan: plan_mod.Plan) -> dict:
        """Under autograd, the knot tables of every layer the plan runs in the knot form,
        built
        at once with the work split across threads (``fastnvp.engine.cpu.knots.build_many``); else
        {}."""
        if not plan.context.grad:
            return {}
        layers, nets = [], []
        for i, path in enumerate(plan.layers):
            if path != "cpu_knots":
                continue
            s_mlp = match_standard_mlp(self.s[i], self.dim)
            t_mlp = match_standard_mlp(self.t[i], self.dim)
            if any(p.requires_grad for p in knots.net_weights(s_mlp, t_mlp)):
                kept, transformed = self._split(i)
                layers.append(i)
                nets += [(s_mlp, kept, transformed), (t_mlp, kept, transformed)]
        if len(layers) < 2 or len({mlp.negative_slope for mlp, _, _ in nets}) != 1:
            return {}
        tables = knots.build_many(nets)
        return {i: (tables[2 * k], tables[2 * k + 1]) for k, i in enumerate(layers)}
