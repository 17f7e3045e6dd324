"""The outbox's end-to-end receipts (``docs/protocol.md``, "Receipts").

Once the fleet has ever sent a receipt (:attr:`ReceiptHolding.receipts_seen`,
persistent), the link keeps messages after the broker's PUBACK until the fleet's receipt
names them; :meth:`ReceiptHolding.requeue_overdue` puts overdue ones back in the queue.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from .outbox_store import OutboxStore, _chunks

__all__ = ["ReceiptHolding", "receipt_overdue"]

_MAX_BACKOFF_EXP = 4  # a held message waits at most timeout_s * 2**4 before going out again


class ReceiptHolding(OutboxStore):
    """The receipt side of :class:`edge_agent.outbox.Outbox`: held messages, the watermark."""

    def _after_open(self) -> None:
        self._receipts_seen = bool(self._counter("receipts_seen"))
        mark = self._counter("receipt_watermark_us")
        self._watermark: float | None = mark / 1e6 if mark >= 0 else None

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


def _watermark_cut(now: float, watermark: float | None, grace_s: float) -> float:
    """Held messages PUBACKed before this were evidently lost; a watermark ahead of the clock is ignored."""
    return watermark - grace_s if watermark is not None and watermark <= now else float("-inf")


def receipt_overdue(sent: float, resends: int, now: float, *, watermark: float | None, grace_s: float,
                    timeout_s: float) -> bool:
    """:meth:`Outbox.requeue_overdue`'s rule for one held message, for senders that keep
    held messages in memory (the fleet benchmark's simulated devices)."""
    return (sent < _watermark_cut(now, watermark, grace_s) or sent > now
            or sent < now - timeout_s * 2 ** min(resends, _MAX_BACKOFF_EXP))
