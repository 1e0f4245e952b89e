"""``fastnvp experiment depth``: the seed report's depth study, reproducible with one command."""

from __future__ import annotations

import argparse

from fastnvp.cli.commands._training_options import (
    add_data_options,
    add_optim_options,
    config_from_args,
    int_list,
    set_threads,
)

HELP = "run a study: 'depth' trains L = 1..50 and tabulates test NLL and latent Gaussianity"

# Sized for two CPU cores (see docs/experiment.md); the seed's full size is --hidden 256.
DEFAULTS = {"hidden": 64, "steps": 2000, "batch": 512, "lr": 2e-3, "threads": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastnvp experiment``."""
    parser.add_argument("study", choices=("depth",), help="which study to run")
    parser.add_argument("--out", default="runs/depth", help="run directory (default runs/depth)")
    parser.add_argument(
        "--report-dir", default=None, help="where figures and tables go (default: --out)"
    )
    parser.add_argument(
        "--depths",
        type=int_list,
        default=(1, 2, 4, 8, 16, 50),
        help="comma-separated depths L (default 1,2,4,8,16,50)",
    )
    add_data_options(parser)
    add_optim_options(parser, defaults=DEFAULTS)


def report(summary: dict) -> None:
    """Print the table and where the figures are."""
    from pathlib import Path

    folder = Path(summary["report_dir"])
    print()
    print(summary["table"], end="")
    if summary["entropy"] is not None:
        e = summary["entropy"]
        print(f"data entropy H = {e['value']:.4f} ± {e['standard_error']:.4f} nats")
    print(f"table:   {folder / 'depth_table.md'}  (and depth_table.json)")
    for name in summary["figures"].values():
        print(f"figure:  {folder / name}")


def run(args: argparse.Namespace) -> int:
    set_threads(args)
    from fastnvp.analysis.experiment import run_depth_study

    base = config_from_args(args, layers=1)
    summary = run_depth_study(
        args.out, base, args.depths, report_dir=args.report_dir, progress=not args.no_progress
    )
    report(summary)
    return 0
