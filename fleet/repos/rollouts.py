"""Rollouts: each staged rollout's persisted state machine, and one target row per device."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import and_, select, update

from core.errors import RolloutError

from ..models import RolloutRow, RolloutTargetRow
from .base import Repository
from .records import ROLLOUT_STATUSES, TARGET_STATUSES, RolloutRecord, RolloutTarget, to_record

__all__ = ["RolloutRepo"]


def _check_status(status: str) -> None:
    if status not in ROLLOUT_STATUSES:
        raise RolloutError(f"unknown rollout status {status!r}", hint=f"one of {', '.join(ROLLOUT_STATUSES)}")


class RolloutRepo(Repository):
    """``registry.rollouts``.  Calling it is :meth:`find`."""

    def create(self, rollout_id: str, model_name: str, version: str, targets: Mapping[str, int], *,
               state: Mapping[str, Any] | None = None, status: str = "pending",
               reason: str | None = None) -> RolloutRecord:
        """Create a rollout with its per-device targets (``device id -> wave index``); ``reason``
        says why it is in ``status`` (``scheduled for ...``)."""
        _check_status(status)
        t = time.time()
        with self._sessions.begin() as s:
            if s.get(RolloutRow, rollout_id) is not None:
                raise RolloutError(f"rollout {rollout_id} already exists", rollout=rollout_id)
            row = RolloutRow(id=rollout_id, model_name=model_name, version=version, status=status, reason=reason,
                             created=t, updated=t, state=dict(state or {}))
            s.add(row)
            s.flush()
            s.add_all(RolloutTargetRow(rollout_id=rollout_id, device_id=d, wave=int(w), status="pending",
                                       detail="", updated=t) for d, w in targets.items())
            return to_record(RolloutRecord, row)

    def get(self, rollout_id: str) -> RolloutRecord | None:
        with self._sessions() as s:
            row = s.get(RolloutRow, rollout_id)
            return to_record(RolloutRecord, row) if row else None

    def find(self, *, statuses: Sequence[str] | None = None) -> list[RolloutRecord]:
        """Rollouts, oldest first; ``statuses=ACTIVE_ROLLOUT_STATUSES`` for those to resume."""
        q = select(RolloutRow).order_by(RolloutRow.created, RolloutRow.id)
        if statuses is not None:
            q = q.where(RolloutRow.status.in_(list(statuses)))
        with self._sessions() as s:
            return [to_record(RolloutRecord, r) for r in s.scalars(q)]

    __call__ = find

    def ids(self, *, statuses: Sequence[str] | None = None) -> list[str]:
        """Ids of rollouts, oldest first, without loading their (large) states."""
        q = select(RolloutRow.id).order_by(RolloutRow.created, RolloutRow.id)
        if statuses is not None:
            q = q.where(RolloutRow.status.in_(list(statuses)))
        with self._sessions() as s:
            return list(s.scalars(q))

    def replace_state(self, rollout_id: str, *, status: str, reason: str | None, state: Mapping[str, Any]) -> None:
        """Overwrite a rollout's status, reason and state in one UPDATE (the rollout driver's
        every tick: loading the old state first only to replace it cost a JSON parse of
        every device's progress)."""
        _check_status(status)
        values: dict[str, Any] = {"status": status, "state": dict(state), "updated": time.time()}
        if reason is not None:
            values["reason"] = reason
        with self._sessions.begin() as s:
            done = s.execute(update(RolloutRow).where(RolloutRow.id == rollout_id).values(**values)).rowcount
        if not done:
            raise RolloutError(f"no rollout {rollout_id}", rollout=rollout_id)

    def update(self, rollout_id: str, *, status: str | None = None, reason: str | None = None,
               state: Mapping[str, Any] | None = None, merge_state: bool = True) -> RolloutRecord:
        """Change a rollout's status / reason / state (merged into the stored dict unless ``merge_state=False``)."""
        if status is not None:
            _check_status(status)
        with self._sessions.begin() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise RolloutError(f"no rollout {rollout_id}", rollout=rollout_id)
            if status is not None:
                row.status = status
            if reason is not None:
                row.reason = reason
            if state is not None:
                row.state = {**(row.state or {}), **state} if merge_state else dict(state)
            row.updated = time.time()
            s.flush()
            return to_record(RolloutRecord, row)

    def targets(self, rollout_id: str, *, wave: int | None = None,
                statuses: Sequence[str] | None = None) -> list[RolloutTarget]:
        q = select(RolloutTargetRow).where(RolloutTargetRow.rollout_id == rollout_id)
        if wave is not None:
            q = q.where(RolloutTargetRow.wave == wave)
        if statuses is not None:
            q = q.where(RolloutTargetRow.status.in_(list(statuses)))
        with self._sessions() as s:
            rows = s.scalars(q.order_by(RolloutTargetRow.wave, RolloutTargetRow.device_id))
            return [to_record(RolloutTarget, r) for r in rows]

    def target_counts(self, rollout_id: str) -> dict[str, int]:
        """``target status -> devices`` of one rollout."""
        counts: dict[str, int] = {}
        for t in self.targets(rollout_id):
            counts[t.status] = counts.get(t.status, 0) + 1
        return counts

    def update_targets(self, rollout_id: str, device_ids: Sequence[str], *, status: str,
                       job_id: str | None = None, previous_version: str | None = None,
                       detail: str | None = None, job_ids: Mapping[str, str] | None = None) -> int:
        """Set the status (and job id / previous version / detail) of several targets at once."""
        if status not in TARGET_STATUSES:
            raise RolloutError(f"unknown target status {status!r}", hint=f"one of {', '.join(TARGET_STATUSES)}")
        values: dict[str, Any] = {"status": status, "updated": time.time()}
        if previous_version is not None:
            values["previous_version"] = previous_version
        if detail is not None:
            values["detail"] = detail
        n = 0
        with self._sessions.begin() as s:
            for d in device_ids:
                jid = (job_ids or {}).get(d, job_id)
                extra = {"job_id": jid} if jid is not None else {}
                res = s.execute(update(RolloutTargetRow).where(and_(RolloutTargetRow.rollout_id == rollout_id,
                                                                    RolloutTargetRow.device_id == d))
                                .values(**values, **extra))
                n += res.rowcount or 0  # type: ignore[attr-defined]
        return n

    def target_for_job(self, job_id: str) -> RolloutTarget | None:
        with self._sessions() as s:
            row = s.scalar(select(RolloutTargetRow).where(RolloutTargetRow.job_id == job_id))
            return to_record(RolloutTarget, row) if row else None
