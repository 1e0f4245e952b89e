"""``fastnvp experiment``: the studies, each reproducible with one command.

- ``depth``: the seed report's depth study on two moons (docs/experiment.md);
- ``digits``: fastnvp variants, a Gaussian and the peers' Real NVPs on the 8 x 8 digits
  (``fastnvp.analysis.digits_study``, docs/digits.md);
- ``norm-depth``: 50-layer stacks with and without ActNorm on moons and digits, and a
  200-layer one (``fastnvp.analysis.norm_depth``).
"""

from __future__ import annotations

import argparse

from fastnvp.cli.commands._training_options import (
    add_data_options,
    add_optim_options,
    config_from_args,
    int_list,
    set_threads,
)

HELP = (
    "run a study: 'depth' (two moons, L = 1..50), 'digits' (64-D real data: fastnvp variants, "
    "a Gaussian, the peers), 'norm-depth' (ActNorm in 50- and 200-layer stacks)"
)
STUDIES = ("depth", "digits", "norm-depth")
#: Default report directory of each study (the depth study writes next to its runs).
REPORT_DIRS = {"digits": "docs/digits", "norm-depth": "docs/digits"}
#: study -> (module, config class, run function); each module also has markdown and write_docs.
STUDY_MODULES = {
    "digits": ("fastnvp.analysis.digits_study", "DigitsStudyConfig", "run_digits_study"),
    "norm-depth": ("fastnvp.analysis.norm_depth", "NormDepthConfig", "run_norm_depth_study"),
}

# Sized for two CPU cores (see docs/experiment.md); the seed's full size is --hidden 256.
DEFAULTS = {"hidden": 64, "steps": 2000, "batch": 512, "lr": 2e-3, "threads": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastnvp experiment``."""
    parser.add_argument("study", choices=STUDIES, help="which study to run")
    parser.add_argument(
        "--out", default="runs/depth", help="run directory of 'depth' (default runs/depth)"
    )
    parser.add_argument(
        "--report-dir",
        default=None,
        help="where figures and tables go (default: --out for 'depth'; docs/digits otherwise, "
        "whose page docs/digits.md and the README get their generated sections refreshed; "
        "runs/<study>-quick with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="'digits' / 'norm-depth': a tiny version that runs in seconds (a smoke test)",
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


def _default_report_dir(study: str, quick: bool) -> str:
    """The committed run's folder, or a scratch one for ``--quick`` (never over the docs)."""
    return f"runs/{study}-quick" if quick else REPORT_DIRS[study]


def _run_study(args: argparse.Namespace) -> int:
    """``digits`` / ``norm-depth``: run, write the report, refresh the pages' generated sections
    for the committed run (default folder, not ``--quick``), print the table."""
    import importlib

    module_name, config_name, run_name = STUDY_MODULES[args.study]
    study = importlib.import_module(module_name)
    config_class = getattr(study, config_name)
    config = config_class.quick() if args.quick else config_class()
    report_dir = args.report_dir or _default_report_dir(args.study, args.quick)
    summary = getattr(study, run_name)(report_dir, config, progress=not args.no_progress)
    if args.report_dir is None and not args.quick:
        study.write_docs(summary)
    print()
    print(study.markdown(summary), end="")
    print(f"table, figures and JSON: {report_dir}")
    return 0


def run(args: argparse.Namespace) -> int:
    set_threads(args)
    if args.study in STUDY_MODULES:
        return _run_study(args)
    from fastnvp.analysis.experiment import run_depth_study

    base = config_from_args(args, layers=1)
    summary = run_depth_study(
        args.out, base, args.depths, report_dir=args.report_dir, progress=not args.no_progress
    )
    report(summary)
    return 0
