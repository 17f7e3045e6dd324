"""``json.loads`` for untrusted bytes, with a size and a nesting-depth limit.

A leaf module (it imports only :mod:`core.errors`) so that both the message decoder
(:mod:`core.codec`) and the chunk-frame parser (:mod:`core.chunks`) use the same limits
without importing each other.  Re-exported by :mod:`core.protocol`.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ProtocolError

__all__ = ["MAX_MESSAGE_BYTES", "MAX_JSON_DEPTH", "parse_json"]

# Hostile-input limits of :func:`core.protocol.decode` (every message is far below both).
MAX_MESSAGE_BYTES = 1 << 20
MAX_JSON_DEPTH = 32


def parse_json(payload: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_JSON_DEPTH,
               what: str = "message") -> Any:
    """``json.loads`` for untrusted bytes: over ``max_bytes``, nested deeper than
    ``max_depth``, or not JSON at all -> one :class:`ProtocolError` (never a RecursionError,
    MemoryError or a huge-integer ValueError)."""
    if not isinstance(payload, (bytes, bytearray, memoryview, str)):
        raise ProtocolError(f"{what} is {type(payload).__name__}, not bytes")
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what} of {len(payload)} bytes is over the {max_bytes}-byte limit")
    try:
        data = json.loads(payload)
    except RecursionError:
        raise ProtocolError(f"{what} is nested more than {max_depth} levels deep") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints over Python's digit limit
        raise ProtocolError(f"{what} is not JSON: {str(exc)[:200]}") from None
    raw = payload if isinstance(payload, (bytes, str)) else bytes(payload)
    opens = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if opens > max_depth and _deeper_than(data, max_depth):  # cheap: only when it could be deep at all
        raise ProtocolError(f"{what} is nested more than {max_depth} levels deep")
    return data


def _deeper_than(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return True
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False
