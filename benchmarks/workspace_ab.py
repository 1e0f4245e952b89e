"""What the kept workspace saves: calls without a gradient timed with it and without, paired.

docs/design.md §3.2, ``fastnvp.engine.cpu.workspace``. For each shape (D, H, B, L) one
``FastRealNVP.standard(D, L, H)`` runs each workload in rounds, alternating between the kept
workspace (the walk's buffers reused from call to call) and buffers allocated for every call
and freed after it (``WORKSPACE_MAX_BYTES = 0``, as before the workspace existed). The first of
the two alternates every round. The speed-up is ``t_fresh / t_kept`` within a round, reported
as the median and quartiles over rounds, next to the minor page faults per call of each
setting (``getrusage``, the whole process). Workloads: ``log_prob(x)`` and ``sample(B)``
without a gradient, in the steady state (pack built, past its second call).

    python benchmarks/workspace_ab.py [--rounds 15] [--threads 2] [--seconds 0.25] [--out DIR]

Writes ``workspace_ab.json`` and ``workspace_ab.md`` under ``--out`` (default
``benchmarks/results/<machine>/``).
"""

from __future__ import annotations

import resource
import statistics
import sys

import torch

#: (D, H, B, L): the digits' D = 64 and the conditional preset's D = 8, both widths, from a
#: small batch to one whose (2, N, H) activations pass glibc's largest mmap threshold (32 MB).
SHAPES = tuple(
    (dim, hidden, batch, 8)
    for dim in (8, 64)
    for hidden in (64, 256)
    for batch in (256, 4096, 16384)
)
WORKLOADS = ("log_prob", "sample")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _workload(flow, name: str, x: torch.Tensor):
    if name == "log_prob":

        def run():
            with torch.no_grad():
                flow.log_prob(x)

        return run

    def draw():
        with torch.no_grad():
            flow.sample(x.shape[0])

    return draw


def _measure(flow, run, rounds: int, seconds: float) -> dict:
    from fastnvp.bench.harness import time_call
    from fastnvp.bench.paired import paired_rounds
    from fastnvp.engine.cpu import workspace

    cap = workspace.WORKSPACE_MAX_BYTES
    faults = {True: [], False: []}

    def timed(kept: bool, calls: int) -> float:
        workspace.WORKSPACE_MAX_BYTES = cap if kept else 0
        run()  # the first call under this setting fills (or drops) the workspace
        before = _faults()
        ms = time_call(run, "cpu", calls) * 1e3
        faults[kept].append((_faults() - before) / calls)
        return ms

    try:
        for _ in range(2):  # the pack and its inference operands
            run()
        result = paired_rounds(timed, rounds, seconds)
    finally:
        workspace.WORKSPACE_MAX_BYTES = cap
    return {
        "fresh_ms": result.pop("off_ms"),
        "kept_ms": result.pop("on_ms"),
        "fresh_faults": statistics.median(faults[False]),
        "kept_faults": statistics.median(faults[True]),
        **result,
    }


def main(argv=None) -> None:
    from fastnvp.bench.paired import Record, parse_arguments
    from fastnvp.flows.fast_realnvp import FastRealNVP

    argv = sys.argv[1:] if argv is None else list(argv)
    args, command = parse_arguments("benchmarks/workspace_ab.py", __doc__.split("\n\n")[0], argv)
    torch.set_num_threads(args.threads)
    record = Record(command, args.rounds, args.threads, args.out)
    rows = []
    for dim, hidden, batch, layers in SHAPES:
        torch.manual_seed(0)
        flow = FastRealNVP.standard(dim, layers, hidden).eval()
        x = torch.randn(batch, dim)
        shape = {"dim": dim, "hidden": hidden, "batch": batch, "layers": layers}
        for workload in WORKLOADS:
            result = _measure(flow, _workload(flow, workload, x), args.rounds, args.seconds)
            rows.append({**shape, "workload": workload, **result})
            print(
                f"D={dim} H={hidden} B={batch} L={layers} {workload}: "
                f"{result['fresh_ms']:.3f} -> {result['kept_ms']:.3f} ms, "
                f"{result['speedup']:.3f}x [{result['q1']:.3f}, {result['q3']:.3f}]; faults "
                f"{result['fresh_faults']:.0f} -> {result['kept_faults']:.0f} per call",
                flush=True,
            )
    lines = [
        record.header(args.threads, torch.__version__) + " Speed-up = time with buffers "
        "allocated per call / time with the kept workspace, paired per round: median "
        "[quartiles]. Faults: minor page faults per call (median over rounds).",
        "",
        "| D | H | B | L | workload | fresh (ms) | kept (ms) | speed-up | faults fresh → kept |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dim']} | {row['hidden']} | {row['batch']} | {row['layers']} | "
            f"{row['workload']} | {row['fresh_ms']:.3f} | {row['kept_ms']:.3f} | "
            f"{row['speedup']:.3f}× [{row['q1']:.3f}, {row['q3']:.3f}] | "
            f"{row['fresh_faults']:.0f} → {row['kept_faults']:.0f} |"
        )
    speedups = [row["speedup"] for row in rows]
    lines += [
        "",
        f"Speed-up over the {len(rows)} cells: {min(speedups):.3f}× to {max(speedups):.3f}×, "
        f"median {statistics.median(speedups):.3f}×.",
    ]
    record.write("workspace_ab", rows, lines)


if __name__ == "__main__":
    main()
