"""Devices' recent log lines (remote logs): the latest ``keep`` lines per device, oldest pruned.

Lines arrive in :class:`~core.protocol.LogLines` answers to the fleet's
:class:`~core.protocol.LogsRequest` (:mod:`fleet.remote_logs`).  A line is identified by
``(device, boot, seq)`` (``boot``: one agent process), so a re-sent answer, or the same
answer stored by ``fleet serve`` and by ``fleet logs`` both, is stored once.

The table is declared here, on the registry's declarative base, so ``create_schema``
makes it with the others on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Index, Integer, String, Text, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from core.protocol import LOG_LEVELS, LogLines

from ..models import Base
from .base import Repository

__all__ = ["LogRepo", "LogLineRecord", "LogLineRow", "DEFAULT_KEEP"]

DEFAULT_KEEP = 1000  # lines kept per device


class LogLineRow(Base):
    __tablename__ = "device_log_lines"
    __table_args__ = (Index("uq_device_log_lines_device_boot_seq", "device_id", "boot", "seq", unique=True),
                      Index("ix_device_log_lines_device_id", "device_id", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    boot: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer)
    ts: Mapped[float] = mapped_column(Float)  # device clock
    received: Mapped[float] = mapped_column(Float)  # fleet clock
    level: Mapped[str] = mapped_column(String(8))
    logger: Mapped[str] = mapped_column(String(100))
    msg: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class LogLineRecord:
    """One stored line; ``level`` is one of :data:`core.protocol.LOG_LEVELS`."""

    device_id: str
    boot: str
    seq: int
    ts: float
    received: float
    level: str
    logger: str
    msg: str

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "boot": self.boot, "seq": self.seq, "ts": self.ts,
                "received": self.received, "level": self.level, "logger": self.logger, "msg": self.msg}


_COLUMNS = ("device_id", "boot", "seq", "ts", "received", "level", "logger", "msg")


class LogRepo(Repository):
    """``LogRepo.of(registry)``.  Calling it is :meth:`find`."""

    def __init__(self, sessions: sessionmaker[Session], *, keep: int = DEFAULT_KEEP) -> None:
        super().__init__(sessions)
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep

    @classmethod
    def of(cls, registry: Any, *, keep: int = DEFAULT_KEEP) -> LogRepo:
        """The log lines of ``registry``'s database (a :class:`fleet.registry.Registry`)."""
        from ..db import make_sessionmaker

        return cls(make_sessionmaker(registry.engine), keep=keep)

    def add(self, msg: LogLines, *, received: float | None = None) -> int:
        """Store the lines of one answer (new ones only) and prune the device to ``keep``; how many were new."""
        if not msg.lines:
            return 0
        from .._ingest_sql import _dialect_insert

        now = time.time() if received is None else received
        rows = [{"device_id": msg.device_id, "boot": msg.boot, "seq": ln["seq"], "ts": float(ln["ts"]),
                 "received": now, "level": ln["level"], "logger": ln["logger"], "msg": ln["msg"]}
                for ln in msg.lines]
        t = LogLineRow.__table__
        with self._sessions.begin() as s:
            # Lines this boot already had pruned would come back as the newest: a re-sent answer.
            floor = s.scalar(select(func.min(LogLineRow.seq)).where(LogLineRow.device_id == msg.device_id,
                                                                    LogLineRow.boot == msg.boot))
            if floor is not None:
                rows = [r for r in rows if r["seq"] >= floor]
            if not rows:
                return 0
            before = self._count(s, msg.device_id)
            stmt = _dialect_insert(s)(t).on_conflict_do_nothing(index_elements=["device_id", "boot", "seq"])
            s.connection().execute(stmt, rows)
            after = self._count(s, msg.device_id)
            if after > self.keep:
                self._prune(s, msg.device_id)
        return after - before

    @staticmethod
    def _count(s: Session, device_id: str) -> int:
        return int(s.scalar(select(func.count()).select_from(LogLineRow).where(LogLineRow.device_id == device_id))
                   or 0)

    def _prune(self, s: Session, device_id: str) -> None:
        """Delete all but the newest ``keep`` lines of ``device_id`` (newest by arrival, then seq)."""
        cutoff = s.scalar(select(LogLineRow.id).where(LogLineRow.device_id == device_id)
                          .order_by(LogLineRow.id.desc()).offset(self.keep - 1).limit(1))
        if cutoff is not None:
            s.execute(delete(LogLineRow).where(LogLineRow.device_id == device_id, LogLineRow.id < cutoff))

    def find(self, device_id: str, *, lines: int = 200, min_level: str = "DEBUG") -> list[LogLineRecord]:
        """The newest ``lines`` lines of ``device_id`` at ``min_level`` or above, oldest first."""
        levels = _levels_from(min_level)
        q = (select(LogLineRow).where(LogLineRow.device_id == device_id, LogLineRow.level.in_(levels))
             .order_by(LogLineRow.id.desc()).limit(max(0, lines)))
        with self._sessions() as s:
            rows = list(s.scalars(q))
        rows.reverse()
        return [LogLineRecord(**{c: getattr(r, c) for c in _COLUMNS}) for r in rows]

    __call__ = find

    def last(self, device_id: str) -> tuple[str, int] | None:
        """``(boot, seq)`` of the newest stored line of ``device_id`` (what the next request asks after)."""
        with self._sessions() as s:
            row = s.execute(select(LogLineRow.boot, LogLineRow.seq).where(LogLineRow.device_id == device_id)
                            .order_by(LogLineRow.id.desc()).limit(1)).first()
        return (str(row.boot), int(row.seq)) if row is not None else None

    def count(self, device_ids: Sequence[str] | None = None) -> int:
        q = select(func.count()).select_from(LogLineRow)
        if device_ids is not None:
            q = q.where(LogLineRow.device_id.in_(list(device_ids)))
        with self._sessions() as s:
            return int(s.scalar(q) or 0)


def _levels_from(min_level: str) -> list[str]:
    """The level names at ``min_level`` or above."""
    if min_level not in LOG_LEVELS:
        from core.errors import ConfigError

        raise ConfigError(f"unknown log level {min_level!r}", hint=f"one of {', '.join(LOG_LEVELS)}")
    return list(LOG_LEVELS[LOG_LEVELS.index(min_level):])
