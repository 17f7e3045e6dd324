"""Devices: the fleet's view of each device (its latest state, telemetry and drift status)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, func, or_, select

from ..models import Device
from .base import Page, Repository
from .records import DeviceRecord, to_record

__all__ = ["DeviceRepo"]


class DeviceRepo(Repository):
    """``registry.devices``.  Calling it lists devices (``registry.devices(online=True)``)."""

    def get(self, device_id: str) -> DeviceRecord | None:
        with self._sessions() as s:
            row = s.get(Device, device_id)
            return to_record(DeviceRecord, row) if row else None

    def find(self, *, online: bool | None = None, model_version: str | None = None,
             alarm: bool | None = None) -> list[DeviceRecord]:
        q = select(Device).where(*self._filters(online=online, alarm=alarm)).order_by(Device.id)
        if model_version is not None:
            q = q.where(Device.model_version == model_version)
        with self._sessions() as s:
            return [to_record(DeviceRecord, r) for r in s.scalars(q)]

    __call__ = find

    def by_ids(self, device_ids: Sequence[str]) -> dict[str, DeviceRecord]:
        """The records of these devices (unknown ids are left out), in one query."""
        if not device_ids:
            return {}
        with self._sessions() as s:
            rows = s.scalars(select(Device).where(Device.id.in_(list(device_ids))))
            return {r.id: to_record(DeviceRecord, r) for r in rows}

    def alarming(self, *, min_duration_s: float = 0.0, now: float | None = None) -> list[DeviceRecord]:
        """Devices whose drift alarm has been on for at least ``min_duration_s``."""
        t = now if now is not None else time.time()
        q = select(Device).where(Device.drift_alarm.is_(True), Device.alarm_since <= t - min_duration_s)
        with self._sessions() as s:
            return [to_record(DeviceRecord, r) for r in s.scalars(q.order_by(Device.id))]

    def page(self, *, page: int = 1, size: int = 50, q: str | None = None, online: bool | None = None,
             alarm: bool | None = None) -> Page[DeviceRecord]:
        """One page of devices by id (SQL LIMIT/OFFSET); ``q`` matches a substring of the id or version."""
        conds = self._filters(online=online, alarm=alarm)
        if q:
            conds.append(or_(Device.id.contains(q), Device.model_version.contains(q)))
        with self._sessions() as s:
            total = int(s.scalar(select(func.count()).select_from(Device).where(*conds)) or 0)
            n, pages = Page.bounds(total, page, size)
            rows = s.scalars(select(Device).where(*conds).order_by(Device.id).offset((n - 1) * size).limit(size))
            return Page([to_record(DeviceRecord, r) for r in rows], total, n, pages, size)

    def most_common_model_name(self) -> str | None:
        """The model name most devices report (the fleet's served model when fleet.toml names none)."""
        with self._sessions() as s:
            row = s.execute(select(Device.model_name, func.count()).where(Device.model_name.is_not(None))
                            .group_by(Device.model_name).order_by(func.count().desc(), Device.model_name)
                            .limit(1)).first()
        return str(row[0]) if row else None

    def upsert(self, device_id: str, *, tags: Mapping[str, Any] | None = None,
               ts: float | None = None) -> DeviceRecord:
        """Create a device the fleet knows of before it connects (provisioning), or merge in its tags."""
        t = ts or time.time()
        with self._sessions.begin() as s:
            row = s.get(Device, device_id)
            if row is None:
                row = Device(id=device_id, first_seen=t, last_seen=t, online=False, variants=[], hardware={},
                             variant_latency_ms={}, delivery=[], tags=dict(tags or {}))
                s.add(row)
            elif tags is not None:
                row.tags = {**(row.tags or {}), **tags}
            s.flush()
            return to_record(DeviceRecord, row)

    def delete(self, device_ids: Sequence[str]) -> int:
        """Forget these devices (their time series stay); returns how many there were."""
        with self._sessions.begin() as s:
            return int(s.execute(delete(Device).where(Device.id.in_(list(device_ids)))).rowcount or 0)

    @staticmethod
    def _filters(*, online: bool | None, alarm: bool | None) -> list[Any]:
        conds: list[Any] = []
        if online is not None:
            conds.append(Device.online.is_(online))
        if alarm is not None:
            conds.append(Device.drift_alarm.is_(alarm))
        return conds
