"""The fleet registry's tables (SQLAlchemy 2 declarative, portable between SQLite and PostgreSQL).

Times are UNIX seconds (float) as sent on the wire: one clock type everywhere, and
range queries stay plain comparisons on both databases.  Free-form parts of messages
(scores, hardware, metrics, rollout state) are JSON columns; what the fleet filters
or aggregates on has its own indexed column.

Devices send at least once, so the time series carry a unique index on each message's
identity (``DEDUPE_KEYS``) and ingestion inserts with ``ON CONFLICT DO NOTHING``: a
re-sent report is ignored.  Each unique index leads with the columns the range queries
use, so it also serves them (one index to maintain per row on the ingest path, not two).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base", "DEDUPE_KEYS", "Device", "TelemetryRow", "DriftRow", "SampleRow", "PendingLabel", "JobRow",
    "ModelVersionRow", "RolloutRow", "RolloutTargetRow", "CredentialRow",
]


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    state_ts: Mapped[float | None] = mapped_column(Float)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64), index=True)
    previous_version: Mapped[str | None] = mapped_column(String(64))
    variant: Mapped[str | None] = mapped_column(String(64))
    variants: Mapped[list[Any]] = mapped_column(JSON, default=list)
    variant_latency_ms: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    agent_version: Mapped[str | None] = mapped_column(String(32))
    delivery: Mapped[list[Any]] = mapped_column(JSON, default=list)
    telemetry: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # latest Telemetry, as sent
    telemetry_ts: Mapped[float | None] = mapped_column(Float)
    drift_alarm: Mapped[bool] = mapped_column(Boolean, default=False)
    drift_risk: Mapped[float | None] = mapped_column(Float)
    drift_ts: Mapped[float | None] = mapped_column(Float)
    alarm_since: Mapped[float | None] = mapped_column(Float)  # start of the current alarm streak
    # Fleet clock when the latest state message arrived: a birth after a command was sent
    # means the device reconnected, and commands queued in its broker session may be lost.
    state_seen: Mapped[float | None] = mapped_column(Float)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    __table_args__ = (Index("uq_telemetry_device_ts_seq", "device_id", "ts", "seq", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float, index=True)
    received: Mapped[float] = mapped_column(Float)
    seq: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str | None] = mapped_column(String(64))
    inferences: Mapped[int] = mapped_column(Integer, default=0)
    inferences_interval: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float)
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    drift_alarm: Mapped[bool] = mapped_column(Boolean, default=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the rest of the message


class DriftRow(Base):
    __tablename__ = "drift_reports"
    __table_args__ = (Index("uq_drift_device_ts_seq", "device_id", "ts", "seq", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float, index=True)
    received: Mapped[float] = mapped_column(Float)
    seq: Mapped[int] = mapped_column(Integer)
    window: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str | None] = mapped_column(String(64))
    risk: Mapped[float] = mapped_column(Float, default=0.0)
    alarm: Mapped[bool] = mapped_column(Boolean, default=False)
    input_shift: Mapped[bool] = mapped_column(Boolean, default=False)
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    flags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    class_counts: Mapped[list[Any]] = mapped_column(JSON, default=list)


class SampleRow(Base):
    __tablename__ = "samples"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    received: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(64), index=True)
    prediction: Mapped[str | None] = mapped_column(String(128))
    confidence: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the sample store's root
    size: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(128), index=True)
    label_source: Mapped[str | None] = mapped_column(String(64))
    label_confidence: Mapped[float | None] = mapped_column(Float)  # teacher pseudo-labels
    labelled_at: Mapped[float | None] = mapped_column(Float, index=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class PendingLabel(Base):
    """Feedback that arrived before its sample (the sample is still in flight)."""

    __tablename__ = "pending_labels"

    sample_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    label: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    # the device whose feedback this is (None: an operator's): applies only to that device's sample
    device_id: Mapped[str | None] = mapped_column(String(64), index=True)


class JobRow(Base):
    __tablename__ = "job_statuses"
    __table_args__ = (Index("uq_jobs_job_device_step_ts", "job_id", "device_id", "step", "ts", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    step: Mapped[str] = mapped_column(String(32))
    ok: Mapped[bool] = mapped_column(Boolean, default=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[float | None] = mapped_column(Float)
    previous_version: Mapped[str | None] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float, index=True)
    received: Mapped[float] = mapped_column(Float)


# table name -> the columns that identify one message (an agent's ``seq`` restarts with the
# agent, its ``ts`` does not repeat); a duplicate of these is a re-sent message.
DEDUPE_KEYS: dict[str, tuple[str, ...]] = {
    TelemetryRow.__tablename__: ("device_id", "seq", "ts"),
    DriftRow.__tablename__: ("device_id", "seq", "ts"),
    JobRow.__tablename__: ("device_id", "job_id", "step", "ts"),
}


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    parent_version: Mapped[str | None] = mapped_column(String(64))
    bundle_path: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(Integer)
    signed_by: Mapped[str | None] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # per variant + gate results
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # run id, data hash, samples used
    status: Mapped[str] = mapped_column(String(16), index=True)  # candidate / accepted / rejected
    reason: Mapped[str | None] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # owned by the rollout engine


class RolloutTargetRow(Base):
    __tablename__ = "rollout_targets"

    rollout_id: Mapped[str] = mapped_column(String(64), ForeignKey("rollouts.id", ondelete="CASCADE"),
                                            primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    job_id: Mapped[str | None] = mapped_column(String(128), index=True)
    previous_version: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    updated: Mapped[float] = mapped_column(Float)


class CredentialRow(Base):
    """MQTT credentials the fleet issued (hash only; the password is shown once)."""

    __tablename__ = "credentials"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # "device" | "fleet"
    password_hash: Mapped[str] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)
