"""``python -m fastnvp`` runs the command-line interface."""

from fastnvp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
