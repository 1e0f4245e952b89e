"""Command-line interface: ``fastnvp <command> ...`` (also ``python -m fastnvp``).

Each command lives in ``fastnvp/cli/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import only ``argparse`` at
module level, so ``--help`` stays fast; the heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Command name -> module. Order is the order shown in ``fastnvp --help``.
COMMANDS: dict[str, str] = {
    "train": "fastnvp.cli.commands.train",
    "sample": "fastnvp.cli.commands.sample",
    "figures": "fastnvp.cli.commands.figures",
    "experiment": "fastnvp.cli.commands.experiment",
    "demo": "fastnvp.cli.commands.demo",
    "profile": "fastnvp.cli.commands.profile",
    "bench": "fastnvp.cli.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered command."""
    from fastnvp import __version__

    parser = argparse.ArgumentParser(
        prog="fastnvp", description="Real NVP normalizing flows with fused Triton kernels."
    )
    parser.add_argument("--version", action="version", version=f"fastnvp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, OSError) as exc:
        # Bad input from the command line is the user's to fix: one clear line, no traceback.
        # The commands name the option at fault where they can; an OSError (a file or folder
        # that cannot be read or written, e.g. a path through a file) is a last resort here.
        # Set FASTNVP_TRACEBACK=1 to see where it was raised.
        if os.environ.get("FASTNVP_TRACEBACK"):
            raise
        print(f"fastnvp {args.command}: error: {exc}", file=sys.stderr)
        return 2
