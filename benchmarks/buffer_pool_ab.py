"""What the buffer pool saves: the GEMM stack's calls timed with it and without, paired.

docs/design.md §3.2, ``fastnvp.engine.cpu.buffer_pool``. For each shape (D, H, B, L) one
``FastRealNVP.standard(D, L, H)`` runs each workload in rounds, alternating between the buffer
pool (the walks' buffers reused from call to call) and buffers allocated for every call and
freed after it (``POOL_MAX_BYTES = 0``, as before the pool existed). The first of the two
alternates every round. The speed-up is ``t_fresh / t_pooled`` within a round, reported as the
median and quartiles over rounds, next to the minor page faults per call of each setting
(``getrusage``, the whole process). Workloads: ``train`` (the step's forward and backward:
``log_prob``, ``backward``, no optimizer), ``log_prob(x)`` and ``sample(B)`` without a
gradient, in the steady state.

    python benchmarks/buffer_pool_ab.py [--rounds 15] [--threads 2] [--seconds 0.25] [--out DIR]

Writes ``buffer_pool_ab.json`` and ``buffer_pool_ab.md`` under ``--out`` (default
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
WORKLOADS = ("train", "log_prob", "sample")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _workload(flow, name: str, x: torch.Tensor):
    if name == "train":

        def step():
            flow.zero_grad(set_to_none=True)
            (-flow.log_prob(x).mean()).backward()

        return step
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
    from fastnvp.engine.cpu import buffer_pool

    cap = buffer_pool.POOL_MAX_BYTES
    faults = {True: [], False: []}

    def timed(pooled: bool, calls: int) -> float:
        buffer_pool.POOL_MAX_BYTES = cap if pooled else 0
        buffer_pool.release()
        run()  # the first call under this setting fills the pool
        before = _faults()
        ms = time_call(run, "cpu", calls) * 1e3
        faults[pooled].append((_faults() - before) / calls)
        return ms

    try:
        for _ in range(2):  # the pack and its inference operands
            run()
        result = paired_rounds(timed, rounds, seconds)
    finally:
        buffer_pool.POOL_MAX_BYTES = cap
    return {
        "fresh_ms": result.pop("off_ms"),
        "pooled_ms": result.pop("on_ms"),
        "fresh_faults": statistics.median(faults[False]),
        "pooled_faults": statistics.median(faults[True]),
        **result,
    }


def main(argv=None) -> None:
    from fastnvp.bench.paired import speedup_summary, start
    from fastnvp.flows.fast_realnvp import FastRealNVP

    argv = sys.argv[1:] if argv is None else list(argv)
    args, record = start("benchmarks/buffer_pool_ab.py", __doc__.split("\n\n")[0], argv)
    rows = []
    for dim, hidden, batch, layers in SHAPES:
        torch.manual_seed(0)
        flow = FastRealNVP.standard(dim, layers, hidden)
        x = torch.randn(batch, dim)
        shape = {"dim": dim, "hidden": hidden, "batch": batch, "layers": layers}
        for workload in WORKLOADS:
            result = _measure(flow, _workload(flow, workload, x), args.rounds, args.seconds)
            rows.append({**shape, "workload": workload, **result})
            print(
                f"D={dim} H={hidden} B={batch} L={layers} {workload}: "
                f"{result['fresh_ms']:.3f} -> {result['pooled_ms']:.3f} ms, "
                f"{result['speedup']:.3f}x [{result['q1']:.3f}, {result['q3']:.3f}]; faults "
                f"{result['fresh_faults']:.0f} -> {result['pooled_faults']:.0f} per call",
                flush=True,
            )
    lines = [
        record.header(args.threads, torch.__version__) + " Speed-up = time with buffers "
        "allocated per call / time with the buffer pool, paired per round: median "
        "[quartiles]. Faults: minor page faults per call (median over rounds).",
        "",
        "| D | H | B | L | workload | fresh ms | pooled ms | speed-up | faults fresh → pooled |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dim']} | {row['hidden']} | {row['batch']} | {row['layers']} | "
            f"{row['workload']} | {row['fresh_ms']:.3f} | {row['pooled_ms']:.3f} | "
            f"{row['speedup']:.3f}× [{row['q1']:.3f}, {row['q3']:.3f}] | "
            f"{row['fresh_faults']:.0f} → {row['pooled_faults']:.0f} |"
        )
    lines += speedup_summary(rows)
    record.write("buffer_pool_ab", rows, lines)


if __name__ == "__main__":
    main()
