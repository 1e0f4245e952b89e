"""GPU check of the fused coupling layer: correctness of every path, then a timing table.

Run on one CUDA GPU (``benchmarks/gpu_check.sh`` does the install and calls this):

    python benchmarks/gpu_check.py --out DIR [--budget-s 300] [--smoke]

Sections, in this order (all within ``--budget-s``; what does not fit is recorded as skipped):

0. API checks: ``triton.testing.do_bench`` accepts the keyword arguments :func:`bench` passes
   (:data:`DO_BENCH_KWARGS`), checked with ``inspect.signature(...).bind`` so that a Triton
   that renamed one fails here, in seconds, and not after the correctness section.
1. Compile report (background thread, CPU only): ``benchmarks/compile_report.py`` for the
   representative configs :data:`COMPILE_REPORT_CONFIGS`, one subprocess each, without
   ``TRITON_INTERPRET`` (the interpreter replaces the kernels, so compiling needs a process of
   its own). It exercises ``triton.compile`` with this Triton's compile options and
   ``GPUTarget("cuda", 90, 32)``, and records registers and spills of each config.
2. Correctness (fp32 inputs; oracle: the same math in float64 on the device, from the reference
   Real NVP's weights): fused layer forward / inverse / backward (input and all 12 weight
   gradients), whole-stack forward / inverse, for ieee / tf32 / bf16, max relative error each.
   bf16 gradients are compared with the PyTorch path that rounds the same operands to bf16.
3. Timing, L = 50, D = 2, H = 256, B in {4096, 65536}: log_prob, sample and one training step
   (forward + backward of the mean NLL) for the eager reference, the fused layer per precision
   (one launch per layer) and the whole-stack kernel per precision (log_prob / sample); medians
   of ``triton.testing.do_bench``. Achieved TFLOP/s count the model's FLOPs (forward 2 nets x
   (2 K1 H + 2 H^2 + 2 H K2) per row and layer, a training step 3x that), next to a bf16 /
   tf32 / fp32 matmul ceiling measured in the same run.
4. torch.compile of the reference (same table rows, variant ``reference compile``) in a
   subprocess (``--only compile``) with a hard timeout of the timing budget that is left: a cold
   compile of a 50-layer flow takes minutes and cannot be interrupted in-process. A killed
   subprocess leaves ``skipped`` rows with the reason; the rows it finished are kept.
5. More correctness cases (D = 3 and D = 128 on the GPU), while the budget lasts.

``DIR/gpu_check.json`` is rewritten (atomically) after every row of every section, so an outer
timeout still leaves everything that finished; ``sections`` says which ones completed.
``--smoke`` runs tiny sizes on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` and
``FASTNVP_BACKEND=triton`` must be set before Python starts; ``gpu_check.sh --smoke`` does) to
rehearse the script itself; its timings mean nothing.

Exit status 1 when a correctness check, an API check, a compile-report config, a timing row or
a section failed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

import fastnvp.ops.fused_layer as fl
from fastnvp.core.conditioner import standard_net
from fastnvp.core.reference import RealNVP
from fastnvp.flows.fast_realnvp import FastRealNVP

ROOT = Path(__file__).resolve().parents[1]
TOL = {"ieee": 1e-4, "tf32": 2e-3, "bf16": 3e-2}
# Weight gradients sum over rows with cancellation, and rounded matmul operands flip a few
# LeakyReLU branches: tf32 gets a looser gradient bound than its output bound (bf16 gradients
# are compared with the PyTorch path that rounds the same operands).
TOL_GRAD = {"ieee": 1e-4, "tf32": 2e-2, "bf16": 3e-2}
PRECISIONS = ("ieee", "tf32", "bf16")
TASKS = ("log_prob", "sample", "train")
REFERENCE_COMPILE = "reference compile"
# The one place the do_bench keyword arguments live: bench() passes them and the API check binds
# them, so the two cannot diverge. warmup / rep are milliseconds of GPU time per row.
DO_BENCH_KWARGS = {"warmup": 10, "rep": 50, "return_mode": "median"}
# Compile-report configs (names printed by ``compile_report.py``): one per kernel family the
# timing launches, at the timed D = 2 / H = 256, the backward in a tensor-core and the fp32 FMA
# precision. All compile with 0 spills under Triton 3.6 (with the tiles of
# fastnvp.kernels.triton_limits) and 3.9.
COMPILE_REPORT_CONFIGS = (
    "coupling_layer_kernel[bf16,D=2,H=256]",
    "coupling_stack_kernel[bf16,D=2,H=256]",
    "coupling_layer_backward_kernel[bf16,D=2,H=256]",
    "coupling_layer_backward_kernel[ieee,D=2,H=256]",
    "_coupling_fwd_kernel[forward,float32,BLOCK=1024x1]",
)
# One config compiles in 5-15 s on a 2-core CPU (ptxas included); a config still compiling
# after this long is hung, not slow.
COMPILE_REPORT_TIMEOUT_S = 180.0
# An in-process timing row is started only with this much budget left: the row itself is
# ~0.1 s of do_bench, but its first call may JIT-compile a few kernels (5-15 s each).
ROW_MIN_S = 20.0
# The torch.compile subprocess is started only with this much budget left: importing torch and
# compiling the first graph of even the 2-layer smoke model takes ~25 s on a 2-core CPU.
REFERENCE_COMPILE_MIN_S = 30.0
# "More correctness" cases are started only with this much budget left (JIT compiles of three
# kernels in three precisions for a new shape).
MORE_CORRECTNESS_MIN_S = 45.0
SECTIONS = ("api", "compile_report", "correctness", "timing", "reference_compile",
            "more_correctness")  # fmt: skip


class Budget:
    """Wall-clock budget: seconds left until a fixed end."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def split(self, fraction: float) -> Budget:
        """A sub-budget ending when ``fraction`` of what is left has passed."""
        sub = Budget(0)
        sub.end = time.monotonic() + fraction * self.left()
        return sub


class Report:
    """The JSON report and its file; :meth:`add` appends a row and rewrites the file at once.

    Rows come from the main thread and the compile-report thread, so every change and every
    write holds one lock. The file is written to a temporary name and renamed, so a kill during
    a write leaves the previous complete file, never a truncated one.
    """

    def __init__(self, path: Path, meta: dict, sections=SECTIONS):
        self.path = path
        self.lock = threading.RLock()
        self.start = time.monotonic()
        self.data = {
            "meta": meta,
            "sections": {name: "pending" for name in sections},
            # Seconds since the start when each section last changed state (time planning).
            "section_at_s": {name: None for name in sections},
            "api": [],
            "compile": [],
            "correctness": [],
            "timing": [],
            "errors": [],
        }

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.data, indent=1, default=str)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)

    def add(self, section: str, row: dict) -> None:
        with self.lock:
            self.data[section].append(row)
            self.save()

    def section(self, name: str, state: str) -> None:
        with self.lock:
            self.data["sections"][name] = state
            self.data["section_at_s"][name] = round(time.monotonic() - self.start, 1)
            self.save()

    def failed(self) -> bool:
        """True when any recorded check failed (skipped rows are not failures)."""
        d = self.data
        bad = [r for r in d["correctness"] + d["api"] + d["compile"] if r.get("ok") is False]
        bad += [r for r in d["timing"] if "error" in r]
        return bool(bad or d["errors"] or "error" in d["sections"].values())


# ------------------------------------------------------------------------- subprocesses
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def run_child(cmd: list[str], timeout: float, env: dict, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group with stdout + stderr to ``log``.

    Kills the whole group (torch.compile's worker processes included) when ``timeout`` seconds
    pass. Returns (exit status, or None when it was killed; seconds it ran).
    """
    start = time.monotonic()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)  # fmt: skip
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        try:
            rc = proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    return rc, time.monotonic() - start


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_children() -> None:
    """Kill every running child's process group (ours run in sessions of their own, out of
    reach of the outer ``timeout``'s signal to our group)."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for proc in children:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Terminated(BaseException):
    """SIGTERM arrived (the outer ``timeout`` of gpu_check.sh): stop, record, clean up."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


# ---------------------------------------------------------------------------- helpers
def rel_err(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench(fn, device) -> float:
    """Median milliseconds of fn(): ``triton.testing.do_bench`` on CUDA.

    On the CPU (``--smoke``) one timed call, first-call costs (torch.compile) included: the
    number only shows that the path runs (the interpreter is far too slow for warm-up calls and
    repeats to be worth their time).
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, **DO_BENCH_KWARGS))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def check_do_bench() -> dict:
    """Bind :data:`DO_BENCH_KWARGS` to ``triton.testing.do_bench``'s signature (no call: it
    needs CUDA events), so a renamed argument fails at once."""
    call = "do_bench(fn, " + ", ".join(f"{k}={v!r}" for k, v in DO_BENCH_KWARGS.items()) + ")"
    try:
        import triton.testing

        inspect.signature(triton.testing.do_bench).bind(lambda: None, **DO_BENCH_KWARGS)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed check
        return {"check": call, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"check": call, "ok": True}


def flops_per_row(dim: int, hidden: int, layers: int) -> int:
    k1, k2 = dim - dim // 2, dim // 2
    return layers * 2 * (2 * k1 * hidden + 2 * hidden * hidden + 2 * hidden * k2)


def make_model(dim, layers, hidden, device):
    """The reference flow every section uses (seeded: the compile subprocess rebuilds it)."""
    torch.manual_seed(0)
    model = RealNVP.standard(dim, layers, hidden=hidden).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _print_errs(tag: str, errs: dict, ok: bool) -> None:
    print(f"  {tag:<40} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
          + ("" if ok else "  FAIL"), flush=True)  # fmt: skip


# ---------------------------------------------------------------------------- correctness
def check_layer(dim, hidden, rows, device, precisions, emit):
    """Fused layer forward / inverse and backward vs float64, one row per case to ``emit``."""
    model = make_model(dim, 2, hidden, device)
    x = torch.randn(rows, dim, device=device)
    for layer in range(2):
        kept, transformed, sw, tw = fl.layer_weights(model, layer)
        sw = [w.detach() for w in sw]
        tw = [w.detach() for w in tw]
        sw64 = [w.double() for w in sw]
        tw64 = [w.double() for w in tw]
        slope = fl.flow_slope(model)
        for precision in precisions:
            for inverse in (False, True):
                op = fl.coupling_layer_inverse if inverse else fl.coupling_layer
                tag = f"layer D={dim} H={hidden} L{layer} {precision} {'inv' if inverse else 'fwd'}"
                xg = x.clone().requires_grad_()
                wg = [w.clone().requires_grad_() for w in (*sw, *tw)]
                out, ld = op(xg, kept, transformed, *wg, slope, precision)
                ref_out, ref_ld = fl.torch_layer(
                    x.double(), kept, transformed, sw64, tw64, slope, inverse
                )
                g_out, g_ld = torch.randn_like(out), torch.randn_like(ld)
                grads = torch.autograd.grad((out * g_out).sum() + (ld * g_ld).sum(), [xg, *wg])
                oracle_prec = "bf16" if precision == "bf16" else "ieee"
                ref_grads = fl.torch_layer_backward(
                    out.detach().double(), g_out.double(), g_ld.double(), kept, transformed,
                    sw64, tw64, slope, inverse, oracle_prec,
                )  # fmt: skip
                errs = {"out": rel_err(out, ref_out), "log_det": rel_err(ld, ref_ld)}
                errs["grad_x"] = rel_err(grads[0], ref_grads[0])
                errs["grad_w_max"] = max(rel_err(g, r) for g, r in zip(grads[1:], ref_grads[1:]))
                ok = errs["out"] <= TOL[precision] and errs["log_det"] <= TOL[precision]
                ok = ok and max(errs["grad_x"], errs["grad_w_max"]) <= TOL_GRAD[precision]
                emit({"check": tag, **errs, "ok": ok})
                _print_errs(tag, errs, ok)


def check_stack(dim, hidden, layers, rows, device, precisions, emit):
    """Whole-stack forward / inverse vs the float64 reference flow, one row per precision."""
    model = make_model(dim, layers, hidden, device)
    x = torch.randn(rows, dim, device=device)
    ref64 = make_model(dim, layers, hidden, device).double()
    ref64.load_state_dict(model.state_dict())
    stacked = fl.flow_stack(model)
    slope = fl.flow_slope(model)
    with torch.no_grad():
        ref_z, ref_ld = ref64.f(x.double())
        ref_x = ref64.g(x.double())
        for precision in precisions:
            z, ld = fl.coupling_stack_forward(x, *stacked, slope, precision)
            xb, _ = fl.coupling_stack_inverse(x, *stacked, slope, precision)
            errs = {"z": rel_err(z, ref_z), "log_det": rel_err(ld, ref_ld), "x": rel_err(xb, ref_x)}
            tag = f"stack D={dim} H={hidden} L={layers} {precision}"
            # Errors compound over layers: allow 5x the per-layer tolerance.
            ok = all(e <= 5 * TOL[precision] for e in errs.values())
            emit({"check": tag, **errs, "ok": ok})
            _print_errs(tag, errs, ok)


def check_conditional(dim, hidden, layers, context, rows, device, emit):
    """A conditional FastRealNVP (fused layers with context columns, docs/design.md §1.7) vs
    the float64 reference: log_prob, parameter and context gradients, g, and the no-grad
    whole-stack launch; then the train step of both, timed side by side (ieee precision)."""
    torch.manual_seed(0)
    ref = RealNVP.standard(dim, layers, hidden=hidden, context=context).to(device)
    fast = FastRealNVP.from_reference(ref)
    ref64 = RealNVP.standard(dim, layers, hidden=hidden, context=context).to(device).double()
    ref64.load_state_dict(ref.state_dict())
    x = torch.randn(rows, dim, device=device)
    c = torch.randn(rows, context, device=device)
    tag = f"conditional D={dim} C={context} H={hidden} L={layers}"
    cg = c.clone().requires_grad_()
    lp = fast.log_prob(x, cg)
    grads = torch.autograd.grad(lp.sum(), [cg, *fast.parameters()])
    c64 = c.double().requires_grad_()
    lp64 = ref64.log_prob(x.double(), c64)
    grads64 = torch.autograd.grad(lp64.sum(), [c64, *ref64.parameters()])
    with torch.no_grad():
        plan = str(fast.explain(x, "f", c))
        z64 = ref64.f(x.double(), c.double())[0]
        stack_z = fast.f(x, c)[0]
        back = fast.g(z64.float(), c)
    errs = {
        "log_prob": rel_err(lp, lp64),
        "grad_context": rel_err(grads[0], grads64[0]),
        "grad_w_max": max(rel_err(g, r) for g, r in zip(grads[1:], grads64[1:])),
        "stack_z": rel_err(stack_z, z64),
        "g": rel_err(back, x.double()),
    }
    ok = all(e <= 5 * TOL_GRAD["ieee"] for e in errs.values())
    emit({"check": tag, "plan": plan, **errs, "ok": ok})
    _print_errs(tag, errs, ok)

    def step(model):
        model.zero_grad(set_to_none=True)
        (-model.log_prob(x, c).mean()).backward()

    times = {
        name: bench(lambda m=m: step(m), device)
        for name, m in (("fastnvp", fast), ("reference", ref))
    }
    row = {
        "check": f"{tag} train step ms",
        **times,
        "speedup": times["reference"] / times["fastnvp"],
    }
    emit(row)
    print(f"  {row['check']:<40} fastnvp {times['fastnvp']:.3f} reference {times['reference']:.3f}"
          f" ({row['speedup']:.2f}x)", flush=True)  # fmt: skip


def check_interleaved(dim, hidden, layers, rows, device, emit):
    """FastRealNVP with interleaved layers (docs/design.md §1.8) on the fused path vs the
    float64 reference: fixed permutations folded into the whole-stack launch, ActNorm + LU and
    BatchNorm (train mode) between fused layers; log_prob, parameter gradients, no-grad f, g."""
    for norm, perm in ((None, "random"), ("actnorm", "lu"), ("batchnorm", "reverse")):
        torch.manual_seed(0)
        ref = RealNVP.standard(dim, layers, hidden=hidden, norm=norm, permutation=perm)
        ref = ref.to(device)
        x = torch.randn(rows, dim, device=device)
        ref(x)  # ActNorm initializes on both from the same batch below
        fast = FastRealNVP.from_reference(ref)
        ref64 = RealNVP.standard(dim, layers, hidden=hidden, norm=norm, permutation=perm)
        ref64 = ref64.to(device).double()
        ref64.load_state_dict(ref.state_dict())
        tag = f"interleaved norm={norm} perm={perm} D={dim} H={hidden} L={layers}"
        lp = fast.log_prob(x)
        grads = torch.autograd.grad(lp.sum(), list(fast.parameters()))
        lp64 = ref64.log_prob(x.double())
        grads64 = torch.autograd.grad(lp64.sum(), list(ref64.parameters()))
        fast.eval()
        ref64.eval()
        with torch.no_grad():
            plan = str(fast.explain(x, "f"))
            z64 = ref64.f(x.double())[0]
            z = fast.f(x)[0]
            back = fast.g(z64.float())
        # Relative to the largest gradient of the model: a BatchNorm in train mode removes the
        # batch mean, so the shift bias of the coupling before it has a zero gradient.
        scale = max(r.abs().max().item() for r in grads64)
        errs = {
            "log_prob": rel_err(lp, lp64),
            "grad_w_max": max((g.double() - r).abs().max().item() for g, r in zip(grads, grads64))
            / scale,
            "eval_z": rel_err(z, z64),
            "g": rel_err(back, x.double()),
        }
        ok = all(e <= 5 * TOL_GRAD["ieee"] for e in errs.values())
        emit({"check": tag, "plan": plan, **errs, "ok": ok})
        _print_errs(tag, errs, ok)


# ------------------------------------------------------------------------- compile report
def _safe_name(name: str) -> str:
    """A file name for a config name (brackets, commas and '=' are not portable)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def compile_report(names, budget: Budget, out: Path, emit, stop: threading.Event) -> None:
    """Run ``compile_report.py --filter NAME --json FILE`` for each name, one row each.

    The subprocess runs without ``TRITON_INTERPRET`` (the interpreter cannot compile). A row is
    ``ok`` when the report compiled the config with 0 spills and shared memory in the sm_90
    limit (its own verdict); a failure or a time-out is recorded and the next name goes on.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    folder = out / "compile_report"
    folder.mkdir(parents=True, exist_ok=True)
    script = ROOT / "benchmarks" / "compile_report.py"
    for i, name in enumerate(names):
        if stop.is_set() or budget.left() <= 0:
            emit({"name": name, "skipped": True, "reason": "budget spent"})
            continue
        stem = f"{i}_{_safe_name(name)}"
        json_path = folder / f"{stem}.json"
        json_path.unlink(missing_ok=True)  # an earlier run's file must not pass for this one
        by_budget = budget.left() < COMPILE_REPORT_TIMEOUT_S
        timeout = min(COMPILE_REPORT_TIMEOUT_S, budget.left())
        cmd = [sys.executable, str(script), "--filter", name, "--json", str(json_path)]
        rc, seconds = run_child(cmd, timeout, env, folder / f"{stem}.log")
        row = {"name": name, "rc": rc, "seconds": round(seconds, 1)}
        if stop.is_set():  # killed by finish_compile_report or on SIGTERM, not a failure
            emit({**row, "skipped": True, "reason": "stopped: budget spent or terminated"})
            print(f"  compile {name:<52} stopped after {seconds:.0f} s", flush=True)
            continue
        if rc is None and by_budget:  # the run's budget ended first: not the config's fault
            emit({**row, "skipped": True, "reason": f"budget spent after {seconds:.0f} s"})
            print(f"  compile {name:<52} budget spent after {seconds:.0f} s", flush=True)
            continue
        if rc is None:  # past COMPILE_REPORT_TIMEOUT_S: hung
            row.update(ok=False, error=f"timeout after {seconds:.0f} s")
        else:
            try:  # the report writes its JSON from its first matching config on
                rows = json.loads(json_path.read_text())["rows"]
            except FileNotFoundError:
                rows = []
            except (OSError, ValueError, KeyError) as exc:
                rows, row["error"] = [], f"unreadable report JSON ({type(exc).__name__})"
            matched = [r for r in rows if r.get("name") == name]
            if not matched and "error" not in row:
                row["error"] = (f"exit status {rc} before any row; see {stem}.log" if rc else
                                "compile_report.py has no config of exactly this name")  # fmt: skip
            if matched:
                row.update({k: v for k, v in matched[0].items() if k != "name"})
            if matched and rc != 0 and "error" not in row:
                row["error"] = f"exit status {rc}: spills, or shared memory over the sm_90 limit"
            row["ok"] = rc == 0 and bool(matched) and "error" not in row
        emit(row)
        verdict = "ok" if row["ok"] else f"FAIL {row['error']}"
        print(f"  compile {name:<52} {seconds:5.1f} s  {verdict}", flush=True)


def start_compile_report(names, budget: Budget, out: Path, report: Report):
    """Run :func:`compile_report` in a daemon thread (CPU only: it overlaps the GPU work).

    Returns (thread, stop event); :func:`finish_compile_report` joins it.
    """
    stop = threading.Event()

    def work():
        report.section("compile_report", "running")
        try:
            compile_report(names, budget, out, lambda row: report.add("compile", row), stop)
            report.section("compile_report", "done")
        except Exception:  # noqa: BLE001 - recorded, the other sections go on
            report.add("errors", {"section": "compile_report", "error": traceback.format_exc()})
            report.section("compile_report", "error")

    thread = threading.Thread(target=work, name="compile-report", daemon=True)
    thread.start()
    return thread, stop


def finish_compile_report(thread, stop, budget: Budget) -> None:
    """Wait for the compile-report thread while the budget lasts, then stop and reap it."""
    if thread is None:
        return
    thread.join(timeout=max(budget.left(), 0.0))
    if thread.is_alive():
        stop.set()
        kill_children()
        thread.join(timeout=10)


# --------------------------------------------------------------------------------- timing
def measure_ceiling(args, device, emit) -> None:
    """bf16 / tf32 / fp32 matmul TFLOP/s of the (B_max, H) x (H, H) product, one row."""
    n, hidden = max(args.batches), args.hidden
    a = torch.randn(n, hidden, device=device)
    w = torch.randn(hidden, hidden, device=device)
    ceilings = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):  # fmt: skip
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ab, wb = a.to(dtype), w.to(dtype)
            ms = bench(lambda ab=ab, wb=wb: ab @ wb, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        ceilings[name] = 2 * n * hidden * hidden / (ms * 1e-3) / 1e12 if ms > 0 else None
    emit({"ceiling_tflops": ceilings, "shape": [n, hidden, hidden]})
    print("  matmul ceiling TFLOP/s: "
          + ", ".join(f"{k} {v:.3g}" for k, v in ceilings.items() if v is not None))  # fmt: skip


def time_variants(args, device, budget: Budget, variants, emit, row_min_s=ROW_MIN_S) -> None:
    """Time each (variant, B, task) and ``emit`` one row each (ms, samples/s, TFLOP/s).

    ``variants``: (name, precision) pairs; a row starts only with ``row_min_s`` of budget left,
    otherwise it is recorded as skipped. The fast models and the torch.compile wrappers are
    built only when a variant needs them.
    """
    dim, layers, hidden = args.dim, args.layers, args.hidden
    model = make_model(dim, layers, hidden, device)
    slope = fl.flow_slope(model)
    per_row = flops_per_row(dim, hidden, layers)
    names = {name for name, _ in variants}

    def nll_ref(m, x):
        return -m.log_prob(x).mean()

    log_2pi = math.log(2 * math.pi)
    # Per-layer weights gathered once (mask splits need a host sync), for the per-layer timing.
    per_layer = [fl.layer_weights(model, i) for i in range(layers)]
    per_layer = [(k, t, [w.detach() for w in sw], [w.detach() for w in tw])
                 for k, t, sw, tw in per_layer]  # fmt: skip

    def layer_log_prob(x, precision):
        z, ld = x, 0
        for kept, transformed, sw, tw in per_layer:
            z, ld_i = fl.coupling_layer(z, kept, transformed, *sw, *tw, slope, precision)
            ld = ld + ld_i
        return -0.5 * (z * z).sum(1) - 0.5 * dim * log_2pi + ld

    def layer_sample(x, precision):
        for kept, transformed, sw, tw in reversed(per_layer):
            x, _ = fl.coupling_layer_inverse(x, kept, transformed, *sw, *tw, slope, precision)
        return x

    fast = {}
    if names - {"reference eager", REFERENCE_COMPILE}:
        for level in ("op", *PRECISIONS):
            fused, precision = ("op", "ieee") if level == "op" else ("layer", level)
            fast[level] = FastRealNVP(
                lambda: standard_net(dim, hidden, tanh=True),
                lambda: standard_net(dim, hidden, tanh=False),
                model.mask,
                fused=fused,
                precision=precision,
            ).to(device)
            fast[level].load_state_dict(model.state_dict())
    if REFERENCE_COMPILE in names:
        backend = args.compile_backend
        compiled_lp = torch.compile(model.log_prob, backend=backend)
        compiled_g = torch.compile(model.g, backend=backend)
        compiled_nll = torch.compile(nll_ref, backend=backend)

    def make_fn(name, precision, task, x):
        """The callable timed for one (variant, task) on input x."""
        if name == "reference eager":
            return {"log_prob": lambda: model.log_prob(x), "sample": lambda: model.g(x),
                    "train": lambda: nll_ref(model, x).backward()}[task]  # fmt: skip
        if name == REFERENCE_COMPILE:
            return {"log_prob": lambda: compiled_lp(x), "sample": lambda: compiled_g(x),
                    "train": lambda: compiled_nll(model, x).backward()}[task]  # fmt: skip
        if name == "fastnvp op":  # the elementwise coupling op level (fused="op")
            m = fast["op"]
            return {"log_prob": lambda: m.log_prob(x), "sample": lambda: m.g(x),
                    "train": lambda: nll_ref(m, x).backward()}[task]  # fmt: skip
        if name.startswith("fused layer"):
            m = fast[precision]
            return {
                "log_prob": lambda: layer_log_prob(x, precision),
                "sample": lambda: layer_sample(x, precision),
                "train": lambda: nll_ref(m, x).backward(),
            }[task]
        # fused stack: FastRealNVP(fused="layer") without gradients takes the whole-stack op.
        m = fast[precision]
        return {"log_prob": lambda: m.log_prob(x), "sample": lambda: m.g(x)}[task]

    inputs = {batch: torch.randn(batch, dim, device=device) for batch in args.batches}
    for name, precision in variants:
        for batch, x in inputs.items():
            for task in TASKS:
                if name.startswith("fused stack") and task == "train":
                    continue  # inference only
                if budget.left() < row_min_s:
                    emit({"variant": name, "task": task, "B": batch, "skipped": True,
                          "reason": f"less than {row_min_s:.0f} s of budget left"})  # fmt: skip
                    continue
                fn = make_fn(name, precision, task, x)
                try:
                    if task == "train":
                        ms = bench(fn, device)
                    else:
                        with torch.no_grad():
                            ms = bench(fn, device)
                except Exception as exc:  # noqa: BLE001 - recorded, the table goes on
                    emit({"variant": name, "task": task, "B": batch, "error": repr(exc)})
                    print(f"  {name:<22} {task:<8} B={batch:<6} ERROR {exc!r}", flush=True)
                    continue
                flops = per_row * batch * (3 if task == "train" else 1)
                tflops = flops / (ms * 1e-3) / 1e12 if ms > 0 else None
                emit({"variant": name, "task": task, "B": batch, "ms": ms,
                      "samples_per_s": batch / (ms * 1e-3) if ms > 0 else None,
                      "tflops": tflops})  # fmt: skip
                print(f"  {name:<22} {task:<8} B={batch:<6} {ms:9.3f} ms  "
                      f"{tflops or 0:7.2f} TFLOP/s", flush=True)  # fmt: skip
        model.zero_grad(set_to_none=True)


def in_process_variants() -> list[tuple[str, str | None]]:
    """The timing variants of the main process, in priority order (torch.compile is not one:
    it runs in its own subprocess, see :func:`reference_compile`)."""
    variants = [("reference eager", None)]
    variants += [(f"fused stack {p}", p) for p in PRECISIONS]
    variants += [("fastnvp op", None)]
    variants += [(f"fused layer {p}", p) for p in PRECISIONS]
    return variants


def reference_compile(args, budget: Budget, emit) -> None:
    """Time torch.compile of the reference in ``gpu_check.py --only compile``, killed when the
    budget is spent; merge its rows and record the ones it did not finish as skipped."""
    expected = [(batch, task) for batch in args.batches for task in TASKS]
    left = budget.left()
    if left < REFERENCE_COMPILE_MIN_S:
        reason = f"only {max(left, 0):.0f} s of budget left (< {REFERENCE_COMPILE_MIN_S:.0f} s)"
        for batch, task in expected:
            emit({"variant": REFERENCE_COMPILE, "task": task, "B": batch, "skipped": True,
                  "reason": reason})  # fmt: skip
        print(f"  {REFERENCE_COMPILE}: skipped, {reason}", flush=True)
        return
    child_out = args.out / "reference_compile"
    (child_out / "gpu_check.json").unlink(missing_ok=True)  # not an earlier run's rows
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", "compile", "--out",
           str(child_out), "--budget-s", f"{left:.0f}", "--compile-backend",
           args.compile_backend] + (["--smoke"] if args.smoke else [])  # fmt: skip
    print(f"  {REFERENCE_COMPILE}: subprocess, hard timeout {left:.0f} s", flush=True)
    rc, seconds = run_child(cmd, left, dict(os.environ), args.out / "reference_compile.log")
    try:
        rows = json.loads((child_out / "gpu_check.json").read_text())["timing"]
    except (OSError, ValueError, KeyError):
        rows = []
    done = set()
    for row in rows:
        if row.get("variant") == REFERENCE_COMPILE and "ms" in row:
            emit(row)
            done.add((row["B"], row["task"]))
            print(f"  {REFERENCE_COMPILE:<22} {row['task']:<8} B={row['B']:<6} "
                  f"{row['ms']:9.3f} ms", flush=True)  # fmt: skip
    for batch, task in expected:
        if (batch, task) in done:
            continue
        row = {"variant": REFERENCE_COMPILE, "task": task, "B": batch}
        if rc is None:
            row.update(skipped=True, reason=f"timeout after {seconds:.0f} s")
        else:
            row["error"] = f"compile subprocess exited {rc} without this row (see its log)"
        emit(row)
    if rc is None:
        print(f"  {REFERENCE_COMPILE}: killed after {seconds:.0f} s", flush=True)


def timing(args, device, budget: Budget, emit) -> None:
    """Section 3: the matmul ceiling, then every in-process variant (one row each)."""
    measure_ceiling(args, device, emit)
    time_variants(args, device, budget, in_process_variants(), emit)


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script")
    parser.add_argument("--only", choices=["compile"],
                        help="compile: only the torch.compile timing rows (the subprocess of "
                             "section 4)")  # fmt: skip
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend; default inductor, aot_eager with --smoke "
                             "(a cold inductor compile of even the smoke model takes ~100 s on "
                             "a 2-core CPU; aot_eager still traces it with dynamo + AOTAutograd)"
                        )  # fmt: skip
    parser.add_argument("--compile-config", action="append", dest="compile_configs",
                        help="compile-report config name (repeatable); default "
                             "COMPILE_REPORT_CONFIGS")  # fmt: skip
    args = parser.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    if not args.compile_configs:
        args.compile_configs = list(COMPILE_REPORT_CONFIGS)
    if args.smoke:
        args.dim, args.layers, args.hidden, args.batches = 2, 2, 16, [33]
        # H = 32 with the interpreter's 16-wide tiles runs two K chunks; 17 rows, two programs.
        args.layer_cases, args.stack_case, args.rows = [(2, 32), (3, 32)], (2, 32, 3), 17
    else:
        args.dim, args.layers, args.hidden, args.batches = 2, 50, 256, [4096, 65536]
        args.layer_cases, args.stack_case = [(2, 256), (3, 64), (128, 256)], (2, 256, 8)
        args.rows = 1000
    return args


def environment(device) -> dict:
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "FASTNVP_BACKEND": os.environ.get("FASTNVP_BACKEND"),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = environment(device)
    print("  ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
    if args.only == "compile":
        report = Report(args.out / "gpu_check.json", meta, sections=("reference_compile",))
        report.section("reference_compile", "running")
        emit = lambda row: report.add("timing", row)
        # No per-row budget check: the parent's hard timeout is the budget.
        time_variants(args, device, budget, [(REFERENCE_COMPILE, None)], emit, row_min_s=0)
        report.section("reference_compile", "done")
        return 1 if report.failed() else 0

    report = Report(args.out / "gpu_check.json", meta)
    report.save()
    job = []  # [thread, stop event] of the compile report once it runs
    try:
        run_sections(args, device, budget, report, job)
        if job:
            finish_compile_report(*job, budget)
    except Terminated as exc:
        # The outer timeout of gpu_check.sh: stop the compile report, record what was running.
        if job:
            job[1].set()
        kill_children()
        if job:
            job[0].join(timeout=5)
        running = [name for name, state in report.data["sections"].items() if state == "running"]
        report.add("errors", {"section": ",".join(running),
                              "error": f"terminated ({exc}), the outer timeout"})  # fmt: skip
        for name in running:
            report.section(name, "terminated")
    finally:
        kill_children()
        report.save()
    status = 1 if report.failed() else 0
    print(f"wrote {report.path} ({'FAIL' if status else 'ok'})", flush=True)
    return status


def run_sections(args, device, budget: Budget, report: Report, job: list) -> None:
    """Sections 0-5 in order. A section that raises is recorded (``errors``, state ``error``)
    and the next one still runs: on a one-shot GPU loan every other result is worth having."""

    def section(name, fn):
        report.section(name, "running")
        try:
            fn()
        except Exception:  # noqa: BLE001 - recorded, the next section goes on
            report.add("errors", {"section": name, "error": traceback.format_exc()})
            report.section(name, "error")
            print(f"section {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        else:
            report.section(name, "done")

    def api():
        row = check_do_bench()
        report.add("api", row)
        print(f"api: {row['check']}: {'ok' if row['ok'] else row['error']}", flush=True)

    def correctness():
        # The first layer case compiles the kernels the timing uses; the rest come after it.
        print("correctness (max relative error vs float64)", flush=True)
        emit = lambda row: report.add("correctness", row)
        check_layer(*args.layer_cases[0], args.rows, device, PRECISIONS, emit)
        check_stack(*args.stack_case, args.rows, device, PRECISIONS, emit)
        dim, hidden, _ = args.stack_case
        check_conditional(dim, hidden, 2, 3, args.rows, device, emit)
        check_interleaved(4 if dim < 4 else dim, hidden, 2, args.rows, device, emit)

    def more_correctness():
        print("more correctness", flush=True)
        emit = lambda row: report.add("correctness", row)
        for dim, hidden in args.layer_cases[1:]:
            if budget.left() < MORE_CORRECTNESS_MIN_S:
                reason = f"less than {MORE_CORRECTNESS_MIN_S:.0f} s of budget left"
                emit({"check": f"layer D={dim} H={hidden}", "skipped": True, "reason": reason})
                continue
            check_layer(dim, hidden, args.rows, device, PRECISIONS, emit)

    emit_timing = lambda row: report.add("timing", row)
    section("api", api)
    job.extend(start_compile_report(args.compile_configs, budget, args.out, report))
    section("correctness", correctness)
    print(f"timing: L={args.layers} D={args.dim} H={args.hidden}", flush=True)
    timing_budget = budget.split(0.75)  # the rest is for the more-correctness cases
    section("timing", lambda: timing(args, device, timing_budget, emit_timing))
    section("reference_compile", lambda: reference_compile(args, timing_budget, emit_timing))
    section("more_correctness", more_correctness)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())
