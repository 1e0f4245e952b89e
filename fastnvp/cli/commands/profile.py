"""``fastnvp profile``: time, phases, operator counts and peak memory of training steps vs depth."""

from __future__ import annotations

import argparse

from fastnvp.cli.commands._training_options import int_list as _int_list

HELP = "profile training steps vs depth: time, phases, op counts, peak memory, trace, plots"


def _choice_list(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastnvp profile``."""
    parser.add_argument(
        "--layers", type=_int_list, default=(8, 50, 100, 200), help="depths (default 8,50,100,200)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size B (default 4096 on cuda, 1024 on cpu)"
    )
    parser.add_argument("--dim", type=int, default=2, help="data dimension D (default 2)")
    parser.add_argument(
        "--hidden", type=int, default=None, help="hidden width H (default 256 on cuda, 128 on cpu)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available"
    )
    parser.add_argument(
        "--mode",
        type=_choice_list(("standard", "invertible")),
        default=None,
        help="training-memory modes, comma-separated (default standard,invertible; "
        "invertible needs --impl fast)",
    )
    parser.add_argument(
        "--impl",
        type=_choice_list(("fast", "reference")),
        default=("fast",),
        help="implementations, comma-separated: fast,reference (default fast)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per config (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument(
        "--trace-layers", type=int, default=None, help="depth exported as trace (default smallest)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--fused",
        choices=("auto", "layer", "op", "none"),
        default=None,
        help="FastRealNVP's fused level (default: the model's, auto); needs --impl fast",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batch")
    parser.add_argument(
        "--memory-probe",
        action="store_true",
        help="also measure peak memory from outside: one fresh process per (impl, mode, depth); "
        "peak RSS on cpu, max_memory_allocated on cuda (fastnvp.analysis.memory_probe)",
    )
    parser.add_argument(
        "--out", default="runs/profile", help="output folder (default runs/profile)"
    )


def run(args: argparse.Namespace) -> int:
    """Profile every (impl, mode, depth) combination and write the artefacts to ``--out``."""
    from pathlib import Path

    import torch

    from fastnvp.analysis.profiling import ProfileConfig, run_profile

    if "fast" not in args.impl:
        # Options of FastRealNVP only: with the reference alone they would be reported but unused.
        unused = [] if args.fused is None else [f"--fused {args.fused}"]
        if args.mode is not None and "invertible" in args.mode:
            unused.append("--mode invertible")
        if unused:
            raise ValueError(
                f"{' and '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} to --impl fast "
                "(FastRealNVP) only, and --impl reference profiles the reference alone; "
                "add fast to --impl (e.g. --impl fast,reference) or leave "
                f"{'it' if len(unused) == 1 else 'them'} out"
            )
    modes = ("standard", "invertible") if args.mode is None else args.mode
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device == "cuda"
    config = ProfileConfig(
        layers=args.layers,
        batch=args.batch if args.batch is not None else (4096 if on_gpu else 1024),
        dim=args.dim,
        hidden=args.hidden if args.hidden is not None else (256 if on_gpu else 128),
        device=device,
        modes=modes,
        impls=args.impl,
        repeats=args.repeats,
        warmup=args.warmup,
        trace_layers=args.trace_layers,
        seed=args.seed,
        threads=args.threads,
        fused=args.fused,
        memory_probe=args.memory_probe,
    )
    out = Path(args.out)
    doc = run_profile(config, out)
    print(f"wrote {out}/summary.md, results.json, trace.json, plots ({doc['elapsed_s']:.1f} s)")
    return 0
