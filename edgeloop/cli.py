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

# Heavy third-party modules -> the extra that installs them: a command whose extra is missing
# says so in one line instead of a ModuleNotFoundError traceback.
_EXTRA_OF = {
    **dict.fromkeys(("onnxruntime", "paho", "cryptography", "PIL"), "agent"),
    **dict.fromkeys(("torch", "torchvision", "onnx", "onnxscript", "sklearn", "optuna", "matplotlib", "rich",
                     "threadpoolctl", "scipy"), "train"),
    **dict.fromkeys(("sqlalchemy", "fastapi", "uvicorn", "starlette", "amqtt", "psutil", "jinja2"), "fleet"),
    "ai_edge_litert": "tflite",
    "litert_torch": "tflite-export",
    "cv2": "camera",
    "psycopg": "postgres",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that provides the module ``exc`` is about, or None when it is not a known dependency."""
    return _EXTRA_OF.get((exc.name or "").split(".")[0])


def _add_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q`` after any sub-command too (``edgeloop agent run -q``); remember each leaf's name."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in action.choices.values():
            sub.set_defaults(_command_name=sub.prog)
            if not any(o in sub._option_string_actions for o in ("-v", "-q", "--verbose", "--quiet")):
                sub.add_argument("-v", "--verbose", dest="_sub_verbose", action="count", default=argparse.SUPPRESS,
                                 help="more logging (-vv for debug)")
                sub.add_argument("-q", "--quiet", dest="_sub_quiet", action="store_true",
                                 default=argparse.SUPPRESS, help="no progress or status lines on stderr")
            _add_everywhere(sub)


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
    _add_everywhere(parser)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; an :class:`EdgeloopError` becomes one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "_sub_verbose", 0)
    args.quiet = args.quiet or getattr(args, "_sub_quiet", False)
    _setup_logging(0 if args.quiet else args.verbose)  # -q: warnings and errors only
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
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None or args.verbose >= 2:
            raise
        command = getattr(args, "_command_name", "edgeloop")
        print(f"edgeloop: error: `{command}` needs the [{extra}] extra ({exc}): pip install 'edgeloop[{extra}]' "
              f"(from a clone: pip install '.[{extra}]'; README.md, 'Install')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
