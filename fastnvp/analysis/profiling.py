"""Profiling training steps of deep coupling stacks: time, phases, operator counts, peak memory.

One *training step* is ``model.zero_grad(set_to_none=True)``, ``loss = -log_prob(x).mean()``,
``loss.backward()`` (the optimizer update is left out: it is the same for every mode).

What is measured, and how:

- **time per step**: wall clock (``time.perf_counter``; CUDA synchronised before and after) over
  ``repeats`` unprofiled steps after ``warmup`` steps; the median is reported. At each depth the
  modes are built with the same weights and timed in turn, step by step, so that a change of
  machine load hits them alike.
- **phases and per-layer time**: one extra step under ``torch.profiler``. The model is
  instrumented *from outside* for that step only (no ``record_function`` inside the model: a
  range enters and leaves a dispatcher op even when no profiler runs): ``layer_forward`` /
  ``layer_inverse`` / ``_conditioner`` of :class:`fastnvp.FastRealNVP` are wrapped at instance
  level in ranges ``layer{i}.forward`` / ``layer{i}.inverse`` / ``layer{i}.conditioner``; the
  reference's nets ``s[i]``, ``t[i]`` get forward hooks opening ``layer{i}.conditioner``. Phases:
  ``conditioner`` (the nets), ``coupling`` (the rest of the forward: split, coupling op,
  ``log_det``, merge, prior), ``backward`` (the whole ``loss.backward()``; in invertible mode
  split into ``inverse`` (``layer_inverse`` calls), ``recompute`` (``layer_forward`` calls, or the
  shared conditioner evaluation) and ``gradient`` (the rest: autograd through each layer).
  Backward time is attributed to layers through the autograd sequence numbers linking each
  backward node to its forward op.
- **operator count**: dispatcher ops (``aten::``, ``fastnvp::``, ...) called at top level during
  the step (ops called inside other ops are counted separately as ``ops_all``); on CUDA also the
  kernel launches (``cudaLaunchKernel`` / ``cuLaunchKernel`` runtime calls).
- **peak memory**: bytes allocated above what was allocated before the step (parameters and the
  input; gradients were set to None; the CPU buffer pool released, so the step
  allocates its own buffers where the profiler sees them). CUDA:
  ``torch.cuda.max_memory_allocated`` around an unprofiled step. CPU: the profiler's allocator
  records (``profile_memory=True``) of the profiled step, replayed in time order; the peak of
  the running sum. The *activation* peak subtracts the gradients (all of them, as they exist at
  the end of the step); parameter bytes are reported separately.
- **peak memory from outside** (``memory_probe=True``, :mod:`fastnvp.analysis.memory_probe`): the
  profiler's figure counts only the allocations it records; this one is one extra step per
  (impl, mode, depth) in a fresh Python process, measured by the operating system (peak RSS,
  ``VmHWM``, reset after a warm-up step) or by CUDA's ``max_memory_allocated``, minus what the
  process held with the model, the input and the gradient buffers allocated.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from fastnvp.engine.cpu import buffer_pool

IMPLS = ("fast", "reference")
MODES = ("standard", "invertible")
MB = 1024.0**2

_LAYER_RANGE = re.compile(r"^layer(\d+)\.(forward|inverse|conditioner|backward)$")
_EVALUATE = "autograd::engine::evaluate_function: "
_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


# --------------------------------------------------------------------------------- configuration
@dataclass
class ProfileConfig:
    """What to profile: every (impl, mode, depth) combination at one batch/dim/hidden size."""

    layers: tuple[int, ...] = (8, 50, 100, 200)
    batch: int = 1024
    dim: int = 2
    hidden: int = 128
    device: str = "cpu"
    modes: tuple[str, ...] = MODES
    impls: tuple[str, ...] = ("fast",)
    repeats: int = 3
    warmup: int = 1
    trace_layers: int | None = None  # depth whose profile is exported as a trace; None: smallest
    seed: int = 0
    threads: int | None = None  # torch.get_num_threads() when None
    fused: str | None = None  # FastRealNVP's ``fused`` level; None keeps the model's default
    memory_probe: bool = False  # also measure peak memory from outside, in fresh processes

    def __post_init__(self) -> None:
        self.layers = _positive_ints(self.layers, "layers")
        for name in ("batch", "dim", "hidden", "repeats"):
            _positive_int(getattr(self, name), name)
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2 (a coupling layer needs two parts), got {self.dim}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        self.modes = _choices(self.modes, MODES, "modes")
        self.impls = _choices(self.impls, IMPLS, "impls")
        if not isinstance(self.device, str) or self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        if self.trace_layers is None:
            self.trace_layers = min(self.layers)
        elif self.trace_layers not in self.layers:
            raise ValueError(f"trace_layers={self.trace_layers} is not one of layers {self.layers}")
        if self.threads is not None:
            _positive_int(self.threads, "threads")
        if self.fused is not None:
            from fastnvp.ops.fused_layer import check_fused

            check_fused(self.fused)
        if not isinstance(self.memory_probe, bool):
            raise TypeError(f"memory_probe must be a bool, got {type(self.memory_probe).__name__}")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _positive_ints(values, name: str) -> tuple[int, ...]:
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must name at least one value")
    for v in values:
        _positive_int(v, name)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value, got {values}")
    return tuple(sorted(values))


def _choices(values, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must name at least one of {allowed}")
    for v in values:
        if v not in allowed:
            raise ValueError(f"{name} must be among {allowed}, got {v!r}")
    # Keep the canonical order whatever the order given.
    return tuple(a for a in allowed if a in values)


# ----------------------------------------------------------------------------------- the step
def build_model(
    impl: str,
    num_layers: int,
    dim: int,
    hidden: int,
    mode: str,
    device: str,
    seed: int = 0,
    fused: str | None = None,
) -> nn.Module:
    """A standard-conditioner flow (docs/design.md §1.3) of ``impl`` in training-memory ``mode``.

    ``fused`` sets FastRealNVP's fused level (None: its default); the reference ignores it.
    """
    from fastnvp.core.reference import RealNVP
    from fastnvp.flows.fast_realnvp import FastRealNVP

    torch.manual_seed(seed)
    if impl == "fast":
        model = FastRealNVP.standard(dim, num_layers, hidden, memory=mode)
        if fused is not None:
            model.fused = fused
    elif impl == "reference":
        if mode != "standard":
            raise ValueError(
                "impl='reference' supports only mode='standard': invertible training needs the "
                "per-layer layer_forward/layer_inverse of FastRealNVP"
            )
        model = RealNVP.standard(dim, num_layers, hidden)
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return model.to(device)


def make_batch(batch: int, dim: int, device: str, seed: int = 0) -> torch.Tensor:
    """A fixed (batch, dim) float32 standard-normal batch."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=gen).to(device)


def training_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Zero the gradients (to None), ``-log_prob(x).mean()`` and backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    loss = -model.log_prob(x).mean()
    loss.backward()
    return loss.detach()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(
    model: nn.Module, x: torch.Tensor, repeats: int, warmup: int, device: str
) -> list[float]:
    """Seconds per training step for ``repeats`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        training_step(model, x)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        training_step(model, x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def tensor_bytes(tensors) -> int:
    """Total bytes of the given tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def cuda_step_peak(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated on the GPU during one step, above the allocation before it."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    training_step(model, x)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def profiler_peak_bytes(prof: profile, device_type: str = "cpu") -> int:
    """Peak of the running sum of the allocator records of ``device_type`` in a profile.

    Needs ``profile_memory=True``. Each record is one allocation (+bytes) or free (-bytes); the
    running sum in time order is the memory allocated above the start of the profile.
    """
    want = torch.device(device_type).type
    records = []
    for event in prof.profiler.kineto_results.events():
        if event.name() != "[memory]":
            continue
        if event.device_type().name.lower() != want:
            continue
        records.append((event.start_ns(), event.nbytes()))
    records.sort(key=lambda r: r[0])
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return int(peak)


# ------------------------------------------------------------------------ instrumentation
@contextmanager
def instrument(model: nn.Module) -> Iterator[None]:
    """Open ``record_function`` ranges around each layer's pieces, for the duration only.

    FastRealNVP-like models (``layer_forward``): instance-level wrappers of ``layer_forward``,
    ``layer_inverse`` and ``_conditioner``. Other flows: forward hooks on ``s[i]`` and ``t[i]``.
    Everything is removed on exit, so the model runs uninstrumented afterwards.
    """
    wrapped: list[str] = []
    hooks = []

    def ranged(fn: Callable, label: str) -> Callable:
        def wrapper(i, *args, **kwargs):
            with record_function(f"layer{i}.{label}"):
                return fn(i, *args, **kwargs)

        return wrapper

    targets = (("layer_forward", "forward"), ("layer_inverse", "inverse"))
    try:
        if hasattr(model, "layer_forward"):
            for name, label in (*targets, ("_conditioner", "conditioner")):
                if hasattr(model, name):
                    setattr(model, name, ranged(getattr(model, name), label))
                    wrapped.append(name)
        else:
            for i in range(model.num_layers):
                for net in (model.s[i], model.t[i]):
                    hooks.extend(_range_hooks(net, f"layer{i}.conditioner"))
        yield
    finally:
        for name in wrapped:
            delattr(model, name)  # drops the instance attribute: the class method shows again
        for hook in hooks:
            hook.remove()


def _range_hooks(net: nn.Module, name: str):
    stack = []

    def enter(_module, _inputs):
        rf = record_function(name)
        rf.__enter__()
        stack.append(rf)

    def leave(_module, _inputs, _output):
        stack.pop().__exit__(None, None, None)

    return net.register_forward_pre_hook(enter), net.register_forward_hook(leave)


def profile_step(model: nn.Module, x: torch.Tensor, device: str) -> profile:
    """One instrumented training step under ``torch.profiler`` (with memory records)."""
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    model.zero_grad(set_to_none=True)
    buffer_pool.release()  # else the pool serves the step from buffers it does not record
    _sync(device)
    with instrument(model), profile(activities=activities, profile_memory=True) as prof:
        with record_function("step.forward"):
            loss = -model.log_prob(x).mean()
        with record_function("step.backward"):
            loss.backward()
        _sync(device)
    return prof


# ------------------------------------------------------------------------------- analysis
def _is_op_name(name: str) -> bool:
    """A dispatcher op (``aten::mm``, ``fastnvp::affine_coupling``), not an autograd node."""
    return "::" in name and name.split("::", 1)[0] not in ("autograd", "torch", "profiler")


def _is_op(event) -> bool:
    return not getattr(event, "is_user_annotation", False) and _is_op_name(event.name)


def _duration_us(event) -> float:
    return float(event.time_range.end - event.time_range.start)


def _within(event, span) -> bool:
    return span[0] <= event.time_range.start and event.time_range.end <= span[1]


def _layer_of(event) -> int | None:
    """Index of the innermost ``layer{i}.*`` range around ``event``, if any."""
    parent = event.cpu_parent
    while parent is not None:
        match = _LAYER_RANGE.match(parent.name)
        if match:
            return int(match.group(1))
        parent = parent.cpu_parent
    return None


def analyse(prof: profile, num_layers: int, device: str) -> dict:
    """Phase times, per-layer times, operator counts and hotspots of a :func:`profile_step`.

    Times are microseconds of wall clock on the host (range durations); on CUDA the hotspots are
    ranked by device time instead.
    """
    events = list(prof.events())
    spans = {}
    for e in events:
        if e.name in ("step.forward", "step.backward"):
            spans[e.name] = (e.time_range.start, e.time_range.end)
    fwd, bwd = spans["step.forward"], spans["step.backward"]

    layer_fwd = [0.0] * num_layers
    layer_bwd = [0.0] * num_layers
    conditioner = inverse = recompute = 0.0
    seq_to_layer: dict[int, int] = {}
    ops = ops_all = launches = 0
    for e in events:
        match = _LAYER_RANGE.match(e.name)
        if match:
            i, kind = int(match.group(1)), match.group(2)
            d = _duration_us(e)
            if _within(e, fwd):
                if kind == "conditioner":
                    conditioner += d
                    # The reference has no layer ranges: its nets are its per-layer work.
                    if _layer_of(e) is None:
                        layer_fwd[i] += d
                elif kind == "forward":
                    layer_fwd[i] += d
            elif _within(e, bwd) and _layer_of(e) is None:
                # The GEMM stack's backward marks each layer's gradient ("backward") and, in the
                # invertible mode, its reconstruction ("inverse"). The generic invertible stack:
                # outermost ranges are the inversion and the recomputation (the shared-conditioner
                # step shows only its conditioner range).
                if kind == "backward":
                    layer_bwd[i] += d
                    continue
                if kind == "inverse":
                    inverse += d
                else:
                    recompute += d
                layer_bwd[i] += d
            continue
        if e.name.startswith(_LAUNCHES) and e.name.split(" ")[0] in _LAUNCHES:
            launches += 1
        if _is_op(e):
            ops_all += 1
            parent = e.cpu_parent
            while parent is not None and not _is_op(parent):
                parent = parent.cpu_parent
            if parent is None:
                ops += 1
            if e.sequence_nr >= 0:
                layer = _layer_of(e)
                if layer is not None:
                    seq_to_layer.setdefault(e.sequence_nr, layer)
    for e in events:
        if e.name.startswith(_EVALUATE) and e.sequence_nr in seq_to_layer:
            layer_bwd[seq_to_layer[e.sequence_nr]] += _duration_us(e)

    forward_us = fwd[1] - fwd[0]
    backward_us = bwd[1] - bwd[0]
    phases = {
        "forward": forward_us,
        "conditioner": conditioner,
        "coupling": forward_us - conditioner,
        "backward": backward_us,
    }
    if inverse:  # the generic step; the shared-conditioner step inverts inside "recompute"
        phases["inverse"] = inverse
    if inverse or recompute:
        phases.update(recompute=recompute, gradient=backward_us - inverse - recompute)
    return {
        "phases_us": phases,
        "layer_forward_us": layer_fwd,
        "layer_backward_us": layer_bwd,
        "ops": ops,
        "ops_all": ops_all,
        "kernel_launches": launches if device == "cuda" else None,
        "hotspots": hotspots(prof, device, 10),
    }


def hotspots(prof: profile, device: str, count: int = 5) -> list[dict]:
    """The ``count`` operators with the largest self time (device time on CUDA)."""
    rows = []
    for avg in prof.key_averages():
        if not _is_op_name(avg.key):
            continue
        self_us = avg.self_device_time_total if device == "cuda" else avg.self_cpu_time_total
        rows.append({"name": avg.key, "self_us": float(self_us), "calls": int(avg.count)})
    total = sum(r["self_us"] for r in rows) or 1.0
    rows.sort(key=lambda r: r["self_us"], reverse=True)
    for r in rows:
        r["share"] = r["self_us"] / total
    return rows[:count]


# ---------------------------------------------------------------------------------- a sweep
@dataclass
class RunResult:
    """Measurements of one (impl, mode, depth) combination."""

    impl: str
    mode: str
    layers: int
    step_s: float
    step_s_all: list[float]
    peak_bytes: int
    activation_bytes: int
    param_bytes: int
    grad_bytes: int
    analysis: dict = field(default_factory=dict)
    reconstruction: dict | None = None
    # From a fresh process (memory_probe=True): bytes above the process's footprint with model,
    # input and gradients allocated; see fastnvp.analysis.memory_probe.
    probe_growth_bytes: int | None = None
    probe_baseline_bytes: int | None = None


def time_interleaved(
    models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Seconds per step of each model, timed in turn (round robin).

    A change of machine load during the measurement then hits every model alike; each model
    first runs ``warmup`` untimed steps.
    """
    for model in models.values():
        for _ in range(warmup):
            training_step(model, x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name] += time_steps(model, x, 1, 0, device)
    return times


def profile_depth(
    config: ProfileConfig, impl: str, modes: tuple[str, ...], num_layers: int
) -> tuple[dict[str, tuple[nn.Module, list[float]]], torch.Tensor]:
    """One model per mode (same weights) and their step times, measured side by side."""
    x = make_batch(config.batch, config.dim, config.device, config.seed)
    models = {}
    for mode in modes:
        model = build_model(
            impl,
            num_layers,
            config.dim,
            config.hidden,
            mode,
            config.device,
            config.seed,
            config.fused,
        )
        if mode == "invertible":
            # Measure and report the reconstruction error instead of stopping the sweep on it.
            model.reconstruction_tolerance = math.inf
        models[mode] = model
    times = time_interleaved(models, x, config.repeats, config.warmup, config.device)
    return {mode: (models[mode], times[mode]) for mode in modes}, x


def measure(
    config: ProfileConfig,
    impl: str,
    mode: str,
    model: nn.Module,
    x: torch.Tensor,
    times: list[float],
    trace_path: Path | None = None,
) -> RunResult:
    """Profile one timed configuration and collect its measurements (see the module doc)."""
    num_layers = model.num_layers
    prof = profile_step(model, x, config.device)
    if config.device == "cuda":
        peak = cuda_step_peak(model, x)
    else:
        peak = profiler_peak_bytes(prof, "cpu")
    analysis = analyse(prof, num_layers, config.device)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    params = [p for p in model.parameters()]
    param_bytes = tensor_bytes(params)
    grad_bytes = tensor_bytes(p for p in params if p.requires_grad)
    reconstruction = None
    report = getattr(model, "last_reconstruction", None)
    if mode == "invertible" and report is not None:
        from fastnvp.engine.invertible import resolve_tolerance

        default = resolve_tolerance(None, x.dtype)
        reconstruction = {
            "max_layer_error": report.max_layer_error,
            "drift_error": report.drift_error,
            "input_error": report.input_error,
            "anchor_every": getattr(model, "anchor_every", None),
            "default_tolerance": default,
            "within_default_tolerance": max(report.max_layer_error, report.drift_error) <= default,
        }
    result = RunResult(
        impl=impl,
        mode=mode,
        layers=num_layers,
        step_s=statistics.median(times),
        step_s_all=times,
        peak_bytes=peak,
        activation_bytes=peak - grad_bytes,
        param_bytes=param_bytes,
        grad_bytes=grad_bytes,
        analysis=analysis,
        reconstruction=reconstruction,
    )
    return result


def machine_info(device: str) -> dict:
    """Where the numbers come from."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def memory_measure(device: str) -> str:
    """One line naming the peak-memory measure used on ``device``."""
    if device == "cuda":
        return (
            "torch.cuda.max_memory_allocated during one unprofiled step, minus "
            "memory_allocated before it"
        )
    return (
        "torch.profiler allocator records (profile_memory=True) of the profiled step: peak of "
        "the running sum of allocations and frees"
    )


def run_profile(config: ProfileConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """Profile every combination of ``config`` and write the artefacts into ``out``.

    Writes ``results.json``, ``summary.md``, ``trace.json`` (Chrome trace of the first
    combination at ``config.trace_layers``; ``trace-<impl>-<mode>.json`` for the others),
    ``time_vs_depth.png`` and ``memory_vs_depth.png``; with ``config.memory_probe`` also
    ``peak_growth_vs_depth.png`` (the fresh-process measurement). Returns the JSON document.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    runs: list[RunResult] = []
    skipped = []
    first_trace = True
    started = time.perf_counter()
    for impl in config.impls:
        modes = config.modes
        if impl == "reference" and "invertible" in modes:
            why = "invertible training needs FastRealNVP's per-layer inverse"
            skipped.append({"impl": impl, "mode": "invertible", "why": why})
            log(f"skip reference/invertible: {why}")
            modes = tuple(m for m in modes if m != "invertible")
        if not modes:
            continue
        for num_layers in config.layers:
            built, x = profile_depth(config, impl, modes, num_layers)
            for mode in modes:
                model, times = built.pop(mode)
                trace = None
                if num_layers == config.trace_layers:
                    trace = out / ("trace.json" if first_trace else f"trace-{impl}-{mode}.json")
                    first_trace = False
                result = measure(config, impl, mode, model, x, times, trace)
                runs.append(result)
                del model
                log(
                    f"{impl:9s} {mode:10s} L={num_layers:4d}  step {result.step_s * 1e3:9.1f} ms"
                    f"  activation peak {result.activation_bytes / MB:9.1f} MB"
                    f"  params {result.param_bytes / MB:7.2f} MB  ops {result.analysis['ops']}"
                )
            del built, x
            gc.collect()
            if config.device == "cuda":
                torch.cuda.empty_cache()
    probe_doc = probe_runs(config, runs, log) if config.memory_probe else None
    doc = {
        "config": asdict(config),
        "machine": machine_info(config.device),
        "memory_measure": memory_measure(config.device),
        "elapsed_s": time.perf_counter() - started,
        "runs": [asdict(r) for r in runs],
        "skipped": skipped,
        "memory_probe": probe_doc,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(doc))
    plot_depth(doc, out)
    if probe_doc is not None:
        from fastnvp.analysis.memory_probe import plot_growth

        plot_growth(probe_doc["rows"], out / "peak_growth_vs_depth.png")
    return doc


def probe_runs(config: ProfileConfig, runs: list[RunResult], log: Callable[[str], None]) -> dict:
    """Measure each run's step again from outside, one fresh process each (memory_probe).

    The child runs at the sweep's thread count, seed and fused level, with one warm-up step of
    its own whatever ``config.warmup`` (the peak is reset after it). Fills the runs'
    ``probe_*`` fields and returns ``{"method": ..., "rows": [...]}`` (rows of
    :func:`fastnvp.analysis.memory_probe.probe`).
    """
    from fastnvp.analysis.memory_probe import METHODS, probe

    threads = config.threads if config.threads is not None else torch.get_num_threads()
    rows = []
    for run in runs:
        row = probe(
            config.dim,
            config.hidden,
            config.batch,
            run.layers,
            run.mode,
            run.impl,
            config.device,
            threads,
            config.seed,
            config.fused,
        )
        run.probe_growth_bytes = row["peak_growth_bytes"]
        run.probe_baseline_bytes = row["baseline_bytes"]
        rows.append(row)
        log(
            f"{run.impl:9s} {run.mode:10s} L={run.layers:4d}  fresh-process peak growth "
            f"{row['peak_growth_bytes'] / MB:9.1f} MB ({row['method']})"
        )
    methods = sorted({row["method"] for row in rows})
    return {"method": "; ".join(f"{m}: {METHODS[m]}" for m in methods), "rows": rows}


# ---------------------------------------------------------------------------------- reports
def _by_key(doc: dict) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in doc["runs"]:
        groups[(run["impl"], run["mode"])].append(run)
    for runs in groups.values():
        runs.sort(key=lambda r: r["layers"])
    return groups


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 and math.isfinite(a / b) else "–"


def summary_markdown(doc: dict) -> str:
    """The markdown summary: depth table, phases, per-layer spread, top-5 hotspots."""
    cfg = doc["config"]
    groups = _by_key(doc)
    lines = [
        "# Training-step profile",
        "",
        f"B = {cfg['batch']}, D = {cfg['dim']}, H = {cfg['hidden']}, device = {cfg['device']}, "
        f"fused = {cfg.get('fused') or 'auto (default)'}, "
        f"torch {doc['machine']['torch']}, {doc['machine']['threads']} threads; "
        f"median of {cfg['repeats']} steps after {cfg['warmup']} warm-up.",
        "",
        f"Peak memory: {doc['memory_measure']}. *Activation* = peak − gradients "
        "(parameters were allocated before the step and are not in the peak).",
        "",
        "## Time and memory vs depth",
        "",
        "| impl | mode | L | step (ms) | vs standard | activation peak (MB) | vs smallest L "
        "| params (MB) | ops/step | kernel launches |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (impl, mode), runs in groups.items():
        base = runs[0]
        std = {r["layers"]: r for r in groups.get((impl, "standard"), [])}
        for r in runs:
            ref = std.get(r["layers"])
            vs_std = _fmt_ratio(r["step_s"], ref["step_s"]) if ref and mode != "standard" else "–"
            launches = r["analysis"]["kernel_launches"]
            lines.append(
                f"| {impl} | {mode} | {r['layers']} | {r['step_s'] * 1e3:.1f} | {vs_std} "
                f"| {r['activation_bytes'] / MB:.2f} "
                f"| {_fmt_ratio(r['activation_bytes'], base['activation_bytes'])} "
                f"| {r['param_bytes'] / MB:.2f} | {r['analysis']['ops']} "
                f"| {'–' if launches is None else launches} |"
            )
    for skip in doc["skipped"]:
        lines.append(f"\nSkipped {skip['impl']}/{skip['mode']}: {skip['why']}.")
    lines += [
        "",
        "## Phases (profiled step, ms)",
        "",
        "| impl | mode | L | forward | conditioner | coupling + log_det | backward "
        "| inverse | recompute | gradient |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (impl, mode), runs in groups.items():
        for r in runs:
            p = r["analysis"]["phases_us"]
            extra = [p.get(k) for k in ("inverse", "recompute", "gradient")]
            cells = " | ".join("–" if v is None else f"{v / 1e3:.1f}" for v in extra)
            lines.append(
                f"| {impl} | {mode} | {r['layers']} | {p['forward'] / 1e3:.1f} "
                f"| {p['conditioner'] / 1e3:.1f} | {p['coupling'] / 1e3:.1f} "
                f"| {p['backward'] / 1e3:.1f} | {cells} |"
            )
    lines += [
        "",
        "## Per-layer time (profiled step, ms; mean / min / max over layers)",
        "",
        "| impl | mode | L | forward | backward |",
        "|---|---|---:|---|---|",
    ]
    for (impl, mode), runs in groups.items():
        for r in runs:
            cells = []
            for key in ("layer_forward_us", "layer_backward_us"):
                v = r["analysis"][key]
                cells.append(
                    f"{statistics.fmean(v) / 1e3:.2f} / {min(v) / 1e3:.2f} / {max(v) / 1e3:.2f}"
                )
            lines.append(f"| {impl} | {mode} | {r['layers']} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Top 5 hotspots (self time, deepest stack of each)", ""]
    for (impl, mode), runs in groups.items():
        r = runs[-1]
        lines.append(f"**{impl} / {mode}, L = {r['layers']}**")
        lines.append("")
        for k, h in enumerate(r["analysis"]["hotspots"][:5], 1):
            lines.append(
                f"{k}. `{h['name']}`: {h['self_us'] / 1e3:.1f} ms ({h['share']:.0%} of op self "
                f"time), {h['calls']} calls"
            )
        lines.append("")
    probed = doc.get("memory_probe")
    if probed:
        from fastnvp.analysis.memory_probe import markdown_table

        lines += [
            "## Peak memory from outside (one fresh process per row)",
            "",
            f"Measured as {probed['method']}. Each row is one step in its own Python process "
            "(`fastnvp.analysis.memory_probe`); unlike the activation peak above it counts all the "
            "process held (CPU: RSS, so allocator slack and library buffers too) or all the "
            "CUDA allocator handed out, not only the tensors the profiler recorded.",
            "",
            markdown_table(probed["rows"]),
        ]
    recon = [r for r in doc["runs"] if r["reconstruction"]]
    if recon:
        lines += [
            "## Reconstruction error of invertible backward",
            "",
            "| impl | L | max layer round-trip | max drift at an anchor | stack input "
            "| anchor every | within default tolerance |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in recon:
            rc = r["reconstruction"]
            lines.append(
                f"| {r['impl']} | {r['layers']} | {rc['max_layer_error']:.2e} "
                f"| {rc['drift_error']:.2e} | {rc['input_error']:.2e} | {rc['anchor_every']} "
                f"| {'yes' if rc['within_default_tolerance'] else 'no'} "
                f"({rc['default_tolerance']:.0e}) |"
            )
        lines.append("")
    lines.append(
        "Artefacts: `results.json` (every number), `trace.json` (Chrome trace; open in "
        "https://ui.perfetto.dev), `time_vs_depth.png`, `memory_vs_depth.png`"
        + (", `peak_growth_vs_depth.png`." if probed else ".")
    )
    return "\n".join(lines) + "\n"


def plot_depth(doc: dict, out: Path) -> list[Path]:
    """``time_vs_depth.png`` and ``memory_vs_depth.png``: one line per (impl, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    title = f"B={cfg['batch']}, D={cfg['dim']}, H={cfg['hidden']}, {cfg['device']}"
    groups = _by_key(doc)
    paths = []
    for key, ylabel, scale, name in (
        ("step_s", "time per training step (ms)", 1e3, "time_vs_depth.png"),
        ("activation_bytes", "peak activation memory (MB)", 1 / MB, "memory_vs_depth.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for (impl, mode), runs in groups.items():
            xs = [r["layers"] for r in runs]
            ys = [r[key] * scale for r in runs]
            style = "-" if mode == "standard" else "--"
            ax.plot(xs, ys, style, marker="o", label=f"{impl} / {mode}")
        if key == "activation_bytes":
            params = groups[next(iter(groups))]
            ax.plot(
                [r["layers"] for r in params],
                [r["param_bytes"] / MB for r in params],
                ":",
                color="gray",
                label="parameters",
            )
        ax.set_xticks(sorted({r["layers"] for r in doc["runs"]}))
        ax.set_xlabel("coupling layers L")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
