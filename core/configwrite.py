"""Writing configs back: a frozen config dataclass as plain data, JSON or TOML.

What :mod:`core.configfile` reads, this writes; both round-trip (``from_mapping(cls,
tomllib.loads(to_toml(cfg))) == cfg``).  ``None`` values are left out of TOML (it has no
null) and kept as ``null`` in JSON; fields marked ``internal`` are left out of both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .configfile import file_fields

__all__ = ["to_dict", "to_json", "to_toml"]


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, Mapping):
        return {str(a): _plain(b) for a, b in v.items()}
    return v


def to_dict(obj: Any, *, table_of: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A config as plain JSON-ready data (tuples -> lists, paths -> strings); it loads back equal.

    ``table_of``: top-level fields to put inside a table (see :func:`from_mapping`).
    """
    out: dict[str, Any] = {}
    for name, v in file_fields(obj):
        if table_of and name in table_of:
            out.setdefault(table_of[name], {})[name] = _plain(v)
        else:
            out[name] = _plain(v)
    return out


def to_json(obj: Any, *, table_of: Mapping[str, str] | None = None) -> str:
    """A config as indented JSON text."""
    return json.dumps(to_dict(obj, table_of=table_of), indent=2) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not isinstance(v, float) or math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(a))} = {_toml_value(b)}" for a, b in v.items()) + " }"
    return json.dumps(str(v), ensure_ascii=False)


def _is_table(v: Any) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, tuple) and bool(v) and all(_is_table(x) for x in v)


def _emit(obj: Any, name: str, lines: list[str], *, array: bool = False) -> None:
    items = file_fields(obj)
    lines += ["", f"[[{name}]]" if array else f"[{name}]"]
    lines += [f"{k} = {_toml_value(_plain(v))}" for k, v in items
              if v is not None and not _is_table(v) and not _is_table_array(v)]
    for k, v in items:
        if _is_table(v):
            _emit(v, f"{name}.{k}", lines)
        elif _is_table_array(v):
            for item in v:
                _emit(item, f"{name}.{k}", lines, array=True)


def to_toml(obj: Any, *, table_of: Mapping[str, str] | None = None) -> str:
    """A config as TOML text (``None`` values are left out); it loads back equal.

    ``table_of``: top-level fields to write inside a table (see :func:`from_mapping`).
    """
    items = file_fields(obj)
    lines: list[str] = []
    grouped: dict[str, list[str]] = {}
    for k, v in items:
        if v is None or _is_table(v) or _is_table_array(v):
            continue
        line = f"{k} = {_toml_value(_plain(v))}"
        if table_of and k in table_of:
            grouped.setdefault(table_of[k], []).append(line)
        else:
            lines.append(line)
    for table, body in grouped.items():
        lines += ["", f"[{table}]", *body]
    for k, v in items:
        if _is_table(v):
            _emit(v, k, lines)
        elif _is_table_array(v):
            for item in v:
                _emit(item, k, lines, array=True)
    return "\n".join(lines).lstrip("\n") + "\n"
