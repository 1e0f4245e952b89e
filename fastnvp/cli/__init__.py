"""Command-line interface: ``fastnvp <command> ...`` (also ``python -m fastnvp``).

The parser and the command registry are in ``fastnvp.cli.main``; one module per command in
``fastnvp.cli.commands``.
"""

from fastnvp.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
