"""Memory-saving training: backward by inversion, so activation memory does not grow with depth.

docs/design.md §5 (the RevNet / MemCNN idea). A coupling stack is invertible, so its intermediate
activations need not be stored for backward: they can be recovered from the output.

- Forward runs every layer under ``no_grad`` and keeps only (N, D) tensors: the stack's input
  and output, and the input of every ``anchor_every``-th layer (default 8; below).
- Backward walks the layers from the last: it reconstructs layer ``i``'s input by inverting the
  layer on its output, recomputes the layer's forward with grad enabled and backpropagates
  through that one layer, then moves on with the reconstructed input; each layer with the same
  kernel and precision as its forward (the steps below). At any time the autograd graph of one
  layer is alive.

All of this is one ``torch.autograd.Function`` over the whole stack. It takes the parameters as
inputs, so their gradients flow through the normal autograd machinery (``loss.backward()``,
``torch.autograd.grad``, gradient hooks); the gradient of ``log_det`` flows too. The model must
provide ``num_layers``, ``layer_forward(i, z) -> (z, log_det)``, ``layer_inverse(i, x) ->
(x, log_det)`` and per-layer nets ``s[i]``, ``t[i]`` holding layer ``i``'s parameters; the layers
must be deterministic (no dropout), or the recomputation would differ from the forward.

Each layer is recomputed with the kernel and precision its forward ran, decided once per call
(in forward, per layer) and kept for backward:

- a layer that ran the fused-layer op (``fastnvp.engine.gpu.fused.model_uses_fused_layer``:
  ``fused="layer"``, or ``"auto"`` on CUDA, for the standard conditioner) takes
  :func:`_fused_layer_step`: the fused layer's inverse reconstructs the input and the fused layer
  is recomputed and backpropagated through its fused backward, all in the model's ``precision``.
  With ``precision="tf32"`` or ``"bf16"`` the forward rounded the matmul operands, so only the
  same op differentiates the function the forward computed (an fp32 recomputation would not).
  Cost per layer: a fused inverse, a fused forward and the fused backward (which recomputes
  the nets from the output), two fused launches more than standard autograd's forward and
  backward;
- every other layer of a :class:`fastnvp.FastRealNVP` takes :func:`_shared_layer_step`, which
  shares one conditioner evaluation between the inversion and the recomputation (the conditioner
  reads only the kept half, which the layer does not change): per layer a training step then
  costs 4 conditioner passes (forward, recompute, and the two of backward) against 3 for
  standard autograd and 5 for the generic inverse + forward walk;
- other models, and FastRealNVP with non-finite checks (they live in ``layer_forward``) or with
  ``share_conditioner=False``, take the generic :func:`_layer_step` through ``layer_inverse`` and
  ``layer_forward``.

Reconstruction is exact in exact arithmetic and close to it in floating point; the engine measures
how close and guards against drift:

- the kept half of each reconstructed input equals the kept half of the output by construction
  (``x1 = z1``), so only the transformed half can drift;
- the recomputed forward of layer ``i`` gives ``f(g(z))``, compared with ``z``: the round-trip
  residual of the transformed half, at the cost of one subtraction and one max per layer;
- inversion amplifies rounding through a deep stack (a float32 stack of 200 random layers can
  lose the input entirely), so the input of every ``anchor_every``-th layer is kept: when the
  walk reaches it, the reconstructed input is compared with the stored one (the drift, measured
  exactly) and replaced by it, so drift never accumulates over more than ``anchor_every``
  layers. An anchor is one (N, D) tensor, tiny next to one layer's (N, H) activations.

All are relative errors ``max|a - b| / max(1, max|b|)``, kept on the device during the walk and
read back once. The report is stored as ``model.last_reconstruction``
(:class:`ReconstructionReport`). If an error exceeds the tolerance (or is NaN), backward raises
:class:`ReconstructionError` instead of returning gradients: the recovered activations would not
be the ones the forward saw, so the gradients would be silently wrong; storing activations
instead would defeat the purpose of the mode. The remedy is ``memory="standard"``, a wider dtype,
a smaller ``anchor_every`` or a looser ``reconstruction_tolerance``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastnvp.engine.first_order import first_order

MEMORY_MODES = ("standard", "invertible")

# Layers between stored inputs. Inverting a deep stack amplifies rounding: a float32 stack of 200
# random layers (B = 1024, H = 128) reconstructs its input with relative error ~3 from the
# output, while its 8-layer segments drift by at most 4e-5. Each anchor is one (N, D) tensor.
DEFAULT_ANCHOR_EVERY = 8

# Relative reconstruction error allowed by default, per dtype. float32 round trips of a coupling
# layer are ~1e-7 relative; the bound leaves room for drift over hundreds of layers while still
# catching a reconstruction that has gone wrong (saturated scales, overflow, NaN).
DEFAULT_TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.bfloat16: 5e-2,
    torch.float16: 5e-2,
}


class ReconstructionError(RuntimeError):
    """Invertible backward recovered activations less accurately than the tolerance allows."""


@dataclass(frozen=True)
class ReconstructionReport:
    """Accuracy of the activations recovered by one invertible backward pass.

    Attributes:
        layer_errors: (L,) float64 CPU tensor; entry ``i`` is the relative round-trip residual
            ``max|f_i(g_i(z_i)) - z_i| / max(1, max|z_i|)`` of layer ``i``.
        anchor_layers: the layers whose stored input the reconstruction was compared with
            (0, the stack input, then every ``anchor_every``-th layer).
        anchor_errors: (A,) float64 CPU tensor; relative error of each reconstructed anchor
            input against its stored copy: the drift accumulated since the anchor above.
        tolerance: the bound all errors were checked against.
    """

    layer_errors: Tensor
    anchor_layers: tuple[int, ...]
    anchor_errors: Tensor
    tolerance: float

    @property
    def max_layer_error(self) -> float:
        """Largest per-layer round-trip residual."""
        return float(self.layer_errors.max())

    @property
    def drift_error(self) -> float:
        """Largest error of a reconstructed anchor input (drift over one anchor segment)."""
        return float(self.anchor_errors.max())

    @property
    def input_error(self) -> float:
        """Relative error of the reconstructed stack input (layer 0's anchor)."""
        return float(self.anchor_errors[0])

    @property
    def ok(self) -> bool:
        """True when every error is finite and within the tolerance."""
        worst = max(self.max_layer_error, self.drift_error)
        return math.isfinite(worst) and worst <= self.tolerance


def check_memory(memory) -> str:
    """Validate a training-memory mode: ``"standard"`` or ``"invertible"``."""
    if not isinstance(memory, str):
        raise TypeError(f"memory must be a str, one of {MEMORY_MODES}, got {type(memory).__name__}")
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


def check_tolerance(tolerance) -> float | None:
    """Validate a reconstruction tolerance: None (the dtype's default) or a float > 0.

    ``math.inf`` measures and reports the errors but raises only for non-finite ones.
    """
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(
            f"reconstruction_tolerance must be a float or None, got {type(tolerance).__name__}"
        )
    if math.isnan(tolerance) or tolerance <= 0:
        raise ValueError(f"reconstruction_tolerance must be > 0, got {tolerance!r}")
    return float(tolerance)


def check_anchor_every(anchor_every) -> int | None:
    """Validate an anchor spacing: None (only the stack input is kept) or an int >= 1."""
    if anchor_every is None:
        return None
    if isinstance(anchor_every, bool) or not isinstance(anchor_every, int):
        raise TypeError(f"anchor_every must be an int or None, got {type(anchor_every).__name__}")
    if anchor_every < 1:
        raise ValueError(f"anchor_every must be >= 1 (or None), got {anchor_every}")
    return anchor_every


def resolve_tolerance(tolerance: float | None, dtype: torch.dtype) -> float:
    """The tolerance in force for activations of ``dtype``."""
    tolerance = check_tolerance(tolerance)
    return DEFAULT_TOLERANCE.get(dtype, 1e-3) if tolerance is None else tolerance


def _relative_error(a: Tensor, b: Tensor) -> Tensor:
    """``max|a - b| / max(1, max|b|)`` as a 0-d float64 tensor on the device (no sync)."""
    scale = b.detach().abs().amax().to(torch.float64).clamp_min(1.0)
    return (a.detach() - b.detach()).abs().amax().to(torch.float64) / scale


def _layer_params(model, num_layers: int) -> list[list[Tensor]]:
    """Per layer, the parameters of ``s[i]`` and ``t[i]`` that require grad (deduplicated)."""
    out = []
    for i in range(num_layers):
        seen: dict[int, Tensor] = {}
        for p in (*model.s[i].parameters(), *model.t[i].parameters()):
            if p.requires_grad:
                seen.setdefault(id(p), p)
        out.append(list(seen.values()))
    return out


def _pre_layers(model) -> list[list]:
    """Per step, the interleaved layers it runs before its coupling (docs/design.md §1.8)."""
    from fastnvp.core.interleave import step_layers

    return [step_layers(model, i) for i in range(model.num_layers)]


def _trainable(module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _autocast(state):
    device_type, dtype, enabled = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _recompute_step(inverse, forward, z, g, grad_log_det, params, autocast):
    """Reconstruct a layer's input with ``inverse``, recompute ``forward`` with grad, backprop.

    ``inverse`` / ``forward``: (N, D) -> ((N, D), (N,)), the layer in each direction. Reconstructs
    the input ``x`` from the output ``z`` (N, D), recomputes the layer with grad and
    backpropagates ``g`` (N, D) and ``grad_log_det`` (N,) (None: zeros) through it.

    Returns:
        ``(x, grad_x, grads of params, round-trip error)``.
    """
    x, _ = inverse(z)  # grad mode is off in a Function's backward
    with torch.enable_grad(), _autocast(autocast):
        x_leaf = x.detach().requires_grad_(True)
        z_again, log_det = forward(x_leaf)
    if grad_log_det is None:  # only z was used downstream
        grad_log_det = torch.zeros_like(log_det)
    pairs = [(z_again, g.to(z_again.dtype)), (log_det, grad_log_det.to(log_det.dtype))]
    # A layer whose log-det is a constant (a permutation: zeros) leaves it out of the graph.
    pairs = [(out, grad) for out, grad in pairs if out.requires_grad]
    out = torch.autograd.grad(
        [p[0] for p in pairs], (x_leaf, *params), [p[1] for p in pairs], allow_unused=True
    )
    grad_x = out[0] if out[0] is not None else torch.zeros_like(x)
    return x, grad_x, out[1:], _relative_error(z_again, z)


def _with_embedded(e):
    """The extra positional argument of the per-layer calls: () unconditional, (e,) else."""
    return () if e is None else (e,)


def _layer_step(model, i, z, g, grad_log_det, params, autocast, e=None):
    """Generic step through ``model.layer_inverse`` / ``model.layer_forward``.

    ``e``: the embedded context (N, E) of a conditional flow (a leaf when its gradient is
    wanted: then it is also the first of ``params``), or None.

    Returns:
        ``(x, grad_x, grads of params, round-trip error)`` (see :func:`_recompute_step`).
    """
    extra = _with_embedded(e)
    return _recompute_step(
        lambda h: model.layer_inverse(i, h, *extra),
        lambda h: model.layer_forward(i, h, *extra),
        z,
        g,
        grad_log_det,
        params,
        autocast,
    )


def _fused_layer_step(model, i, z, g, grad_log_det, params, autocast, e=None):
    """Step of a layer whose forward ran the fused-layer op: the same op, the same precision.

    The fused layer's inverse (``fastnvp::coupling_layer_inverse``) reconstructs the input, and
    the fused layer (``fastnvp::coupling_layer``) is recomputed with grad, so backward runs its
    fused backward (``fastnvp::coupling_layer_backward``) in the model's ``precision``: the
    gradients are those of the function the forward computed, rounded matmul operands included.
    Calls :func:`fastnvp.engine.gpu.fused.model_layer` directly, as the forward's dispatch decided.

    Returns:
        ``(x, grad_x, grads of params, round-trip error)`` (see :func:`_recompute_step`).
    """
    from fastnvp.engine.gpu import fused as gpu_fused

    # The forward ran the fused layer only with autocast off, so ``autocast`` keeps it off here.
    with _autocast(autocast):
        return _recompute_step(
            lambda h: gpu_fused.model_layer(model, i, h, inverse=True, context=e),
            lambda h: gpu_fused.model_layer(model, i, h, inverse=False, context=e),
            z,
            g,
            grad_log_det,
            params,
            autocast,
        )


def _fused_layers(model, x: Tensor) -> tuple[bool, ...]:
    """Per layer, whether ``model.layer_forward`` runs it as the fused-layer op on state ``x``.

    The forward's dispatch (``fastnvp.engine.gpu.fused.model_uses_fused_layer``) depends on the
    model
    and on the state's device and autocast, not on its values: one decision per call serves
    every layer's forward and the backward. False for every layer of models without fused levels.
    """
    if getattr(model, "fused", "none") in ("op", "none"):
        return (False,) * model.num_layers
    from fastnvp.engine.gpu import fused as gpu_fused

    return tuple(gpu_fused.model_uses_fused_layer(model, i, x) for i in range(model.num_layers))


def _can_share(model) -> bool:
    """Whether the model exposes the pieces of a layer that :func:`_shared_layer_step` needs."""
    checking = getattr(model, "_checking", None)
    if checking is not None and checking():
        return False  # non-finite checks and gradient watches live in layer_forward
    return callable(getattr(model, "_split", None)) and callable(getattr(model, "_layer_st", None))


def _shared_layer_step(model, i, z, g, grad_log_det, params, autocast, e=None):
    """Like :func:`_layer_step`, evaluating the conditioner once instead of twice.

    The conditioner of layer ``i`` sees only the kept half, and the kept half of the input equals
    the kept half of the output (``x1 = z1``). So ``(s, t)`` computed from ``z`` with grad serve
    both the inversion ``x2 = (z2 - t) exp(-s)`` and the recomputed coupling
    ``z2 = x2 exp(s) + t``. With F the cost of one conditioner forward, a layer's training step
    costs F (forward) + F (recompute) + 2F (backward) = 4F instead of 5F with the generic step
    (standard autograd: 3F). FastRealNVP only
    (``_split``, ``_layer_st``, the coupling ops).
    """
    from fastnvp import ops

    kept, transformed = model._split(i)
    with torch.enable_grad(), _autocast(autocast):
        h = z.detach().requires_grad_(True)  # stands for x: only its kept half is read
        path = model._plan(h, "f", e).layers[i]  # the layer's path under autograd
        s, t = model._layer_st(i, h, kept, transformed, "f", path, e)
    z2 = z.index_select(1, transformed)
    x2, _ = ops.affine_coupling_inverse(z2, s.detach(), t.detach())
    with torch.enable_grad(), _autocast(autocast):
        x2_leaf = x2.detach().requires_grad_(True)
        z2_again, log_det = ops.affine_coupling(x2_leaf, s, t)
    if grad_log_det is None:  # only z was used downstream
        grad_log_det = torch.zeros_like(log_det)
    out = torch.autograd.grad(
        (z2_again, log_det),
        (h, x2_leaf, *params),
        (g.index_select(1, transformed).to(z2_again.dtype), grad_log_det.to(log_det.dtype)),
        allow_unused=True,
    )
    grad_h, grad_x2 = out[0], out[1]
    # dz1/dx1 = I: the upstream gradient of the kept half passes through, plus the conditioner's.
    grad_x = g if grad_h is None else g + grad_h.to(g.dtype)
    grad_x = grad_x.index_copy(1, transformed, grad_x2.to(g.dtype))
    x = z.to(x2.dtype).index_copy(1, transformed, x2)
    return x, grad_x, out[2:], _relative_error(z2_again, z2)


def _pre_layer_step(layer, stats, z, g, grad_log_det, params, autocast):
    """Step of one interleaved layer (docs/design.md §1.8): invert it on its output ``z``,
    recompute it with grad, backprop. A BatchNorm that used batch statistics inverts with the
    (mean, var) its forward kept (``stats``) and is recomputed from the reconstructed batch's
    own statistics, without touching the running averages.

    Returns:
        ``(x, grad_x, grads of params, round-trip error)`` (see :func:`_recompute_step`).
    """
    if stats is None:
        return _recompute_step(layer.inverse, layer.forward, z, g, grad_log_det, params, autocast)
    return _recompute_step(
        lambda h: layer.inverse_with(h, *stats),
        lambda h: layer.forward_with(h, *layer.batch_statistics(h)),
        z,
        g,
        grad_log_det,
        params,
        autocast,
    )


def _pre_forward(layer, h: Tensor, stats: list):
    """An interleaved layer's forward in the stack; a batch-statistics BatchNorm's (mean, var)
    go to ``stats`` (None for every other layer)."""
    if getattr(layer, "uses_batch_statistics", False):
        y, log_det, batch = layer.forward_batch(h)
        stats.append(batch)
        return y, log_det
    stats.append(None)
    return layer(h)


class _InvertibleStack(torch.autograd.Function):
    """``(x, *params) -> (z, log_det)`` over all layers; backward by inversion (module doc)."""

    @staticmethod
    def forward(ctx, model, tolerance, share, anchor_every, layer_params, x, e, *params):
        # Autograd has switched grad mode off here: nothing is recorded for the layers.
        # Which layers run the fused-layer op, decided once: backward recomputes them with it.
        ctx.fused_layers = _fused_layers(model, x)
        z = x
        log_det = None
        anchors = []
        pre = _pre_layers(model)
        pre_stats: list[list] = []  # per step, per interleaved layer: (mean, var) or None
        for i in range(model.num_layers):
            if anchor_every is not None and i > 0 and i % anchor_every == 0:
                anchors.append(z)  # step i's input, (N, D): tiny next to a layer's activations
            pre_stats.append([])
            for layer in pre[i]:
                z, ld = _pre_forward(layer, z, pre_stats[i])
                log_det = ld if log_det is None else log_det + ld
            z, ld = model.layer_forward(i, z, *_with_embedded(e))
            log_det = ld if log_det is None else log_det + ld
        ctx.pre, ctx.pre_stats = pre, pre_stats
        ctx.model = model
        ctx.embedded = e  # (N, E) or None: the embedded context every layer sees
        ctx.tolerance = tolerance
        ctx.share = share
        ctx.layer_params = layer_params
        positions = {id(p): k for k, p in enumerate(params)}
        ctx.layer_slots = [[positions[id(p)] for p in lp] for lp in layer_params]
        ctx.pre_slots = [
            [[positions[id(p)] for p in _trainable(layer)] for layer in step] for step in pre
        ]
        ctx.num_params = len(params)
        device_type = x.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        num_layers = model.num_layers
        ctx.anchor_layers = (
            (0,) if anchor_every is None else tuple(range(0, num_layers, anchor_every))
        )
        ctx.save_for_backward(x, z, *anchors)
        return z, log_det

    @staticmethod
    @first_order
    def backward(ctx, grad_z, grad_log_det):
        model = ctx.model
        x_in, z, *anchors = ctx.saved_tensors
        stored = dict(zip(ctx.anchor_layers, (x_in, *anchors)))
        anchor_errors: list[Tensor] = []
        if grad_z is None:
            grad_z = torch.zeros_like(z)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        grads: list[Tensor | None] = [None] * ctx.num_params
        errors: list[Tensor] = []
        g = grad_z
        autocast = (device_type, autocast_dtype, autocast_on)
        # One step per layer, chosen once: the forward's fused layers through the fused op, the
        # others through the shared conditioner where possible (module doc).
        plain = _shared_layer_step if ctx.share else _layer_step
        steps = [_fused_layer_step if fused else plain for fused in ctx.fused_layers]
        e = ctx.embedded
        wants_e = e is not None and ctx.needs_input_grad[6]
        grad_e = None
        if e is not None:  # a leaf, so each layer's step also returns d(loss)/de of that layer
            e = e.detach().requires_grad_(wants_e)
        for i in reversed(range(model.num_layers)):
            inputs = ([e] if wants_e else []) + ctx.layer_params[i]
            x, g, layer_grads, error = steps[i](model, i, z, g, grad_log_det, inputs, autocast, e)
            if wants_e:
                ge, layer_grads = layer_grads[0], layer_grads[1:]
                if ge is not None:
                    grad_e = ge if grad_e is None else grad_e + ge
            errors.append(error)
            for slot, gp in zip(ctx.layer_slots[i], layer_grads):
                if gp is not None:
                    grads[slot] = gp if grads[slot] is None else grads[slot] + gp
            for k in reversed(range(len(ctx.pre[i]))):  # the step's interleaved layers
                layer, stats = ctx.pre[i][k], ctx.pre_stats[i][k]
                pre_params = _trainable(layer)
                x, g, pre_grads, _ = _pre_layer_step(
                    layer, stats, x, g, grad_log_det, pre_params, autocast
                )
                for slot, gp in zip(ctx.pre_slots[i][k], pre_grads):
                    if gp is not None:
                        grads[slot] = gp if grads[slot] is None else grads[slot] + gp
            if i in stored:
                # Measure the drift exactly, then restart the walk from the stored input.
                anchor_errors.append(_relative_error(x, stored[i]))
                x = stored[i]
            z = x
        errors.reverse()
        # One read-back for the whole walk, so the device is not synchronised per layer.
        anchor_errors.reverse()
        summary = torch.stack([*errors, *anchor_errors]).cpu()
        num_layers = model.num_layers
        report = ReconstructionReport(
            summary[:num_layers].clone(),
            ctx.anchor_layers,
            summary[num_layers:].clone(),
            ctx.tolerance,
        )
        model.last_reconstruction = report
        if not report.ok:
            raise ReconstructionError(_failure_message(report))
        grad_x = g if ctx.needs_input_grad[5] else None
        if wants_e and grad_e is None:
            grad_e = torch.zeros_like(e)
        return (None, None, None, None, None, grad_x, grad_e, *grads)


def _failure_message(report: ReconstructionReport) -> str:
    tol = report.tolerance
    errors = report.layer_errors.tolist()
    # Backward walks from the last layer: the highest failing index is where it first went wrong.
    bad = [i for i, e in enumerate(errors) if not e <= tol]
    if bad:
        where = (
            f"first failing layer {max(bad)} (walking back from the output): round-trip error "
            f"{errors[max(bad)]:.3g}"
        )
    else:
        where = f"per-layer round trips within tolerance (worst {max(errors):.3g})"
    drift = report.anchor_errors.tolist()
    worst = max(range(len(drift)), key=lambda k: drift[k] if drift[k] == drift[k] else math.inf)
    return (
        "invertible backward: activations recovered by inversion are not accurate enough for "
        f"exact gradients ({where}; drift at anchor layer {report.anchor_layers[worst]}: "
        f"{drift[worst]:.3g}; "
        f"reconstruction_tolerance={tol:.3g}). Use memory='standard', a wider dtype, a smaller "
        "anchor_every or a larger reconstruction_tolerance."
    )


def invertible_flow(
    model,
    x: Tensor,
    tolerance: float | None = None,
    share_conditioner: bool | None = None,
    anchor_every: int | None = DEFAULT_ANCHOR_EVERY,
    embedded: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``model``'s coupling stack data -> latent with memory-saving backward.

    Args:
        model: a flow with ``num_layers``, ``layer_forward``, ``layer_inverse`` and nets
            ``s[i]``, ``t[i]`` (e.g. :class:`fastnvp.FastRealNVP`).
        x: (N, D) data batch (already validated by the caller).
        tolerance: relative reconstruction error allowed in backward; None for the default of
            ``x``'s dtype (:data:`DEFAULT_TOLERANCE`).
        share_conditioner: evaluate each layer's conditioner once for both the inversion and the
            recomputation (:func:`_shared_layer_step`, FastRealNVP without checks) instead of
            going through ``layer_inverse`` + ``layer_forward``; None: whenever possible. Layers
            that run the fused-layer op always take :func:`_fused_layer_step` (module doc).
        anchor_every: keep the input of every ``anchor_every``-th layer, (N, D) each, and restart
            the reconstruction from it (bounding drift to that many layers); None keeps only the
            stack input.
        embedded: a conditional flow's embedded context e (N, E), passed to every layer
            (``layer_forward(i, z, e)``); its gradient is summed over the layers. None when
            unconditional.

    Returns:
        ``(z (N, D), log_det (N,))``, the same values as the layer-by-layer forward. Backward
        stores :class:`ReconstructionReport` as ``model.last_reconstruction`` and raises
        :class:`ReconstructionError` when the reconstruction is not accurate enough.
    """
    tol = resolve_tolerance(tolerance, x.dtype)
    anchor_every = check_anchor_every(anchor_every)
    possible = _can_share(model)
    if share_conditioner is None:
        share_conditioner = possible
    elif not isinstance(share_conditioner, bool):
        raise TypeError(
            f"share_conditioner must be a bool or None, got {type(share_conditioner).__name__}"
        )
    elif share_conditioner and not possible:
        raise ValueError(
            "share_conditioner=True needs a FastRealNVP without non-finite checks "
            "(_split and _layer_st)"
        )
    layer_params = _layer_params(model, model.num_layers)
    params = [p for lp in layer_params for p in lp]
    params += [p for step in _pre_layers(model) for layer in step for p in _trainable(layer)]
    # A parameter shared between layers appears once among the Function's inputs.
    unique = list({id(p): p for p in params}.values())
    return _InvertibleStack.apply(
        model, tol, share_conditioner, anchor_every, layer_params, x, embedded, *unique
    )
