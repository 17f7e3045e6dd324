"""The fleet in numbers: what ``edgeloop fleet status`` and ``GET /api/status`` report."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ..models import Device, DriftRow, ModelVersionRow, RolloutRow, SampleRow
from .records import ACTIVE_ROLLOUT_STATUSES, FleetStatus

__all__ = ["fleet_status"]


def fleet_status(sessions: sessionmaker[Session]) -> FleetStatus:
    """Counts of devices (online, alarming, per version), reports, samples, models and active rollouts."""
    with sessions() as s:
        def count(q: Any) -> int:
            return int(s.scalar(q) or 0)

        devices = count(select(func.count()).select_from(Device))
        online = count(select(func.count()).select_from(Device).where(Device.online.is_(True)))
        alarming = count(select(func.count()).select_from(Device).where(Device.drift_alarm.is_(True)))
        versions = {str(v) if v is not None else "unknown": int(c) for v, c in s.execute(
            select(Device.model_version, func.count()).group_by(Device.model_version))}
        drift = count(select(func.count()).select_from(DriftRow))
        samples = count(select(func.count()).select_from(SampleRow))
        labelled = count(select(func.count()).select_from(SampleRow).where(SampleRow.label.is_not(None)))
        models = count(select(func.count()).select_from(ModelVersionRow))
        active = count(select(func.count()).select_from(RolloutRow)
                       .where(RolloutRow.status.in_(ACTIVE_ROLLOUT_STATUSES)))
    return FleetStatus(devices=devices, online=online, offline=devices - online, alarming=alarming,
                       versions=versions, drift_reports=drift, samples=samples, labelled_samples=labelled,
                       models=models, active_rollouts=active, ts=time.time())
