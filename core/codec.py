"""The machinery under every wire message: the :class:`Message` base and strict decoding.

A message is a frozen dataclass with a ``TYPE``; subclassing :class:`Message` registers it
for :func:`decode`, which checks every field against its annotation (checkers compiled
once per class) and refuses unknown types, unknown fields, wrong field types and other
schema versions with :class:`ProtocolError`.  The message types themselves live in
:mod:`core.messages`; import both through :mod:`core.protocol`, which loads them (a type
is only decodable once its module has been imported).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

from .errors import ProtocolError
from .identifiers import validate_device_id
from .jsonsafe import parse_json

__all__ = ["PROTOCOL_SCHEMA_VERSION", "Message", "decode", "decode_as"]

PROTOCOL_SCHEMA_VERSION = 1

_REGISTRY: dict[str, type[Message]] = {}


@dataclass(frozen=True)
class Message:
    """Base of every JSON message; subclasses set ``TYPE``."""

    TYPE: ClassVar[str] = ""
    # Fields added after a message type shipped: decoding is strict (an older peer rejects
    # unknown fields), so these stay out of the JSON while they hold their default and a
    # message that does not use them is exactly what an older peer expects.
    OPTIONAL_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls

    def __post_init__(self) -> None:
        device_id = getattr(self, "device_id", None)
        if device_id is not None:
            validate_device_id(device_id)
        self._validate()

    def _validate(self) -> None:
        """Per-message checks beyond field types; subclasses override."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with ``type`` and ``schema_version`` (containers are copies)."""
        d = {name: _plain(getattr(self, name)) for name in _wire_names(self)}
        d["type"] = self.TYPE
        d["schema_version"] = PROTOCOL_SCHEMA_VERSION
        return d

    def encode(self) -> bytes:
        """Compact UTF-8 JSON; NaN/Infinity are refused because JSON has no such numbers."""
        # json.dumps only reads the values: no copies (``dataclasses.asdict`` deep-copies
        # recursively and cost ~4x the JSON encoding on every message a device sends).
        d = {name: getattr(self, name) for name in _wire_names(self)}
        d["type"] = self.TYPE
        d["schema_version"] = PROTOCOL_SCHEMA_VERSION
        try:
            return json.dumps(d, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:
            raise ProtocolError(f"cannot encode {self.TYPE} message: {exc}",
                                hint="replace NaN/inf with None before sending") from exc

    @classmethod
    def from_dict(cls: type[M], data: dict[str, Any]) -> M:
        """The inverse of :meth:`to_dict`; validates like :func:`decode`."""
        return decode_as(json.dumps(data, allow_nan=False), cls)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _optional_defaults(cls: type[Message]) -> dict[str, Any]:
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls) if f.name in cls.OPTIONAL_FIELDS}


def _wire_names(msg: Message) -> tuple[str, ...]:
    """The fields a message puts on the wire: all but optional ones at their default."""
    names = _field_names(type(msg))
    optional = _optional_defaults(type(msg)) if msg.OPTIONAL_FIELDS else None
    if not optional:
        return names
    return tuple(n for n in names if n not in optional or getattr(msg, n) != optional[n])


def _plain(value: Any) -> Any:
    """A copy of a field value's containers (what ``dataclasses.asdict`` gave, without its cost)."""
    t = type(value)
    if t is dict:
        return {k: _plain(v) for k, v in value.items()}
    if t is tuple or t is list:
        return t(_plain(v) for v in value)
    return value


M = TypeVar("M", bound=Message)


Checker = Callable[[Any, str], Any]
_CHECKERS: dict[type[Message], dict[str, tuple[Checker, str]]] = {}


def _field_checkers(cls: type[Message]) -> dict[str, tuple[Checker, str]]:
    """Per field: a checker compiled once from the annotation, and the name used in errors.

    Annotations are strings under ``from __future__ import annotations``; resolving and
    walking them per message cost ~10x the JSON parse on the fleet's ingestion path.
    """
    checkers = _CHECKERS.get(cls)
    if checkers is None:
        hints = typing.get_type_hints(cls)
        checkers = {f.name: (_compile(hints[f.name]), f"{cls.TYPE}.{f.name}") for f in dataclasses.fields(cls)}
        _CHECKERS[cls] = checkers
    return checkers


def _fail(value: Any, tp: Any, where: str) -> ProtocolError:
    return ProtocolError(f"{where}: {value!r} is not {getattr(tp, '__name__', tp)}")


def _compile(tp: Any) -> Checker:
    """A function checking a JSON value against ``tp``; lists become tuples where declared."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return lambda v, where: v
    if origin in (Union, types.UnionType):
        arms = typing.get_args(tp)
        optional = type(None) in arms
        rest = [_compile(a) for a in arms if a is not type(None)]

        def check_union(v: Any, where: str) -> Any:
            if v is None and optional:
                return None
            for arm in rest:
                try:
                    return arm(v, where)
                except ProtocolError:
                    continue
            raise _fail(v, tp, where)

        return check_union
    if tp is type(None):
        def check_none(v: Any, where: str) -> Any:
            if v is None:
                return None
            raise _fail(v, tp, where)
        return check_none
    if tp is bool:
        def check_bool(v: Any, where: str) -> Any:
            if v is True or v is False:
                return v
            raise _fail(v, tp, where)
        return check_bool
    if tp is int:
        def check_int(v: Any, where: str) -> Any:
            if type(v) is int:
                return v
            raise _fail(v, tp, where)
        return check_int
    if tp is float:
        def check_float(v: Any, where: str) -> Any:
            t = type(v)
            if (t is float or t is int) and math.isfinite(v):
                return float(v)
            raise _fail(v, tp, where)
        return check_float
    if tp is str:
        def check_str(v: Any, where: str) -> Any:
            if type(v) is str:
                return v
            raise _fail(v, tp, where)
        return check_str
    if origin is tuple:
        item = _compile(typing.get_args(tp)[0])

        def check_tuple(v: Any, where: str) -> Any:
            if isinstance(v, (list, tuple)):
                return tuple(item(x, where + "[]") for x in v)
            raise _fail(v, tp, where)
        return check_tuple
    if origin is dict:
        val = _compile(typing.get_args(tp)[1])

        def check_dict(v: Any, where: str) -> Any:
            if isinstance(v, dict) and all(type(k) is str for k in v):
                return {k: val(x, where + "." + k) for k, x in v.items()}
            raise _fail(v, tp, where)
        return check_dict
    raise TypeError(f"unsupported annotation {tp}")  # pragma: no cover - a schema bug, found at import


def decode(payload: bytes | str) -> Message:
    """JSON bytes -> the message dataclass; anything malformed -> ProtocolError.

    Payloads over ``MAX_MESSAGE_BYTES`` or nested deeper than ``MAX_JSON_DEPTH`` are
    malformed too (:func:`parse_json`).
    """
    data = parse_json(payload)
    if not isinstance(data, dict):
        raise ProtocolError("message is not a JSON object")
    mtype = data.pop("type", None)
    version = data.pop("schema_version", None)
    cls = _REGISTRY.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype!r}")
    if version != PROTOCOL_SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema_version {version!r} for {mtype}",
                            hint=f"this side speaks version {PROTOCOL_SCHEMA_VERSION}")
    checkers = _field_checkers(cls)
    unknown = data.keys() - checkers.keys()
    if unknown:
        raise ProtocolError(f"{mtype} message has unknown fields {sorted(unknown)}")
    try:
        for k, v in data.items():
            check, where = checkers[k]
            data[k] = check(v, where)
        return cls(**data)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"invalid {mtype} message: {exc}") from exc


def decode_as(payload: bytes | str, cls: type[M]) -> M:
    """:func:`decode`, insisting on one message class."""
    msg = decode(payload)
    if not isinstance(msg, cls):
        raise ProtocolError(f"expected a {cls.TYPE} message, got {msg.TYPE}")
    return msg

