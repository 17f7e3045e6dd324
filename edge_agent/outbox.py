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

The parts: this module (queueing, eviction, acks, reading), :mod:`edge_agent.outbox_receipts`
(holding for receipts), :mod:`edge_agent.outbox_store` (the SQLite file, schema, counters)
and :mod:`edge_agent.send_window` (a sender's window onto the queue).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from core.errors import QueueError
from core.protocol import PRIORITY_CONTROL, PRIORITY_SAMPLES

from .outbox_receipts import ReceiptHolding, receipt_overdue
from .outbox_store import DEFAULT_MAX_BYTES, OutboxMessage, _chunks
from .send_window import SendWindow

__all__ = ["Outbox", "OutboxMessage", "OutboxStats", "SendWindow", "DEFAULT_MAX_BYTES", "receipt_overdue"]


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


class Outbox(ReceiptHolding):
    """Disk-backed priority queue of outgoing MQTT messages (thread-safe, one process).

    >>> box = Outbox(path, max_bytes=16 << 20)
    >>> box.put("edgeloop/v1/devices/d1/telemetry", b"{...}", priority=1)
    >>> batch = box.peek_batch(10); ...publish...; box.ack([m.id for m in batch])
    """

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
