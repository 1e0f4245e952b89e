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

import argparse
import json
import statistics
import sys
from pathlib import Path

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

    bank = flow._param_bank

    def timed(with_bank: bool, calls: int) -> float:
        flow._param_bank = bank if with_bank else None
        flow.clear_caches()  # the no-gradient pack is rebuilt the way the setting reads it
        run()
        return time_call(run, "cpu", calls) * 1e3

    calls = max(3, int(seconds / (timed(True, 2) / 1e3)))
    with_ms, without_ms, ratios = [], [], []
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        times = {setting: timed(setting, calls) for setting in order}
        with_ms.append(times[True])
        without_ms.append(times[False])
        ratios.append(times[False] / times[True])
    flow._param_bank = bank
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "with_bank_ms": statistics.median(with_ms),
        "without_bank_ms": statistics.median(without_ms),
        "speedup": statistics.median(ratios),
        "q1": q1,
        "q3": q3,
        "calls_per_round": calls,
    }


def main(argv=None) -> None:
    from fastnvp.bench.harness import environment, load_average, recorded_command
    from fastnvp.flows.fast_realnvp import FastRealNVP

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=0.25, help="per setting and round")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = recorded_command("python benchmarks/param_bank_ab.py", argv)
    if args.rounds < 4:
        raise SystemExit("--rounds must be at least 4 (quartiles over rounds)")
    torch.set_num_threads(args.threads)
    env = environment("cpu", args.threads)
    out = args.out or Path("benchmarks/results") / env["machine"]["name"]
    load_start = load_average()
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
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "rounds": args.rounds,
        "load_average_start": load_start,
        **env,
        "load_average_end": load_average(),
        "rows": rows,
    }
    (out / "param_bank_ab.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        f"Measured by `{command}` at commit {str(env['commit'])[:10]} "
        f"on {env['machine']['cpu_model']}, {args.threads} threads, torch "
        f"{torch.__version__}, {args.rounds} rounds. Speed-up = time without the parameter "
        "bank / time with it, paired per round: median [quartiles].",
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
    (out / "param_bank_ab.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'param_bank_ab.json'} and {out / 'param_bank_ab.md'}")


if __name__ == "__main__":
    main()
