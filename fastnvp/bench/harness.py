"""The benchmark harness: workloads, timing, the GEMM ceiling and the results document.

Workloads (B rows, D features; all providers get the same inputs):

- ``log_prob``: ``log_prob(x)`` under ``torch.no_grad``, x (B, D).
- ``sample``: ``sample(B)`` under ``torch.no_grad`` (prior draw + inverse).
- ``inverse``: ``g(z)`` under ``torch.no_grad``, z (B, D).
- ``train``: one step of Adam on ``-log_prob(x).mean()``: zero_grad, forward, backward, step.

Conditional configurations (``BenchConfig.context`` = C): the reference is
``RealNVP.standard(D, L, H, context=C)``, every provider gets the same context c (B, C) besides
x and z, and the workloads become ``log_prob(x, c)``, ``g(z, c)``, the Adam step on
``-log_prob(x, c).mean()`` (its gradient reaches the context columns of every first Linear)
and ``sample``: ONE sample per context row, B rows, by each library's own call for that
(:mod:`fastnvp.bench.providers`, ``sample_form``, recorded per provider in ``checks``).

Timing (docs/design.md §6.6): all providers of one configuration live in one process and are
timed in rounds; each round times every provider once, starting at a different provider each
round, so slow drifts of the machine hit all of them alike. Before the rounds each provider runs
warm-up calls (the first call of ``torch.compile`` compiles; its duration is reported as
``compile_s``). A timed sample repeats the call ``number`` times, chosen from the warm-up so
that one sample lasts at least ``min_sample_s``. CPU: ``time.perf_counter`` with
``torch.set_num_threads`` fixed; CUDA: CUDA events after a synchronize. Reported: median and
quartiles of the per-call times, and the median over rounds of the paired ratio (reference time
/ provider time of the same round; > 1 means faster than the reference).

The optimizer's share of a training step: on the CPU the ``train`` call also clocks its
``opt.step()`` (``time.perf_counter``, the step being synchronous there), so each train row
carries ``optimizer_s`` (median seconds of the update per call) and, with peers, the paired
ratio to the fastest peer of the step *without* its update,
``ratio_vs_fastest_peer_without_optimizer`` (median over rounds of min_p (t_p - u_p) /
(t - u), u the update's time). Every provider runs torch's default Adam over its own
parameter tensors, and on the CPU that update is a loop over the tensors (about ten small ops
each), a cost set by the number of tensors rather than by the flow's engine. On CUDA the update
is not clocked apart (that would need a synchronize inside the timed call).

FLOPs are counted analytically: per row, per layer, per net ``2 (K1 H + H H + H K2)`` for the
forward; a training step counts three times the forward (forward, two backward GEMMs). The
ceiling is the best rate of ``addmm`` ((rows, H) @ (H, H) + bias) over several row tiles and
both threading modes (see :func:`gemm_ceiling`), measured in the same run on the same device,
dtype and thread count, before and after the configurations.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from fastnvp.bench import providers as prov
from fastnvp.core.masks import split_indices
from fastnvp.core.reference import RealNVP
from fastnvp.engine.cpu.threads import on_threads

SCHEMA = "fastnvp-bench/1"
WORKLOADS = ("log_prob", "sample", "train", "inverse")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
GEMM_ROWS = (256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class BenchConfig:
    """One model and batch: L layers, D features, H hidden units, B rows."""

    layers: int
    dim: int
    hidden: int
    batch: int
    device: str = "cpu"
    dtype: str = "float32"
    context: int | None = None  # C of a conditional flow; None: unconditional

    def __post_init__(self):
        for name, lo in (("layers", 1), ("dim", 2), ("hidden", 1), ("batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if self.context is not None and (
            isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1
        ):
            raise ValueError(f"context must be None or an int >= 1, got {self.context!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def label(self) -> str:
        ctx = f" C={self.context}" if self.context is not None else ""
        return f"L={self.layers} D={self.dim}{ctx} H={self.hidden} B={self.batch}"


@dataclass
class Settings:
    """How to run: which providers and workloads, how many rounds, threads."""

    providers: Sequence[str] = prov.ALL_PROVIDERS
    workloads: Sequence[str] = WORKLOADS
    repeats: int = 5
    warmup: int = 1
    min_warmup_s: float = 0.2
    min_sample_s: float = 0.02
    threads: int = 2
    seed: int = 0
    compile_max_layers: int = 8
    lr: float = 1e-5
    fastnvp_variants: bool = True

    def __post_init__(self):
        if isinstance(self.providers, str) or not self.providers:
            raise ValueError("providers must be a non-empty list of provider names")
        for spec in self.providers:
            prov.parse_provider(spec)
        if isinstance(self.workloads, str) or not self.workloads:
            raise ValueError(f"workloads must be a non-empty list from {WORKLOADS}")
        bad = [w for w in self.workloads if w not in WORKLOADS]
        if bad:
            raise ValueError(f"unknown workload(s) {bad}; choose from {WORKLOADS}")
        for name, lo in (("repeats", 1), ("warmup", 1), ("threads", 1), ("compile_max_layers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        for name in ("min_sample_s", "min_warmup_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class Plan:
    """A list of configurations, each with the providers and workloads to run on it.

    ``grid``: for the grid preset, how the shapes were chosen and ordered (see
    :func:`grid_plan`); ``conditional``: for the conditional presets, their axes (see
    :func:`conditional_plan`). :func:`run` copies either into the results document.
    """

    name: str
    entries: list[tuple[BenchConfig, Settings]] = field(default_factory=list)
    grid: dict | None = None
    conditional: dict | None = None


# ----------------------------------------------------------------------------- presets
def preset(
    name: str,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int = 2,
    grid_sample: int | None = None,
    grid_seed: int = 0,
) -> Plan:
    """Named sweeps.

    - ``quick`` (≤ 3 min on 2 cores): L ∈ {1, 8}, D = 2, H = 256, B = 1024, every provider and
      workload except ``torch.compile`` (skipped with a message).
    - ``main``: the headline configuration L = 50, D = 2, H = 256, B = 4096, every provider
      (with FastRealNVP's fused levels) and workload.
    - ``full``: ``main`` plus one-factor sweeps around it: depth L ∈ {1, 8, 50, 100, 200}
      (B = 1024; log_prob and train), D ∈ {16, 64} and H = 64 (L = 8; log_prob and train) and
      B ∈ {256, 16384} (L = 8; log_prob).
    - ``grid``: the product :data:`GRID_AXES` (D ∈ {2, 5, 16, 64}, H ∈ {32, 64, 256},
      B ∈ {16, 256, 1024, 4096}, L ∈ {8, 50}: 96 shapes; an odd D, whose layers keep
      different numbers of features, and a small batch, where per-call work dominates)
      with :data:`GRID_PROVIDERS` and :data:`GRID_WORKLOADS`, in the cover-first order of
      :func:`grid_order` (seed ``grid_seed``); ``grid_sample``: keep only the first that many
      shapes (see :func:`grid_plan`).
    - ``conditional`` (about 6-8 min on 2 idle cores): conditional flows, the product
      :data:`CONDITIONAL_AXES` (D ∈ {2, 8, 16}, C ∈ {1, 8}, B ∈ {256, 4096}, L = 8, H ∈ {64, 256})
      and the deep point :data:`CONDITIONAL_DEEP` (L = 50, D = 2, C = 8, H = 256, B = 1024),
      with :data:`prov.CONDITIONAL_PROVIDERS` on :data:`GRID_WORKLOADS` (see
      :func:`conditional_plan`).
    - ``conditional-quick`` (under a minute): the same at D ∈ {2, 8}, C ∈ {1, 8}, B = 256,
      L = 8, H = 64, no deep point, 2 rounds.
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    if name == "grid":
        return grid_plan(GRID_AXES, grid_sample, grid_seed, device, dtype, threads)
    if grid_sample is not None:
        raise ValueError(f"grid_sample applies to the grid preset only, not to {name!r}")
    if name == "conditional":
        return conditional_plan(device=device, dtype=dtype, threads=threads)
    if name == "conditional-quick":
        settings = dataclasses.replace(conditional_settings(threads), repeats=2)
        return conditional_plan(
            CONDITIONAL_QUICK_AXES, (), device, dtype, threads, settings, "conditional-quick"
        )

    def cfg(layers, dim=2, hidden=256, batch=4096):
        return BenchConfig(layers, dim, hidden, batch, device, dtype)

    plan = Plan(name)
    if name == "quick":
        # No torch.compile: its cold compile alone takes minutes on a small CPU.
        base = Settings(repeats=3, warmup=1, threads=threads, compile_max_layers=0)
        plan.entries += [(cfg(1, batch=1024), base), (cfg(8, batch=1024), base)]
        return plan
    main = Settings(repeats=5, warmup=1, threads=threads, compile_max_layers=8)
    plan.entries.append((cfg(50), main))
    if name == "main":
        return plan
    # In priority order: `fastnvp bench --max-minutes` drops the tail when time runs out.
    depth = Settings(
        workloads=("log_prob", "train"),
        repeats=3,
        threads=threads,
        compile_max_layers=8,
        fastnvp_variants=False,
    )
    plan.entries += [(cfg(layers, batch=1024), depth) for layers in (8, 50, 1, 100, 200)]
    plan.entries += [(cfg(8, dim=dim), depth) for dim in (16, 64)]
    plan.entries.append((cfg(8, hidden=64), depth))
    lp = dataclasses.replace(depth, workloads=("log_prob",))
    plan.entries += [(cfg(8, batch=batch), lp) for batch in (256, 16384)]
    return plan


PRESETS = ("quick", "main", "full", "grid", "conditional", "conditional-quick")

# ----------------------------------------------------------------------------- the grid
#: The grid preset's axes, in the order of a shape tuple (D, H, B, L).
GRID_AXES = {
    "dim": (2, 5, 16, 64),
    "hidden": (32, 64, 256),
    "batch": (16, 256, 1024, 4096),
    "layers": (8, 50),
}
GRID_PROVIDERS = ("fastnvp", "reference", "zuko", "FrEIA")
GRID_WORKLOADS = ("train", "log_prob", "sample")
GRID_RULE = (
    "greedy, cover first: each next shape is the one with the most axis values not yet "
    "in the order, then the most new pairs of values of two axes, then the most new triples "
    "(ties: the order of random.Random(seed).random() keys, one per shape in product order); "
    "the first max-axis-length shapes contain every value of every axis. A sample of N keeps "
    "the first N shapes; --max-minutes starts shapes in this order until the budget is spent."
)


def _check_axes(axes: dict, keys=GRID_AXES) -> dict[str, tuple[int, ...]]:
    """Validate a preset's axes: exactly ``keys``, each a non-empty list of distinct values."""
    if not isinstance(axes, dict) or set(axes) != set(keys):
        raise ValueError(f"axes must be a dict with the keys {tuple(keys)}, got {axes!r}")
    out = {}
    for name in keys:
        values = tuple(axes[name]) if isinstance(axes[name], (list, tuple)) else ()
        if not values or len(set(values)) != len(values):
            raise ValueError(
                f"axes[{name!r}] must be a non-empty list of distinct values, got {axes[name]!r}"
            )
        out[name] = tuple(sorted(values))
    return out


def grid_shapes(axes: dict = GRID_AXES) -> list[tuple[int, int, int, int]]:
    """Every shape (D, H, B, L) of the product of ``axes``, in product order."""
    axes = _check_axes(axes)
    return list(itertools.product(*(axes[n] for n in GRID_AXES)))


def _combos(shape: tuple, k: int) -> set[tuple]:
    """The k-way (axis, value) combinations of a shape."""
    return set(itertools.combinations(enumerate(shape), k))


def grid_order(axes: dict = GRID_AXES, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Every shape (D, H, B, L) of the grid in the cover-first order of :data:`GRID_RULE`.

    Greedy: the next shape maximises (new axis values, new 2-way value pairs, new 3-way value
    triples) lexicographically, counted against the shapes already ordered. On a full product
    every pick can take an unseen value on each axis that still has one, so the first
    ``max(len(values))`` shapes contain every value of every axis (4 on :data:`GRID_AXES`),
    and the pairs follow soon after; a prefix is therefore a spread-out subsample.

    Ties are broken by one ``random.Random(seed).random()`` key per shape (in product order):
    ``random()``'s stream is the part of the module that Python keeps stable across versions,
    so the order depends only on ``axes`` and ``seed``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    shapes = grid_shapes(axes)
    rng = random.Random(seed)
    keys = {shape: rng.random() for shape in shapes}
    remaining = sorted(shapes, key=keys.__getitem__)
    ways = range(1, len(GRID_AXES))
    seen: dict[int, set] = {k: set() for k in ways}
    order = []
    while remaining:
        # max() keeps the first of equal gains, i.e. the lowest tie-break key.
        best = max(remaining, key=lambda s: tuple(len(_combos(s, k) - seen[k]) for k in ways))
        remaining.remove(best)
        order.append(best)
        for k in ways:
            seen[k] |= _combos(best, k)
    return order


def grid_coverage(axes: dict, shapes: Sequence[tuple]) -> dict[str, bool]:
    """Whether ``shapes`` (D, H, B, L) contain every axis value and every 2-axis value pair."""
    everything = grid_shapes(axes)
    out = {}
    for key, k in (("every_value", 1), ("every_pair", 2)):
        need = set().union(*(_combos(s, k) for s in everything))
        have = set().union(*(_combos(tuple(s), k) for s in shapes)) if shapes else set()
        out[key] = need <= have
    return out


def _prefix_covering(axes: dict, order: list[tuple], key: str) -> int:
    """Length of the shortest prefix of ``order`` with ``grid_coverage(...)[key]``."""
    for n in range(1, len(order) + 1):
        if grid_coverage(axes, order[:n])[key]:
            return n
    return len(order)


def grid_plan(
    axes: dict = GRID_AXES,
    sample: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int = 2,
    settings: Settings | None = None,
) -> Plan:
    """The grid preset: every shape of ``axes`` (or the first ``sample``) in :func:`grid_order`.

    Every shape gets the same ``settings`` (default: :data:`GRID_PROVIDERS` and
    :data:`GRID_WORKLOADS`, 3 rounds, no fused-level variants), so providers are paired and
    alternated exactly as in the other presets (:func:`run_config`).

    Args:
        axes: ``{"dim", "hidden", "batch", "layers"}`` -> values.
        sample: None: the whole grid (``--max-minutes`` may still stop it early, in order);
            else keep the first ``sample`` shapes, at least ``max(len(values))`` so that every
            axis value is in the sample.
        seed: tie-break seed of :func:`grid_order`.

    Returns:
        The plan, with ``plan.grid`` describing the axes, rule, seed, sample and the order
        (``shapes``: [[D, H, B, L], ...] as planned).
    """
    axes = _check_axes(axes)
    full = grid_order(axes, seed)
    order = full
    cover = max(len(v) for v in axes.values())
    if sample is not None:
        if (
            isinstance(sample, bool)
            or not isinstance(sample, int)
            or not (cover <= sample <= len(order))
        ):
            raise ValueError(
                f"grid_sample must be an int in [{cover}, {len(order)}] (the first {cover} shapes"
                f" contain every axis value), got {sample!r}"
            )
        order = order[:sample]
    if settings is None:
        # No fused-level variants: on the grid the question is fastnvp (its default path) vs
        # the reference and the peers, and each variant would add a full timing per workload.
        settings = Settings(
            providers=GRID_PROVIDERS,
            workloads=GRID_WORKLOADS,
            repeats=3,
            threads=threads,
            fastnvp_variants=False,
        )
    plan = Plan("grid")
    for dim, hidden, batch, layers in order:
        plan.entries.append((BenchConfig(layers, dim, hidden, batch, device, dtype), settings))
    plan.grid = {
        "axes": {n: list(v) for n, v in axes.items()},
        "size": len(full),
        "rule": GRID_RULE,
        "seed": seed,
        "sample": sample,
        "planned": len(order),
        "every_value_after": _prefix_covering(axes, full, "every_value"),
        "every_pair_after": _prefix_covering(axes, full, "every_pair"),
        "shapes": [list(s) for s in order],
    }
    return plan


# ----------------------------------------------------------------------------- conditional
#: The conditional preset's axes; its shapes are the product, ordered B, then D, then C.
CONDITIONAL_AXES = {
    "dim": (2, 8, 16),
    "context": (1, 8),
    "batch": (256, 4096),
    "layers": (8,),
    # 64: the width class of sbi's default estimators (50 hidden units); 256: the main preset's.
    "hidden": (64, 256),
}
#: Extra shapes after the product, (D, C, B, L, H): the main preset's L = 50, D = 2, H = 256
#: with an 8-wide context, at the depth sweep's B = 1024 (at B = 4096 this one shape would cost
#: as much as the rest of the preset together).
CONDITIONAL_DEEP = ((2, 8, 1024, 50, 256),)
CONDITIONAL_QUICK_AXES = {
    "dim": (2, 8),
    "context": (1, 8),
    "batch": (256,),
    "layers": (8,),
    "hidden": (64,),
}
#: The order of a conditional shape tuple.
CONDITIONAL_KEYS = ("dim", "context", "batch", "layers", "hidden")


def conditional_settings(threads: int = 2) -> Settings:
    """Settings of the conditional presets: :data:`prov.CONDITIONAL_PROVIDERS` on
    :data:`GRID_WORKLOADS`, 3 rounds, no fused-level variants, no ``torch.compile``."""
    return Settings(
        providers=prov.CONDITIONAL_PROVIDERS,
        workloads=GRID_WORKLOADS,
        repeats=3,
        threads=threads,
        compile_max_layers=0,
        fastnvp_variants=False,
    )


def conditional_shapes(
    axes: dict = CONDITIONAL_AXES, deep: Sequence[tuple] = CONDITIONAL_DEEP
) -> list[tuple[int, int, int, int, int]]:
    """The shapes (D, C, B, L, H) of a conditional plan: the product of ``axes`` ordered by
    L, H, B, D, C (cheap batches first, so ``--max-minutes`` drops the expensive tail), then
    ``deep`` (extra (D, C, B, L, H) tuples not in the product)."""
    axes = _check_axes(axes, CONDITIONAL_KEYS)
    shapes = [
        (dim, ctx, batch, layers, hidden)
        for layers in axes["layers"]
        for hidden in axes["hidden"]
        for batch in axes["batch"]
        for dim in axes["dim"]
        for ctx in axes["context"]
    ]
    for shape in deep:
        shape = tuple(shape)
        if len(shape) != 5 or not all(isinstance(v, int) for v in shape):
            raise ValueError(f"deep shapes must be (D, C, B, L, H) int tuples, got {shape!r}")
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def conditional_plan(
    axes: dict = CONDITIONAL_AXES,
    deep: Sequence[tuple] = CONDITIONAL_DEEP,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int = 2,
    settings: Settings | None = None,
    name: str = "conditional",
) -> Plan:
    """The conditional preset: every shape of :func:`conditional_shapes` as a conditional
    configuration (``BenchConfig.context`` = C).

    Every shape gets the same ``settings`` (default :func:`conditional_settings`), so providers
    are paired and alternated as in the other presets (:func:`run_config`).

    Args:
        axes: ``{"dim", "context", "batch", "layers", "hidden"}`` -> values.
        deep: extra (D, C, B, L, H) shapes run after the product.

    Returns:
        The plan, with ``plan.conditional`` describing the axes, the deep shapes and the order
        (``shapes``: [[D, C, B, L, H], ...] as planned).
    """
    checked = _check_axes(axes, CONDITIONAL_KEYS)
    shapes = conditional_shapes(checked, deep)
    if settings is None:
        settings = conditional_settings(threads)
    plan = Plan(name)
    for dim, ctx, batch, layers, hidden in shapes:
        plan.entries.append(
            (BenchConfig(layers, dim, hidden, batch, device, dtype, context=ctx), settings)
        )
    plan.conditional = {
        "axes": {n: list(v) for n, v in checked.items()},
        "deep": [list(s) for s in deep],
        "keys": list(CONDITIONAL_KEYS),
        "shapes": [list(s) for s in shapes],
        "planned": len(shapes),
    }
    return plan


# ----------------------------------------------------------------------------- FLOPs
def forward_flops_per_row(ref: RealNVP) -> int:
    """Analytic FLOPs of one forward pass per row: Σ_layers 2 nets · 2 ((K1 + E) H + H H + H K2),
    E the context width the nets see (0 unconditional; an embedding is not counted)."""
    hidden = ref.s[0][0].out_features
    ctx = prov.context_width(ref)
    total = 0
    for i in range(ref.num_layers):
        kept, transformed = split_indices(ref.mask[i])
        k1, k2 = kept.numel() + ctx, transformed.numel()
        total += 2 * 2 * (k1 * hidden + hidden * hidden + hidden * k2)
    return total


def workload_flops(ref: RealNVP, workload: str, batch: int) -> int:
    """FLOPs of one call of ``workload`` on ``batch`` rows (train = 3 x forward)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    factor = 3 if workload == "train" else 1
    return factor * batch * forward_flops_per_row(ref)


# ----------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(call: Callable[[], object], device: str, number: int = 1) -> float:
    """Seconds per call of ``call`` (averaged over ``number`` back-to-back calls)."""
    if device == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(number):
            call()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - t0) / number


def gemm_ceiling(
    hidden: int,
    device: str = "cpu",
    dtype: str = "float32",
    rows: Sequence[int] = GEMM_ROWS,
    repeats: int = 5,
    min_sample_s: float = 0.02,
) -> list[dict]:
    """Rate of ``addmm`` ((rows, H) @ (H, H) + bias) for each row tile, median of ``repeats``.

    Mode ``intra-op``: one addmm using all intra-op threads; ``per-thread`` (CPU, 2+ threads):
    every thread runs its own single-threaded addmm on its own tile, rate summed.

    Returns:
        ``[{"hidden", "rows", "mode", "gflops", "device", "dtype"}, ...]``.
    """
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(hidden, hidden, generator=gen).to(device=device, dtype=dt).t()
    bias = torch.randn(hidden, generator=gen).to(device=device, dtype=dt)
    threads = torch.get_num_threads()
    # CPU: also each thread on its own (rows, H) tile with a single-threaded addmm, the way
    # the row-parallel CPU path runs; the rate is the sum over threads.
    modes = ["intra-op"] + (["per-thread"] if device == "cpu" and threads > 1 else [])
    out = []
    for mode in modes:
        for r in rows:
            copies = threads if mode == "per-thread" else 1
            xs = [torch.randn(r, hidden, generator=gen).to(device=device, dtype=dt)] * copies
            res = [torch.empty(r, hidden, device=device, dtype=dt) for _ in range(copies)]
            if mode == "per-thread":

                def call(xs=xs, res=res, copies=copies):
                    on_threads(lambda k: torch.addmm(bias, xs[k], weight, out=res[k]), copies)

            else:

                def call(xs=xs, res=res):
                    torch.addmm(bias, xs[0], weight, out=res[0])

            first = time_call(call, device, 3)
            number = max(1, math.ceil(min_sample_s / max(first, 1e-9)))
            times = [time_call(call, device, number) for _ in range(repeats)]
            flops = 2 * r * hidden * hidden * copies
            out.append(
                {
                    "hidden": hidden,
                    "rows": r,
                    "mode": mode,
                    "device": device,
                    "dtype": dtype,
                    "gflops": flops / statistics.median(times) / 1e9,
                }
            )
    return out


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


class _Call:
    """One call of a workload (``__call__``); ``optimizer_s``: seconds its Adam updates took
    since the last :meth:`take_optimizer_s` (CPU train calls; else it stays 0)."""

    def __init__(self, run: Callable[[], object], clocks_optimizer: bool = False):
        self._run = run
        self.optimizer_s = 0.0
        self.clocks_optimizer = clocks_optimizer

    def __call__(self):
        return self._run()

    def take_optimizer_s(self) -> float:
        spent, self.optimizer_s = self.optimizer_s, 0.0
        return spent


def _make_call(flow: prov.Flow, workload: str, x, z, lr: float, c=None) -> _Call:
    """One call of ``workload`` on ``flow``; with a context c (B, C) the conditional form
    (``sample``: one sample per context row). A CPU ``train`` call clocks its optimizer update
    apart (module doc)."""
    batch = x.shape[0]
    given = () if c is None else (c,)
    if workload == "log_prob":

        def call():
            with torch.no_grad():
                return flow.log_prob(x, *given)

    elif workload == "sample":
        arg = batch if c is None else c

        def call():
            with torch.no_grad():
                return flow.sample(arg)

    elif workload == "inverse":

        def call():
            with torch.no_grad():
                return flow.inverse(z, *given)

    else:
        opt = torch.optim.Adam(flow.trainable(), lr=lr)
        clock = x.device.type == "cpu"  # on CUDA the update runs asynchronously (module doc)

        def call():
            opt.zero_grad(set_to_none=True)
            loss = flow.loss(x, *given)
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            if clock:
                timed.optimizer_s += time.perf_counter() - t0
            return loss

        timed = _Call(call, clocks_optimizer=clock)
        return timed

    return _Call(call)


def check_tolerance(cfg: BenchConfig, provider: str = "") -> tuple[float, float]:
    """(rtol, atol) for log_prob agreement with the reference at this depth, dtype and matmul
    precision (``precision=tf32`` / ``bf16`` in the provider's options)."""
    if "precision=bf16" in provider or cfg.dtype not in ("float32", "float64"):
        base = 2e-2
    elif "precision=tf32" in provider:
        base = 1e-3
    else:
        base = 1e-4 if cfg.dtype == "float32" else 1e-10
    return base, base * (1 + 0.1 * cfg.layers)


# ----------------------------------------------------------------------------- one config
def run_config(cfg: BenchConfig, settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Build every provider for ``cfg``, check them against the reference, time the workloads."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    dt = DTYPES[cfg.dtype]
    extra = {} if cfg.context is None else {"context": cfg.context}
    ref = RealNVP.standard(cfg.dim, cfg.layers, cfg.hidden, **extra)
    ref = ref.to(device=cfg.device, dtype=dt)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    x = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device=cfg.device, dtype=dt)
    z = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device=cfg.device, dtype=dt)
    c = None
    if cfg.context is not None:
        c = torch.randn(cfg.batch, cfg.context, generator=gen).to(device=cfg.device, dtype=dt)
    given = () if c is None else (c,)

    specs = list(settings.providers)
    if "reference" not in specs:
        specs.insert(0, "reference")
    if "fastnvp" in specs and settings.fastnvp_variants:
        specs += [s for s in prov.fastnvp_variants(cfg.device) if s not in specs]
    flows: dict[str, prov.Flow] = {}
    checks: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    with torch.no_grad():
        expected = ref.log_prob(x) if c is None else ref.log_prob(x, context=c)
    for spec in specs:
        if spec == "torch.compile" and cfg.layers > settings.compile_max_layers:
            skipped[spec] = (
                f"skipped at L={cfg.layers} (> compile_max_layers={settings.compile_max_layers};"
                " cold compile time grows with depth)"
            )
            continue
        try:
            flow = prov.build(spec, ref)
        except prov.ProviderUnavailable as exc:
            skipped[spec] = str(exc)
            log(f"  skip {spec}: {exc}")
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            got = flow.log_prob(x, *given)
        first_s = time.perf_counter() - t0
        err = (got.double() - expected.double()).abs()
        rtol, atol = check_tolerance(cfg, flow.name)
        ok = bool(torch.all(err <= atol + rtol * expected.double().abs()).item())
        checks[flow.name] = {
            "params_total": flow.params_total,
            "params_effective": flow.params_effective,
            "max_abs_err": float(err.max().item()),
            "rtol": rtol,
            "atol": atol,
            "ok": ok,
        }
        if flow.compiled:
            checks[flow.name]["first_log_prob_s"] = first_s
        if flow.sample_form:
            checks[flow.name]["sample_call"] = flow.sample_form
        if not ok:
            log(f"  {flow.name}: log_prob differs from the reference (max {err.max().item():.3g})")
        flows[flow.name] = flow
    eff = {c["params_effective"] for c in checks.values()}
    params_match = len(eff) == 1
    log(
        "  params (total/effective): "
        + ", ".join(f"{n} {c['params_total']}/{c['params_effective']}" for n, c in checks.items())
        + ("" if params_match else "  MISMATCH")
    )

    results = []
    names = list(flows)
    for workload in settings.workloads:
        calls = {n: _make_call(flows[n], workload, x, z, settings.lr, c) for n in names}
        numbers, first_s = {}, {}
        for n in names:
            # The first call is the cold one (compiles for torch.compile); more warm-up calls
            # follow when warmup > 1. The last one sizes the timed samples.
            warm = first_s[n] = time_call(calls[n], cfg.device)
            if workload == "log_prob" and "first_log_prob_s" in checks[n]:
                first_s[n] = checks[n]["first_log_prob_s"]  # the check made the cold call
            # At least `warmup` calls and `min_warmup_s` seconds: the timed rounds measure the
            # steady state, past what a library does on its first calls at new parameters.
            spent, done = warm, 1
            while done < settings.warmup or spent < settings.min_warmup_s:
                warm = time_call(calls[n], cfg.device)
                spent, done = spent + warm, done + 1
            numbers[n] = max(1, math.ceil(settings.min_sample_s / max(warm, 1e-9)))
        times: dict[str, list[float]] = {n: [] for n in names}
        updates: dict[str, list[float]] = {n: [] for n in names}  # optimizer s per call
        for r in range(settings.repeats):
            for k in range(len(names)):
                n = names[(r + k) % len(names)]
                calls[n].take_optimizer_s()  # drop what the warm-up calls clocked
                times[n].append(time_call(calls[n], cfg.device, numbers[n]))
                updates[n].append(calls[n].take_optimizer_s() / numbers[n])
        clocked = all(calls[n].clocks_optimizer for n in names)
        flops = workload_flops(ref, workload, cfg.batch)
        peers = [n for n in names if n in prov.PEERS]
        for n in names:
            q1, med, q3 = _quantiles(times[n])
            paired = [a / b for a, b in zip(times["reference"], times[n])]
            pq1, pmed, pq3 = _quantiles(paired)
            row = {
                "workload": workload,
                "provider": n,
                "times_s": times[n],
                "number": numbers[n],
                "median_s": med,
                "q1_s": q1,
                "q3_s": q3,
                "samples_per_s": cfg.batch / med,
                "gflops": flops / med / 1e9,
                "ratio_vs_reference": pmed,
                "ratio_vs_reference_q1": pq1,
                "ratio_vs_reference_q3": pq3,
            }
            if peers:
                best = [min(times[p][r] for p in peers) / times[n][r] for r in range(len(times[n]))]
                row["ratio_vs_fastest_peer"] = statistics.median(best)
            if clocked:
                row["optimizer_times_s"] = updates[n]
                row["optimizer_s"] = statistics.median(updates[n])
                if peers:
                    row["ratio_vs_fastest_peer_without_optimizer"] = statistics.median(
                        _without_update(times, updates, peers, n)
                    )
            if flows[n].compiled:
                row["compile_s"] = max(first_s[n] - med, 0.0)
            results.append(row)
        summary = ", ".join(
            f"{row['provider']} {row['ratio_vs_reference']:.2f}x"
            for row in results
            if row["workload"] == workload
        )
        log(f"  {workload}: {summary}")
    return {
        "config": asdict(cfg),
        "settings": _settings_dict(settings),
        "flops_forward_per_row": forward_flops_per_row(ref),
        "checks": checks,
        "params_match": params_match,
        "skipped": skipped,
        "results": results,
    }


def _without_update(times: dict, updates: dict, peers: list[str], name: str) -> list[float]:
    """Per round: the fastest peer's step without its update over ``name``'s without its."""
    return [
        min(times[p][r] - updates[p][r] for p in peers) / (times[name][r] - updates[name][r])
        for r in range(len(times[name]))
    ]


def _settings_dict(settings: Settings) -> dict:
    d = asdict(settings)
    d["providers"] = list(d["providers"])
    d["workloads"] = list(d["workloads"])
    return d


# ----------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_model() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_name(device: str = "cpu", threads: int = 2) -> str:
    """A folder name for the machine: ``cpu-<model>-<threads>t`` or ``cuda-<gpu>``."""
    raw = gpu_model() if device == "cuda" and gpu_model() else f"{cpu_model()}-{threads}t"
    prefix = "cuda" if device == "cuda" else "cpu"
    slug = "".join(c.lower() if c.isalnum() else "-" for c in raw)
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{prefix}-{slug.strip('-')}"


def _git(*args: str) -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def versions() -> dict:
    """Versions of Python, torch, fastnvp and the peers (None where not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("fastnvp", "numpy", "triton", "nflows", "normflows", "zuko", "FrEIA"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def environment(device: str, threads: int) -> dict:
    """Machine, versions and commit of this run."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "machine": {
            "name": machine_name(device, threads),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpu_model": gpu_model(),
            "platform": platform.platform(),
            "torch_threads": threads,
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
        "versions": versions(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- a run
def run(
    plan: Plan,
    command: str,
    log: Callable[[str], None] = print,
    max_minutes: float | None = None,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run every configuration of ``plan``; returns the results document (see ``SCHEMA``).

    Args:
        plan: the configurations, in priority order.
        command: the command line recorded in the document.
        log: progress messages.
        max_minutes: start no configuration after the first once this many minutes passed; the rest
            is listed under ``not_run``. None: no limit.
        checkpoint: called with the document so far after each configuration (e.g. to write
            it), so an interrupted run keeps what it measured.
    """
    if not plan.entries:
        raise ValueError("plan has no configurations")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0 or None, got {max_minutes!r}")
    before = torch.get_num_threads()
    try:
        return _run(plan, command, log, max_minutes, checkpoint)
    finally:
        torch.set_num_threads(before)


def _run(plan, command, log, max_minutes, checkpoint) -> dict:
    first_cfg, first_settings = plan.entries[0]
    device, threads = first_cfg.device, first_settings.threads
    torch.set_num_threads(threads)
    doc = {
        "schema": SCHEMA,
        "preset": plan.name,
        "command": command,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **environment(device, threads),
        "load_average_start": load_average(),
    }
    if plan.grid is not None:
        doc["grid"] = {
            **plan.grid,
            "shapes_run": 0,
            "every_value_run": False,
            "every_pair_run": False,
        }
    if plan.conditional is not None:
        doc["conditional"] = dict(plan.conditional)
    log(f"machine {doc['machine']['name']}, load average {doc['load_average_start']}")
    shapes = sorted({(c.hidden, c.device, c.dtype) for c, _ in plan.entries})
    ceilings = []
    for hidden, dev, dtype in shapes:
        ceilings += gemm_ceiling(hidden, dev, dtype)
    t0 = time.perf_counter()
    configs, not_run = [], []
    doc["configs"], doc["not_run"], doc["ceilings"] = configs, not_run, ceilings
    for cfg, settings in plan.entries:
        if max_minutes is not None and configs and time.perf_counter() - t0 > 60 * max_minutes:
            not_run.append({**asdict(cfg), "reason": f"time limit of {max_minutes} min reached"})
            log(f"{cfg.label()}: not run (time limit)")
            continue
        log(f"{cfg.label()} {cfg.device} {cfg.dtype}")
        configs.append(run_config(cfg, settings, log))
        if plan.grid is not None:
            _grid_progress(doc)
        if checkpoint is not None:
            _attach_ceilings(configs, ceilings)
            checkpoint(doc)
    # Measured again after the configs; the ceiling is the better of the two passes.
    for hidden, dev, dtype in shapes:
        for again in gemm_ceiling(hidden, dev, dtype):
            for c in ceilings:
                if (c["hidden"], c["rows"], c["mode"], c["device"], c["dtype"]) == (
                    again["hidden"],
                    again["rows"],
                    again["mode"],
                    again["device"],
                    again["dtype"],
                ):
                    c["gflops_second_pass"] = again["gflops"]
    _attach_ceilings(configs, ceilings)
    doc["duration_s"] = time.perf_counter() - t0
    doc["load_average_end"] = load_average()
    return doc


def _grid_progress(doc: dict) -> None:
    """Record in ``doc["grid"]`` how many shapes ran and whether they cover every axis value."""
    shapes = [
        (c["dim"], c["hidden"], c["batch"], c["layers"])
        for c in (e["config"] for e in doc["configs"])
    ]
    cover = grid_coverage(doc["grid"]["axes"], shapes)
    doc["grid"]["shapes_run"] = len(shapes)
    doc["grid"]["every_value_run"] = cover["every_value"]
    doc["grid"]["every_pair_run"] = cover["every_pair"]


def _attach_ceilings(configs: list[dict], ceilings: list[dict]) -> None:
    for c in ceilings:
        c["best_gflops"] = max(c["gflops"], c.get("gflops_second_pass", 0.0))
    for entry in configs:
        cfg = entry["config"]
        best = best_ceiling(ceilings, cfg["hidden"], cfg["device"], cfg["dtype"])
        entry["ceiling_gflops"] = best
        for row in entry["results"]:
            row["fraction_of_ceiling"] = row["gflops"] / best if best else None


def best_ceiling(ceilings: list[dict], hidden: int, device: str, dtype: str) -> float | None:
    """Best measured addmm rate for (H, device, dtype) over all row tiles and passes."""
    rates = [
        c.get("best_gflops", c["gflops"])
        for c in ceilings
        if (c["hidden"], c["device"], c["dtype"]) == (hidden, device, dtype)
    ]
    return max(rates) if rates else None


# ----------------------------------------------------------------------------- schema
_TOP_KEYS = {
    "schema": str,
    "preset": str,
    "command": str,
    "created_utc": str,
    "machine": dict,
    "versions": dict,
    "ceilings": list,
    "configs": list,
}
_ROW_KEYS = {
    "workload": str,
    "provider": str,
    "times_s": list,
    "median_s": float,
    "samples_per_s": float,
    "gflops": float,
    "ratio_vs_reference": float,
}


def validate(doc: dict) -> dict:
    """Check a results document against the schema; returns it, raises ValueError otherwise."""
    if not isinstance(doc, dict):
        raise TypeError(f"doc must be a dict, got {type(doc).__name__}")
    for key, kind in _TOP_KEYS.items():
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"results: {key!r} must be a {kind.__name__}")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"results: schema {doc['schema']!r}, expected {SCHEMA!r}")
    for key in ("name", "cpu_model"):
        if not isinstance(doc["machine"].get(key), str):
            raise ValueError(f"results: machine.{key} must be a string")
    if "torch" not in doc["versions"]:
        raise ValueError("results: versions.torch is missing")
    if "grid" in doc:
        grid = doc["grid"]
        if not isinstance(grid, dict) or not isinstance(grid.get("axes"), dict):
            raise ValueError("results: grid must be a dict with 'axes'")
        _check_axes(grid["axes"])
    if "conditional" in doc:
        cond = doc["conditional"]
        if not isinstance(cond, dict) or not isinstance(cond.get("axes"), dict):
            raise ValueError("results: conditional must be a dict with 'axes'")
        _check_axes(cond["axes"], CONDITIONAL_KEYS)
    for i, entry in enumerate(doc["configs"]):
        cfg = entry.get("config")
        if not isinstance(cfg, dict):
            raise ValueError(f"results: configs[{i}].config must be a dict")
        BenchConfig(**cfg)
        if not isinstance(entry.get("results"), list) or not isinstance(entry.get("checks"), dict):
            raise ValueError(f"results: configs[{i}] needs 'results' (list) and 'checks' (dict)")
        for j, row in enumerate(entry["results"]):
            for key, kind in _ROW_KEYS.items():
                value = row.get(key)
                if kind is float:
                    ok = isinstance(value, (int, float)) and math.isfinite(value) and value > 0
                else:
                    ok = isinstance(value, kind)
                if not ok:
                    raise ValueError(f"results: configs[{i}].results[{j}].{key} is invalid")
            if row["workload"] not in WORKLOADS:
                raise ValueError(f"results: configs[{i}].results[{j}] has unknown workload")
    return doc


def recorded_command(program: str, argv: list[str] | None = None) -> str:
    """``program`` (e.g. ``"python benchmarks/x.py"``) with its options as given (default
    ``sys.argv[1:]``), shell-quoted: what a results document records so that the table says
    how to make it again (the options change the numbers)."""
    given = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([*program.split(), *given])


def command_line() -> str:
    """The command as typed (``fastnvp bench ...``)."""
    argv = list(sys.argv)
    argv[0] = os.path.basename(argv[0])
    if argv[0] in ("__main__.py", "-m"):
        argv[0] = "python -m fastnvp"
    return " ".join(argv)
