"""`armfast` command line. Each subcommand lives in its own module with `add_parser` and `run`.

A mistake ends in one line, ``armfast COMMAND: error: ...``, and a non-zero exit (2 for a
problem with the input or the machine, 1 for an unexpected failure); warnings are one line
each too. ``--debug`` (or ARMFAST_DEBUG=1) shows the traceback and Python's own warnings.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings

from .._version import __version__
from ._errors import USER_ERRORS, error_message

# subcommand modules, in the order `armfast --help` lists them
COMMANDS = ("backends", "bench", "segment", "train", "eval", "check-dataset")
DEBUG_ENV = "ARMFAST_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="armfast",
        description="Fast Attention Refinement Module (ARM) for CLIP open-vocabulary segmentation.")
    parser.add_argument("--version", action="version", version=f"armfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"armfast.cli.{name.replace('-', '_')}")
        p = module.add_parser(sub)
        p.add_argument("--debug", action="store_true",
                       help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")
        p.set_defaults(_run=module.run)
    return parser


class _OneLineLog(logging.Handler):
    """Log records of the libraries (WARNING and up) as ``armfast CMD: warning: ...``."""

    def __init__(self, prog: str):
        super().__init__(logging.WARNING)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning" if record.levelno < logging.ERROR else "note"  # one error line: ours
        print(f"{self.prog}: {kind}: {' '.join(record.getMessage().split())}", file=sys.stderr,
              flush=True)


@contextlib.contextmanager
def _one_line_warnings(prog: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)

    root = logging.getLogger()
    handler = None if root.handlers else _OneLineLog(prog)  # a configured logging stays as is
    if handler is not None:
        root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        if handler is not None:
            root.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    prog = f"armfast {args.command}"
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    if debug:
        return int(args._run(args) or 0)
    with _one_line_warnings(prog):
        try:
            return int(args._run(args) or 0)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 -- the CLI's one place that reports errors
            print(f"{prog}: error: {error_message(exc)}", file=sys.stderr, flush=True)
            return 2 if isinstance(exc, USER_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
