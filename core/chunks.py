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

Transfers belong to an *owner* (the fleet passes the sending device's id, taken from the
topic): transfer ids are scoped by owner, budgets can be set per owner, and a bound is
only ever enforced against the owner that hit it — one device's transfers never evict
another's.  When nothing of the same owner can make room the new frame is refused with
:class:`OverBudgetError` (the sender keeps it and sends it again later).
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

from .errors import OverBudgetError, ProtocolError
from .jsonsafe import parse_json

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
    "OverBudgetError",  # defined in core.errors; re-exported here, where it is raised
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
    try:  # size- and depth-limited: a deeply nested header is malformed, not a RecursionError
        h = parse_json(payload[_PREFIX.size:_PREFIX.size + hlen], max_bytes=_MAX_HEADER, what="header")
    except ProtocolError as exc:
        raise _bad(exc.message) from exc
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
    """A transfer given up on, and why (``corrupt``, ``inconsistent``, ``expired``, ``evicted``).

    Only ``corrupt`` and ``inconsistent`` are the sender's fault; an ``expired`` or
    ``evicted`` transfer was given up for lack of room or time and must be sent again
    (a receiver that acknowledges frames must never acknowledge those)."""

    transfer_id: str
    reason: str
    detail: str
    owner: str = ""


# Drop reasons that say the transfer itself is bad (sending it again unchanged cannot help).
SENDER_FAULTS = frozenset({"corrupt", "inconsistent"})


_Key = tuple[str, str]  # (owner, transfer id)


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

    ``max_transfers`` partial transfers and ``max_bytes`` buffered bytes at most, and per
    owner ``max_transfers_per_owner`` / ``max_bytes_per_owner`` (default: the global
    bounds); a partial transfer idle for ``ttl_s`` is dropped.  When a bound is hit the
    oldest partial transfer *of the same owner* goes first; when that owner has nothing
    else to give up, the frame is refused (:class:`OverBudgetError`) and nothing is
    dropped.  Every drop is appended to ``dropped`` (the last 100) and passed to
    ``on_drop``.  Not thread-safe: feed it from one thread.
    """

    def __init__(self, *, max_transfers: int = 8, max_bytes: int = 64 * 1024 * 1024, ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[Dropped], None] | None = None,
                 max_transfers_per_owner: int | None = None, max_bytes_per_owner: int | None = None) -> None:
        if max_transfers < 1 or max_bytes < 1 or ttl_s <= 0:
            raise ValueError("max_transfers, max_bytes and ttl_s must be positive")
        self.max_transfers = max_transfers
        self.max_bytes = max_bytes
        self.max_transfers_per_owner = min(max_transfers, max_transfers_per_owner or max_transfers)
        self.max_bytes_per_owner = min(max_bytes, max_bytes_per_owner or max_bytes)
        if self.max_transfers_per_owner < 1 or self.max_bytes_per_owner < 1:
            raise ValueError("per-owner budgets must be positive")
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_drop = on_drop
        self._partials: collections.OrderedDict[_Key, _Partial] = collections.OrderedDict()
        self._owners: dict[str, list[int]] = {}  # owner -> [open transfers, buffered bytes]
        # Late duplicates of a finished transfer must not reopen it (QoS 1 redelivers).
        self._done: collections.OrderedDict[_Key, str] = collections.OrderedDict()
        self.dropped: collections.deque[Dropped] = collections.deque(maxlen=100)
        self.refused = 0  # frames refused for lack of budget
        self.buffered_bytes = 0

    def __len__(self) -> int:
        return len(self._partials)

    def __contains__(self, key: object) -> bool:
        """``transfer_id`` (owner ``""``) or ``(owner, transfer_id)`` is open."""
        return (("", key) if isinstance(key, str) else key) in self._partials

    def owner_usage(self, owner: str) -> tuple[int, int]:
        """``(open transfers, buffered bytes)`` of one owner."""
        n, b = self._owners.get(owner, (0, 0))
        return n, b

    def add(self, frame: Frame | bytes, owner: str = "") -> Completed | None:
        """Take one frame of ``owner``; returns the :class:`Completed` payload when its last chunk arrives.

        Raises :class:`ProtocolError` for a malformed frame, a frame contradicting earlier
        chunks of its transfer, a transfer bigger than ``max_bytes``, or a whole payload
        whose sha256 does not match (in the last two cases the transfer is dropped);
        :class:`OverBudgetError` when the frame cannot be buffered without taking room
        from another owner (nothing is dropped).
        """
        if not isinstance(frame, Frame):
            frame = parse_frame(frame)
        now = self._clock()
        self.expire(now)
        tid = frame.transfer_id
        key = (owner, tid)
        if self._done.get(key) == frame.sha256:
            return None  # duplicate of a delivered transfer
        if frame.size > self.max_bytes_per_owner:
            raise ProtocolError(f"transfer {tid} of {frame.size} bytes exceeds the "
                                f"{self.max_bytes_per_owner}-byte buffer",
                                hint="raise max_bytes or send less", transfer_id=tid)
        p = self._partials.get(key)
        if p is not None and (p.first.total, p.first.size, p.first.sha256, p.first.kind) != (
                frame.total, frame.size, frame.sha256, frame.kind):
            # A new transfer reusing the id (sender restarted) supersedes the old one.
            self._drop(key, "inconsistent", "a chunk disagrees with earlier chunks; restarting the transfer")
            p = None
        if p is not None and frame.index in p.chunks:
            p.touched = now
            return None  # duplicate chunk
        opened = p is None
        if opened:
            self._make_room(owner, key, 1, 0)
        self._make_room(owner, key, 0, len(frame.data))
        if opened:
            p = self._partials[key] = _Partial(frame, now)
            self._usage(owner)[0] += 1
        assert p is not None
        p.touched = now
        p.chunks[frame.index] = frame.data
        p.nbytes += len(frame.data)
        self._usage(owner)[1] += len(frame.data)
        self.buffered_bytes += len(frame.data)
        if p.nbytes > p.first.size:
            self._drop(key, "corrupt", "chunks add up to more bytes than the declared size")
            raise ProtocolError(f"transfer {tid} is corrupt: more bytes than declared", transfer_id=tid)
        if len(p.chunks) < p.first.total:
            return None
        data = b"".join(p.chunks[i] for i in range(p.first.total))
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != p.first.size or digest != p.first.sha256:
            detail = f"sha256 {digest[:12]}.. != {p.first.sha256[:12]}.. ({len(data)}/{p.first.size} bytes)"
            self._drop(key, "corrupt", detail)
            raise ProtocolError(f"transfer {tid} is corrupt: {detail}", hint="the sender must resend it",
                                transfer_id=tid)
        self._forget(key)
        self._done[key] = digest
        while len(self._done) > max(256, self.max_transfers):
            self._done.popitem(last=False)
        return Completed(tid, p.first.kind, data, digest, dict(p.first.meta))

    def _usage(self, owner: str) -> list[int]:
        u = self._owners.get(owner)
        if u is None:
            u = self._owners[owner] = [0, 0]
        return u

    def _make_room(self, owner: str, key: _Key, transfers: int, nbytes: int) -> None:
        """Evict ``owner``'s oldest other transfers until ``transfers`` more and ``nbytes`` more
        fit its budget and the global one; refuse (:class:`OverBudgetError`) when they cannot."""
        def fits() -> bool:
            n, b = self.owner_usage(owner)
            return (n + transfers <= self.max_transfers_per_owner and b + nbytes <= self.max_bytes_per_owner
                    and len(self._partials) + transfers <= self.max_transfers
                    and self.buffered_bytes + nbytes <= self.max_bytes)

        while not fits():
            victim = next((k for k in self._partials if k[0] == owner and k != key), None)  # oldest first
            if victim is None:
                self.refused += 1
                raise OverBudgetError(
                    f"transfer {key[1]} refused: the reassembly buffer is at its budget "
                    f"({'owner ' + repr(owner) if owner else 'all transfers'})",
                    hint="send it again later; raise the reassembler budgets if this is normal load",
                    transfer_id=key[1], owner=owner)
            self._drop(victim, "evicted", "over the reassembly budget")

    def missing(self, transfer_id: str, owner: str = "") -> tuple[int, ...] | None:
        """Indices not yet received, or None when the transfer is not open (unknown, done or dropped)."""
        p = self._partials.get((owner, transfer_id))
        if p is None:
            return None
        return tuple(i for i in range(p.first.total) if i not in p.chunks)

    def expire(self, now: float | None = None) -> None:
        """Drop partial transfers idle for longer than ``ttl_s``."""
        now = self._clock() if now is None else now
        for key in [k for k, p in self._partials.items() if now - p.touched > self.ttl_s]:
            self._drop(key, "expired", f"no chunk for {self.ttl_s:g} s")

    def _forget(self, key: _Key) -> None:
        p = self._partials.pop(key)
        self.buffered_bytes -= p.nbytes
        u = self._owners[key[0]]
        u[0] -= 1
        u[1] -= p.nbytes
        if u[0] == 0:
            del self._owners[key[0]]

    def _drop(self, key: _Key, reason: str, detail: str) -> None:
        self._forget(key)
        d = Dropped(key[1], reason, detail, owner=key[0])
        self.dropped.append(d)
        if self._on_drop is not None:
            self._on_drop(d)
