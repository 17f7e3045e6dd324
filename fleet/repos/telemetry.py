"""Telemetry: each device's periodic health report (latency, throughput, errors), as a time series."""

from __future__ import annotations

from collections.abc import Sequence

from ..models import TelemetryRow
from .base import Repository
from .records import TelemetryRecord

__all__ = ["TelemetryRepo"]


class TelemetryRepo(Repository):
    """``registry.telemetry``.  Calling it is :meth:`find`."""

    def find(self, *, device_ids: Sequence[str] | None = None, since: float | None = None,
             until: float | None = None, limit: int | None = None) -> list[TelemetryRecord]:
        """Telemetry in time order (the last ``limit`` when given); ``since``/``until`` compare device time."""
        return self._series(TelemetryRow, TelemetryRecord, device_ids, since, until, limit)

    __call__ = find
