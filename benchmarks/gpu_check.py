"""GPU check of the fused coupling layer: correctness of every path, then a timing table.

Run on one CUDA GPU (``benchmarks/gpu_check.sh`` does the install and calls this):

    python benchmarks/gpu_check.py --out DIR [--budget-s 330] [--smoke]

1. Correctness (fp32 inputs; oracle: the same math in float64 on the GPU, from the reference
   Real NVP's weights): fused layer forward / inverse / backward (input and all 12 weight
   gradients), whole-stack forward / inverse, for ieee / tf32 / bf16, max relative error each.
   bf16 gradients are compared with the PyTorch path that rounds the same operands to bf16.
2. Timing, L = 50, D = 2, H = 256, B in {4096, 65536}: log_prob, sample and one training step
   (forward + backward of the mean NLL) for the eager reference, torch.compile of the
   reference, the fused layer per precision (one launch per layer) and the whole-stack kernel
   per precision (log_prob / sample); medians of ``triton.testing.do_bench``. Achieved TFLOP/s
   count the model's FLOPs (forward 2 nets x (2 K1 H + 2 H^2 + 2 H K2) per row and layer, a
   training step 3x that), next to a bf16 / tf32 matmul ceiling measured in the same run.

Sections run in priority order within ``--budget-s``; whatever does not fit is recorded as
skipped. Results: ``DIR/gpu_check.json``. ``--smoke`` runs tiny sizes (CPU + interpreter works)
to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import fastnvp.fused_layer as fl
from fastnvp.conditioner import standard_net
from fastnvp.model import FastRealNVP
from fastnvp.reference import RealNVP

TOL = {"ieee": 1e-4, "tf32": 2e-3, "bf16": 3e-2}
# Weight gradients sum over rows with cancellation, and rounded matmul operands flip a few
# LeakyReLU branches: tf32 gets a looser gradient bound than its output bound (bf16 gradients
# are compared with the PyTorch path that rounds the same operands).
TOL_GRAD = {"ieee": 1e-4, "tf32": 2e-2, "bf16": 3e-2}
PRECISIONS = ("ieee", "tf32", "bf16")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def split(self, fraction: float) -> Budget:
        """A sub-budget ending when ``fraction`` of what is left has passed."""
        sub = Budget(0)
        sub.end = time.monotonic() + fraction * self.left()
        return sub


def rel_err(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench(fn, device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    times = []
    fn()
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def flops_per_row(dim: int, hidden: int, layers: int) -> int:
    k1, k2 = dim - dim // 2, dim // 2
    return layers * 2 * (2 * k1 * hidden + 2 * hidden * hidden + 2 * hidden * k2)


def make_model(dim, layers, hidden, device):
    torch.manual_seed(0)
    model = RealNVP.standard(dim, layers, hidden=hidden).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------- correctness
def check_layer(dim, hidden, rows, device, precisions, results):
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
                results.append({"check": tag, **errs, "ok": ok})
                print(f"  {tag:<40} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                      + ("" if ok else "  FAIL"), flush=True)  # fmt: skip


def check_stack(dim, hidden, layers, rows, device, precisions, results):
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
            results.append({"check": tag, **errs, "ok": ok})
            print(f"  {tag:<40} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                  + ("" if ok else "  FAIL"), flush=True)  # fmt: skip


# --------------------------------------------------------------------------------- timing
def timing(args, device, budget, rows_out, save=lambda: None):
    dim, layers, hidden = args.dim, args.layers, args.hidden
    model = make_model(dim, layers, hidden, device)
    slope = fl.flow_slope(model)
    ceilings = {}
    n = max(args.batches)
    a = torch.randn(n, hidden, device=device)
    w = torch.randn(hidden, hidden, device=device)
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):  # fmt: skip
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ab, wb = a.to(dtype), w.to(dtype)
            ms = bench(lambda ab=ab, wb=wb: ab @ wb, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        ceilings[name] = 2 * n * hidden * hidden / (ms * 1e-3) / 1e12
    print("  matmul ceiling TFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))
    rows_out.append({"ceiling_tflops": ceilings, "shape": [n, hidden, hidden]})
    per_row = flops_per_row(dim, hidden, layers)

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

    def make_fn(name, precision, task, x):
        """The callable timed for one (variant, task) on input x."""
        if name == "reference eager":
            return {"log_prob": lambda: model.log_prob(x), "sample": lambda: model.g(x),
                    "train": lambda: nll_ref(model, x).backward()}[task]  # fmt: skip
        if name == "reference compile":
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

    compiled_lp = torch.compile(model.log_prob)
    compiled_g = torch.compile(model.g)
    compiled_nll = torch.compile(nll_ref)
    # torch.compile of a 50-layer flow takes minutes: it goes last, within what budget is left.
    variants = [("reference eager", None)]
    variants += [(f"fused stack {p}", p) for p in PRECISIONS]
    variants += [("fastnvp op", None)]
    variants += [(f"fused layer {p}", p) for p in PRECISIONS]
    variants += [("reference compile", None)]
    inputs = {batch: torch.randn(batch, dim, device=device) for batch in args.batches}
    for name, precision in variants:
        for batch, x in inputs.items():
            for task in ("log_prob", "sample", "train"):
                # torch.compile of 50 layers can take minutes: start it only with time to spare.
                need = 150 if name == "reference compile" else 20
                if budget.left() < need:
                    rows_out.append({"variant": name, "task": task, "B": batch, "skipped": True})
                    continue
                if name.startswith("fused stack") and task == "train":
                    continue  # inference only
                fn = make_fn(name, precision, task, x)
                try:
                    if task == "train":
                        ms = bench(fn, device)
                    else:
                        with torch.no_grad():
                            ms = bench(fn, device)
                except Exception as exc:  # noqa: BLE001 - recorded, the table goes on
                    rows_out.append({"variant": name, "task": task, "B": batch, "error": repr(exc)})
                    print(f"  {name:<22} {task:<8} B={batch:<6} ERROR {exc!r}", flush=True)
                    continue
                flops = per_row * batch * (3 if task == "train" else 1)
                tflops = flops / (ms * 1e-3) / 1e12
                row = {"variant": name, "task": task, "B": batch, "ms": ms,
                       "samples_per_s": batch / (ms * 1e-3), "tflops": tflops}  # fmt: skip
                rows_out.append(row)
                save()
                print(f"  {name:<22} {task:<8} B={batch:<6} {ms:9.3f} ms  {tflops:7.2f} TFLOP/s",
                      flush=True)  # fmt: skip
        model.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--budget-s", type=float, default=330.0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget(args.budget_s)
    if args.smoke:
        args.dim, args.layers, args.hidden, args.batches = 2, 2, 32, [33]
        layer_cases, stack_case, rows = [(2, 32), (3, 32)], (2, 32, 3), 37
    else:
        args.dim, args.layers, args.hidden, args.batches = 2, 50, 256, [4096, 65536]
        layer_cases, stack_case, rows = [(2, 256), (3, 64), (128, 256)], (2, 256, 8), 1000
    report = {
        "meta": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "correctness": [],
        "timing": [],
    }
    try:
        import triton

        report["meta"]["triton"] = triton.__version__
    except ImportError:
        pass
    status = 0
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        """Write the JSON so far (an outer timeout still leaves the finished sections)."""
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    try:
        # The first layer case compiles the kernels the timing uses; the rest come after it.
        print("correctness (max relative error vs float64)", flush=True)
        check_layer(*layer_cases[0], rows, device, PRECISIONS, report["correctness"])
        check_stack(*stack_case, rows, device, PRECISIONS, report["correctness"])
        save()
        print(f"timing: L={args.layers} D={args.dim} H={args.hidden}", flush=True)
        timing(args, device, budget.split(0.75), report["timing"], save)
        print("more correctness", flush=True)
        for dim, hidden in layer_cases[1:]:
            if budget.left() < 45:
                report["correctness"].append({"check": f"layer D={dim} H={hidden}", "skipped": 1})
                continue
            check_layer(dim, hidden, rows, device, PRECISIONS, report["correctness"])
            save()
        if not all(r.get("ok", True) for r in report["correctness"]):
            status = 1
    except Exception:  # noqa: BLE001 - the JSON still records what ran
        report["error"] = traceback.format_exc()
        print(report["error"], file=sys.stderr)
        status = 1
    save()
    print(f"wrote {args.out / 'gpu_check.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
