"""Command-line options shared by ``train``, ``experiment`` and ``demo`` (argparse only)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


#: The toy-data and --data options' defaults. add_data_options leaves every one of them None
#: in the namespace, so config_from_args can tell an option given (even at its default value)
#: from one left out and refuse options that do not apply to the chosen source; it resolves
#: these defaults (TrainConfig's) in one place. The help texts show them.
DATA_DEFAULTS = {"dataset": "moons", "n_train": 20_000, "n_test": 5_000, "test_fraction": 0.2}
#: Options of the toy data sets only (refused with --data), by destination.
TOY_OPTIONS = ("dataset", "noise", "n_train", "n_test")
#: Options of a --data file only (refused without it).
FILE_OPTIONS = ("test_fraction",)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """--dataset/--data/--noise/--n-train/--n-test/--test-fraction (all default None: see
    :data:`DATA_DEFAULTS` and :func:`config_from_args`)."""
    # The names mirror fastnvp.training.data.DATASETS; listed here so --help stays import-free.
    parser.add_argument(
        "--dataset",
        default=None,
        choices=("moons", "circles", "8gaussians", "checkerboard", "pinwheel", "2spirals"),
        help=f"toy data set (default {DATA_DEFAULTS['dataset']}; not with --data)",
    )
    parser.add_argument(
        "--data", default=None, help="your own N×D data: a .npy or .csv file (instead of --dataset)"
    )
    parser.add_argument(
        "--noise",
        type=nonnegative_float,
        default=None,
        help="toy data noise (default: the data set's own, 0.05 for moons; not with --data)",
    )
    parser.add_argument(
        "--n-train",
        type=positive_int,
        default=None,
        help=f"toy training points (default {DATA_DEFAULTS['n_train']}; not with --data)",
    )
    parser.add_argument(
        "--n-test",
        type=positive_int,
        default=None,
        help=f"toy test points (default {DATA_DEFAULTS['n_test']}; not with --data)",
    )
    parser.add_argument(
        "--test-fraction",
        type=positive_float,
        default=None,
        help="with --data only: fraction of its rows held out as test set "
        f"(default {DATA_DEFAULTS['test_fraction']})",
    )


def flag(dest: str) -> str:
    """The command-line flag of an argparse destination: ``n_train`` -> ``--n-train``."""
    return "--" + dest.replace("_", "-")


def _flags(dests) -> str:
    return ", ".join(flag(d) for d in dests)


def check_data_source(args) -> None:
    """Refuse data options that the chosen source would ignore: the toy-data options with
    ``--data FILE``, ``--test-fraction`` with a toy data set. ValueError naming them."""
    if getattr(args, "data", None) is not None:
        toy = [d for d in TOY_OPTIONS if getattr(args, d, None) is not None]
        if toy:
            one = len(toy) == 1
            raise ValueError(
                f"{_flags(toy)} appl{'ies' if one else 'y'} to the toy data sets (--dataset), "
                f"not to --data {args.data!r}; leave {'it' if one else 'them'} out (a --data "
                "file is split by --test-fraction)"
            )
    else:
        given = [d for d in FILE_OPTIONS if getattr(args, d, None) is not None]
        if given:
            raise ValueError(
                f"{_flags(given)} applies to --data FILE only; a toy data set's test set is "
                "--n-test points"
            )


def check_out_dir(path: str, option: str = "--out") -> None:
    """Raise ValueError naming ``option`` when ``path`` cannot be (or become) a writable
    directory: it is a file, a parent of it is a file, or the nearest existing one is not
    writable. Creates nothing."""
    import os
    from pathlib import Path

    target = Path(path)
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == target else f"cannot be created: {str(probe)!r} is a file"
        raise ValueError(f"{option} {path!r} {where}; expected a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == target else f" ({str(probe)!r} is not writable)"
        raise ValueError(f"{option} {path!r} is not a writable directory{where}")


def add_context_options(parser: argparse.ArgumentParser) -> None:
    """--context/--context-columns: train a conditional flow p(x | c)."""
    parser.add_argument(
        "--context",
        choices=("label",),
        default=None,
        help="condition the toy data set on its component label (which moon, ...), one-hot: "
        "context width C = number of labels (2 for moons)",
    )
    parser.add_argument(
        "--context-columns",
        default=None,
        metavar="COLS",
        help="with --data: comma-separated columns taken as the context c, the other columns "
        "being x; 0-based indices or CSV header names (e.g. 2,3 or age,height). Continuous "
        "context columns are standardized like x, 0/1 columns are kept as they are",
    )


def add_optim_options(parser: argparse.ArgumentParser, *, defaults: dict) -> None:
    """--hidden/--norm/--permutation/--steps/--batch/--lr/--schedule/--clip/--seed/--impl/
    --threads/--no-progress."""
    parser.add_argument(
        "--hidden",
        type=positive_int,
        default=defaults["hidden"],
        help=f"hidden width H of the conditioner MLPs (default {defaults['hidden']})",
    )
    parser.add_argument(
        "--norm",
        choices=("actnorm", "batchnorm"),
        default=None,
        help="a normalization layer before every coupling (docs/design.md §1.8; default none)",
    )
    parser.add_argument(
        "--permutation",
        choices=("reverse", "random", "lu"),
        default=None,
        help="a fixed permutation or a learned LU linear layer before every coupling, after the "
        "norm (default none: alternating masks)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=defaults["steps"],
        help=f"training steps (default {defaults['steps']})",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=defaults["batch"],
        help=f"batch size (default {defaults['batch']})",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=defaults["lr"],
        help=f"Adam learning rate (default {defaults['lr']})",
    )
    parser.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="learning-rate schedule (default cosine decay to 0)",
    )
    parser.add_argument(
        "--clip",
        type=nonnegative_float,
        default=10.0,
        help="max gradient norm, 0 = no clipping (default 10)",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed (default 0)")
    parser.add_argument(
        "--impl",
        choices=("fast", "reference"),
        default=None,
        help="flow implementation (default: fastnvp.training.train.DEFAULT_IMPL)",
    )
    parser.add_argument(
        "--eval-every", type=positive_int, default=100, help="steps between test evaluations"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=defaults.get("threads"),
        help="torch CPU threads (default: "
        + ("torch's own" if defaults.get("threads") is None else str(defaults["threads"]))
        + ")",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args, layers: int):
    """A validated TrainConfig from parsed options (heavy import deferred to here).

    The data options left out (None) get :data:`DATA_DEFAULTS`; those that do not apply to the
    chosen source are refused (:func:`check_data_source`). A relative ``--data`` is stored as
    an absolute path, so a resumed run or ``fastnvp figures`` finds it from any directory.
    """
    from pathlib import Path

    from fastnvp.training.train import DEFAULT_IMPL, TrainConfig

    check_data_source(args)
    data = {
        name: default if getattr(args, name, None) is None else getattr(args, name)
        for name, default in DATA_DEFAULTS.items()
    }
    path = None if args.data is None else str(Path(args.data).expanduser().resolve())
    return TrainConfig(
        dataset=data["dataset"],
        data=path,
        noise=args.noise,
        n_train=data["n_train"],
        n_test=data["n_test"],
        test_fraction=data["test_fraction"],
        layers=layers,
        hidden=args.hidden,
        norm=getattr(args, "norm", None),
        permutation=getattr(args, "permutation", None),
        impl=args.impl or DEFAULT_IMPL,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        schedule=args.schedule,
        clip=args.clip,
        seed=args.seed,
        eval_every=args.eval_every,
        context=getattr(args, "context", None),
        context_columns=getattr(args, "context_columns", None),
    ).validate()


def set_threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
