"""Job statuses: the steps devices report while installing or rolling back a model version."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select

from ..models import JobRow
from .base import Repository
from .records import JobRecord, to_record

__all__ = ["JobRepo"]


class JobRepo(Repository):
    """``registry.jobs``."""

    def find(self, *, job_id: str | None = None, job_ids: Sequence[str] | None = None,
             device_id: str | None = None, since: float | None = None) -> list[JobRecord]:
        """Job steps in arrival order, filtered by job, device and receive time."""
        q = select(JobRow)
        ids = [job_id] if job_id else job_ids
        if ids is not None:
            q = q.where(JobRow.job_id.in_(list(ids)))
        if device_id:
            q = q.where(JobRow.device_id == device_id)
        if since is not None:
            q = q.where(JobRow.received >= since)
        with self._sessions() as s:
            return [to_record(JobRecord, r) for r in s.scalars(q.order_by(JobRow.id))]

    def latest_steps(self, job_ids: Sequence[str]) -> dict[tuple[str, str], JobRecord]:
        """``(job_id, device_id) -> latest JobRecord`` (by arrival) for each job."""
        if not job_ids:
            return {}
        # Only the newest row per (job, device), chosen in SQL: the rollout driver asks this
        # every tick for every open job, and each job has ~10 step rows.
        newest = (select(func.max(JobRow.id)).where(JobRow.job_id.in_(list(job_ids)))
                  .group_by(JobRow.job_id, JobRow.device_id))
        with self._sessions() as s:
            rows = s.scalars(select(JobRow).where(JobRow.id.in_(newest)))
            return {(r.job_id, r.device_id): to_record(JobRecord, r) for r in rows}
