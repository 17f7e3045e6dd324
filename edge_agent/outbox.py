"""The agent's disk-backed outgoing queue: nothing is lost while the broker is away.

One SQLite file (WAL journal).  Messages drain in priority order (0 first), FIFO within a
priority, and leave the queue only when :meth:`Outbox.ack` is called, which the MQTT link
does on the broker's PUBACK: delivery is at-least-once across broker outages, agent
restarts and ``kill -9`` (a message published but not yet acknowledged when the agent
dies is sent again; receivers dedupe on the message's own ids / ``seq``).

End-to-end receipts (``docs/protocol.md``, "Receipts"): a PUBACK only says the *broker*
has the message, and a broker that restarts before the fleet's subscriber is back
PUBACKs messages it then delivers to nobody.  Once the fleet has ever sent a receipt
(:attr:`Outbox.receipts_seen`, persistent), the link keeps such messages after the
PUBACK — :meth:`Outbox.mark_sent` stamps them ``sent`` and :meth:`peek_batch` skips them —
until the fleet's receipt names their id (:meth:`Outbox.receipt` deletes them).
:meth:`Outbox.requeue_overdue` puts a held message back in the queue when the fleet has
already receipted one PUBACKed ``grace_s`` later (the *watermark*: this one was lost), or
when no receipt came for ``timeout_s``, doubling per resend up to 16x (tail loss, fleet
down).  Requeued messages go out again in their original order.  :meth:`Outbox.forget_receipts`
turns holding off again when the fleet has stopped sending receipts.

Durability: ``synchronous=NORMAL`` by default.  In WAL mode that is crash-safe against a
killed *process* (every commit is in the WAL before ``put`` returns) and never corrupts
the file, and it skips an fsync per message, which on an SD card costs milliseconds each.
What it gives up: on *power loss* the last commits since the previous WAL sync may roll
back.  Pass ``synchronous="FULL"`` to fsync every commit when that matters more than
write rate (``docs/protocol.md`` has measured figures).

Bounded size: ``max_bytes`` caps the payload + topic bytes held.  When a new message does
not fit, the oldest messages of the least important class go first — samples
(priority 2), then reports (1); priority 0 (state and job status) is never evicted.  A
sample never evicts a report: it is dropped itself instead.  Dropped samples and other
dropped messages are counted in the file, so the count survives restarts and is reported
in telemetry.  Messages awaiting a receipt still count toward ``max_bytes``; when room is
needed they are evicted before unsent messages of their class (they most likely arrived).
"""

from __future__ import annotations

import collections
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.errors import QueueError
from core.protocol import PRIORITY_CONTROL, PRIORITY_SAMPLES

__all__ = ["Outbox", "OutboxMessage", "OutboxStats", "SendWindow", "DEFAULT_MAX_BYTES", "receipt_overdue"]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused, so id order is FIFO
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    sent REAL NULL,  -- v2: when the broker PUBACKed it; NULL = to send
    resends INTEGER NOT NULL DEFAULT 0  -- v2: times put back for want of a receipt
);
CREATE INDEX IF NOT EXISTS outbox_order ON outbox (priority, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('bytes', 0), ('dropped_samples', 0), ('dropped_messages', 0);
"""
# v1 -> v2 in place: the two columns (existing rows: unsent, never resent) ...
_MIGRATE_V1 = """
ALTER TABLE outbox ADD COLUMN sent REAL NULL;
ALTER TABLE outbox ADD COLUMN resends INTEGER NOT NULL DEFAULT 0;
"""
# ... and, for every version, the v2 indexes and counters.  Partial indexes keep the
# sender's read (unsent rows in order) and the once-a-second overdue scan (held rows) off
# each other's rows.  receipt_watermark_us: the newest `sent` the fleet has receipted
# (microseconds: the counters are integers); -1 = none yet.
_SCHEMA_V2 = """
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (priority, id) WHERE sent IS NULL;
CREATE INDEX IF NOT EXISTS outbox_held ON outbox (sent, resends) WHERE sent IS NOT NULL;
INSERT OR IGNORE INTO counters VALUES ('receipts_seen', 0), ('resent', 0), ('receipt_watermark_us', -1);
"""
_MAX_BACKOFF_EXP = 4  # a held message waits at most timeout_s * 2**4 before going out again


@dataclass(frozen=True)
class OutboxMessage:
    """One queued message; ``id`` is what :meth:`Outbox.ack` takes."""

    id: int
    topic: str
    payload: bytes
    priority: int
    qos: int
    retain: bool
    created: float


@dataclass(frozen=True)
class OutboxStats:
    """Queue depth and size now, and drops and resends since the file was created.

    ``depth`` and ``bytes`` include the messages awaiting the fleet's receipt
    (``awaiting_receipt`` of them); ``resent`` counts messages put back in the queue by
    :meth:`Outbox.requeue_overdue`, ever.
    """

    depth: int
    bytes: int
    max_bytes: int
    dropped_samples: int
    dropped_messages: int  # reports evicted to make room (never state / job status)
    depth_by_priority: dict[int, int] = field(default_factory=dict)
    awaiting_receipt: int = 0
    resent: int = 0


class Outbox:
    """Disk-backed priority queue of outgoing MQTT messages (thread-safe, one process).

    >>> box = Outbox(path, max_bytes=16 << 20)
    >>> box.put("edgeloop/v1/devices/d1/telemetry", b"{...}", priority=1)
    >>> batch = box.peek_batch(10); ...publish...; box.ack([m.id for m in batch])
    """

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
                 max_file_bytes: int | None = None) -> None:
        """Open (creating if needed) the queue at ``path``.

        ``max_file_bytes`` is a hard limit on the database file (SQLite's
        ``max_page_count``): past it a put fails like a full disk would, which protects a
        device whose outbox shares the root filesystem.
        """
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be 'NORMAL' or 'FULL'")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._put_event = threading.Event()
        self.puts = 0  # count of puts by this process: lets a reader see that the queue changed
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE) so none is left open
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            if max_file_bytes is not None:
                page = self._db.execute("PRAGMA page_size").fetchone()[0]
                self._db.execute(f"PRAGMA max_page_count={max(8, int(max_file_bytes) // page)}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, _SCHEMA_VERSION):
                raise QueueError(f"outbox {self.path} has schema version {version}, this agent knows {_SCHEMA_VERSION}",
                                 hint="upgrade the agent or move the file away", path=self.path)
            # One transaction: a migration interrupted by a power cut leaves the v1 file as it was.
            migrate = _MIGRATE_V1 if version == 1 else _SCHEMA
            self._db.executescript(f"BEGIN IMMEDIATE; {migrate} {_SCHEMA_V2} "
                                   f"PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;")
            self._receipts_seen = bool(self._counter("receipts_seen"))
            mark = self._counter("receipt_watermark_us")
            self._watermark: float | None = mark / 1e6 if mark >= 0 else None
        except sqlite3.Error as exc:
            raise self._error(exc, "open") from exc
        except OSError as exc:
            raise QueueError(f"cannot create outbox {self.path}: {exc}",
                             hint="point the agent's outbox at a writable directory", path=self.path) from exc

    # ------------------------------------------------------------------ writing

    def put(self, topic: str, payload: bytes, priority: int, qos: int = 1, *, retain: bool = False) -> int | None:
        """Queue a message durably; returns its id, or None when a sample was dropped for room.

        Raises :class:`QueueError` when the message alone is bigger than ``max_bytes``, when
        state/job messages fill the whole queue, or when the disk is full (stored messages
        are untouched in every case).
        """
        if not isinstance(priority, int) or not 0 <= priority <= 9:
            raise ValueError(f"priority must be an int 0..9, got {priority!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        payload = bytes(payload)
        size = len(payload) + len(topic.encode())
        if size > self.max_bytes:
            raise QueueError(f"a {size}-byte message for {topic} is larger than the outbox cap of {self.max_bytes} bytes",
                             hint="raise the outbox max_bytes or send smaller chunks", path=self.path)
        new_id: int | None = None
        with self._transaction("write to"):
            if self._make_room(size, priority):
                cur = self._db.execute(
                    "INSERT INTO outbox (priority, topic, payload, qos, retain, size, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", (priority, topic, payload, qos, int(retain), size, time.time()))
                new_id = cur.lastrowid
                self._bump("bytes", size)
            elif priority >= PRIORITY_SAMPLES:
                self._bump("dropped_samples", 1)
            else:
                raise QueueError(f"outbox {self.path} is full of state/job messages ({self.max_bytes} bytes)",
                                 hint="the broker has been unreachable for long; raise the outbox max_bytes",
                                 path=self.path)
            self.puts += 1
        self._put_event.set()
        return new_id

    def _make_room(self, size: int, priority: int) -> bool:
        """Evict oldest messages of the least important classes until ``size`` fits.

        Only classes at least as unimportant as the new message, and never priority 0, are
        candidates; within a class, messages awaiting a receipt go first (the broker has
        them, so they most likely reached the fleet).  Runs inside the caller's transaction,
        so a failed put evicts nothing.
        """
        need = self._counter("bytes") + size - self.max_bytes
        if need <= 0:
            return True
        lowest = self._db.execute("SELECT MAX(priority) FROM outbox").fetchone()[0] or 0
        victims: list[tuple[int, int, int]] = []
        for cls in range(lowest, max(priority, PRIORITY_CONTROL + 1) - 1, -1):
            for row in self._db.execute("SELECT id, size FROM outbox WHERE priority = ? "
                                        "ORDER BY sent IS NULL, id", (cls,)):
                victims.append((row[0], row[1], cls))
                need -= row[1]
                if need <= 0:
                    break
            if need <= 0:
                break
        if need > 0:
            return False  # not enough evictable bytes: evict nothing
        self._db.executemany("DELETE FROM outbox WHERE id = ?", [(v[0],) for v in victims])
        self._bump("bytes", -sum(v[1] for v in victims))
        samples = sum(1 for v in victims if v[2] >= PRIORITY_SAMPLES)
        self._bump("dropped_samples", samples)
        self._bump("dropped_messages", len(victims) - samples)
        return True

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered messages; unknown ids are ignored (acks may repeat). Returns the count removed."""
        return self._settle(ids, (), 0.0)

    def mark_sent(self, ids: Iterable[int], at: float) -> int:
        """The broker PUBACKed these messages at ``at`` (Unix time); keep them for the fleet's
        receipt, out of :meth:`peek_batch`'s sight.  Unknown ids are ignored; returns the count marked."""
        return self._settle((), ids, at)

    def _settle(self, delete: Iterable[int], hold: Iterable[int], at: float) -> int:
        """:meth:`ack` ``delete`` and :meth:`mark_sent` ``hold`` in one transaction (one commit
        per batch of deliveries, whatever their kinds); returns the rows deleted + marked."""
        delete, hold = list(delete), list(hold)
        if not delete and not hold:
            return 0
        freed = done = 0
        with self._transaction("acknowledge in"):
            for part, marks in _chunks(delete):
                row = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE id IN ({marks})",
                                       part).fetchone()
                done += row[0]
                freed += row[1]
                self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", part)
            self._bump("bytes", -freed)
            for part, marks in _chunks(hold):
                done += self._db.execute(f"UPDATE outbox SET sent = ? WHERE id IN ({marks})", (at, *part)).rowcount
        return done

    # ------------------------------------------------------------------ receipts

    @property
    def receipts_seen(self) -> bool:
        """Whether a fleet receipt ever reached this outbox (persistent): only then does the
        link hold messages after the PUBACK; before, nobody would ever release them."""
        return self._receipts_seen

    @property
    def watermark(self) -> float | None:
        """The newest ``sent`` time among the messages the fleet has receipted (persistent);
        None before the first such receipt.  :meth:`requeue_overdue` takes it."""
        return self._watermark

    def receipt(self, ids: Iterable[int]) -> int:
        """The fleet has committed these messages: delete them, and remember that receipts
        flow (:attr:`receipts_seen`) and the newest ``sent`` time among them
        (:attr:`watermark`).  Unknown ids are ignored (receipts may repeat or come late);
        returns the count removed.  Any receipt, even an empty one, sets ``receipts_seen``.
        """
        ids = list(ids)
        if not ids and self._receipts_seen:
            return 0
        removed = freed = 0
        newest_us = -1  # newest `sent` among them, in the counter's unit
        with self._transaction("apply a receipt to"):
            for part, marks in _chunks(ids):
                row = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0), MAX(sent) FROM outbox "
                                       f"WHERE id IN ({marks})", part).fetchone()
                removed += row[0]
                freed += row[1]
                if row[2] is not None:
                    newest_us = max(newest_us, int(row[2] * 1e6))
                self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", part)
            self._bump("bytes", -freed)
            seen = not self._receipts_seen
            if seen:
                self._db.execute("UPDATE counters SET value = 1 WHERE name = 'receipts_seen'")
            mark_us = -1 if self._watermark is None else int(self._watermark * 1e6)
            # A stored watermark ahead of the clock means the clock went back (a Pi without
            # RTC before NTP): start again from what this receipt says.
            advance = newest_us >= 0 and (newest_us > mark_us or mark_us > time.time() * 1e6)
            if advance:
                self._db.execute("UPDATE counters SET value = ? WHERE name = 'receipt_watermark_us'", (newest_us,))
        # memory follows only a committed transaction
        if seen:
            self._receipts_seen = True
        if advance:
            self._watermark = newest_us / 1e6
        return removed

    def requeue_overdue(self, now: float, *, watermark: float | None, grace_s: float, timeout_s: float) -> int:
        """Put held messages whose receipt is overdue back in the queue (``sent`` = NULL,
        ``resends`` + 1); returns how many.  Overdue means any of:

        - ``sent < watermark - grace_s``: the fleet has receipted a message PUBACKed
          ``grace_s`` later, so this one was lost (a broker restart without the fleet);
        - ``sent < now - timeout_s * 2**min(resends, 4)``: no receipt at all for that long
          (the last messages before a loss, or the fleet is down): back off per resend;
        - ``sent > now``: the clock went back; how long it has waited is unknown.

        A ``watermark`` ahead of ``now`` (the clock went back) is ignored.  Requeued
        messages keep their ids, so they go out again before newer ones of their priority.
        Costs one read when nothing is overdue.
        """
        if grace_s < 0 or timeout_s <= 0:
            raise ValueError("grace_s must be >= 0 and timeout_s > 0")
        cut = _watermark_cut(now, watermark, grace_s)
        where = (f"sent IS NOT NULL AND (sent < ? OR sent > ? "
                 f"OR sent < ? - ? * (1 << MIN(resends, {_MAX_BACKOFF_EXP})))")
        args = (cut, now, now, timeout_s)
        with self._lock:
            try:
                due = self._db.execute(f"SELECT EXISTS (SELECT 1 FROM outbox WHERE {where})", args).fetchone()[0]
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from exc
        if not due:
            return 0
        with self._transaction("requeue in"):
            n = self._db.execute(f"UPDATE outbox SET sent = NULL, resends = resends + 1 WHERE {where}", args).rowcount
            self._bump("resent", n)
            self.puts += 1  # like a put: a sender's read-ahead must look again
        self._put_event.set()
        return n

    def oldest_held(self) -> float | None:
        """The oldest ``sent`` time among messages awaiting a receipt; None when none is held."""
        with self._lock:
            try:
                return self._db.execute("SELECT MIN(sent) FROM outbox WHERE sent IS NOT NULL").fetchone()[0]
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from exc

    def forget_receipts(self) -> int:
        """The fleet has stopped sending receipts: clear :attr:`receipts_seen` (so messages
        are deleted on the PUBACK again, until the next receipt) and put every held message
        back in the queue, to go out once more; returns how many."""
        with self._transaction("reset receipts in"):
            n = self._db.execute("UPDATE outbox SET sent = NULL, resends = resends + 1 "
                                 "WHERE sent IS NOT NULL").rowcount
            self._bump("resent", n)
            self._db.execute("UPDATE counters SET value = 0 WHERE name = 'receipts_seen'")
            self.puts += 1
        self._receipts_seen = False
        self._put_event.set()
        return n

    # ------------------------------------------------------------------ reading

    def peek_batch(self, n: int, *, exclude: Iterable[int] = ()) -> list[OutboxMessage]:
        """The next ``n`` unsent messages in delivery order (priority, then FIFO), skipping
        ``exclude`` (the ids a sender already has in flight) and those awaiting a receipt.
        Nothing is removed."""
        skip = list(exclude)
        where = f"AND id NOT IN ({','.join('?' * len(skip))})" if skip else ""
        with self._lock:
            try:
                rows = self._db.execute(
                    f"SELECT id, topic, payload, priority, qos, retain, created FROM outbox WHERE sent IS NULL {where} "
                    "ORDER BY priority, id LIMIT ?", (*skip, n)).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from exc
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], r[4], bool(r[5]), r[6]) for r in rows]

    def stats(self) -> OutboxStats:
        """Depth, bytes held, messages awaiting a receipt, persistent drop and resend counters."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT priority, COUNT(*), COUNT(sent) FROM outbox GROUP BY priority").fetchall()
                counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from exc
        by_prio = {r[0]: r[1] for r in rows}
        return OutboxStats(depth=sum(by_prio.values()), bytes=counters["bytes"], max_bytes=self.max_bytes,
                           dropped_samples=counters["dropped_samples"],
                           dropped_messages=counters["dropped_messages"], depth_by_priority=by_prio,
                           awaiting_receipt=sum(r[2] for r in rows), resent=counters["resent"])

    def __len__(self) -> int:
        return self.stats().depth

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a ``put`` or :meth:`notify` (or ``timeout``); True if one came.

        For the one consumer (the sender thread): peek after this returns, never before,
        and no wake-up is lost.
        """
        fired = self._put_event.wait(timeout)
        self._put_event.clear()
        return fired

    def notify(self) -> None:
        """Wake :meth:`wait` (a sender uses it for its own events: PUBACK, reconnect, stop)."""
        self._put_event.set()

    def close(self) -> None:
        """Close the database; everything committed stays on disk."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[None]:
        """One write transaction under the lock; any failure rolls back, keeping stored messages."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc, doing) from exc

    def _counter(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])

    def _bump(self, name: str, delta: int) -> None:
        if delta:
            self._db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (delta, name))

    def _error(self, exc: sqlite3.Error, doing: str) -> QueueError:
        text = str(exc)
        if "full" in text:
            return QueueError(f"outbox {self.path}: cannot {doing} it, the disk (or its size limit) is full",
                              hint="free space on the device or lower the outbox max_bytes; queued messages are kept",
                              path=self.path)
        if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
            return QueueError(f"outbox {self.path} is corrupt: {text}",
                              hint="move the file away; the agent starts with an empty outbox", path=self.path)
        return QueueError(f"outbox {self.path}: cannot {doing} it: {text}", path=self.path)


def _chunks(ids: list[int]) -> Iterator[tuple[list[int], str]]:
    """``ids`` in parts under SQLite's bound-parameter limit, each with its ``?,?,...``."""
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        yield part, ",".join("?" * len(part))


def _watermark_cut(now: float, watermark: float | None, grace_s: float) -> float:
    """Held messages PUBACKed before this were evidently lost; a watermark ahead of the clock is ignored."""
    return watermark - grace_s if watermark is not None and watermark <= now else float("-inf")


def receipt_overdue(sent: float, resends: int, now: float, *, watermark: float | None, grace_s: float,
                    timeout_s: float) -> bool:
    """:meth:`Outbox.requeue_overdue`'s rule for one held message, for senders that keep
    held messages in memory (the fleet benchmark's simulated devices)."""
    return (sent < _watermark_cut(now, watermark, grace_s) or sent > now
            or sent < now - timeout_s * 2 ** min(resends, _MAX_BACKOFF_EXP))


class SendWindow:
    """A sender's view of the outbox: what it has read ahead, what is in flight, what is
    delivered but not yet written back.  Transport-neutral (the MQTT link keys it by paho mid).

    A message sent with ``receipt=True`` is marked sent on delivery (it waits for the
    fleet's receipt); any other is deleted.  Costs one SQLite read per ``2 * max_inflight``
    messages while draining a backlog (it re-reads early only when a put may have queued
    something more urgent) and one write per ``max_inflight // 2`` deliveries.  A crash
    loses at most the unflushed writes: those messages are sent again (at-least-once).
    Use from one thread.
    """

    def __init__(self, outbox: Outbox, max_inflight: int = 16) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.outbox = outbox
        self.max_inflight = max_inflight
        self.inflight: dict[int, int] = {}  # token (e.g. MQTT mid) -> outbox id
        self._receipt: set[int] = set()  # tokens whose message waits for a receipt once delivered
        self._ahead: collections.deque[OutboxMessage] = collections.deque()
        self._delivered: list[int] = []  # to delete
        self._held: list[int] = []  # to mark sent
        self._puts_seen = -1

    def next(self) -> OutboxMessage | None:
        """The next message to send, or None when the window is full or nothing is queued."""
        if len(self.inflight) >= self.max_inflight:
            return None
        if not self._ahead or self._puts_seen != self.outbox.puts:
            self._puts_seen = self.outbox.puts  # read before peeking: a later put forces a re-read
            skip = [*self.inflight.values(), *self._delivered, *self._held]
            self._ahead = collections.deque(self.outbox.peek_batch(2 * self.max_inflight, exclude=skip))
        return self._ahead.popleft() if self._ahead else None

    def unsend(self, msg: OutboxMessage) -> None:
        """Give back a message that could not be handed to the transport; it goes first next time."""
        self._ahead.appendleft(msg)

    def sent(self, token: int, msg: OutboxMessage, *, receipt: bool = False) -> None:
        """``msg`` is in flight under ``token``; ``receipt``: keep it after delivery until
        the fleet's receipt (:meth:`Outbox.mark_sent`) instead of deleting it."""
        self.inflight[token] = msg.id
        if receipt:
            self._receipt.add(token)
        else:
            self._receipt.discard(token)  # a reused token

    def delivered(self, token: int, *, failed: bool = False) -> int | None:
        """The transport confirmed ``token``; returns the outbox id (None for an unknown token).

        ``failed``: the broker refused the message (e.g. MQTT 5 "Not authorized"); it is
        deleted even if it wanted a receipt, since none will ever come and a retry would
        block the queue.
        """
        oid = self.inflight.pop(token, None)
        held = token in self._receipt
        self._receipt.discard(token)
        if oid is not None:
            (self._held if held and not failed else self._delivered).append(oid)
            if len(self._delivered) + len(self._held) >= max(1, self.max_inflight // 2) or not self.inflight:
                self.flush()
        return oid

    def flush(self) -> None:
        """Write the deliveries back now: delete, or mark sent (one transaction)."""
        if self._delivered or self._held:
            self.outbox._settle(self._delivered, self._held, time.time())
            self._delivered, self._held = [], []

    def reset(self) -> None:
        """Forget what is in flight (the transport lost it); it is read from the outbox again."""
        self.inflight.clear()
        self._receipt.clear()
        self._ahead.clear()
        self._puts_seen = -1

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing waiting to be written back."""
        return not self.inflight and not self._delivered and not self._held
