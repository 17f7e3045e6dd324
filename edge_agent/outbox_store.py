"""The outbox's SQLite file: schema and its migration, transactions, counters, errors.

:class:`OutboxStore` is the base of :class:`edge_agent.outbox.Outbox`; it owns the
connection, the lock that serialises every use of it, and the put/notify event the
sender thread waits on.  See :mod:`edge_agent.outbox` for the queue's semantics.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from core.errors import QueueError

__all__ = ["OutboxStore", "OutboxMessage", "DEFAULT_MAX_BYTES"]

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


class OutboxStore:
    """One outbox file: the open connection, its lock, transactions and counters."""

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
            self._after_open()
        except sqlite3.Error as exc:
            raise self._error(exc, "open") from exc
        except OSError as exc:
            raise QueueError(f"cannot create outbox {self.path}: {exc}",
                             hint="point the agent's outbox at a writable directory", path=self.path) from exc

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


    def _after_open(self) -> None:
        """Read what a subclass keeps in memory from the counters (called inside ``__init__``)."""


def _chunks(ids: list[int]) -> Iterator[tuple[list[int], str]]:
    """``ids`` in parts under SQLite's bound-parameter limit, each with its ``?,?,...``."""
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        yield part, ",".join("?" * len(part))
