"""``fastnvp sample``: draw samples (in data units) from a trained run."""

from __future__ import annotations

import argparse

from fastnvp.cli.commands._training_options import check_out_dir, nonnegative_int, positive_int

#: The --out file formats, by extension (case-insensitive).
FORMATS = (".npy", ".csv")

HELP = "draw N samples from a trained run and save them as .npy or .csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastnvp sample``."""
    parser.add_argument("run", metavar="RUN", help="run directory (or its checkpoint.pt)")
    parser.add_argument("-n", type=positive_int, default=1000, help="number of samples")
    parser.add_argument("--out", required=True, help="output file: .npy or .csv")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed")
    parser.add_argument(
        "--context",
        default=None,
        metavar="VALUES",
        help="conditional runs only (required there): sample x given this context; a label "
        "(e.g. 0) for a --context label run, the C context-column values in data units, "
        "comma-separated, for a --context-columns run (write --context=-1.5,2 for a "
        "leading minus)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from fastnvp.training.train import context_from_values, load_run

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(
            f"--out {args.out!r} is a directory; expected a file ending in {' or '.join(FORMATS)}"
        )
    if out.suffix.lower() not in FORMATS:
        raise ValueError(
            f"--out must end in {' or '.join(FORMATS)} (the formats sample writes), "
            f"got {args.out!r}"
        )
    check_out_dir(str(out.parent), f"--out {args.out!r}: its folder")
    model, _, payload = load_run(args.run)
    context = None
    if model.context_features is None:
        if args.context is not None:
            raise ValueError(f"--context: the run {args.run!r} is unconditional; leave it out")
    else:
        info = payload["context"]
        if args.context is None:
            what = "a label" if info["kind"] == "label" else f"{info['features']} numbers"
            raise ValueError(f"--context is required: the run {args.run!r} is conditional ({what})")
        context = context_from_values(info, args.context)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        x = model.sample(args.n, generator=generator, context=context).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        np.save(out, x)
    else:
        np.savetxt(out, x, delimiter=",", fmt="%.7g")
    given = "" if context is None else f" given context {args.context}"
    print(f"wrote {x.shape[0]} samples of dimension {x.shape[1]}{given} to {out}")
    return 0
