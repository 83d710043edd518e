"""`armfast` command line. Each subcommand lives in its own module with `add_parser` and `run`."""
from __future__ import annotations

import argparse
import importlib
import sys

from .._version import __version__

# subcommand modules, in the order `armfast --help` lists them
COMMANDS = ("backends", "bench", "segment", "train", "eval", "check-dataset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="armfast",
        description="Fast Attention Refinement Module (ARM) for CLIP open-vocabulary segmentation.")
    parser.add_argument("--version", action="version", version=f"armfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"armfast.cli.{name.replace('-', '_')}")
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
