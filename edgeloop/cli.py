"""The ``edgeloop`` command: one entry point, sub-commands registered by each package.

Each package's ``cli`` module must import nothing heavy at module level (no torch,
no onnx), so that ``edgeloop agent ...`` works on a device with only ``[agent]``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from core.errors import EdgeloopError
from core.progress import set_quiet

from . import __version__

# Package CLI modules, each with ``register(subparsers)``.  None imports anything heavy at
# module level, so every one loads on a device with only ``[agent]`` installed.
_COMMAND_MODULES = (
    "train.cli",
    "export.cli",
    "edge_agent.cli",
    "fleet.cli",
    "demo.cli",
    "benchmarks.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeloop",
        description="Train, export, deploy and watch models at the edge, and close the loop.",
    )
    parser.add_argument("--version", action="version", version=f"edgeloop {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress or status lines on stderr (results and errors still print)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; an :class:`EdgeloopError` becomes one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    set_quiet(args.quiet)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 1
    try:
        return int(func(args) or 0)
    except EdgeloopError as exc:
        red, reset = ("\033[31m", "\033[0m") if sys.stderr.isatty() and not os.environ.get("NO_COLOR") else ("", "")
        print(f"{red}edgeloop: error: {exc}{reset}", file=sys.stderr)
        if args.verbose >= 2:
            raise
        return 2
    except KeyboardInterrupt:
        print("edgeloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
