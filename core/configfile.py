"""One strict loader for every edgeloop config: a frozen dataclass from a TOML/JSON mapping.

The agent config, ``fleet.toml`` (with its dashboard, trigger and acceptance tables), the
retrain policy and the training config are all frozen dataclasses checked by this
module, so a value is read, validated and reported the same way everywhere::

    fleet.toml: [rollout].soak_s: expected a number >= 0, got "abc" (fix [rollout].soak_s in fleet.toml)

How a config class uses it::

    @dataclass(frozen=True)
    class RolloutSection:
        soak_s: float = knob(60.0, ge=0)            # type and bounds from the annotation / knob
        delivery: Literal["auto", "http", "mqtt"] = "auto"

        def __post_init__(self) -> None:
            check(self)                              # types, bounds, choices, nested tables
            if ...:
                raise invalid("soak_s", "must be shorter than the job timeout")

    cfg = from_mapping(RolloutSection, {"soak_s": 30}, source="fleet.toml", at=("rollout",))

:func:`check` runs on construction, so a config built in code is held to the same rules
as one read from a file.  It normalises what a file cannot spell: a list becomes a tuple,
a string a :class:`~pathlib.Path`, an int a float, a table a nested dataclass, and an
old spelling of a value (``knob(values=...)``) the current one.  :func:`from_mapping`
adds what only a file needs: unknown keys are refused with the list of known ones, old
key names (``knob(aliases=...)``) still load, and every error names the file and the key.
New dataclass fields need nothing here: the annotation is the schema.  Writing configs
back (TOML, JSON) is :mod:`core.configwrite`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError, EdgeloopError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices
    import tomli as tomllib

__all__ = [
    "Knob", "knob", "check", "invalid", "relocate", "fail", "supported_schema", "from_mapping", "parse_toml",
    "read_mapping", "load_file", "file_fields", "accepted_keys", "where_text",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
Where = tuple[str | int, ...]
_KNOB = "edgeloop.knob"


@dataclass(frozen=True)
class Knob:
    """What a field accepts beyond its annotation (see :func:`knob`)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False
    check: Callable[[Any], object] | None = None
    aliases: tuple[str, ...] = ()
    values: Mapping[Any, Any] | None = None
    secret: bool = False
    internal: bool = False
    hint: str | None = None


def knob(default: Any = MISSING, *, factory: Callable[[], Any] | Any = MISSING, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None, nonempty: bool = False,
         check: Callable[[Any], object] | None = None, aliases: tuple[str, ...] = (),
         values: Mapping[Any, Any] | None = None, secret: bool = False, internal: bool = False,
         hint: str | None = None) -> Any:
    """A dataclass field with validation rules.

    ``ge``/``gt``/``le``/``lt``: bounds of a number (of every number in a tuple).
    ``nonempty``: a string or tuple must not be empty.  ``check``: called with the value;
    it rejects it by raising an :class:`EdgeloopError` or :class:`ValueError` (whose message
    becomes the problem).  ``aliases``: older key names that still load.  ``values``: older
    spellings of values mapped to the current ones.  ``secret``: never echo the value.
    ``internal``: not read from nor written to files.  ``hint``: how to fix a bad value.
    """
    meta = {_KNOB: Knob(ge=ge, gt=gt, le=le, lt=lt, nonempty=nonempty, check=check, aliases=tuple(aliases),
                        values=values, secret=secret, internal=internal, hint=hint)}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------ errors

def _join(parts: Where) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def where_text(where: Where, *, table: bool = False) -> str:
    """``("rollout", "soak_s")`` -> ``[rollout].soak_s``; ``("epochs",)`` -> ``epochs``."""
    if not where:
        return "(top level)"
    if table:
        return f"[{_join(where)}]"
    if len(where) == 1:
        return str(where[0])
    return f"[{where[0]}]" + ("" if isinstance(where[1], int) else ".") + _join(where[1:])


def _error(where: Where, problem: str, hint: str | None = None, *, table: bool = False) -> ConfigError:
    text = where_text(where, table=table)
    return ConfigError(f"{text}: {problem}", hint=hint, key=_join(where), where=where, problem=problem,
                       table=table)


def invalid(key: str | Where, problem: str, *, hint: str | None = None) -> ConfigError:
    """A field's cross-field check failed: ``raise invalid("password_file", "and password are both set")``."""
    where: Where = (key,) if isinstance(key, str) else tuple(key)
    return _error(where, problem, hint)


def relocate(exc: ConfigError, prefix: Where) -> ConfigError:
    """The same error seen from ``prefix`` up (a nested table's error named from its parent)."""
    if "problem" not in exc.context:
        return _error(prefix, exc.message, exc.hint)
    return _error(prefix + tuple(exc.context["where"]), exc.context["problem"], exc.hint,
                  table=exc.context.get("table", False))


def _label(source: str) -> str:
    return source if source.startswith("<") or "/" not in source and os.sep not in source else Path(source).name


def _in_file(exc: ConfigError, source: str, at: Where, table_of: Mapping[str, str] | None) -> ConfigError:
    """The final error: ``file: [section].key: problem (hint)``."""
    label = _label(source)
    if "problem" not in exc.context:  # not raised through this module
        return ConfigError(f"{label}: {exc.message}", hint=exc.hint, **_path_ctx(source), **{
            k: v for k, v in exc.context.items() if k != "path"})
    where = tuple(at) + tuple(exc.context["where"])
    if table_of and where and isinstance(where[0], str) and where[0] in table_of:
        where = (table_of[where[0]],) + where
    table = exc.context.get("table", False)
    text = where_text(where, table=table)
    hint = exc.hint or f"fix {text} in {label}"
    return ConfigError(f"{label}: {text}: {exc.context['problem']}", hint=hint, key=_join(where), where=where,
                       problem=exc.context["problem"], table=table, **_path_ctx(source))


def fail(source: str, where: Where, problem: str, *, hint: str | None = None, table: bool = False) -> ConfigError:
    """An error in file ``source`` at ``where`` (for checks a loader makes before :func:`from_mapping`)."""
    return _in_file(_error(tuple(where), problem, hint, table=table), source, (), None)


def _path_ctx(source: str) -> dict[str, str]:
    return {} if source.startswith("<") else {"path": source}


def supported_schema(current: int) -> Callable[[Any], None]:
    """A ``check`` for ``schema_version``: this edgeloop reads versions 1..``current``."""
    def _check(version: Any) -> None:
        if not 1 <= version <= current:
            known = "1" if current == 1 else f"1-{current}"
            raise ValueError(f"this edgeloop reads schema_version {known}, got {version}")
    return _check


# ------------------------------------------------------------------------------- checking

@dataclass(frozen=True)
class _Field:
    name: str
    tp: Any
    knob: Knob
    required: bool
    table: bool  # a nested dataclass whose default is the class's own defaults


@cache
def _spec(cls: type) -> tuple[dict[str, _Field], dict[str, str]]:
    hints = get_type_hints(cls)
    fields: dict[str, _Field] = {}
    aliases: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        k = f.metadata.get(_KNOB, Knob())
        tp = hints[f.name]
        fields[f.name] = _Field(f.name, tp, k, f.default is MISSING and f.default_factory is MISSING,
                                dataclasses.is_dataclass(tp) and f.default_factory is tp)
        for old in k.aliases:
            aliases[old] = f.name
    return fields, aliases


def file_fields(obj: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` of each field a config file holds (``internal`` fields left out)."""
    fields, _ = _spec(type(obj))
    return [(n, getattr(obj, n)) for n, f in fields.items() if not f.knob.internal]


def accepted_keys(cls: type) -> frozenset[str]:
    """The keys a file may use for ``cls``: its fields' names and their old names."""
    fields, aliases = _spec(cls)
    return frozenset(n for n, f in fields.items() if not f.knob.internal) | frozenset(aliases)


def _show(value: Any, secret: bool = False) -> str:
    if secret:
        return "***"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "a table"
    return repr(value)


def _kind(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path"
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} values"
    if origin in (Union, types.UnionType):
        return " or ".join(_kind(a) if a is not type(None) else "nothing" for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin in (dict, Mapping):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings", Path: "paths"}.get(
        tp, "tables" if dataclasses.is_dataclass(tp) else _kind(tp))


def _convert(tp: Any, v: Any, where: Where, k: Knob) -> Any:
    """``v`` as type ``tp`` (normalised), or a ConfigError saying what was expected."""
    if k.values and isinstance(v, str) and v in k.values:
        v = k.values[v]
    origin = get_origin(tp)
    if tp is Any:
        return v
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if v is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _convert(rest[0], v, where, k)
        for a in rest:
            try:
                return _convert(a, v, where, Knob())
            except ConfigError:
                continue
        raise _error(where, f"expected {_kind(tp)}, got {_show(v, k.secret)}", k.hint)
    if origin is Literal:
        for choice in get_args(tp):
            if v == choice and type(v) is type(choice):
                return v
        raise _error(where, f"expected {_kind(tp)}, got {_show(v, k.secret)}", k.hint)
    if origin is tuple:
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            raise _error(where, f"expected {_kind(tp)}, got {_show(v, k.secret)}", k.hint)
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], x, where + (i,), Knob(secret=k.secret)) for i, x in enumerate(v))
        if len(v) != len(args):
            raise _error(where, f"expected {_kind(tp)}, got {_show(v, k.secret)}", k.hint)
        return tuple(_convert(a, x, where + (i,), Knob(secret=k.secret)) for i, (a, x) in enumerate(zip(args, v, strict=True)))
    if origin in (dict, Mapping):
        if not isinstance(v, Mapping):
            raise _error(where, f"expected a table, got {_show(v, k.secret)}", k.hint)
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(kt, a, where, Knob()): _convert(vt, b, where + (str(a),), Knob()) for a, b in v.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(v, tp):
            return v
        if not isinstance(v, Mapping):
            raise _error(where, f"expected a table, got {_show(v, k.secret)}", k.hint, table=True)
        try:
            return _build(tp, v)
        except ConfigError as exc:
            raise relocate(exc, where) from None
    ok = (isinstance(v, bool) if tp is bool else
          isinstance(v, int) and not isinstance(v, bool) if tp is int else
          isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))
          if tp is float else
          isinstance(v, str) if tp is str else
          isinstance(v, (str, os.PathLike)) and str(v) != "" if tp is Path else
          isinstance(v, tp))
    if not ok:
        rng = _bounds(k) if tp in (int, float) else ""
        raise _error(where, f"expected {_kind(tp)}{' ' + rng if rng else ''}, got {_show(v, k.secret)}", k.hint)
    if tp is float:
        return float(v)
    if tp is Path and not isinstance(v, Path):
        return Path(v)
    return v


def _bounds(k: Knob) -> str:
    lo = f"[{k.ge:g}" if k.ge is not None else f"({k.gt:g}" if k.gt is not None else None
    hi = f"{k.le:g}]" if k.le is not None else f"{k.lt:g})" if k.lt is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f"{'>=' if k.ge is not None else '>'} {lo[1:]}"
    if hi:
        return f"{'<=' if k.le is not None else '<'} {hi[:-1]}"
    return ""


def _constrain(f: _Field, v: Any, where: Where, raw: Any) -> None:
    """Bounds, emptiness and the field's own check; ``raw`` is the value as given (for messages)."""
    k = f.knob
    if v is None:
        return
    if k.ge is not None or k.gt is not None or k.le is not None or k.lt is not None:
        nums = v if isinstance(v, tuple) else (v,)
        for x in nums:
            if (k.ge is not None and x < k.ge) or (k.gt is not None and x <= k.gt) or \
                    (k.le is not None and x > k.le) or (k.lt is not None and x >= k.lt):
                base = [a for a in get_args(f.tp) if a is not type(None)][0] \
                    if get_origin(f.tp) in (Union, types.UnionType) else f.tp
                what = _kind(base)
                raise _error(where, f"expected {what} {_bounds(k)}, got {_show(raw, k.secret)}", k.hint)
    if k.nonempty and not v:
        raise _error(where, f"expected a non-empty {'string' if isinstance(v, str) else 'list'}, got "
                            f"{_show(v, k.secret)}", k.hint)
    if k.check is not None:
        try:
            k.check(v)
        except EdgeloopError as exc:
            raise _error(where, exc.message, exc.hint or k.hint) from None
        except ValueError as exc:
            raise _error(where, str(exc), k.hint) from None


def check(obj: Any) -> None:
    """Validate and normalise every field of a frozen dataclass instance (call it in ``__post_init__``)."""
    fields, _ = _spec(type(obj))
    for f in fields.values():
        v = getattr(obj, f.name)
        where: Where = (f.name,)
        new = _convert(f.tp, v, where, f.knob)
        _constrain(f, new, where, v)
        if new is not v:
            object.__setattr__(obj, f.name, new)


# -------------------------------------------------------------------------------- loading

def _build(cls: type[T], data: Mapping[str, Any]) -> T:
    fields, aliases = _spec(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        f = fields.get(name)
        if f is None or f.knob.internal:
            known = [n for n, g in fields.items() if not g.knob.internal]
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = (f"did you mean {close[0]}? " if close else "") + f"known: {', '.join(known)}"
            table = isinstance(value, Mapping)
            raise _error((key,), f"unknown {'section' if table else 'key'}", hint, table=table)
        if name != key:
            if name in data:
                raise _error((key,), f"is the old name of {name}; set only {name}")
            log.warning("config key %r is deprecated; it is now %r (the old name still loads)", key, name)
        kwargs[name] = value
    for f in fields.values():
        if f.required and f.name not in kwargs:
            raise _error((f.name,), "is required")
        if f.table and f.name not in kwargs:
            kwargs[f.name] = {}  # built (and its errors named) like a table the file spelled out empty
    return cls(**kwargs)


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str = "<string>", at: Where = (),
                 table_of: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from a parsed TOML/JSON mapping; errors name ``source`` and the key.

    ``at``: where this mapping sits in the file (``("rollout",)`` for a ``[rollout]``
    table).  ``table_of``: top-level fields written inside a table rather than at the top
    (fleet.toml keeps ``data_dir`` in ``[fleet]``), for naming them in errors.
    """
    try:
        if not isinstance(data, Mapping):
            raise _error((), f"expected a table, got {_show(data)}", table=True)
        return _build(cls, data)
    except ConfigError as exc:
        raise _in_file(exc, source, at, table_of) from None


def parse_toml(text: str, *, source: str = "<string>") -> dict[str, Any]:
    """TOML text as a dict; malformed text is a ConfigError naming ``source``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{_label(source)}: not valid TOML: {exc}", **_path_ctx(source)) from exc


def read_mapping(path: str | os.PathLike[str], *, missing_hint: str | None = None) -> dict[str, Any]:
    """A TOML file (or JSON for ``*.json``) as a dict; unreadable or malformed files are ConfigErrors."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file", hint=missing_hint, path=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})", path=str(p)) from exc
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"{p.name}: not valid {kind}: {exc}", path=str(p)) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p.name}: expected a table (a JSON object) at the top", path=str(p))
    return data


def load_file(cls: type[T], path: str | os.PathLike[str], *, missing_hint: str | None = None) -> T:
    """Read ``path`` (TOML, or JSON for ``*.json``) into ``cls``."""
    return from_mapping(cls, read_mapping(path, missing_hint=missing_hint), source=str(path))
