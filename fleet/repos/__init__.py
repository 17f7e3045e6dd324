"""The fleet database, one repository per aggregate, composed by :class:`fleet.registry.Registry`.

    registry.devices     devices.py      each device's latest state, tags, drift status
    registry.telemetry   telemetry.py    health reports (time series)
    registry.drift       drift.py        drift reports (time series, dashboard aggregates)
    registry.jobs        jobs.py         install / rollback steps devices report
    registry.samples     samples.py      uploaded drift samples
    registry.labels      labels.py       their true labels, feedback accuracy
    registry.models      models.py       signed model versions, lineage, verdicts
    registry.rollouts    rollouts.py     staged rollouts and their per-device targets
    registry.credentials credentials.py  MQTT users the fleet issued
    LogRepo.of(registry) logs.py         devices' recent log lines (remote logs), bounded per device

Every method is one short transaction returning frozen records (:mod:`.records`);
ingestion's batched writes are :meth:`fleet.registry.Registry.apply`.
"""

from __future__ import annotations

from .base import Page, Repository
from .credentials import CredentialRepo
from .devices import DeviceRepo
from .drift import DriftBucket, DriftRepo
from .jobs import JobRepo
from .labels import LabelRepo
from .logs import LogLineRecord, LogRepo
from .models import ModelRepo, file_sha256
from .rollouts import RolloutRepo
from .samples import SampleRepo
from .summary import fleet_status
from .telemetry import TelemetryRepo

__all__ = [
    "Page", "Repository", "CredentialRepo", "DeviceRepo", "DriftBucket", "DriftRepo", "JobRepo", "LabelRepo",
    "LogLineRecord", "LogRepo", "ModelRepo", "RolloutRepo", "SampleRepo", "TelemetryRepo", "file_sha256", "fleet_status",
]
