"""Binary chunk framing and bounded reassembly for payloads bigger than one MQTT message.

A frame is ``MAGIC`` (4 bytes, ``b"ELC1"``) + header length (uint16, big endian) + a
compact JSON header + the raw chunk bytes.  Raw bytes instead of base64-in-JSON keep the
whole 128 KiB of a broker's message limit for data.  The header names the transfer, the
chunk's index and count, the size and sha256 of the *whole* payload, and an optional
small ``meta`` dict; every chunk carries the full header so whichever chunk arrives first
opens the transfer, in any order.

MQTT QoS 1 delivers at least once and a fleet may resend, so :class:`Reassembler`
tolerates duplicates and reordering, verifies the sha256 of the whole before handing it
out (a corrupted transfer is dropped with a reason, never delivered), and bounds memory
by count, bytes and age.  ``missing()`` tells a receiver which chunks to ask for again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError

__all__ = [
    "CHUNK_MAGIC",
    "DEFAULT_CHUNK_SIZE",
    "Frame",
    "Completed",
    "Dropped",
    "Reassembler",
    "split",
    "parse_frame",
    "is_frame",
]

CHUNK_MAGIC = b"ELC1"
DEFAULT_CHUNK_SIZE = 128 * 1024
_PREFIX = struct.Struct(">4sH")
_MAX_HEADER = 16 * 1024  # meta is for a few labels, not for data
_TRANSFER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _bad(reason: str, **context: Any) -> ProtocolError:
    return ProtocolError(f"bad chunk frame: {reason}", **context)


@dataclass(frozen=True)
class Frame:
    """One chunk of a transfer; ``encode()`` gives the wire bytes."""

    transfer_id: str
    index: int
    total: int
    size: int  # bytes of the whole payload
    sha256: str  # of the whole payload
    data: bytes
    kind: str = "data"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.transfer_id, str) or not _TRANSFER_ID_RE.match(self.transfer_id):
            raise _bad(f"invalid transfer id {self.transfer_id!r}",
                       hint="use 1-128 letters, digits or '_.:@+-', starting with a letter or digit")
        for name in ("index", "total", "size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise _bad(f"{name} must be a non-negative integer, got {v!r}", transfer_id=self.transfer_id)
        if self.total < 1 or self.index >= self.total:
            raise _bad(f"index {self.index} outside 0..{self.total - 1}", transfer_id=self.transfer_id)
        if not isinstance(self.sha256, str) or not _SHA_RE.match(self.sha256):
            raise _bad("sha256 is not 64 lowercase hex digits", transfer_id=self.transfer_id)
        if not isinstance(self.kind, str) or not 0 < len(self.kind) <= 64:
            raise _bad(f"invalid kind {self.kind!r}", transfer_id=self.transfer_id)
        if not isinstance(self.meta, dict):
            raise _bad("meta must be a JSON object", transfer_id=self.transfer_id)
        if len(self.data) > self.size:
            raise _bad("chunk is larger than the whole transfer", transfer_id=self.transfer_id)

    def header(self) -> bytes:
        """The compact JSON header (the wire format's field names)."""
        h: dict[str, Any] = {"id": self.transfer_id, "kind": self.kind, "i": self.index, "n": self.total,
                             "size": self.size, "sha256": self.sha256}
        if self.meta:
            h["meta"] = self.meta
        return json.dumps(h, separators=(",", ":"), allow_nan=False).encode()

    def encode(self) -> bytes:
        header = self.header()
        if len(header) > _MAX_HEADER:
            raise _bad(f"header of {len(header)} bytes exceeds {_MAX_HEADER}",
                       hint="keep meta to a few small fields", transfer_id=self.transfer_id)
        return _PREFIX.pack(CHUNK_MAGIC, len(header)) + header + self.data


def is_frame(payload: bytes) -> bool:
    """Cheap test whether ``payload`` looks like a chunk frame rather than JSON."""
    return payload[:4] == CHUNK_MAGIC


def parse_frame(payload: bytes) -> Frame:
    """Wire bytes -> :class:`Frame`; anything malformed raises :class:`ProtocolError`."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise _bad(f"expected bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < _PREFIX.size:
        raise _bad(f"only {len(payload)} bytes")
    magic, hlen = _PREFIX.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise _bad(f"magic {magic!r} is not {CHUNK_MAGIC!r}")
    if hlen > _MAX_HEADER or _PREFIX.size + hlen > len(payload):
        raise _bad(f"header length {hlen} does not fit in {len(payload)} bytes")
    try:
        h = json.loads(payload[_PREFIX.size:_PREFIX.size + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"header is not JSON: {exc}") from exc
    if not isinstance(h, dict):
        raise _bad("header is not a JSON object")
    try:
        return Frame(transfer_id=h["id"], kind=h.get("kind", "data"), index=h["i"], total=h["n"],
                     size=h["size"], sha256=h["sha256"], meta=h.get("meta", {}),
                     data=payload[_PREFIX.size + hlen:])
    except KeyError as exc:
        raise _bad(f"header lacks {exc.args[0]!r}") from exc


def split(transfer_id: str, data: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE, kind: str = "data",
          meta: dict[str, Any] | None = None) -> list[bytes]:
    """Cut ``data`` into encoded frames, each (header included) at most ``chunk_size`` bytes.

    Empty ``data`` gives one frame with no bytes, so a receiver still sees the transfer.
    """
    data = bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    meta = dict(meta or {})

    def overhead(total: int) -> int:
        # The largest header this transfer will have: index and total at their widest.
        probe = Frame(transfer_id, total - 1, total, len(data), sha, b"", kind, meta)
        return _PREFIX.size + len(probe.header())

    total = 1
    while True:  # the header grows with the digit count of `total`; converges in <= 3 rounds
        room = chunk_size - overhead(total)
        if room < 1:
            raise ProtocolError(f"chunk size {chunk_size} leaves no room for data after the frame header",
                                hint="use a chunk size of at least a few KiB", transfer_id=transfer_id)
        needed = max(1, math.ceil(len(data) / room))
        if needed <= total:
            break
        total = needed
    total = max(1, math.ceil(len(data) / room))
    return [Frame(transfer_id, i, total, len(data), sha, data[i * room:(i + 1) * room], kind, meta).encode()
            for i in range(total)]


@dataclass(frozen=True)
class Completed:
    """A whole, verified transfer."""

    transfer_id: str
    kind: str
    data: bytes
    sha256: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class Dropped:
    """A transfer given up on, and why (``corrupt``, ``inconsistent``, ``expired``, ``evicted``)."""

    transfer_id: str
    reason: str
    detail: str


class _Partial:
    __slots__ = ("first", "chunks", "nbytes", "started", "touched")

    def __init__(self, first: Frame, now: float) -> None:
        self.first = first
        self.chunks: dict[int, bytes] = {}
        self.nbytes = 0
        self.started = now
        self.touched = now


class Reassembler:
    """Collects frames into whole payloads with bounded memory.

    ``max_transfers`` partial transfers and ``max_bytes`` buffered bytes at most; a partial
    transfer idle for ``ttl_s`` is dropped.  When a bound is hit the oldest partial transfer
    goes first.  Every drop is appended to ``dropped`` (the last 100) and passed to
    ``on_drop``.  Not thread-safe: feed it from one thread.
    """

    def __init__(self, *, max_transfers: int = 8, max_bytes: int = 64 * 1024 * 1024, ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[Dropped], None] | None = None) -> None:
        if max_transfers < 1 or max_bytes < 1 or ttl_s <= 0:
            raise ValueError("max_transfers, max_bytes and ttl_s must be positive")
        self.max_transfers = max_transfers
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_drop = on_drop
        self._partials: collections.OrderedDict[str, _Partial] = collections.OrderedDict()
        # Late duplicates of a finished transfer must not reopen it (QoS 1 redelivers).
        self._done: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.dropped: collections.deque[Dropped] = collections.deque(maxlen=100)
        self.buffered_bytes = 0

    def __len__(self) -> int:
        return len(self._partials)

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._partials

    def add(self, frame: Frame | bytes) -> Completed | None:
        """Take one frame; returns the :class:`Completed` payload when its last chunk arrives.

        Raises :class:`ProtocolError` for a malformed frame, a frame contradicting earlier
        chunks of its transfer, a transfer bigger than ``max_bytes``, or a whole payload
        whose sha256 does not match (in the last two cases the transfer is dropped).
        """
        if not isinstance(frame, Frame):
            frame = parse_frame(frame)
        now = self._clock()
        self.expire(now)
        tid = frame.transfer_id
        if self._done.get(tid) == frame.sha256:
            return None  # duplicate of a delivered transfer
        if frame.size > self.max_bytes:
            raise ProtocolError(f"transfer {tid} of {frame.size} bytes exceeds the {self.max_bytes}-byte buffer",
                                hint="raise max_bytes or send less", transfer_id=tid)
        p = self._partials.get(tid)
        if p is not None and (p.first.total, p.first.size, p.first.sha256, p.first.kind) != (
                frame.total, frame.size, frame.sha256, frame.kind):
            # A new transfer reusing the id (sender restarted) supersedes the old one.
            self._drop(tid, "inconsistent", "a chunk disagrees with earlier chunks; restarting the transfer")
            p = None
        if p is None:
            p = self._partials[tid] = _Partial(frame, now)
            while len(self._partials) > self.max_transfers:
                self._drop(next(iter(self._partials)), "evicted", f"more than {self.max_transfers} transfers open")
        p.touched = now
        if frame.index in p.chunks:
            return None  # duplicate chunk
        for other in [t for t in self._partials if t != tid]:  # oldest first
            if self.buffered_bytes + len(frame.data) <= self.max_bytes:
                break
            self._drop(other, "evicted", f"buffer over {self.max_bytes} bytes")
        p.chunks[frame.index] = frame.data
        p.nbytes += len(frame.data)
        self.buffered_bytes += len(frame.data)
        if p.nbytes > p.first.size:
            self._drop(tid, "corrupt", "chunks add up to more bytes than the declared size")
            raise ProtocolError(f"transfer {tid} is corrupt: more bytes than declared", transfer_id=tid)
        if len(p.chunks) < p.first.total:
            return None
        data = b"".join(p.chunks[i] for i in range(p.first.total))
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != p.first.size or digest != p.first.sha256:
            detail = f"sha256 {digest[:12]}.. != {p.first.sha256[:12]}.. ({len(data)}/{p.first.size} bytes)"
            self._drop(tid, "corrupt", detail)
            raise ProtocolError(f"transfer {tid} is corrupt: {detail}", hint="the sender must resend it",
                                transfer_id=tid)
        self._forget(tid)
        self._done[tid] = digest
        while len(self._done) > 256:
            self._done.popitem(last=False)
        return Completed(tid, p.first.kind, data, digest, dict(p.first.meta))

    def missing(self, transfer_id: str) -> tuple[int, ...] | None:
        """Indices not yet received, or None when the transfer is not open (unknown, done or dropped)."""
        p = self._partials.get(transfer_id)
        if p is None:
            return None
        return tuple(i for i in range(p.first.total) if i not in p.chunks)

    def expire(self, now: float | None = None) -> None:
        """Drop partial transfers idle for longer than ``ttl_s``."""
        now = self._clock() if now is None else now
        for tid in [t for t, p in self._partials.items() if now - p.touched > self.ttl_s]:
            self._drop(tid, "expired", f"no chunk for {self.ttl_s:g} s")

    def _forget(self, tid: str) -> None:
        p = self._partials.pop(tid)
        self.buffered_bytes -= p.nbytes

    def _drop(self, tid: str, reason: str, detail: str) -> None:
        self._forget(tid)
        d = Dropped(tid, reason, detail)
        self.dropped.append(d)
        if self._on_drop is not None:
            self._on_drop(d)
