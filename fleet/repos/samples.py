"""Samples: the inputs devices uploaded as drift evidence, with their labels once known."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select

from ..models import SampleRow
from .base import Page, Repository
from .records import SampleRecord, to_record

__all__ = ["SampleRepo"]


def _filter(q: Any, device_ids: Sequence[str] | None, labelled: bool | None, since: float | None,
            model_version: str | None, label_source: str | None) -> Any:
    if device_ids is not None:
        q = q.where(SampleRow.device_id.in_(list(device_ids)))
    if labelled is not None:
        q = q.where(SampleRow.label.is_not(None) if labelled else SampleRow.label.is_(None))
    if since is not None:
        q = q.where(SampleRow.received >= since)
    if model_version is not None:
        q = q.where(SampleRow.model_version == model_version)
    if label_source is not None:
        q = q.where(SampleRow.label_source == label_source)
    return q


class SampleRepo(Repository):
    """``registry.samples``.  Calling it is :meth:`find`.  Writes go through ``Registry.apply``."""

    def get(self, sample_id: str) -> SampleRecord | None:
        with self._sessions() as s:
            row = s.get(SampleRow, sample_id)
            return to_record(SampleRecord, row) if row else None

    def find(self, *, device_ids: Sequence[str] | None = None, labelled: bool | None = None,
             since: float | None = None, model_version: str | None = None, label_source: str | None = None,
             limit: int | None = None, offset: int = 0) -> list[SampleRecord]:
        """Samples in arrival order, filtered; ``since`` compares the fleet's receive time."""
        q = _filter(select(SampleRow), device_ids, labelled, since, model_version, label_source)
        q = q.order_by(SampleRow.received, SampleRow.id).offset(offset)
        if limit is not None:
            q = q.limit(limit)
        with self._sessions() as s:
            return [to_record(SampleRecord, r) for r in s.scalars(q)]

    __call__ = find

    def newest(self, *, device_ids: Sequence[str], reasons: Sequence[str], limit: int) -> list[SampleRecord]:
        """The newest ``limit`` samples of ``device_ids`` captured for one of ``reasons``, newest first."""
        q = (_filter(select(SampleRow), device_ids, None, None, None, None)
             .where(SampleRow.reason.in_(list(reasons)))
             .order_by(SampleRow.received.desc(), SampleRow.id.desc()).limit(limit))
        with self._sessions() as s:
            return [to_record(SampleRecord, r) for r in s.scalars(q)]

    def count(self, *, device_ids: Sequence[str] | None = None, labelled: bool | None = None,
              since: float | None = None, model_version: str | None = None, label_source: str | None = None) -> int:
        q = _filter(select(func.count()).select_from(SampleRow), device_ids, labelled, since, model_version,
                    label_source)
        with self._sessions() as s:
            return int(s.scalar(q) or 0)

    def page_by_capture(self, *, page: int = 1, size: int = 50, device_id: str | None = None,
                        labelled: bool | None = None, since: float | None = None,
                        until: float | None = None) -> Page[SampleRecord]:
        """Newest captured first, filtered by device, label state and capture time (device clock)."""
        q = _filter(select(SampleRow), [device_id] if device_id else None, labelled, None, None, None)
        if since is not None:
            q = q.where(SampleRow.ts >= since)
        if until is not None:
            q = q.where(SampleRow.ts < until)
        with self._sessions() as s:
            total = int(s.scalar(select(func.count()).select_from(q.subquery())) or 0)
            n, pages = Page.bounds(total, page, size)
            rows = s.scalars(q.order_by(SampleRow.ts.desc(), SampleRow.id).offset((n - 1) * size).limit(size))
            return Page([to_record(SampleRecord, r) for r in rows], total, n, pages, size)

    def classes_seen(self, *, limit: int = 200) -> set[str]:
        """Distinct labels and predictions stored so far (label choices when no manifest names them)."""
        with self._sessions() as s:
            seen = {str(x) for x in s.scalars(select(SampleRow.label).where(SampleRow.label.is_not(None))
                                              .distinct().limit(limit))}
            seen |= {str(x) for x in s.scalars(select(SampleRow.prediction)
                                               .where(SampleRow.prediction.is_not(None)).distinct().limit(limit))}
        return seen
