"""What the inference operands save: calls without a gradient timed with them and without, paired.

docs/design.md §3.2, ``fastnvp.engine.cpu.gemm_stack.InferenceOperands``. For each shape
(D, C, H, B, L) one ``FastRealNVP.standard(D, L, H, context=C)`` runs each workload in rounds,
alternating between the inference operands (the cached no-gradient pack's copies: b2 inside
the second GEMM against h1's column of ones, W1 and W3 contiguous) and the plain operands
(``CACHED_W2_MAX_BYTES = 0``: the H x H pairs read from the parameter bank and b2 added after
the GEMM, as above the cap). The first of the two alternates every round. The speed-up is
``t_plain / t_inference`` within a round, reported as the median and quartiles over rounds.
Workloads: ``log_prob(x, c)`` and ``sample(1, c)`` without a gradient, in the steady state
(the pack built and past its second call); ``rebuild`` is the one-time cost the copy adds: the
second call after the weights change (the call that builds the operands) minus a steady call.

    python benchmarks/inference_operands_ab.py [--rounds 15] [--threads 2] [--seconds 0.25]
        [--out DIR]

Writes ``inference_operands_ab.json`` and ``inference_operands_ab.md`` under ``--out``
(default ``benchmarks/results/<machine>/``).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

#: (D, C, H, B, L): the conditional preset's D = 8, C = 8 at both widths, from 16 to 4096 rows.
SHAPES = tuple((8, 8, hidden, batch, 8) for hidden in (64, 256) for batch in (16, 256, 1024, 4096))
WORKLOADS = ("log_prob", "sample")


def _workload(flow, name: str, x: torch.Tensor, c: torch.Tensor):
    if name == "log_prob":

        def run():
            with torch.no_grad():
                flow.log_prob(x, context=c)

        return run

    def draw():
        with torch.no_grad():
            flow.sample(1, context=c)

    return draw


def _measure(flow, run, rounds: int, seconds: float) -> dict:
    from fastnvp.bench.harness import time_call
    from fastnvp.bench.paired import paired_rounds
    from fastnvp.engine.cpu import gemm_stack

    cap = gemm_stack.CACHED_W2_MAX_BYTES

    def timed(inference: bool, calls: int) -> float:
        gemm_stack.CACHED_W2_MAX_BYTES = cap if inference else 0
        flow.clear_caches()
        run()
        run()  # the pack's second call: the inference operands are built here
        if flow._gemm_pack[1].inference != inference:
            raise RuntimeError(f"the pack has inference operands: {not inference}")
        return time_call(run, "cpu", calls) * 1e3

    try:
        result = paired_rounds(timed, rounds, seconds)
    finally:
        gemm_stack.CACHED_W2_MAX_BYTES = cap
    return {"plain_ms": result.pop("off_ms"), "inference_ms": result.pop("on_ms"), **result}


def _rebuild_ms(flow, run, rounds: int) -> float:
    """Median over rounds of (the call that builds the operands - a steady call), ms."""
    extra = []
    for _ in range(rounds):
        flow.clear_caches()
        run()
        start = time.perf_counter()
        run()
        building = time.perf_counter() - start
        start = time.perf_counter()
        run()
        extra.append((building - (time.perf_counter() - start)) * 1e3)
    return statistics.median(extra)


def main(argv=None) -> None:
    from fastnvp.bench.paired import speedup_summary, start
    from fastnvp.flows.fast_realnvp import FastRealNVP

    argv = sys.argv[1:] if argv is None else list(argv)
    args, record = start("benchmarks/inference_operands_ab.py", __doc__.split("\n\n")[0], argv)
    rows = []
    for dim, context, hidden, batch, layers in SHAPES:
        torch.manual_seed(0)
        flow = FastRealNVP.standard(dim, layers, hidden, context=context)
        x, c = torch.randn(batch, dim), torch.randn(batch, context)
        shape = {"dim": dim, "context": context, "hidden": hidden, "batch": batch}
        for workload in WORKLOADS:
            run = _workload(flow, workload, x, c)
            result = _measure(flow, run, args.rounds, args.seconds)
            if workload == "log_prob":
                result["rebuild_ms"] = _rebuild_ms(flow, run, args.rounds)
            rows.append({**shape, "layers": layers, "workload": workload, **result})
            print(
                f"D={dim} C={context} H={hidden} B={batch} L={layers} {workload}: "
                f"{result['plain_ms']:.3f} -> {result['inference_ms']:.3f} ms, "
                f"{result['speedup']:.3f}x [{result['q1']:.3f}, {result['q3']:.3f}]",
                flush=True,
            )
    lines = [
        record.header(args.threads, torch.__version__) + " Speed-up = time on the plain "
        "operands / time on the inference operands, paired per round: median [quartiles]. "
        "Rebuild: what the call that builds the operands (a pack's second) takes beyond a "
        "steady call.",
        "",
        "| D | C | H | B | L | workload | plain (ms) | inference (ms) | speed-up | rebuild (ms) |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        rebuild = f"{row['rebuild_ms']:.3f}" if "rebuild_ms" in row else ""
        lines.append(
            f"| {row['dim']} | {row['context']} | {row['hidden']} | {row['batch']} | "
            f"{row['layers']} | {row['workload']} | {row['plain_ms']:.3f} | "
            f"{row['inference_ms']:.3f} | {row['speedup']:.3f}× "
            f"[{row['q1']:.3f}, {row['q3']:.3f}] | {rebuild} |"
        )
    lines += speedup_summary(rows)
    record.write("inference_operands_ab", rows, lines)


if __name__ == "__main__":
    main()
