"""``fastnvp demo``: a CPU-sized depth study on two moons (the ``make demo`` target)."""

from __future__ import annotations

import argparse

from fastnvp.cli.commands._training_options import positive_int

HELP = "CPU-sized depth study on two moons (minutes on 2 cores): figures + NLL/Gaussianity table"

# Small enough for about five minutes on two CPU cores; `fastnvp experiment depth` is the
# full-size study.
DEMO = {"hidden": 32, "steps": 600, "batch": 256, "lr": 3e-3, "n_train": 10_000, "n_test": 2_000}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastnvp demo``."""
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=DEMO["steps"],
        help=f"training steps per depth (default {DEMO['steps']})",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from fastnvp.analysis.experiment import DEFAULT_DEPTHS, run_depth_study
    from fastnvp.cli.commands.experiment import report
    from fastnvp.training.train import TrainConfig

    torch.set_num_threads(args.threads)
    base = TrainConfig(
        dataset="moons",
        layers=1,
        hidden=DEMO["hidden"],
        steps=args.steps,
        batch=DEMO["batch"],
        lr=DEMO["lr"],
        n_train=DEMO["n_train"],
        n_test=DEMO["n_test"],
        eval_every=50,
    )
    print(
        f"fastnvp demo: two moons, depths {', '.join(map(str, DEFAULT_DEPTHS))}, "
        f"H={base.hidden}, {base.steps} steps each -> {args.out}"
    )
    start = time.perf_counter()
    summary = run_depth_study(args.out, base, DEFAULT_DEPTHS, progress=not args.no_progress)
    report(summary)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
