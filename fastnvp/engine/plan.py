"""The execution plan: which executor runs a flow call, decided once (docs/design.md §3).

Three pieces, each decided in one place:

- :class:`FlowFacts` — what does not change between calls: per layer the split, whether the
  conditioner is the standard pair (docs/design.md §1.3), its hidden width and slope, whether the
  log-scale is soft-clamped; for the whole flow whether the split is uniform and every layer has
  its own parameters. Computed by :func:`flow_facts` at construction and after
  ``load_state_dict``.
- :class:`CallContext` — what a call brings: direction, device, dtype, rows, whether a gradient
  is needed, autocast, ``torch.compile`` tracing, a ``torch.func`` transform, non-finite checks,
  intra-op threads, whether it runs inside a row worker, the op backend, the memory mode and
  the model's options.
- :class:`Policy` — the thresholds (rows per thread, when the knot form pays under autograd).

:func:`choose` is a pure function of the three and returns a frozen :class:`Plan`: one stack
strategy, one path per layer and the reason. ``FastRealNVP`` caches plans per context, so a
training loop asks the predicates once, not once per layer per call; ``FastRealNVP.explain``
returns the plan a call would take.

Stack strategies (:data:`STACKS`):

``gpu_fused_stack``  every layer is a fused Triton layer and nothing needs a gradient: one
                     whole-stack launch (``fastnvp.engine.gpu.fused.model_stack``).
``rows_parallel``    CPU flows the GEMM stack does not take, several threads, many rows: one
                     chunk of rows per thread, each run by the sub-plan chosen for it in a worker.
``cpu_gemm_stack``   CPU, standard layers, uniform split: the whole stack as batched GEMMs, one
                     autograd node with a hand-written backward (``fastnvp.engine.cpu.gemm_stack``),
                     in either memory mode.
``invertible``       memory="invertible" where the GEMM stack does not apply: the generic
                     recompute-by-inversion stack (``fastnvp.engine.invertible``), each layer
                     recomputed
                     on the path its forward used.
``layers``           a Python loop over the layers, each on its own path (:data:`LAYER_PATHS`).

Layer paths: ``fused_layer`` (the fused-layer op), ``cpu_knots`` (the exact piecewise-linear
form of a one-input conditioner, ``fastnvp.engine.cpu.knots``), ``cpu_pair`` (the CPU
conditioner pair, ``fastnvp.engine.cpu.conditioner_pair``), ``split_mlp`` (the standard nets on
the split halves with plain ``F.linear``), ``modules`` (the user's own nets on the masked input).

Interleaved layers (docs/design.md §1.8: a norm and a mixing layer before each coupling) run
inside the GEMM stack, the invertible stack and the layer loop; the whole-stack kernel takes
fixed permutations only (folded into its gathers), and three facts of a call constrain the
choice: ActNorm layers still to initialize run the layer loop (their first ``f`` call),
BatchNorm layers in mixed train / eval modes run as modules, and BatchNorm with batch
statistics (``f`` in train mode) never splits the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

STACKS = ("gpu_fused_stack", "rows_parallel", "cpu_gemm_stack", "invertible", "layers")
LAYER_PATHS = ("fused_layer", "cpu_knots", "cpu_pair", "split_mlp", "modules")
DIRECTIONS = ("f", "g")

_CPU_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class LayerFacts:
    """What a coupling layer is, independent of the call.

    Attributes:
        kept: K1, the number of kept (conditioning) features.
        standard: the nets are the standard conditioner pair (docs/design.md §1.3).
        hidden: H of the standard pair (None otherwise).
        slope: the LeakyReLU slope of the standard pair (None otherwise).
        clamped: the log-scale is soft-clamped (``clamp`` set and a non-standard layer).
        context_width: E, the embedded context columns the conditioner also sees (0:
            unconditional).
        pre: the kinds (``fastnvp.core.flow_layer.KINDS``) of the interleaved layers the step
            runs before this coupling, in order.
    """

    kept: int
    standard: bool
    hidden: int | None
    slope: float | None
    clamped: bool
    context_width: int = 0
    pre: tuple[str, ...] = ()

    @property
    def fusable(self) -> bool:
        """The fused Triton layer supports it: standard, H a power of two >= 16 (§4.5)."""
        h = self.hidden
        return self.standard and h is not None and h >= 16 and h & (h - 1) == 0


@dataclass(frozen=True)
class FlowFacts:
    """What a flow is, independent of the call: its layers and whole-stack properties.

    Attributes:
        layers: one :class:`LayerFacts` per coupling layer.
        dim: D.
        uniform_split: every layer keeps the same number of features.
        own_parameters: no parameter tensor is shared between layers or nets.
        context_width: E, the embedded context width of a conditional flow (0: unconditional).
        hooked_interleaved: a norm or mixing layer has a forward or backward hook: the engine's
            forms of those layers would skip it, so they run as modules.
    """

    layers: tuple[LayerFacts, ...]
    dim: int
    uniform_split: bool
    own_parameters: bool
    context_width: int = 0
    hooked_interleaved: bool = False

    @property
    def all_standard(self) -> bool:
        return all(layer.standard for layer in self.layers)

    @cached_property
    def has_knot_layers(self) -> bool:
        """Some standard layer keeps one feature (the knot forms apply to it); read on every
        call without a gradient (``FastRealNVP._pieces_ready``), so computed once."""
        return any(layer.kept == 1 and layer.standard for layer in self.layers)

    @property
    def pre_kinds(self) -> frozenset[str]:
        """The kinds of interleaved layers anywhere in the flow (empty without any)."""
        return frozenset(kind for layer in self.layers for kind in layer.pre)

    @property
    def one_slope(self) -> float | None:
        """The slope shared by every layer, or None when layers differ or are not standard."""
        slopes = {layer.slope for layer in self.layers}
        return slopes.pop() if len(slopes) == 1 and None not in slopes else None


def flow_facts(model) -> FlowFacts:
    """The :class:`FlowFacts` of a ``FastRealNVP`` (its ``_standard`` / ``_num_kept`` lists)."""
    from fastnvp.core.conditioner import match_standard_mlp, module_hooks
    from fastnvp.core.interleave import step_layers

    width = model.embedded_features
    layers = []
    for i in range(model.num_layers):
        standard = bool(model._standard[i])
        mlp = match_standard_mlp(model.s[i], model.dim, width) if standard else None
        layers.append(
            LayerFacts(
                kept=int(model._num_kept[i]),
                standard=standard,
                hidden=mlp.lin1.out_features if mlp else None,
                slope=mlp.negative_slope if mlp else None,
                clamped=bool(model._clamped[i]),
                context_width=width,
                pre=tuple(layer.kind for layer in step_layers(model, i)),
            )
        )
    params = [p for net in (*model.s, *model.t) for p in net.parameters()]
    own = len({id(p) for p in params}) == len(params)
    interleaved = [layer for i in range(model.num_layers) for layer in step_layers(model, i)]
    return FlowFacts(
        layers=tuple(layers),
        dim=model.dim,
        uniform_split=len({layer.kept for layer in layers}) == 1,
        own_parameters=own,
        context_width=width,
        hooked_interleaved=any(any(module_hooks(layer)) for layer in interleaved),
    )


@dataclass(frozen=True)
class CallContext:
    """What one call brings to the choice (hashable: plans are cached per context).

    Attributes:
        direction: ``"f"`` (data -> latent) or ``"g"`` (latent -> data).
        device: the device type, ``"cpu"`` or ``"cuda"``.
        dtype: the state's dtype.
        rows: N.
        grad: a gradient is needed (grad mode on and the input or a parameter requires grad).
        autocast: autocast is enabled on the device.
        compiling: inside ``torch.compile`` tracing.
        func_transform: inside a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``,
            ``jacfwd``, ``hessian``, ...): every layer on plain tensor ops
            (:func:`layer_path`), which the transforms batch and differentiate to any order;
            the engine's hand-written backwards and custom ops have no batching rule and are
            first order.
        checking: non-finite checks are on.
        threads: ``torch.get_num_threads()``.
        in_worker: the call runs on a row-parallel worker.
        triton: the ops run their Triton kernels on this state (``fastnvp.ops.backend.use_triton``:
            CUDA, or the interpreter with ``FASTNVP_BACKEND=triton``).
        memory: ``"standard"`` or ``"invertible"``.
        fused: the model's ``fused`` level.
        knot_tables: the model's ``knot_tables`` option.
        batch_stats: a BatchNorm layer normalizes with the batch's statistics (``f`` in train
            mode): the rows of a call are not independent.
        pending_init: an ActNorm layer initializes from this call's batch (``f`` before any).
        mixed_norm_modes: some BatchNorm layers are in train mode and others in eval mode.
        pieces_ready: without autograd, the knot pieces of the current parameters are built or
            worth building now (``FastRealNVP._pieces_ready``: where the GEMM stack can run the
            flow it is "rented" until the calls at these parameters have run
            ``Policy.pieces_build_rows`` rows; a flow it cannot run takes the pieces at once).
    """

    direction: str
    device: str
    dtype: torch.dtype
    rows: int
    grad: bool
    autocast: bool
    compiling: bool
    checking: bool
    threads: int
    in_worker: bool
    triton: bool
    memory: str
    fused: str
    knot_tables: bool
    batch_stats: bool = False
    pending_init: bool = False
    mixed_norm_modes: bool = False
    pieces_ready: bool = True
    func_transform: bool = False


@dataclass(frozen=True)
class Policy:
    """The thresholds of :func:`choose`, in one place (tests pass their own).

    Attributes:
        min_rows_per_thread: fewest rows per thread for ``rows_parallel``; below it the call runs
            on the caller's thread (at B = 1024 on two cores the per-chunk Python work,
            serialised by the GIL, outweighed the saved
            barriers).
        parallel_training: ``rows_parallel`` also for training steps (one autograd graph per
            chunk, parameter gradients summed).
        knot_min_hidden: with autograd, the knot form (``fastnvp.engine.cpu.knots``) from this
        hidden
            width on. Its per-row work is O(H) but with a larger constant than the GEMM's O(H^2)
            (about 15 passes over an (N, H) tile in forward + backward): on 2 cores, training
            at H = 64 stayed ~2x faster in the GEMM form even at B = 16384, while at H = 256
            the knot form was 2-2.6x faster from B = 1024. Without autograd the piece form is
            used at every width and batch (with cached tables it was 1.24-5.75x faster than
            the per-layer GEMM path for H in {16, ..., 128}, B in {16, ..., 4096}, L = 8).
        knot_min_work_grad: with autograd, the knot form from ``rows * H^2`` this large: the
            tables are built and differentiated on every call (about 3 ms per net at H = 256),
            so at H = 256 from 1024 rows (the crossover was between 512 and 1024 rows for a
            training step at L = 8).
        pieces_min_hidden: without autograd, the knot piece form only from this hidden width
            on: below it the GEMM stack was faster at every batch measured (D = 2, L = 8, 2
            threads, GEMM time over the cached pieces': H = 16: 0.55-0.71 from 4096 to 131072
            rows; H = 32: 0.67-0.90 up to 8192 rows, 1.00 at 16384).
        pieces_min_work: without autograd, the knot piece form from ``rows * H^3`` this large
            (and ``pieces_min_hidden``). The crossover moves to fewer rows faster than 1/H^2 as
            H grows: with its one-feature output GEMM run as W3 h2^T (``gemm_stack._nets``),
            the GEMM stack over the cached pieces at D = 2, L = 8, 2 threads, ``log_prob``
            (``sample`` alike): H = 64: 0.92-0.99 at 1024 rows, 1.04 at 1536, 1.19-1.58 from
            2048; H = 128: 0.86 at 128, 1.00 at 256, 1.24 at 384; H = 192: 1.16 at 128;
            H = 256: 0.89 at 16, 1.02 at 32, 1.26 at 64 (L = 50 alike: H = 32, 4096 rows 0.76;
            H = 64, 1024 rows 0.91; H = 128, 256 rows 0.98). 384 Mi puts the switch at 1536
            rows for H = 64, 192 for H = 128 and 24 for H = 256. (Before that GEMM change the
            rule was ``rows * H^2`` >= 512 Ki, and H = 32 at 4096 rows took the pieces at
            0.97x the fastest peer's ``sample`` in the grid, where the stack is 1.3x faster.)
        mixed_pieces_min_work: without autograd, a stack whose layers keep different numbers
            of features (padded in the GEMM stack) and partly take the knot pieces runs the
            layer loop (pieces where they apply) from ``rows * H^2`` this large, the padded
            GEMM stack below it (D = 3, L = 8, 2 threads, log_prob time of the loop over the
            stack's: H = 128: 1.49 at B = 64, 1.12 at B = 1024, 0.78 at B = 4096; H = 256:
            1.18 at B = 64, 0.98 at B = 256, 0.70 at B = 1024; H = 512: 1.00 at B = 64, 0.74
            at B = 256).
        pieces_build_rows: without autograd, the knot pieces of a set of parameters are built
            once the calls at those parameters have run this many rows (rent, then buy: until
            then the GEMM stack runs). A build costs about as much as the stack's excess over
            the cached pieces on that many rows (D = 2, L = 8, 2 threads: a build takes 9, 13
            and 55 ms at H = 64, 128 and 256; the excess pays for it after 15k, 4k-50k and
            6k-9k rows). Built on every call, a first ``log_prob`` after each optimizer step
            took 10-56 ms against the reference's 1-13 ms (H = 64 / 256, B = 16-1024), while
            cached pieces are 1.4-4.5x faster than the reference.
        gemm_stack: allow ``cpu_gemm_stack``.
    """

    min_rows_per_thread: int = 1024
    parallel_training: bool = True
    knot_min_hidden: int = 128
    knot_min_work_grad: int = 64 * 1024 * 1024
    pieces_min_hidden: int = 64
    pieces_min_work: int = 384 * 1024 * 1024
    mixed_pieces_min_work: int = 24 * 1024 * 1024
    pieces_build_rows: int = 8192
    gemm_stack: bool = True


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class Plan:
    """How one call runs.

    Attributes:
        stack: one of :data:`STACKS`.
        layers: per layer, one of :data:`LAYER_PATHS`: the path the layer takes when the stack
            runs layer by layer (``layers``, ``invertible``) or inside a row worker; for the
            whole-stack executors, the path the same call would take per layer without them.
        reason: why this stack, in words.
        context: the :class:`CallContext` it was chosen for.
    """

    stack: str
    layers: tuple[str, ...]
    reason: str
    context: CallContext = field(repr=False)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for path in self.layers:
            counts[path] = counts.get(path, 0) + 1
        paths = ", ".join(f"{n} x {p}" for p, n in counts.items())
        return f"{self.stack} ({paths}): {self.reason}"


def _knot_form(layer: LayerFacts, ctx: CallContext, policy: Policy) -> bool:
    """The knot form for a standard CPU layer (``fastnvp.engine.cpu.knots``): one input column."""
    if not ctx.knot_tables or layer.kept != 1 or layer.context_width or ctx.compiling:
        return False
    h = layer.hidden
    if not ctx.grad:
        return h >= policy.pieces_min_hidden and ctx.rows * h**3 >= policy.pieces_min_work
    return h >= policy.knot_min_hidden and ctx.rows * h * h >= policy.knot_min_work_grad


def layer_path(layer: LayerFacts, ctx: CallContext, policy: Policy = DEFAULT_POLICY) -> str:
    """The path of one layer in context ``ctx`` (one of :data:`LAYER_PATHS`)."""
    if not layer.standard:
        return "modules"
    if ctx.func_transform:  # plain F.linear and tensor ops: what vmap and higher orders need
        return "split_mlp"
    # Non-finite checks inspect s and t, and autocast changes the nets' precision: both need
    # the unfused conditioner. The kernel tiles H in powers of two >= 16 (docs/design.md §4.5);
    # the ops' PyTorch path takes any width.
    unfused_only = ctx.checking or ctx.autocast
    wanted = ctx.fused == "layer" or (ctx.fused == "auto" and ctx.device == "cuda" and ctx.triton)
    if wanted and not unfused_only and (layer.fusable or not ctx.triton):
        return "fused_layer"
    if ctx.device == "cpu" and ctx.dtype in _CPU_DTYPES and not ctx.autocast:
        return "cpu_knots" if _knot_form(layer, ctx, policy) else "cpu_pair"
    return "split_mlp"


def choose(facts: FlowFacts, ctx: CallContext, policy: Policy = DEFAULT_POLICY) -> Plan:
    """The plan of a call: a pure function of the flow's facts, the context and the policy."""
    if ctx.direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {ctx.direction!r}")
    paths = tuple(layer_path(layer, ctx, policy) for layer in facts.layers)

    def plan(stack: str, reason: str) -> Plan:
        return Plan(stack, paths, reason, ctx)

    if ctx.compiling:
        return plan("layers", "inside torch.compile: the layer loop traces into one graph")
    if ctx.func_transform:
        return plan("layers", "inside a torch.func transform: the layer loop on plain tensor ops")
    if ctx.checking:
        return plan("layers", "non-finite checks inspect every layer's s, t and outputs")
    if ctx.pending_init:
        return plan("layers", "ActNorm layers initialize from this batch (first f call)")
    if facts.hooked_interleaved:
        return plan("layers", "a norm or mixing layer has a hook: those layers run as modules")
    if ctx.mixed_norm_modes:
        return plan("layers", "BatchNorm layers mix train and eval modes: they run as modules")
    if all(p == "fused_layer" for p in paths):
        if not ctx.grad:
            unfoldable = sorted(facts.pre_kinds - {"permutation"})
            if not unfoldable:
                folded = ", permutations folded into its gathers" if facts.pre_kinds else ""
                return plan(
                    "gpu_fused_stack", f"every layer fused, no gradient: one launch{folded}"
                )
            return plan(
                "layers",
                f"{' and '.join(unfoldable)} layers run between the fused layers: the "
                "whole-stack kernel folds only fixed permutations",
            )
        if ctx.memory == "invertible" and ctx.direction == "f":
            return plan("invertible", "fused layers recomputed by inversion in backward")
        return plan("layers", "every layer fused; autograd records one node per layer")
    cpu = ctx.device == "cpu" and ctx.dtype in _CPU_DTYPES and not ctx.autocast
    standard_cpu = cpu and all(p in ("cpu_knots", "cpu_pair") for p in paths)
    # The GEMM stack first: with its few ops per layer, splitting rows across threads lost to
    # the stack's own multi-threaded GEMMs (grid preset, B = 4096, 2 threads: train 0.63x vs
    # 1.07x the reference at D = 16, H = 32; equal within 5 % at H = 256), and the knot form
    # under autograd lost to it too (D = 2, H = 256, B = 1024, L = 50: 0.88x vs 1.15x).
    gemm_ok, why_not = _gemm_stack_fits(facts, ctx, policy, standard_cpu, paths)
    if gemm_ok:
        mode = f", memory={ctx.memory}" if ctx.grad else ""
        split = (
            "uniform split"
            if facts.uniform_split
            else "unequal halves padded with a zero column to one width"
        )
        renting = not ctx.grad and not ctx.pieces_ready and "cpu_knots" in paths
        rent = "; knot pieces not built yet at these parameters" if renting else ""
        return plan(
            "cpu_gemm_stack", f"standard CPU layers{_inside(facts, ctx)}, {split}{mode}{rent}"
        )
    if ctx.batch_stats and standard_cpu and ctx.threads > 1 and not ctx.in_worker:
        why_not += "; no row split: BatchNorm normalizes with the whole batch's statistics"
    elif standard_cpu and not ctx.in_worker and ctx.threads > 1:
        enough = ctx.rows >= 2 * policy.min_rows_per_thread
        piece_form = not ctx.grad and all(p == "cpu_knots" for p in paths)
        trains = ctx.grad and ctx.direction == "f" and ctx.memory == "standard"
        if enough and not piece_form and (not ctx.grad or (trains and policy.parallel_training)):
            return plan(
                "rows_parallel",
                f"{ctx.rows} rows on {ctx.threads} threads; no GEMM stack: {why_not}",
            )
    if ctx.grad and ctx.memory == "invertible" and ctx.direction == "f":
        return plan("invertible", f"recompute by inversion; no GEMM stack: {why_not}")
    return plan("layers", why_not)


def _inside(facts: FlowFacts, ctx) -> str:
    """The interleaved layers the GEMM stack runs inside its walk, as the plan's reason says
    them ("" without any); BatchNorm says which statistics it normalizes with."""
    if not facts.pre_kinds:
        return ""
    kinds = sorted(facts.pre_kinds)
    if "batchnorm" in kinds:
        stats = "batch statistics" if ctx.batch_stats else "running statistics"
        kinds[kinds.index("batchnorm")] = f"batchnorm ({stats})"
    return f" with {' + '.join(kinds)} layers inside the stack"


def _gemm_stack_fits(facts, ctx, policy, standard_cpu, paths) -> tuple[bool, str]:
    if not policy.gemm_stack:
        return False, "the policy turns the GEMM stack off"
    if not standard_cpu:
        return False, "not every layer is a standard conditioner on a CPU fp32/fp64 state"
    if not facts.uniform_split and facts.pre_kinds - {"actnorm", "batchnorm"}:
        return False, "layers keep different numbers of features, with mixing layers between them"
    if not facts.own_parameters:
        return False, "parameters are shared between layers"
    slope = facts.one_slope
    if slope is None or slope < 0:
        return False, "the layers need one LeakyReLU slope >= 0"
    if ctx.grad and ctx.direction == "g":
        return False, "a differentiable inverse runs layer by layer"
    # Without autograd the knot pieces win once built; until the calls at these parameters
    # have paid for a build (ctx.pieces_ready: rent, then buy), the stack runs instead.
    if not ctx.grad and "cpu_knots" in paths and ctx.pieces_ready:
        if all(p == "cpu_knots" for p in paths):
            return False, "the cached knot pieces are faster without autograd"
        hidden = max(layer.hidden for layer, p in zip(facts.layers, paths) if p == "cpu_knots")
        # A row worker runs a chunk of a call whose caller declined the stack for this.
        if ctx.in_worker or ctx.rows * hidden * hidden >= policy.mixed_pieces_min_work:
            return False, "the cached knot pieces of the one-feature layers are faster here"
    return True, ""
