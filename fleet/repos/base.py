"""What every repository shares: a session factory, and the time-series range query."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .records import to_record

__all__ = ["Repository", "Page"]

R = TypeVar("R")


class Repository:
    """One aggregate's queries over the fleet database; each call is one short transaction."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def _series(self, table: Any, cls: type[R], device_ids: Sequence[str] | None, since: float | None,
                until: float | None, limit: int | None) -> list[R]:
        """Rows of a time-series ``table`` in ``ts`` order (the last ``limit`` when given)."""
        q = select(table)
        if device_ids is not None:
            q = q.where(table.device_id.in_(list(device_ids)))
        if since is not None:
            q = q.where(table.ts >= since)
        if until is not None:
            q = q.where(table.ts < until)
        with self._sessions() as s:
            if limit is not None:
                rows = list(s.scalars(q.order_by(table.ts.desc(), table.id.desc()).limit(limit)))
                rows.reverse()
            else:
                rows = list(s.scalars(q.order_by(table.ts, table.id)))
            return [to_record(cls, r) for r in rows]


@dataclass(frozen=True)
class Page(Generic[R]):
    """One page of a filtered listing: ``page`` is clamped to ``1..pages``; ``total`` counts every page."""

    items: list[R]
    total: int
    page: int
    pages: int
    size: int

    @staticmethod
    def bounds(total: int, page: int, size: int) -> tuple[int, int]:
        """``(page, pages)``: the requested page clamped to the pages ``total`` rows make."""
        pages = max(1, -(-total // size))
        return min(max(1, page), pages), pages
