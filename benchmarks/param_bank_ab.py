"""What the parameter bank saves: the same flow timed with it and without it, paired.

docs/design.md §3.2, ``fastnvp.engine.param_bank``. For each shape (D, C, H, B, L) one
``FastRealNVP.standard(D, L, H, context=C)`` runs each workload in rounds, alternating between
its bank (the GEMM stack reads the (L, 2, ...) weight tensors as they are) and no bank (the
pre-bank path: every call stacks the parameters, five stacks per call and one H x H pair per
layer and direction). The first of the two alternates every round. The speed-up is
``t_without / t_with`` within a round, reported as the median and quartiles over rounds.
Workloads: ``train`` (zero_grad, -log_prob(x, c).mean(), backward, torch's default Adam step),
``forward_backward`` (the same without Adam) and ``log_prob`` (no gradient).

    python benchmarks/param_bank_ab.py [--rounds 15] [--threads 2] [--seconds 0.25] [--out DIR]

Writes ``param_bank_ab.json`` and ``param_bank_ab.md`` under ``--out`` (default
``benchmarks/results/<machine>/``).
"""

from __future__ import annotations

import sys

import torch

#: (D, C, H, B, L): the conditional preset's widths and batches at D = 8 and 16, both kinds.
SHAPES = (
    (16, 0, 256, 256, 8),
    (16, 1, 256, 256, 8),
    (8, 4, 64, 256, 8),
    (8, 0, 64, 4096, 8),
    (8, 0, 256, 4096, 8),
)
WORKLOADS = ("train", "forward_backward", "log_prob")


def _workload(flow, name: str, x: torch.Tensor, given: dict):
    if name == "log_prob":

        def run():
            with torch.no_grad():
                flow.log_prob(x, **given)

        return run
    opt = torch.optim.Adam(flow.parameters(), lr=1e-7) if name == "train" else None

    def step():
        flow.zero_grad(set_to_none=True)
        (-flow.log_prob(x, **given).mean()).backward()
        if opt is not None:
            opt.step()

    return step


def _measure(flow, run, rounds: int, seconds: float) -> dict:
    from fastnvp.bench.harness import time_call
    from fastnvp.bench.paired import paired_rounds

    bank = flow._param_bank

    def timed(with_bank: bool, calls: int) -> float:
        flow._param_bank = bank if with_bank else None
        flow.clear_caches()  # the no-gradient pack is rebuilt the way the setting reads it
        run()
        return time_call(run, "cpu", calls) * 1e3

    try:
        result = paired_rounds(timed, rounds, seconds)
    finally:
        flow._param_bank = bank
    return {"with_bank_ms": result.pop("on_ms"), "without_bank_ms": result.pop("off_ms"), **result}


def main(argv=None) -> None:
    from fastnvp.bench.paired import start
    from fastnvp.flows.fast_realnvp import FastRealNVP

    argv = sys.argv[1:] if argv is None else list(argv)
    args, record = start("benchmarks/param_bank_ab.py", __doc__.split("\n\n")[0], argv)
    rows = []
    for dim, context, hidden, batch, layers in SHAPES:
        torch.manual_seed(0)
        flow = FastRealNVP.standard(dim, layers, hidden, context=context or None)
        if flow._param_bank is None:
            raise RuntimeError("a standard CPU flow has no parameter bank")
        x = torch.randn(batch, dim)
        given = {"context": torch.randn(batch, context)} if context else {}
        for workload in WORKLOADS:
            run = _workload(flow, workload, x, given)
            result = _measure(flow, run, args.rounds, args.seconds)
            shape = {"dim": dim, "context": context, "hidden": hidden, "batch": batch}
            rows.append({**shape, "layers": layers, "workload": workload, **result})
            print(
                f"D={dim} C={context} H={hidden} B={batch} L={layers} {workload}: "
                f"{result['without_bank_ms']:.2f} -> {result['with_bank_ms']:.2f} ms, "
                f"{result['speedup']:.3f}x [{result['q1']:.3f}, {result['q3']:.3f}]",
                flush=True,
            )
    lines = [
        record.header(args.threads, torch.__version__) + " Speed-up = time without the "
        "parameter bank / time with it, paired per round: median [quartiles].",
        "",
        "| D | C | H | B | L | workload | without bank (ms) | with bank (ms) | speed-up |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dim']} | {row['context']} | {row['hidden']} | {row['batch']} | "
            f"{row['layers']} | {row['workload']} | {row['without_bank_ms']:.2f} | "
            f"{row['with_bank_ms']:.2f} | {row['speedup']:.3f}× "
            f"[{row['q1']:.3f}, {row['q3']:.3f}] |"
        )
    record.write("param_bank_ab", rows, lines)


if __name__ == "__main__":
    main()
