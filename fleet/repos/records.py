"""The registry's records: frozen dataclasses copied out of the database, safe across threads.

Every repository in :mod:`fleet.repos` returns these, never ORM objects or sessions.
:class:`IngestBatch` is what ingestion hands :meth:`fleet.registry.Registry.apply`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from core.protocol import DeviceState, DriftReportMsg, Feedback, JobStatus, Telemetry

__all__ = [
    "MODEL_STATUSES", "ROLLOUT_STATUSES", "ACTIVE_ROLLOUT_STATUSES", "TARGET_STATUSES",
    "DeviceRecord", "TelemetryRecord", "DriftRecord", "SampleRecord", "JobRecord", "ModelVersion",
    "RolloutRecord", "RolloutTarget", "CredentialRecord", "FleetStatus", "IngestBatch", "to_record",
]

MODEL_STATUSES = ("candidate", "accepted", "rejected")
ROLLOUT_STATUSES = ("scheduled", "pending", "running", "paused", "halted", "rolled_back", "completed", "aborted")
ACTIVE_ROLLOUT_STATUSES = ("scheduled", "pending", "running", "paused")
TARGET_STATUSES = ("pending", "sent", "updating", "updated", "failed", "rolling_back", "rolled_back", "skipped")


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class DeviceRecord:
    id: str
    first_seen: float
    last_seen: float
    online: bool
    state_ts: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    previous_version: str | None = None
    variant: str | None = None
    variants: list[Any] = field(default_factory=list)
    variant_latency_ms: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    agent_version: str | None = None
    delivery: list[Any] = field(default_factory=list)
    telemetry: dict[str, Any] | None = None
    telemetry_ts: float | None = None
    drift_alarm: bool = False
    drift_risk: float | None = None
    drift_ts: float | None = None
    alarm_since: float | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    state_seen: float | None = None  # fleet clock: when its latest state message (a birth) arrived


@dataclass(frozen=True)
class TelemetryRecord:
    id: int
    device_id: str
    ts: float
    received: float
    seq: int
    model_version: str | None
    inferences: int
    inferences_interval: int
    errors: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    mean_confidence: float | None
    drift_alarm: bool
    data: dict[str, Any]


@dataclass(frozen=True)
class DriftRecord:
    id: int
    device_id: str
    ts: float
    received: float
    seq: int
    window: int
    n: int
    model_version: str | None
    risk: float
    alarm: bool
    input_shift: bool
    mean_confidence: float | None
    scores: dict[str, Any]
    thresholds: dict[str, Any]
    flags: dict[str, Any]
    class_counts: list[Any]


@dataclass(frozen=True)
class SampleRecord:
    """One stored drift sample; ``path`` is relative to the sample store's root."""

    id: str
    device_id: str
    ts: float
    path: str
    size: int
    received: float = 0.0
    model_version: str | None = None
    prediction: str | None = None
    confidence: float | None = None
    reason: str | None = None
    label: str | None = None
    label_source: str | None = None
    label_confidence: float | None = None
    labelled_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobRecord:
    id: int
    device_id: str
    job_id: str
    version: str
    step: str
    ok: bool
    detail: str
    progress: float | None
    previous_version: str | None
    ts: float
    received: float


@dataclass(frozen=True)
class ModelVersion:
    id: int
    name: str
    version: str
    parent_version: str | None
    bundle_path: str | None
    sha256: str | None
    size: int | None
    signed_by: str | None
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    status: str
    reason: str | None
    created: float


@dataclass(frozen=True)
class RolloutRecord:
    id: str
    model_name: str
    version: str
    status: str
    reason: str | None
    created: float
    updated: float
    state: dict[str, Any]


@dataclass(frozen=True)
class RolloutTarget:
    rollout_id: str
    device_id: str
    wave: int
    status: str
    job_id: str | None
    previous_version: str | None
    detail: str
    updated: float


@dataclass(frozen=True)
class CredentialRecord:
    """An MQTT user the fleet issued (the password's hash only)."""

    username: str
    role: str  # "device" | "fleet"
    password_hash: str
    created: float


@dataclass(frozen=True)
class FleetStatus:
    devices: int
    online: int
    offline: int
    alarming: int
    versions: dict[str, int]
    drift_reports: int
    samples: int
    labelled_samples: int
    models: int
    active_rollouts: int
    ts: float


@dataclass
class IngestBatch:
    """Everything ingestion decoded since the last flush, written in one transaction.

    Messages are kept in arrival order per kind; ``received`` is the fleet's clock
    (device clocks drift, so "last seen" is measured here).
    """

    states: list[tuple[DeviceState, float]] = field(default_factory=list)
    telemetry: list[tuple[Telemetry, float]] = field(default_factory=list)
    drift: list[tuple[DriftReportMsg, float]] = field(default_factory=list)
    jobs: list[tuple[JobStatus, float]] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # device id -> last receive time

    def __len__(self) -> int:
        return (len(self.states) + len(self.telemetry) + len(self.drift) + len(self.jobs) + len(self.samples)
                + len(self.feedback))


R = TypeVar("R")


def to_record(cls: type[R], row: Any) -> R:
    """Copy the ORM ``row``'s columns named by the record class ``cls`` into a frozen record."""
    return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
