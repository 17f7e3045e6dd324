"""Helpers shared by every ``edgeloop`` sub-command (no heavy imports).

Lives in ``edge_agent`` because the agent's own commands must work on a device that
has only the ``[agent]`` extra; ``train``, ``export``, ``fleet`` and ``benchmarks``
import it from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_json_flag", "emit", "to_jsonable", "Handler"]

Handler = Callable[[argparse.Namespace], int]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Add the ``--json`` flag every reporting command carries."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def to_jsonable(obj: Any) -> Any:
    """Turn dataclasses, paths and numpy scalars/arrays into plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return obj.tolist()
    return obj


def emit(args: argparse.Namespace, data: Any, human: Callable[[], None] | str | None = None) -> None:
    """Print ``data`` as JSON when ``--json`` was given, else the human rendering."""
    if getattr(args, "json", False):
        json.dump(to_jsonable(data), sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    if human is None:
        json.dump(to_jsonable(data), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif isinstance(human, str):
        print(human)
    else:
        human()
