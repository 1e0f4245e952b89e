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

import contextlib
import copy

import torch
import torch.nn.functional as F

from fastnvp import ops
from fastnvp.core import checks
from fastnvp.core.conditioner import engine_can_run, is_standard_pair, match_standard_mlp
from fastnvp.core.reference import FlowBase, RealNVP
from fastnvp.engine import interleaved, param_bank
from fastnvp.engine import plan as plan_mod
from fastnvp.engine.cache_keys import tensors_key
from fastnvp.engine.cpu import buffer_pool, conditioner_pair, gemm_stack, knots
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
from fastnvp.flows.structure import StructureWatch
from fastnvp.ops import fused_layer
from fastnvp.ops.backend import use_triton

#: Attributes that cache per-call work (weight packs, split views); dropped from copies.
_CALL_CACHES = (
    "_gemm_pack",
    "_gemm_grad_pack",
    "_gemm_layouts",
    "_fused_stack_cache",
    "_stack_split_cache",
    "_interleave_cache",
    "_mixing_cache",
    "_pieces_rent",
)


def _outside_inference_mode():
    """Under ``torch.inference_mode``, run a call as under ``no_grad`` instead (a no-op
    elsewhere): the engine keeps index tensors and packs between calls, keyed on version
    counters, and an inference tensor has none and cannot enter a later call with a gradient.
    The call's inputs may still be inference tensors; the engine never writes them. A traced
    call (``torch.compile``) keeps no such caches and cannot ask for the mode."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _refresh_after_load(module: FastRealNVP, _incompatible) -> None:
    """load_state_dict post-hook: a loaded state may bring other masks, so rebuild the split.

    A module-level function (not a lambda) so the model pickles."""
    module._refresh_split()
    module._refresh_storage()  # load_state_dict(assign=True) rebinds the parameters


class FastRealNVP(FlowBase):
    """Real NVP with fused coupling kernels; a drop-in for :class:`fastnvp.RealNVP`.

    Args:
        nets: zero-argument factory returning the scale net S: (N, D) -> (N, D).
        nett: zero-argument factory returning the shift net T: (N, D) -> (N, D).
        masks: (L, D) 0/1 tensor, 1 = kept (conditioning) feature; one row per coupling layer.
        prior: a ``torch.distributions`` object over (N, D), or None for N(0, I) (closed form).
        context: None (unconditional) or C, the width of the context (N, C) each call takes;
            the nets then take ``cat([x * m, e])`` (N, D + E) (docs/design.md §1.7).
        embedding: None or a module (N, C) -> (N, E) applied once per call to the context.
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
            without autograd. False always uses the GEMM path.
        norm: None, ``"actnorm"`` or ``"batchnorm"``: a normalization layer before every
            coupling; permutation: None, ``"reverse"``, ``"random"`` or ``"lu"``: a mixing layer
            after it (docs/design.md §1.8; ``fastnvp.core.interleave``).

    ``f(x, context) -> (z, log_det)``, ``g(z, context) -> x``, ``log_prob(x, context) -> (N,)``,
    ``sample(n, context) -> (n, D)`` or ``(n, M, D)``, ``sample_and_log_prob``, ``distribution``
    (see ``fastnvp.core.reference.FlowBase``). A conditional flow's fast paths take the context
    columns in the first Linear of every layer: ``cat(x[:, kept], e) @ W1[:, inputs]^T``.

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
        context=None,
        embedding=None,
        clamp=None,
        check=False,
        memory="standard",
        reconstruction_tolerance=None,
        anchor_every=DEFAULT_ANCHOR_EVERY,
        fused="auto",
        precision="ieee",
        knot_tables=True,
        norm=None,
        permutation=None,
    ):
        super().__init__(
            nets,
            nett,
            masks,
            prior,
            context=context,
            embedding=embedding,
            clamp=clamp,
            check=check,
            norm=norm,
            permutation=permutation,
        )
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
        self.register_buffer("input_order", torch.empty(0, dtype=torch.long), persistent=False)
        self._refresh_split()
        self._param_bank = None
        self._refresh_storage()
        # Loading a state_dict may bring other masks: rebuild the split each time.
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def __getstate__(self) -> dict:
        """The module's state without its per-call caches (deep copies and pickles rebuild them).

        The no-grad weight packs hold views of the parameters made under ``no_grad``, which
        ``copy.deepcopy`` refuses once an optimizer has changed the parameters in place; a copy
        starts with empty caches instead.
        """
        state = self.__dict__.copy()
        for name in _CALL_CACHES:
            state.pop(name, None)
        state.pop("_structure", None)  # watches the original's modules: a copy rebuilds its own
        state["_plans"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        """Restore, then the parameter bank: a shallow copy shares the original's (the same
        parameters); deep copies and pickles carry none (``param_bank``) and build their own,
        as do flows pickled before the bank existed."""
        super().__setstate__(state)
        self.__dict__.setdefault("_param_bank", None)
        self._refresh_storage()

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to()``, ``.double()``, ``.cuda()``, ...), then the
        conditioner weights back into one tensor per kind (:meth:`_refresh_storage`)."""
        out = super()._apply(fn, recurse)
        if "_param_bank" in self.__dict__:  # not while FlowBase.__init__ runs
            self._refresh_storage()
        return out

    def _refresh_storage(self) -> None:
        """Keep the standard conditioners' weights in one (L, 2, ...) tensor per kind, each
        parameter lying in it (``fastnvp.engine.param_bank``; docs/design.md §3.2), so the
        GEMM stack stacks nothing per call. A no-op while the current bank still holds them;
        no bank for flows the GEMM stack does not run (non-standard or shared nets)."""
        facts = self._facts
        if not (facts.all_standard and facts.own_parameters):
            self._param_bank = None
            return
        params = gemm_stack.layer_parameters(self)
        if gemm_stack.bank_of(self, params) is None:
            self._param_bank = param_bank.build(params)

    @staticmethod
    def release_buffers() -> None:
        """Free the buffers the CPU walks keep between calls: the process's buffer pool
        (``fastnvp.engine.cpu.buffer_pool``, shared by every flow: activations, states and
        temporaries reused from one call to the next, at most ``POOL_MAX_BYTES``); the next
        calls allocate them again. The memory measurements (``fastnvp.analysis``) empty it
        the same way before their step, so that the step's own footprint is counted."""
        buffer_pool.release()

    def clear_caches(self) -> None:
        """Drop the work kept between calls (the packed weights of calls with and without a
        gradient, knot tables, stacked interleaved layers); the next call rebuilds it.

        Every cache already notices optimizer steps (fused ones included), ``load_state_dict``
        and ``.to()`` (``fastnvp.engine.cache_keys``). Call this after writing parameters
        through ``.data`` (``p.data.copy_(w)``), which no version counter records.
        """
        for name in _CALL_CACHES:
            self.__dict__.pop(name, None)
        self._knot_cache.clear()

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
            context=model.context_features,
            embedding=copy.deepcopy(model.embedding),
            clamp=model.clamp,
            check=model.check,
            norm=model.norm,
            permutation=model.permutation,
        )
        anchor = model._anchor()
        fast = fast.to(device=anchor.device)
        if model.interleaved:  # the same norm statistics, permutations and LU factors
            for mine, theirs in (
                (fast.norms, model.norms),
                (fast.permutations, model.permutations),
            ):
                if mine is not None:
                    mine.to(dtype=anchor.dtype).load_state_dict(theirs.state_dict())
        return fast

    def _refresh_split(self) -> None:
        """Per layer: kept indices then transformed ones, and how many are kept."""
        mask = self.mask.detach()
        order = torch.argsort(1 - mask, dim=1, stable=True)  # kept (1) first, each in order
        self.split_order = order.to(device=mask.device)
        self._num_kept = [int(k) for k in mask.sum(dim=1).round().tolist()]
        # Per layer [kept, context columns D..D+E-1, transformed]: _inputs(i) is a prefix view.
        width = self.embedded_features
        columns = torch.arange(self.dim, self.dim + width, device=mask.device)
        self.input_order = torch.stack(
            [
                torch.cat([row[:k1], columns, row[k1:]])
                for row, k1 in zip(self.split_order, self._num_kept, strict=True)
            ]
        )
        # The math's standard pair (which layers clamp, as in the reference), then the layers
        # the engine may run from their weights (no hooks, weights registered as parameters).
        standard = [
            is_standard_pair(self.s[i], self.t[i], self.dim, width) for i in range(self.num_layers)
        ]
        self._math_standard = standard
        self._clamped = [self.clamp is not None and not std for std in standard]
        self._standard = [
            std and engine_can_run(self.s[i], self.t[i]) for i, std in enumerate(standard)
        ]
        # What the plan needs to know of the flow, once (docs/design.md §3.1); plans follow.
        self._facts = plan_mod.flow_facts(self)
        self._plans = {}
        self._structure = StructureWatch(self)  # what they were read from (_check_structure)

    def _check_structure(self) -> None:
        """Rebuild the facts and everything built on them if the flow was edited since they
        were read: a net or a module of one replaced, a Linear parametrized, pruned or given a
        new weight, a slope, ``clamp`` or the mask changed, a hook added to or removed from a
        module the engine runs from its weights (``fastnvp.flows.structure``). Without this
        such a flow would run the plan of the old modules: wrong results, a crash, or hooks
        that never run."""
        if torch.compiler.is_compiling():  # the trace guards on the modules it reads itself
            return
        watch = self.__dict__.get("_structure")
        if watch is not None and not watch.changed(self):
            return
        self._refresh_split()
        self.clear_caches()
        self._refresh_storage()

    def _split(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.split_order[i]
        k1 = self._num_kept[i]
        return order[:k1], order[k1:]

    def _inputs(self, i: int) -> torch.Tensor:
        """Layer ``i``'s first-Linear input columns: kept features, then the E context columns.

        (K1 + E,) indices into ``W1``'s columns; equal to the kept indices when unconditional.
        """
        return self.input_order[i, : self._num_kept[i] + self.embedded_features]

    def _mlps(self, i: int):
        """The matched standard S and T nets of layer ``i`` (``StandardMLP`` handles)."""
        width = self.embedded_features
        return (
            match_standard_mlp(self.s[i], self.dim, width),
            match_standard_mlp(self.t[i], self.dim, width),
        )

    # ----------------------------------------------------------------------------- conditioner
    def _conditioner(self, i: int, h, x1, kept, transformed, path, e=None):
        """(s, t) of layer i for the transformed half, each (N, K2); x1 (N, K1) is the kept half.

        ``path`` is the layer's path from the plan (``fastnvp.engine.plan.LAYER_PATHS``);
        ``e`` (N, E) is the embedded context of a conditional flow, or None.
        """
        if path == "modules":
            masked = self._with_context(h * self.mask[i].to(h.dtype), e)
            s, t = self._scale_shift(i, masked)
            return s.index_select(1, transformed), t.index_select(1, transformed)
        s_mlp, t_mlp = self._mlps(i)
        if path == "cpu_knots":  # the plan takes it only for one input column (K1 = 1, E = 0)
            grad = torch.is_grad_enabled() and (
                x1.requires_grad or any(p.requires_grad for p in knots.net_weights(s_mlp, t_mlp))
            )
            if not grad:
                pieces = self._knot_cache.pieces(i, s_mlp, t_mlp, kept, transformed)
                if pieces is not None:
                    return knots.evaluate_pieces(pieces, x1)
            tables = self._knot_cache.pair(i, s_mlp, t_mlp, kept, transformed)
            return knots.evaluate_pair(*tables, x1)
        inputs = self._inputs(i) if e is not None else kept
        x_in = self._with_context(x1, e)
        if path == "cpu_pair":
            return conditioner_pair.standard_st(s_mlp, t_mlp, x_in, inputs, transformed)
        slope = s_mlp.negative_slope
        outs = []
        for mlp in (s_mlp, t_mlp):
            h = F.linear(x_in, mlp.lin1.weight.index_select(1, inputs), mlp.lin1.bias)
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

    def _layer_st(self, i, h, kept, transformed, direction: str, path: str, e=None):
        """(s, t) of layer ``i`` in ``h``'s dtype, soft-clamped where configured; checked."""
        x1 = h.index_select(1, kept)
        with self._nets_checked(i, direction):
            s, t = self._conditioner(i, h, x1, kept, transformed, path, e)
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
    def _context(
        self, h: torch.Tensor, direction: str, e=None, record: bool = True
    ) -> plan_mod.CallContext:
        """The :class:`~fastnvp.engine.plan.CallContext` of a call on state ``h`` (N, D).

        ``e`` is the call's embedded context (N, E) or None; a gradient is needed when the
        state, the context or a parameter requires one. ``record``: the call runs (its work
        counts towards building the knot pieces, :meth:`_pieces_ready`); False for
        :meth:`explain`.
        """
        device = h.device.type
        grad = torch.is_grad_enabled() and (
            h.requires_grad
            or (e is not None and e.requires_grad)
            or any(p.requires_grad for p in self.parameters())
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
            batch_stats=self._uses_batch_statistics(direction),
            pending_init=self._actnorm_pending(direction),
            mixed_norm_modes=self._norm_modes_mixed(),
            pieces_ready=grad or compiling or self._pieces_ready(h, record),
            func_transform=torch._C._are_functorch_transforms_active(),
        )

    def _pieces_ready(self, h: torch.Tensor, record: bool = True) -> bool:
        """Whether a call without autograd on ``h`` may use the knot pieces (docs/design.md
        §3.1): they are cached for the current parameters, or worth building now.

        Rent, then buy: building the pieces costs as much as many calls of the GEMM stack, so
        calls at a new set of parameters run on the stack until the rows they ran there reach
        ``policy.pieces_build_rows``; from then on the pieces are built and served from the
        cache. A loop that evaluates after every optimizer step
        therefore never pays a build per step, and inference after training builds once.
        """
        if not self._facts.has_knot_layers or not self.knot_tables or h.device.type != "cpu":
            return True
        # "The same parameters": no optimizer step since, and the first and last nets'
        # first tensors unchanged (two probes, not all 12 L: this runs on every call). A
        # change they miss only means that the pieces' own cache rebuilds where it is used.
        probes = [next(net.parameters(), None) for net in (self.s[0], self.t[-1])]
        key = tensors_key(p for p in probes if p is not None)
        previous = getattr(self, "_pieces_rent", None)
        same = previous is not None and previous[0] == key
        if in_worker():  # a row worker's chunk: its caller counted the call and decided
            return same and previous[2]
        if same and previous[2]:
            return True
        rows = h.shape[0] + (previous[1] if same else 0)
        ready = rows >= self.policy.pieces_build_rows
        if record:
            self._pieces_rent = (key, rows, ready)
        return ready

    def _uses_batch_statistics(self, direction: str) -> bool:
        """BatchNorm layers normalize with the batch's statistics: ``f`` with them in train
        mode (each layer's own mode, as ``torch.nn`` decides it; :meth:`_norm_modes_mixed`)."""
        return (
            direction == "f"
            and self.norm == "batchnorm"
            and any(layer.training for layer in self.norms)
        )

    def _norm_modes_mixed(self) -> bool:
        """Some BatchNorm layers are in train mode and others in eval mode (a partly frozen
        flow): the engine's forms take one mode for all, so the layers run as modules."""
        if self.norm != "batchnorm":
            return False
        return len({layer.training for layer in self.norms}) > 1

    def _actnorm_pending(self, direction: str) -> bool:
        """An ActNorm layer is still to initialize from the data (only ``f`` initializes)."""
        return (
            direction == "f"
            and self.norm == "actnorm"
            and not all(layer.is_initialized for layer in self.norms)
        )

    def _plan(self, h: torch.Tensor, direction: str, e=None, record: bool = True) -> plan_mod.Plan:
        """The plan of a call on ``h`` (and embedded context ``e``), cached per call context
        (docs/design.md §3); ``record``: see :meth:`_context`."""
        self._check_structure()
        ctx = self._context(h, direction, e, record)
        if ctx.compiling:  # traced once per graph: no cache lookups inside the trace
            return plan_mod.choose(self._facts, ctx, self.policy)
        plan = self._plans.get(ctx)
        if plan is None:
            plan = self._plans[ctx] = plan_mod.choose(self._facts, ctx, self.policy)
        return plan

    def explain(
        self, x: torch.Tensor, direction: str = "f", context: torch.Tensor | None = None
    ) -> plan_mod.Plan:
        """The plan a call ``f(x, context)`` (or ``g`` with ``direction="g"``) would run, unrun.

        Args:
            x: (N, D) input of the call, on the model's device and dtype.
            direction: ``"f"`` (data -> latent, also ``log_prob`` and training) or ``"g"``
                (latent -> data, ``sample``).
            context: (N, C), required exactly when the flow is conditional.

        Returns:
            A frozen :class:`fastnvp.engine.plan.Plan`: ``stack`` (the stack strategy),
            ``layers`` (one path per layer) and ``reason``; ``str(plan)`` is one line.
        """
        if direction not in plan_mod.DIRECTIONS:
            raise ValueError(f"direction must be one of {plan_mod.DIRECTIONS}, got {direction!r}")
        self._check_input(x, "x" if direction == "f" else "z")
        return self._plan(x, direction, self._embed(context, x.shape[0]), record=False)

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
    def _layer(self, i: int, h: torch.Tensor, path: str, inverse: bool, e=None):
        """Layer ``i`` on ``path`` (f, or g when ``inverse``).  (N, D) -> ((N, D), (N,)).

        ``e``: the embedded context (N, E) of a conditional flow, else None.
        """
        if path == "fused_layer":
            return gpu_fused.model_layer(self, i, h, inverse=inverse, context=e)
        direction = "g" if inverse else "f"
        kept, transformed = self._split(i)
        s, t = self._layer_st(i, h, kept, transformed, direction, path, e)
        h2, log_det = ops.coupling(h.index_select(1, transformed), s, t, inverse=inverse)
        return self._layer_out(i, h, transformed, h2, log_det, direction)

    def _check_embedded(self, embedded, rows: int):
        """Validate the per-layer API's embedded context: (rows, E) or None when unconditional."""
        if not self.conditional:
            if embedded is not None:
                raise ValueError("embedded was given, but this flow is unconditional")
            return None
        width = self.embedded_features
        if not isinstance(embedded, torch.Tensor) or embedded.shape != (rows, width):
            got = tuple(embedded.shape) if isinstance(embedded, torch.Tensor) else embedded
            raise ValueError(
                f"embedded (the embedded context) must have shape ({rows}, {width}) for this "
                f"conditional flow, got {got}"
            )
        return embedded

    def layer_forward(self, i: int, z: torch.Tensor, embedded: torch.Tensor | None = None):
        """Coupling layer ``i`` in the data -> latent direction.  (N, D) -> ((N, D), (N,)).

        The coupling alone: step ``i``'s interleaved layers (``norms[i]``, ``permutations[i]``,
        docs/design.md §1.8) run before it in ``f`` and are not part of this call.

        ``embedded``: a conditional flow's embedded context e (N, E) (the context itself when
        the flow has no embedding).
        """
        self._check_layer_args(i, z, "z")
        e = self._check_embedded(embedded, z.shape[0])
        return self._layer(i, z, self._plan(z, "f", e).layers[i], inverse=False, e=e)

    def layer_inverse(self, i: int, x: torch.Tensor, embedded: torch.Tensor | None = None):
        """Coupling layer ``i`` in the latent -> data direction.  (N, D) -> ((N, D), (N,))."""
        self._check_layer_args(i, x, "x")
        e = self._check_embedded(embedded, x.shape[0])
        return self._layer(i, x, self._plan(x, "g", e).layers[i], inverse=True, e=e)

    # ----------------------------------------------------------------------------- the flow
    def _forward(self, x: torch.Tensor, e: torch.Tensor | None):
        """Runs the plan of the call (:meth:`explain`; docs/design.md §3)."""
        with _outside_inference_mode():
            return self._run(self._plan(x, "f", e), x, e)

    def _inverse(self, z: torch.Tensor, e: torch.Tensor | None, with_log_det: bool = False):
        with _outside_inference_mode():
            x, log_det = self._run(self._plan(z, "g", e), z, e)
        return x, log_det if with_log_det else None

    def _run(self, plan: plan_mod.Plan, h: torch.Tensor, e=None):
        """Execute ``plan`` on ``h`` (and the embedded context ``e``): (out, log_det).

        ``f`` gives ``(z, log|det dz/dx|)``, ``g`` gives ``(x, log|det dx/dz|)``.
        """
        inverse = plan.context.direction == "g"
        stack = plan.stack
        if stack == "gpu_fused_stack":
            stacked = gpu_fused.model_stack(self, h, inverse=inverse, context=e)
            if stacked is not None:  # None: the stacked weights exceed the cache budget
                return stacked
        elif stack == "rows_parallel":
            return conditioner_pair.rows_parallel(
                self,
                h,
                e,
                lambda chunk, e_chunk: self._run(
                    self._plan(chunk, plan.context.direction, e_chunk), chunk, e_chunk
                ),
            )
        elif stack == "cpu_gemm_stack":
            kept, transformed = self._stack_split()
            slope = self._facts.one_slope
            if inverse:
                return gemm_stack.run_inverse(self, h, kept, transformed, slope, e)
            return gemm_stack.run_forward(
                self,
                h,
                kept,
                transformed,
                slope,
                e,
                grad=plan.context.grad,
                batch_stats=plan.context.batch_stats,
                memory=plan.context.memory,
                anchor_every=self.anchor_every,
                tolerance=resolve_tolerance(self.reconstruction_tolerance, h.dtype),
            )
        elif stack == "invertible":
            return invertible_flow(
                self, h, self.reconstruction_tolerance, anchor_every=self.anchor_every, embedded=e
            )
        forms = self._interleaved_forms(plan)
        if inverse:
            x, log_det = h, None
            views = forms.layer_views() if forms is not None else None
            for i in reversed(range(self.num_layers)):
                x, ld = self._layer(i, x, plan.layers[i], inverse=True, e=e)
                log_det = ld if log_det is None else log_det + ld
                if forms is not None:
                    x = interleaved.inverse_step(forms, i, x, views[i])
                else:
                    x, log_det = self._pre_inverse(i, x, log_det)
            return x, log_det if forms is None else forms.add_log_det(log_det)
        tables = self._knot_tables_for_training(plan)
        if tables:
            with self._knot_cache.prebuilt(tables):
                return self._layers_forward(plan, h, e)
        return self._layers_forward(plan, h, e, forms)

    def _interleaved_forms(self, plan: plan_mod.Plan):
        """The interleaved layers in the engine's forms (``fastnvp.engine.interleaved``) for a
        layer loop without a gradient, checks, tracing or a pending ActNorm initialization;
        else None (the loop calls the layer modules)."""
        ctx = plan.context
        as_modules = (
            ctx.grad
            or ctx.checking
            or ctx.compiling
            or ctx.func_transform
            or ctx.pending_init
            or self._facts.hooked_interleaved
        )
        if not self.interleaved or as_modules or ctx.mixed_norm_modes:
            return None
        return interleaved.prepare(self, ctx.direction, ctx.batch_stats)

    def _stack_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, K1) kept and (L, K2) transformed indices of every layer for the GEMM stack, each
        row increasing. Where layers keep different numbers of features (odd D), K1 and K2 are
        the largest counts and shorter rows end in the padding index D
        (``fastnvp.engine.cpu.columns``)."""
        order = self.split_order
        cache = getattr(self, "_stack_split_cache", None)
        if cache is None or cache[0] != (order.data_ptr(), order._version):
            counts = self._num_kept
            k1, k2 = max(counts), self.dim - min(counts)  # a uniform split pads nothing

            def padded(rows, width: int) -> torch.Tensor:
                return torch.stack([F.pad(r, (0, width - r.numel()), value=self.dim) for r in rows])

            rows = list(zip(order, counts, strict=True))
            halves = padded([o[:k] for o, k in rows], k1), padded([o[k:] for o, k in rows], k2)
            cache = self._stack_split_cache = ((order.data_ptr(), order._version), halves)
        return cache[1]

    def _layers_forward(self, plan: plan_mod.Plan, x: torch.Tensor, e=None, forms=None):
        """The layer loop of ``f``; ``forms``: the interleaved layers' engine forms (no
        gradient), else they run as modules."""
        z = x
        log_det = None
        views = forms.layer_views() if forms is not None else None
        stats: list = []
        for i in range(self.num_layers):
            if forms is not None:
                z = interleaved.forward_step(forms, i, z, views[i], None, stats)
            else:
                z, log_det = self._pre_forward(i, z, log_det)
            z, ld = self._layer(i, z, plan.layers[i], inverse=False, e=e)
            log_det = ld if log_det is None else log_det + ld
        if forms is None:
            return z, log_det
        interleaved.finish_batch_stats(forms, stats, x.shape[0], log_det)
        return z, forms.add_log_det(log_det)

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
            s_mlp, t_mlp = self._mlps(i)
            if any(p.requires_grad for p in knots.net_weights(s_mlp, t_mlp)):
                kept, transformed = self._split(i)
                layers.append(i)
                nets += [(s_mlp, kept, transformed), (t_mlp, kept, transformed)]
        if len(layers) < 2 or len({mlp.negative_slope for mlp, _, _ in nets}) != 1:
            return {}
        tables = knots.build_many(nets)
        return {i: (tables[2 * k], tables[2 * k + 1]) for k, i in enumerate(layers)}
