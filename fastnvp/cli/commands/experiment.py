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
    check_out_dir,
    config_from_args,
    flag,
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
#: Options every study takes (where its report goes, threads, progress bars).
COMMON_OPTIONS = frozenset({"help", "study", "report_dir", "threads", "no_progress"})
#: The options 'digits' and 'norm-depth' take onto their configuration
#: (:func:`study_config`); any other option of the depth study is refused for them.
STUDY_OPTIONS = ("hidden", "steps", "batch", "lr", "seed", "quick")


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
        "runs/<study>-quick with --quick, runs/<study>-custom when options change the "
        "committed configuration)",
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
    # Which options were given, not only their values: every study-specific option defaults
    # to None here (its depth-study default is kept aside and restored by run), so a study
    # that does not use an option can refuse it instead of ignoring it.
    specific = [a for a in parser._actions if a.dest not in COMMON_OPTIONS and a.dest != "quick"]
    parser.set_defaults(
        _depth_defaults={a.dest: a.default for a in specific},
        **{a.dest: None for a in specific},
    )
    parser.epilog = (
        "'digits' and 'norm-depth' run their committed configuration "
        "(fastnvp.analysis.digits_study.DigitsStudyConfig, norm_depth.NormDepthConfig); "
        "--hidden, --steps, --batch, --lr and --seed change it (norm-depth: its 50-layer "
        "runs), --quick shrinks it, and the depth study's other options are refused there."
    )


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


def _default_report_dir(study: str, given: dict) -> str:
    """The committed run's folder for the committed configuration; a scratch folder for
    ``--quick`` or a changed configuration, which must never replace the committed results."""
    if "quick" in given:
        return f"runs/{study}-quick"
    return f"runs/{study}-custom" if given else REPORT_DIRS[study]


def _run_study(args: argparse.Namespace) -> int:
    """``digits`` / ``norm-depth``: run, write the report, refresh the pages' generated sections
    for the committed run only (the committed configuration in its default folder), print the
    table."""
    import importlib

    module_name, config_name, run_name = STUDY_MODULES[args.study]
    study = importlib.import_module(module_name)
    config = study_config(args.study, getattr(study, config_name), args)
    given = given_options(args)
    report_dir = args.report_dir or _default_report_dir(args.study, given)
    check_out_dir(report_dir, "--report-dir")
    summary = getattr(study, run_name)(report_dir, config, progress=not args.no_progress)
    if args.report_dir is None and not given:
        study.write_docs(summary)
    print()
    print(study.markdown(summary), end="")
    print(f"table, figures and JSON: {report_dir}")
    return 0


def given_options(args: argparse.Namespace) -> dict:
    """The study-specific options given on the command line (``add_arguments``: those not
    given are None, and ``--quick`` False), by destination."""
    given = {dest: getattr(args, dest) for dest in args._depth_defaults}
    given = {dest: value for dest, value in given.items() if value is not None}
    if args.quick:
        given["quick"] = True
    return given


def study_config(study: str, config_class, args: argparse.Namespace):
    """The configuration of ``digits`` / ``norm-depth``: the committed one (or its ``quick``
    form) with ``--hidden``, ``--steps``, ``--batch``, ``--lr`` and ``--seed`` applied; any
    other study-specific option raises ``ValueError`` naming it (the study would ignore it).

    ``digits``: ``--hidden`` is the width of the norm x permutation variants, the training
    options set every candidate's :class:`~fastnvp.analysis.density_training.TrainSettings`.
    ``norm-depth``: ``--hidden`` and the training options set the 50-layer runs on moons and
    digits (the 200-layer run keeps its own ``deep_steps`` and ``deep_lr``).
    """
    import dataclasses

    from fastnvp.analysis.density_training import TrainSettings

    given = given_options(args)
    refused = [flag(dest) for dest in given if dest not in STUDY_OPTIONS]
    if refused:
        raise ValueError(
            f"'experiment {study}' does not take {', '.join(refused)} (options of the depth "
            f"study); it takes {', '.join(flag(d) for d in STUDY_OPTIONS)}"
        )
    config = config_class.quick() if args.quick else config_class()
    training = {k: given[k] for k in ("steps", "batch", "lr", "seed") if k in given}
    changes = {"hidden": given["hidden"]} if "hidden" in given else {}
    if training:
        for field in ("settings", "moons", "digits"):  # the TrainSettings of each study
            if isinstance(getattr(config, field, None), TrainSettings):
                changes[field] = dataclasses.replace(getattr(config, field), **training)
    return dataclasses.replace(config, **changes)


def run(args: argparse.Namespace) -> int:
    set_threads(args)
    if args.study in STUDY_MODULES:
        return _run_study(args)
    if args.quick:
        raise ValueError("--quick applies to 'digits' and 'norm-depth', not to 'depth'")
    for dest, default in args._depth_defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    from fastnvp.analysis.experiment import run_depth_study

    base = config_from_args(args, layers=1)
    check_out_dir(args.out)
    if args.report_dir is not None:
        check_out_dir(args.report_dir, "--report-dir")
    summary = run_depth_study(
        args.out, base, args.depths, report_dir=args.report_dir, progress=not args.no_progress
    )
    report(summary)
    return 0
