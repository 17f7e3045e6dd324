"""Drift reports: each device's windowed drift scores and alarms, as a time series.

Besides the plain range query it answers the dashboard's aggregates in SQL (one row
per device and time bucket), so a drift chart costs the same with 10 or 10,000 devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Integer, case, cast, delete, func, select

from ..models import DriftRow
from .base import Page, Repository
from .records import DriftRecord, to_record

__all__ = ["DriftRepo", "DriftBucket"]


@dataclass(frozen=True)
class DriftBucket:
    """One device's reports in one time bucket: their mean risk and how many were alarms."""

    device_id: str
    bucket: int
    mean_risk: float
    n: int
    alarms: int


class DriftRepo(Repository):
    """``registry.drift``.  Calling it is :meth:`find`."""

    def find(self, *, device_id: str | None = None, device_ids: Sequence[str] | None = None,
             since: float | None = None, until: float | None = None, limit: int | None = None) -> list[DriftRecord]:
        """Drift reports in time order (the last ``limit`` when given)."""
        ids = [device_id] if device_id else device_ids
        return self._series(DriftRow, DriftRecord, ids, since, until, limit)

    __call__ = find

    def first_ts(self) -> float | None:
        """Device time of the oldest report."""
        with self._sessions() as s:
            found = s.scalar(select(func.min(DriftRow.ts)))
        return float(found) if found is not None else None

    def buckets(self, since: float, width: float) -> list[DriftBucket]:
        """Reports from ``since`` on, aggregated per device per ``width``-second bucket (0 is the first)."""
        offset = (DriftRow.ts - since) / width
        with self._sessions() as s:
            # SQLite's CAST truncates (offset >= 0 here) and many SQLite builds lack floor();
            # PostgreSQL's CAST rounds, so there the bucket is floor()ed first.
            if s.get_bind().dialect.name == "sqlite":
                bucket = cast(offset, Integer)
            else:
                bucket = cast(func.floor(offset), Integer)
            q = (select(DriftRow.device_id, bucket, func.avg(DriftRow.risk), func.count(),
                        func.sum(case((DriftRow.alarm.is_(True), 1), else_=0)))
                 .where(DriftRow.ts >= since).group_by(DriftRow.device_id, bucket))
            return [DriftBucket(str(d), int(b), float(mean), int(n), int(a or 0)) for d, b, mean, n, a in s.execute(q)]

    def alarms_page(self, since: float, *, page: int = 1, size: int = 50) -> Page[DriftRecord]:
        """Alarmed reports from ``since`` on, newest first."""
        conds = (DriftRow.alarm.is_(True), DriftRow.ts >= since)
        with self._sessions() as s:
            total = int(s.scalar(select(func.count()).select_from(DriftRow).where(*conds)) or 0)
            n, pages = Page.bounds(total, page, size)
            rows = s.scalars(select(DriftRow).where(*conds).order_by(DriftRow.ts.desc(), DriftRow.id.desc())
                             .offset((n - 1) * size).limit(size))
            return Page([to_record(DriftRecord, r) for r in rows], total, n, pages, size)

    def count(self, *, device_prefix: str | None = None) -> int:
        """How many reports are stored (of devices whose id starts with ``device_prefix``)."""
        q = select(func.count()).select_from(DriftRow)
        if device_prefix is not None:
            q = q.where(DriftRow.device_id.startswith(device_prefix, autoescape=True))
        with self._sessions() as s:
            return int(s.scalar(q) or 0)

    def identities(self) -> set[tuple[str, int]]:
        """``(device_id, seq)`` of every stored report (what a loss check compares with what was sent)."""
        with self._sessions() as s:
            return {(str(d), int(q)) for d, q in s.execute(select(DriftRow.device_id, DriftRow.seq))}

    def delete(self, device_ids: Sequence[str]) -> int:
        """Delete these devices' reports; returns how many."""
        with self._sessions.begin() as s:
            return int(s.execute(delete(DriftRow).where(DriftRow.device_id.in_(list(device_ids)))).rowcount or 0)
