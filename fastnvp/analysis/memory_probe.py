"""Peak memory of one training step, measured from outside the model in a fresh process.

The profiler's own memory figure (:mod:`fastnvp.analysis.profiling`) counts what it sees: tensors
that
pass through torch's allocator while it records. It misses what the process really holds:
allocator fragmentation and slack, memory of threads' arenas, buffers that libraries (oneDNN,
OpenMP) allocate without torch. This module asks the operating system (CPU) or the CUDA caching
allocator's own counters (GPU) instead, in a process that runs nothing else, so earlier
configurations cannot leave freed-but-resident memory behind.

One *training step* is ``loss = -model.log_prob(x).mean()`` and ``loss.backward()`` into gradient
buffers that already exist (no optimizer update).

CPU (``method="clear_refs"``, used where the kernel supports it):

1. build the model and the (batch, dim) float32 input; run ``warmup`` steps (they create the
   gradients, page in the code paths and start the thread pool), then
   ``zero_grad(set_to_none=False)``, so the gradient buffers exist before the measured step,
   and the CPU buffer pool emptied (``fastnvp.engine.cpu.buffer_pool.release``), so the
   step's own buffers, which the pool would otherwise keep from the warm-up, count in it;
2. ``gc.collect()`` and glibc ``malloc_trim(0)``: memory freed by the warm-up goes back to the
   system, otherwise the measured step would reuse resident pages and hide its own peak;
3. write ``5`` to ``/proc/self/clear_refs``: the kernel resets ``VmHWM`` (peak RSS) to the
   current RSS; that RSS is ``baseline_bytes`` (interpreter, libraries, model, input, gradients);
4. run one step; ``peak_growth_bytes = VmHWM - baseline_bytes``.

CPU fallback (``method="hwm_before"``, where ``clear_refs`` cannot reset ``VmHWM``): the peak of a
warm-up step could not be cleared, so no warm-up runs; the gradient buffers are allocated as
zeros by hand, ``baseline_bytes`` is ``VmHWM`` before the step and the growth is ``VmHWM`` after
minus that. It includes first-step costs (thread pool, lazily paged code) and misses whatever
part of the step fits under an earlier peak (model construction).

CUDA (``method="cuda_max_allocated"``): warm-up and zeroed gradients as above, then
``torch.cuda.reset_peak_memory_stats()``; ``baseline_bytes`` is ``memory_allocated()`` before the
step and ``peak_growth_bytes`` is ``max_memory_allocated()`` after it minus the baseline (the
caching allocator's allocated bytes, not its reserved pool).

Use :func:`probe` for one configuration, :func:`probe_depths` for a sweep (one fresh process
each), or the command line::

    python -m fastnvp.analysis.memory_probe --dim 8 --hidden 256 --batch 4096 --layers 8,50 \\
        --memory standard,invertible --threads 2 --out runs/memory-probe
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median_low

IMPLS = ("fast", "reference")
MODES = ("standard", "invertible")
DEVICES = ("cpu", "cuda")
RESETS = ("auto", "clear_refs", "none")
METHODS = {
    "clear_refs": (
        "peak RSS (VmHWM, reset through /proc/self/clear_refs after a warm-up step and "
        "malloc_trim) minus the RSS at the reset (model, input and gradient buffers allocated)"
    ),
    "hwm_before": (
        "peak RSS (VmHWM) after the step minus VmHWM before it (VmHWM could not be reset: no "
        "warm-up step; gradient buffers allocated as zeros before)"
    ),
    "cuda_max_allocated": (
        "torch.cuda.max_memory_allocated during the step (peak stats reset after a warm-up "
        "step) minus memory_allocated before it (model, input and gradient buffers)"
    ),
}
MB = 1024.0**2

_STATUS_FIELD = re.compile(r"^(VmHWM|VmRSS):\s+(\d+)\s+kB$", re.MULTILINE)


# ------------------------------------------------------------------------------- validation
def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _choice(value, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_arguments(
    dim: int,
    hidden: int,
    batch: int,
    layers: int,
    memory: str = "standard",
    impl: str = "fast",
    device: str = "cpu",
    threads: int = 1,
    seed: int = 0,
    fused: str | None = None,
    warmup: int = 1,
    reset: str = "auto",
) -> None:
    """Raise ``ValueError`` naming the first bad argument of :func:`probe`."""
    _positive_int(dim, "dim", minimum=2)  # a coupling layer needs two parts
    _positive_int(hidden, "hidden")
    _positive_int(batch, "batch")
    _positive_int(layers, "layers")
    _choice(memory, MODES, "memory")
    _choice(impl, IMPLS, "impl")
    _choice(device, DEVICES, "device")
    _positive_int(threads, "threads")
    _positive_int(seed, "seed", minimum=0)
    _positive_int(warmup, "warmup", minimum=0)
    _choice(reset, RESETS, "reset")
    if impl == "reference" and memory != "standard":
        raise ValueError(
            "memory must be 'standard' for impl='reference': invertible training needs the "
            "per-layer layer_forward/layer_inverse of FastRealNVP"
        )
    if fused is not None:
        from fastnvp.ops.fused_layer import check_fused

        try:
            check_fused(fused)
        except ValueError as err:
            raise ValueError(f"fused: {err}") from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    elif warmup < 1 and reset != "none":
        # Without a warm-up step the gradient buffers do not exist yet and the step would pay
        # for its first-call costs; the reset method is only meaningful after one.
        raise ValueError("warmup must be >= 1 unless reset='none' (the fallback runs none)")


# --------------------------------------------------------------------- the measuring process
def read_status() -> dict[str, int]:
    """``VmHWM`` (peak RSS) and ``VmRSS`` of this process from /proc/self/status, in bytes."""
    text = Path("/proc/self/status").read_text()
    found = {name: int(kb) * 1024 for name, kb in _STATUS_FIELD.findall(text)}
    if set(found) != {"VmHWM", "VmRSS"}:
        raise RuntimeError("/proc/self/status has no VmHWM/VmRSS: peak RSS needs Linux")
    return found


def reset_peak_rss() -> bool:
    """Ask the kernel to reset ``VmHWM`` to the current RSS; False where it cannot be written."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def clear_refs_resets_peak() -> bool:
    """Whether writing ``5`` to /proc/self/clear_refs really lowers ``VmHWM`` on this kernel.

    Touches and frees 64 MiB (so that ``VmHWM`` is well above ``VmRSS``), resets, and checks that
    the peak came down by most of it. Kernels before 4.0 accept the write and ignore it.
    """
    size = 64 << 20
    block = b"\x01" * size  # filled, so every page is resident
    del block
    trim_malloc()
    before = read_status()
    if before["VmHWM"] - before["VmRSS"] < size // 2 or not reset_peak_rss():
        return False
    after = read_status()
    return after["VmHWM"] - after["VmRSS"] < size // 4


def trim_malloc() -> bool:
    """``gc.collect()`` and glibc ``malloc_trim(0)``; False where the libc has no malloc_trim."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _step(model, x) -> float:
    """``-log_prob(x).mean()`` and backward, accumulating into the existing gradients."""
    loss = -model.log_prob(x).mean()
    loss.backward()
    return float(loss.detach())


def measure_in_this_process(
    dim: int,
    hidden: int,
    batch: int,
    layers: int,
    memory: str = "standard",
    impl: str = "fast",
    device: str = "cpu",
    threads: int = 1,
    seed: int = 0,
    fused: str | None = None,
    warmup: int = 1,
    reset: str = "auto",
) -> dict:
    """The measurement itself (see the module doc); run it in a process that does nothing else.

    Returns one row: the arguments, ``method``, ``peak_growth_bytes`` and ``baseline_bytes``
    (bytes), ``peak_bytes`` (the absolute peak: VmHWM, or max_memory_allocated on CUDA),
    ``param_bytes`` / ``grad_bytes`` / ``input_bytes`` (tensor sizes, for comparison),
    ``step_s`` (wall seconds of the measured step) and ``loss``.
    """
    check_arguments(
        dim, hidden, batch, layers, memory, impl, device, threads, seed, fused, warmup, reset
    )
    import torch

    from fastnvp.analysis.profiling import build_model, make_batch, tensor_bytes
    from fastnvp.engine.cpu import buffer_pool

    torch.set_num_threads(threads)
    if device == "cpu":
        resettable = reset != "none" and clear_refs_resets_peak()
        if reset == "clear_refs" and not resettable:
            raise RuntimeError("reset='clear_refs' but /proc/self/clear_refs does not reset VmHWM")
        method = "clear_refs" if resettable else "hwm_before"
    else:
        method = "cuda_max_allocated"

    model = build_model(impl, layers, dim, hidden, memory, device, seed, fused)
    if memory == "invertible":
        # Measure whatever the reconstruction error is instead of stopping on it.
        model.reconstruction_tolerance = math.inf
    x = make_batch(batch, dim, device, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "hwm_before":
        for p in params:
            p.grad = torch.zeros_like(p)
    else:
        for _ in range(warmup):
            _step(model, x)
        model.zero_grad(set_to_none=False)  # keep the buffers: they belong to the baseline
    buffer_pool.release()  # the pool's buffers are the step's, not the baseline
    if device == "cuda":
        torch.cuda.synchronize()
    gc.collect()

    if method == "cuda_max_allocated":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = _step(model, x)
        torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
    else:
        trimmed = trim_malloc()
        if method == "clear_refs":
            reset_peak_rss()
            baseline = read_status()["VmRSS"]
        else:
            baseline = read_status()["VmHWM"]
        t0 = time.perf_counter()
        loss = _step(model, x)
        step_s = time.perf_counter() - t0
        peak = read_status()["VmHWM"]
    row = {
        "impl": impl,
        "memory": memory,
        "layers": layers,
        "dim": dim,
        "hidden": hidden,
        "batch": batch,
        "device": device,
        "threads": threads,
        "fused": getattr(model, "fused", None),
        "seed": seed,
        "peak_growth_bytes": int(peak - baseline),
        "baseline_bytes": int(baseline),
        "peak_bytes": int(peak),
        "param_bytes": tensor_bytes(params),
        "grad_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
        "input_bytes": tensor_bytes([x]),
        "method": method,
        "torch": torch.__version__,
        "step_s": step_s,
        "loss": loss,
    }
    if device == "cpu":
        row["malloc_trim"] = trimmed
    return row


# ------------------------------------------------------------------------ the calling process
def probe(
    dim: int,
    hidden: int,
    batch: int,
    layers: int,
    memory: str = "standard",
    impl: str = "fast",
    device: str = "cpu",
    threads: int = 1,
    seed: int = 0,
    fused: str | None = None,
    warmup: int = 1,
    reset: str = "auto",
    timeout: float | None = None,
) -> dict:
    """One training step of a ``(dim, hidden, layers)`` flow at ``batch``, in a fresh process.

    ``memory`` is the training-memory mode, ``impl`` ``"fast"`` (:class:`fastnvp.FastRealNVP`)
    or ``"reference"`` (:class:`fastnvp.RealNVP`, standard only), ``threads`` the torch thread
    count of the child, ``fused`` FastRealNVP's fused level (None: the model's default),
    ``reset`` ``"auto"`` (clear_refs where it works), ``"clear_refs"`` (required) or ``"none"``
    (the fallback), ``timeout`` seconds for the child. Returns the row of
    :func:`measure_in_this_process`. Bad arguments raise ``ValueError`` naming the argument
    before any process starts; a failing child raises ``RuntimeError`` with its stderr.
    """
    check_arguments(
        dim, hidden, batch, layers, memory, impl, device, threads, seed, fused, warmup, reset
    )
    argv = [sys.executable, "-m", "fastnvp.analysis.memory_probe", "--in-process"]
    argv += ["--dim", str(dim), "--hidden", str(hidden), "--batch", str(batch)]
    argv += ["--layers", str(layers), "--memory", memory, "--impl", impl, "--device", device]
    argv += ["--threads", str(threads), "--seed", str(seed), "--warmup", str(warmup)]
    argv += ["--reset", reset]
    if fused is not None:
        argv += ["--fused", fused]
    env = dict(os.environ)
    # The child must import this same fastnvp (a source checkout need not be installed), and
    # OpenMP/MKL should size their pools like torch.set_num_threads does in the child.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"memory probe child failed (exit {done.returncode}): {' '.join(argv[1:])}\n"
            f"{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_depths(
    dim: int,
    hidden: int,
    batch: int,
    layers: Sequence[int],
    memories: Sequence[str] = MODES,
    impls: Sequence[str] = ("fast",),
    device: str = "cpu",
    threads: int = 1,
    seed: int = 0,
    fused: str | None = None,
    warmup: int = 1,
    reset: str = "auto",
    timeout: float | None = None,
    repeats: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict:
    """:func:`probe` every (impl, memory, depth) ``repeats`` times, each in a fresh process.

    Returns ``{"rows": [...], "skipped": [...], "machine": {...}, "source": {...},
    "elapsed_s": ...}``. Each row is the run with the lower-median ``peak_growth_bytes`` of its
    configuration (a real measurement, so ``peak_bytes = baseline_bytes + peak_growth_bytes``
    holds), with every run's growth in ``peak_growth_all``. The reference has no invertible
    mode, so that combination is listed in ``skipped``.
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one depth")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a depth, got {layers}")
    for name, values, allowed in (("memories", memories, MODES), ("impls", impls, IMPLS)):
        if not values:
            raise ValueError(f"{name} must name at least one of {allowed}")
        for v in values:
            _choice(v, allowed, name)
    _positive_int(repeats, "repeats")
    common = dict(device=device, threads=threads, seed=seed, fused=fused, warmup=warmup)
    common["reset"] = reset
    for num_layers in layers:
        check_arguments(dim, hidden, batch, num_layers, **common)
    rows, skipped = [], []
    started = time.perf_counter()
    for impl in impls:
        for memory in memories:
            if impl == "reference" and memory != "standard":
                skipped.append({"impl": impl, "memory": memory, "why": "no invertible mode"})
                continue
            for num_layers in sorted(layers):
                runs = [
                    probe(dim, hidden, batch, num_layers, memory, impl, timeout=timeout, **common)
                    for _ in range(repeats)
                ]
                growth = [r["peak_growth_bytes"] for r in runs]
                row = next(r for r in runs if r["peak_growth_bytes"] == median_low(growth))
                row["peak_growth_all"] = growth
                rows.append(row)
                if log is not None:
                    each = ", ".join(f"{g / MB:.1f}" for g in growth)
                    log(
                        f"{impl:9s} {memory:10s} L={num_layers:4d}  peak growth {each} MB  "
                        f"baseline {row['baseline_bytes'] / MB:.1f} MB  ({row['method']})"
                    )
    return {
        "rows": rows,
        "skipped": skipped,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            # glibc's tunables change what RSS shows (see docs/profiling.md): record any set.
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
        "source": source_revision(),
        "elapsed_s": time.perf_counter() - started,
    }


def source_revision() -> dict:
    """The git commit of this checkout and its modified files under ``fastnvp/`` (or Nones).

    The numbers belong to the engine they were measured on; a dirty tree is not that commit.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "fastnvp"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": [line[3:] for line in status.splitlines()]}


# ---------------------------------------------------------------------------------- reports
def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["impl"], row["memory"]), []).append(row)
    for group in groups.values():
        group.sort(key=lambda r: r["layers"])
    return groups


def per_layer_growth(group: list[dict]) -> float | None:
    """Bytes of peak growth per added layer between the smallest and largest depth of a group."""
    if len(group) < 2:
        return None
    lo, hi = group[0], group[-1]
    return (hi["peak_growth_bytes"] - lo["peak_growth_bytes"]) / (hi["layers"] - lo["layers"])


def _all_runs(row: dict) -> str:
    growth = row.get("peak_growth_all", [row["peak_growth_bytes"]])
    return ", ".join(f"{g / MB:.1f}" for g in growth)


def markdown_table(rows: list[dict]) -> str:
    """Peak growth vs depth, one line per row, with the per-layer slope of each (impl, memory).

    The slope is (growth at the largest L - growth at the smallest L) / (difference in L), in MB
    (2**20 bytes) per layer, shown on the group's last line; "all runs" lists every repeat.
    """
    lines = [
        "| impl | memory | L | peak growth (MB) | per added layer (MB) | all runs (MB) "
        "| baseline (MB) | params (MB) | method |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group in _groups(rows).values():
        slope = per_layer_growth(group)
        for k, r in enumerate(group):
            cell = f"{slope / MB:.2f}" if slope is not None and k == len(group) - 1 else "–"
            lines.append(
                f"| {r['impl']} | {r['memory']} | {r['layers']} "
                f"| {r['peak_growth_bytes'] / MB:.1f} | {cell} | {_all_runs(r)} "
                f"| {r['baseline_bytes'] / MB:.1f} "
                f"| {r['param_bytes'] / MB:.2f} | {r['method']} |"
            )
    return "\n".join(lines) + "\n"


def plot_growth(rows: list[dict], path: Path, title: str | None = None) -> Path:
    """Peak growth (MB) vs coupling layers, one line per (impl, memory), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (impl, memory), group in _groups(rows).items():
        style = "-" if memory == "standard" else "--"
        ax.plot(
            [r["layers"] for r in group],
            [r["peak_growth_bytes"] / MB for r in group],
            style,
            marker="o",
            label=f"{impl} / {memory}",
        )
    if title is None and rows:
        r = rows[0]
        title = f"B={r['batch']}, D={r['dim']}, H={r['hidden']}, {r['device']}, {r['threads']} thr"
    ax.set_title(title or "")
    ax.set_xticks(sorted({r["layers"] for r in rows}))
    ax.set_xlabel("coupling layers L")
    device = rows[0]["device"] if rows else "cpu"
    what = "max_memory_allocated" if device == "cuda" else "peak RSS"
    ax.set_ylabel(f"{what} growth in one step (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ command line
def _list(cast):
    def parse(text: str):
        try:
            values = tuple(cast(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m fastnvp.analysis.memory_probe``."""
    p = argparse.ArgumentParser(
        prog="python -m fastnvp.analysis.memory_probe",
        description="Peak memory of one training step vs depth, each in a fresh process.",
    )
    p.add_argument("--dim", type=int, default=8, help="data dimension D (default 8)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width H (default 256)")
    p.add_argument("--batch", type=int, default=4096, help="batch size B (default 4096)")
    p.add_argument("--layers", type=_list(int), default=(8, 50), help="depths (default 8,50)")
    p.add_argument(
        "--memory", type=_list(str), default=MODES, help="modes (default standard,invertible)"
    )
    p.add_argument("--impl", type=_list(str), default=("fast",), help="fast,reference")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each child")
    p.add_argument("--fused", default=None, help="FastRealNVP's fused level (default: model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="steps before the measured one")
    p.add_argument("--reset", default="auto", help="auto, clear_refs or none (the fallback)")
    p.add_argument(
        "--repeats", type=int, default=1, help="fresh processes per configuration (default 1)"
    )
    p.add_argument("--out", default=None, help="write results.json, table.md, the plot here")
    # Internal: the child side of probe(); prints one JSON row.
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run a sweep (or, with ``--in-process``, one measurement) and print the table (or row)."""
    args = build_parser().parse_args(argv)
    try:
        if args.in_process:
            if len(args.layers) != 1 or len(args.memory) != 1 or len(args.impl) != 1:
                raise ValueError("--in-process measures one configuration")
            row = measure_in_this_process(
                args.dim,
                args.hidden,
                args.batch,
                args.layers[0],
                args.memory[0],
                args.impl[0],
                args.device,
                args.threads,
                args.seed,
                args.fused,
                args.warmup,
                args.reset,
            )
            print(json.dumps(row))
            return 0
        log = lambda line: print(line, file=sys.stderr, flush=True)
        doc = probe_depths(
            args.dim,
            args.hidden,
            args.batch,
            args.layers,
            args.memory,
            args.impl,
            args.device,
            args.threads,
            args.seed,
            args.fused,
            args.warmup,
            args.reset,
            repeats=args.repeats,
            log=log,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The allocator's tunables change the numbers: a command that reproduces them names them.
    env = [f"{k}={v}" for k, v in sorted(doc["machine"]["malloc_env"].items())]
    words = [
        *env,
        "python -m fastnvp.analysis.memory_probe",
        *(sys.argv[1:] if argv is None else argv),
    ]
    doc["command"] = " ".join(words)
    table = markdown_table(doc["rows"])
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "table.md").write_text(table)
        plot_growth(doc["rows"], out / "peak_growth_vs_depth.png")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
