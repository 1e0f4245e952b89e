"""Paired A/B timing of one engine setting against another, for the ``benchmarks/*_ab.py`` scripts.

Each round times both settings back to back, the first of the two alternating every round,
and the speed-up is ``t_off / t_on`` within a round, reported as the median and quartiles over
rounds. The scripts share their command line (``--rounds``, ``--threads``, ``--seconds``,
``--out``) and their JSON record (the command, the machine, versions, commit and load).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from fastnvp.bench.harness import environment, load_average, recorded_command


def parse_arguments(script: str, description: str, argv: list[str]):
    """``(args, command)`` of an A/B script's command line ``argv``; ``script`` is its path
    (``benchmarks/name.py``), ``command`` the line its results record."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=0.25, help="per setting and round")
    args = parser.parse_args(argv)
    if args.rounds < 4:
        raise SystemExit("--rounds must be at least 4 (quartiles over rounds)")
    if args.threads < 1 or args.seconds <= 0:
        raise SystemExit("--threads must be at least 1 and --seconds positive")
    return args, recorded_command(f"python {script}", argv)


def start(script: str, description: str, argv: list[str]):
    """An A/B script's start: ``(args, record)`` from its command line (:func:`parse_arguments`),
    with torch's intra-op threads set to ``--threads`` and its :class:`Record` opened."""
    import torch

    args, command = parse_arguments(script, description, argv)
    torch.set_num_threads(args.threads)
    return args, Record(command, args.rounds, args.threads, args.out)


def speedup_summary(rows: list[dict]) -> list[str]:
    """The markdown lines that close an A/B table: the range and median of ``speedup``."""
    speedups = [row["speedup"] for row in rows]
    return [
        "",
        f"Speed-up over the {len(rows)} cells: {min(speedups):.3f}× to {max(speedups):.3f}×, "
        f"median {statistics.median(speedups):.3f}×.",
    ]


def paired_rounds(timed: Callable[[bool, int], float], rounds: int, seconds: float) -> dict:
    """Time ``timed(on, calls)`` (ms per call with the setting on or off) in ``rounds`` paired
    rounds of ``calls`` calls each, sized to about ``seconds`` per setting and round.

    Returns ``on_ms``, ``off_ms`` (medians), ``speedup`` (median of off / on) with its
    quartiles ``q1``, ``q3``, and ``calls_per_round``.
    """
    calls = max(3, int(seconds / (timed(True, 2) / 1e3)))
    on_ms, off_ms, ratios = [], [], []
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        times = {setting: timed(setting, calls) for setting in order}
        on_ms.append(times[True])
        off_ms.append(times[False])
        ratios.append(times[False] / times[True])
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "on_ms": statistics.median(on_ms),
        "off_ms": statistics.median(off_ms),
        "speedup": statistics.median(ratios),
        "q1": q1,
        "q3": q3,
        "calls_per_round": calls,
    }


class Record:
    """An A/B run's record: the environment and load at its start, and where it writes."""

    def __init__(self, command: str, rounds: int, threads: int, out: Path | None):
        self.command, self.rounds = command, rounds
        self.env = environment("cpu", threads)
        self.out = out or Path("benchmarks/results") / self.env["machine"]["name"]
        self.load_start = load_average()

    def header(self, threads: int, torch_version: str) -> str:
        """The first words of the markdown table: the command, commit, machine and rounds."""
        return (
            f"Measured by `{self.command}` at commit {str(self.env['commit'])[:10]} "
            f"on {self.env['machine']['cpu_model']}, {threads} threads, torch "
            f"{torch_version}, {self.rounds} rounds."
        )

    def write(self, name: str, rows: list[dict], markdown: list[str]) -> None:
        """Write ``name.json`` (the record and ``rows``) and ``name.md`` under the output."""
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "command": self.command,
            "rounds": self.rounds,
            "load_average_start": self.load_start,
            **self.env,
            "load_average_end": load_average(),
            "rows": rows,
        }
        (self.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        (self.out / f"{name}.md").write_text("\n".join(markdown) + "\n")
        print(f"wrote {self.out / (name + '.json')} and {self.out / (name + '.md')}")
