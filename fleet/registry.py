"""The fleet registry: one typed repository over the database, returning frozen records.

Callers never see ORM objects or sessions: every method opens one short transaction
and returns plain frozen dataclasses, so records can cross threads (ingest writer,
HTTP API, rollout engine) safely.  Ingestion writes through :meth:`Registry.apply`,
one transaction per :class:`IngestBatch`.

    reg = Registry.open("sqlite:///fleet-data/fleet.db")
    reg.apply(batch)                         # ingest: devices, telemetry, drift, jobs, samples, labels
    reg.devices(); reg.drift_reports(device_id="cam-1", since=t0)
    reg.register_model(bundle_path, trusted_key=pub)     # verifies the signature first
    reg.create_rollout("r1", "digits", "2", {"cam-1": 0, "cam-2": 1}, state={...})
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, and_, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.errors import FleetError, RolloutError
from core.protocol import DeviceState, DriftReportMsg, Feedback, JobStatus, Telemetry

from . import db
from .models import (
    Device,
    DriftRow,
    JobRow,
    ModelVersionRow,
    PendingLabel,
    RolloutRow,
    RolloutTargetRow,
    SampleRow,
    TelemetryRow,
)

__all__ = [
    "MODEL_STATUSES", "ROLLOUT_STATUSES", "TARGET_STATUSES",
    "DeviceRecord", "TelemetryRecord", "DriftRecord", "SampleRecord", "JobRecord", "ModelVersion",
    "RolloutRecord", "RolloutTarget", "FleetStatus", "IngestBatch", "Registry",
]

MODEL_STATUSES = ("candidate", "accepted", "rejected")
ROLLOUT_STATUSES = ("pending", "running", "paused", "halted", "rolled_back", "completed", "aborted")
ACTIVE_ROLLOUT_STATUSES = ("pending", "running", "paused")
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


def _rec(cls: type[R], row: Any) -> R:
    return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- registry
class Registry:
    """Typed access to the fleet database.  Thread-safe: each call uses its own session."""

    def __init__(self, engine: Engine, *, create: bool = True) -> None:
        self.engine = engine
        self._sessions: sessionmaker[Session] = db.make_sessionmaker(engine)
        # Tables whose dedupe index old duplicate rows prevent (see fleet.db): plain inserts there.
        self.without_dedupe: frozenset[str] = db.create_schema(engine) if create else frozenset()

    @classmethod
    def open(cls, url: str, *, busy_timeout_ms: int = 10_000, echo: bool = False) -> Registry:
        """Open (and create if needed) the registry at ``url``."""
        return cls(db.make_engine(url, busy_timeout_ms=busy_timeout_ms, echo=echo))

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        """A new session for queries the methods below do not cover (use as a context manager)."""
        return self._sessions()

    # ------------------------------------------------------------------ ingest
    def apply(self, batch: IngestBatch) -> None:
        """Write one ingest batch (devices, telemetry, drift, jobs, samples, labels) in one transaction."""
        if not len(batch) and not batch.seen:
            return
        from . import _ingest_sql

        with self._sessions.begin() as s:
            _ingest_sql.apply_batch(s, batch, without_dedupe=self.without_dedupe)

    def upsert_device(self, device_id: str, *, tags: Mapping[str, Any] | None = None,
                      ts: float | None = None) -> DeviceRecord:
        """Create a device the fleet knows of before it connects (provisioning), or update its tags."""
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
            return _rec(DeviceRecord, row)

    # ------------------------------------------------------------------ devices
    def device(self, device_id: str) -> DeviceRecord | None:
        with self._sessions() as s:
            row = s.get(Device, device_id)
            return _rec(DeviceRecord, row) if row else None

    def devices(self, *, online: bool | None = None, model_version: str | None = None,
                alarm: bool | None = None) -> list[DeviceRecord]:
        q = select(Device).order_by(Device.id)
        if online is not None:
            q = q.where(Device.online == online)
        if model_version is not None:
            q = q.where(Device.model_version == model_version)
        if alarm is not None:
            q = q.where(Device.drift_alarm == alarm)
        with self._sessions() as s:
            return [_rec(DeviceRecord, r) for r in s.scalars(q)]

    def devices_by_id(self, device_ids: Sequence[str]) -> dict[str, DeviceRecord]:
        """The records of these devices (unknown ids are left out), in one query."""
        if not device_ids:
            return {}
        with self._sessions() as s:
            return {r.id: _rec(DeviceRecord, r) for r in s.scalars(select(Device).where(Device.id.in_(list(device_ids))))}

    def alarming_devices(self, *, min_duration_s: float = 0.0, now: float | None = None) -> list[DeviceRecord]:
        """Devices whose drift alarm has been on for at least ``min_duration_s``."""
        t = now if now is not None else time.time()
        q = select(Device).where(Device.drift_alarm.is_(True), Device.alarm_since <= t - min_duration_s)
        with self._sessions() as s:
            return [_rec(DeviceRecord, r) for r in s.scalars(q.order_by(Device.id))]

    # ------------------------------------------------------------------ time series
    def telemetry(self, *, device_ids: Sequence[str] | None = None, since: float | None = None,
                  until: float | None = None, limit: int | None = None) -> list[TelemetryRecord]:
        return self._series(TelemetryRow, TelemetryRecord, device_ids, since, until, limit)

    def drift_reports(self, *, device_id: str | None = None, device_ids: Sequence[str] | None = None,
                      since: float | None = None, until: float | None = None,
                      limit: int | None = None) -> list[DriftRecord]:
        """Drift reports in time order (the last ``limit`` when given)."""
        ids = [device_id] if device_id else device_ids
        return self._series(DriftRow, DriftRecord, ids, since, until, limit)

    def job_statuses(self, *, job_id: str | None = None, job_ids: Sequence[str] | None = None,
                     device_id: str | None = None, since: float | None = None) -> list[JobRecord]:
        q = select(JobRow)
        ids = [job_id] if job_id else job_ids
        if ids is not None:
            q = q.where(JobRow.job_id.in_(list(ids)))
        if device_id:
            q = q.where(JobRow.device_id == device_id)
        if since is not None:
            q = q.where(JobRow.received >= since)
        with self._sessions() as s:
            return [_rec(JobRecord, r) for r in s.scalars(q.order_by(JobRow.id))]

    def latest_job_steps(self, job_ids: Sequence[str]) -> dict[tuple[str, str], JobRecord]:
        """``(job_id, device_id) -> latest JobRecord`` (by arrival) for each job."""
        if not job_ids:
            return {}
        # Only the newest row per (job, device), chosen in SQL: the rollout driver asks this
        # every tick for every open job, and each job has ~10 step rows.
        newest = (select(func.max(JobRow.id)).where(JobRow.job_id.in_(list(job_ids)))
                  .group_by(JobRow.job_id, JobRow.device_id))
        with self._sessions() as s:
            rows = s.scalars(select(JobRow).where(JobRow.id.in_(newest)))
            return {(r.job_id, r.device_id): _rec(JobRecord, r) for r in rows}

    def _series(self, table: Any, cls: type[R], device_ids: Sequence[str] | None, since: float | None,
                until: float | None, limit: int | None) -> list[R]:
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
            return [_rec(cls, r) for r in rows]

    # ------------------------------------------------------------------ samples and labels
    def add_samples(self, samples: Sequence[SampleRecord]) -> None:
        batch = IngestBatch(samples=list(samples))
        self.apply(batch)

    def sample(self, sample_id: str) -> SampleRecord | None:
        with self._sessions() as s:
            row = s.get(SampleRow, sample_id)
            return _rec(SampleRecord, row) if row else None

    def _sample_query(self, q: Any, device_ids: Sequence[str] | None, labelled: bool | None,
                      since: float | None, model_version: str | None, label_source: str | None) -> Any:
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

    def samples(self, *, device_ids: Sequence[str] | None = None, labelled: bool | None = None,
                since: float | None = None, model_version: str | None = None, label_source: str | None = None,
                limit: int | None = None, offset: int = 0) -> list[SampleRecord]:
        """Samples in arrival order, filtered; ``since`` compares the fleet's receive time."""
        q = self._sample_query(select(SampleRow), device_ids, labelled, since, model_version, label_source)
        q = q.order_by(SampleRow.received, SampleRow.id).offset(offset)
        if limit is not None:
            q = q.limit(limit)
        with self._sessions() as s:
            return [_rec(SampleRecord, r) for r in s.scalars(q)]

    def count_samples(self, *, device_ids: Sequence[str] | None = None, labelled: bool | None = None,
                      since: float | None = None, model_version: str | None = None,
                      label_source: str | None = None) -> int:
        q = self._sample_query(select(func.count()).select_from(SampleRow), device_ids, labelled, since,
                               model_version, label_source)
        with self._sessions() as s:
            return int(s.scalar(q) or 0)

    def label_samples(self, labels: Iterable[tuple[str, str, str]], *,
                      confidence: Mapping[str, float] | None = None) -> int:
        """Apply ``(sample_id, label, source)`` triples; unknown ids wait in ``pending_labels``.

        Returns how many existing samples were labelled.  ``confidence`` (sample id ->
        teacher confidence) is recorded for pseudo-labels.
        """
        from . import _ingest_sql

        with self._sessions.begin() as s:
            return _ingest_sql.apply_labels(s, list(labels), dict(confidence or {}))

    def feedback_accuracy(self, *, device_ids: Sequence[str] | None = None, since: float | None = None,
                          model_version: str | None = None) -> tuple[int, int]:
        """``(correct, total)`` over samples whose true label came from feedback (not a teacher)."""
        q = self._sample_query(select(SampleRow.prediction, SampleRow.label), device_ids, True, None,
                               model_version, None)
        q = q.where(SampleRow.label_source != "teacher")
        if since is not None:
            q = q.where(SampleRow.labelled_at >= since)
        with self._sessions() as s:
            rows = list(s.execute(q))
        return sum(1 for p, lab in rows if p is not None and str(p) == str(lab)), len(rows)

    # ------------------------------------------------------------------ models
    def register_model(self, bundle_path: str | Path, *, trusted_key: Any, status: str = "candidate",
                       parent_version: str | None = None, metrics: Mapping[str, Any] | None = None,
                       lineage: Mapping[str, Any] | None = None, reason: str | None = None) -> ModelVersion:
        """Verify a bundle's signature against ``trusted_key`` and record it.

        The fleet never records (and so never pushes) an unsigned or wrongly signed
        bundle: verification failures raise :class:`SignatureError` / :class:`BundleError`.
        Metrics default to the manifest's (per variant); lineage to the manifest's.
        """
        from core.bundle import open_bundle

        p = Path(bundle_path).resolve()
        bundle = open_bundle(p, trusted_key=trusted_key, require_signature=True)
        m = bundle.manifest
        variant_metrics = {v.id: {"test_accuracy": v.test_accuracy, "accuracy_drop": v.accuracy_drop,
                                  "latency_ms": v.latency_ms, "size": v.size} for v in m.variants}
        return self.add_model_version(
            m.name, m.version, bundle_path=str(p), sha256=file_sha256(p), size=p.stat().st_size,
            signed_by=bundle.signed_by, status=status, reason=reason,
            parent_version=parent_version if parent_version is not None else m.lineage.parent_version,
            metrics=dict(metrics) if metrics is not None else {"variants": variant_metrics,
                                                               "reference_accuracy": m.reference_accuracy,
                                                               **m.metrics},
            lineage=dict(lineage) if lineage is not None else dataclasses.asdict(m.lineage))

    def add_model_version(self, name: str, version: str, *, status: str = "candidate",
                          bundle_path: str | None = None, sha256: str | None = None, size: int | None = None,
                          signed_by: str | None = None, parent_version: str | None = None,
                          metrics: Mapping[str, Any] | None = None, lineage: Mapping[str, Any] | None = None,
                          reason: str | None = None, created: float | None = None) -> ModelVersion:
        """Insert or replace the record of ``name`` ``version`` (no bundle verification: see register_model)."""
        if status not in MODEL_STATUSES:
            raise FleetError(f"unknown model status {status!r}", hint=f"one of {', '.join(MODEL_STATUSES)}")
        values = dict(parent_version=parent_version, bundle_path=bundle_path, sha256=sha256, size=size,
                      signed_by=signed_by, metrics=dict(metrics or {}), lineage=dict(lineage or {}),
                      status=status, reason=reason, created=created or time.time())
        with self._sessions.begin() as s:
            row = s.scalar(select(ModelVersionRow).where(ModelVersionRow.name == name,
                                                         ModelVersionRow.version == version))
            if row is None:
                row = ModelVersionRow(name=name, version=version, **values)
                s.add(row)
            else:
                for k, v in values.items():
                    setattr(row, k, v)
            s.flush()
            return _rec(ModelVersion, row)

    def model(self, name: str, version: str) -> ModelVersion | None:
        with self._sessions() as s:
            row = s.scalar(select(ModelVersionRow).where(ModelVersionRow.name == name,
                                                         ModelVersionRow.version == version))
            return _rec(ModelVersion, row) if row else None

    def models(self, *, name: str | None = None, status: str | None = None) -> list[ModelVersion]:
        q = select(ModelVersionRow).order_by(ModelVersionRow.created, ModelVersionRow.id)
        if name:
            q = q.where(ModelVersionRow.name == name)
        if status:
            q = q.where(ModelVersionRow.status == status)
        with self._sessions() as s:
            return [_rec(ModelVersion, r) for r in s.scalars(q)]

    def set_model_status(self, name: str, version: str, status: str, *, reason: str | None = None,
                         metrics: Mapping[str, Any] | None = None) -> ModelVersion:
        """Accept or reject a candidate (the reason is kept); ``metrics`` are merged in."""
        if status not in MODEL_STATUSES:
            raise FleetError(f"unknown model status {status!r}", hint=f"one of {', '.join(MODEL_STATUSES)}")
        with self._sessions.begin() as s:
            row = s.scalar(select(ModelVersionRow).where(ModelVersionRow.name == name,
                                                         ModelVersionRow.version == version))
            if row is None:
                raise FleetError(f"no model {name} {version} in the registry", model=name, version=version)
            row.status, row.reason = status, reason
            if metrics:
                row.metrics = {**(row.metrics or {}), **metrics}
            s.flush()
            return _rec(ModelVersion, row)

    def latest_model(self, name: str, *, status: str = "accepted") -> ModelVersion | None:
        found = self.models(name=name, status=status)
        return found[-1] if found else None

    # ------------------------------------------------------------------ rollouts
    def create_rollout(self, rollout_id: str, model_name: str, version: str, targets: Mapping[str, int], *,
                       state: Mapping[str, Any] | None = None, status: str = "pending") -> RolloutRecord:
        """Create a rollout with its per-device targets (``device id -> wave index``)."""
        self._check_rollout_status(status)
        t = time.time()
        with self._sessions.begin() as s:
            if s.get(RolloutRow, rollout_id) is not None:
                raise RolloutError(f"rollout {rollout_id} already exists", rollout=rollout_id)
            row = RolloutRow(id=rollout_id, model_name=model_name, version=version, status=status, reason=None,
                             created=t, updated=t, state=dict(state or {}))
            s.add(row)
            s.flush()
            s.add_all(RolloutTargetRow(rollout_id=rollout_id, device_id=d, wave=int(w), status="pending",
                                       detail="", updated=t) for d, w in targets.items())
            return _rec(RolloutRecord, row)

    def rollout(self, rollout_id: str) -> RolloutRecord | None:
        with self._sessions() as s:
            row = s.get(RolloutRow, rollout_id)
            return _rec(RolloutRecord, row) if row else None

    def rollouts(self, *, statuses: Sequence[str] | None = None) -> list[RolloutRecord]:
        """Rollouts, oldest first; ``statuses=ACTIVE_ROLLOUT_STATUSES`` for those to resume."""
        q = select(RolloutRow).order_by(RolloutRow.created, RolloutRow.id)
        if statuses is not None:
            q = q.where(RolloutRow.status.in_(list(statuses)))
        with self._sessions() as s:
            return [_rec(RolloutRecord, r) for r in s.scalars(q)]

    def rollout_ids(self, *, statuses: Sequence[str] | None = None) -> list[str]:
        """Ids of rollouts, oldest first, without loading their (large) states."""
        q = select(RolloutRow.id).order_by(RolloutRow.created, RolloutRow.id)
        if statuses is not None:
            q = q.where(RolloutRow.status.in_(list(statuses)))
        with self._sessions() as s:
            return list(s.scalars(q))

    def replace_rollout_state(self, rollout_id: str, *, status: str, reason: str | None,
                              state: Mapping[str, Any]) -> None:
        """Overwrite a rollout's status, reason and state in one UPDATE (the rollout driver's
        every tick: loading the old state first only to replace it cost a JSON parse of
        every device's progress)."""
        self._check_rollout_status(status)
        values: dict[str, Any] = {"status": status, "state": dict(state), "updated": time.time()}
        if reason is not None:
            values["reason"] = reason
        with self._sessions.begin() as s:
            done = s.execute(update(RolloutRow).where(RolloutRow.id == rollout_id).values(**values)).rowcount
        if not done:
            raise RolloutError(f"no rollout {rollout_id}", rollout=rollout_id)

    def update_rollout(self, rollout_id: str, *, status: str | None = None, reason: str | None = None,
                       state: Mapping[str, Any] | None = None, merge_state: bool = True) -> RolloutRecord:
        """Change a rollout's status / reason / state (merged into the stored dict unless ``merge_state=False``)."""
        if status is not None:
            self._check_rollout_status(status)
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
            return _rec(RolloutRecord, row)

    def rollout_targets(self, rollout_id: str, *, wave: int | None = None,
                        statuses: Sequence[str] | None = None) -> list[RolloutTarget]:
        q = select(RolloutTargetRow).where(RolloutTargetRow.rollout_id == rollout_id)
        if wave is not None:
            q = q.where(RolloutTargetRow.wave == wave)
        if statuses is not None:
            q = q.where(RolloutTargetRow.status.in_(list(statuses)))
        with self._sessions() as s:
            return [_rec(RolloutTarget, r) for r in s.scalars(q.order_by(RolloutTargetRow.wave,
                                                                           RolloutTargetRow.device_id))]

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
            return _rec(RolloutTarget, row) if row else None

    @staticmethod
    def _check_rollout_status(status: str) -> None:
        if status not in ROLLOUT_STATUSES:
            raise RolloutError(f"unknown rollout status {status!r}", hint=f"one of {', '.join(ROLLOUT_STATUSES)}")

    # ------------------------------------------------------------------ summary
    def status(self) -> FleetStatus:
        """Counts for ``edgeloop fleet status`` and ``GET /api/status``."""
        with self._sessions() as s:
            devices = int(s.scalar(select(func.count()).select_from(Device)) or 0)
            online = int(s.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True))) or 0)
            alarming = int(s.scalar(select(func.count()).select_from(Device)
                                    .where(Device.drift_alarm.is_(True))) or 0)
            versions = {str(v) if v is not None else "unknown": int(c) for v, c in s.execute(
                select(Device.model_version, func.count()).group_by(Device.model_version))}
            drift = int(s.scalar(select(func.count()).select_from(DriftRow)) or 0)
            samples = int(s.scalar(select(func.count()).select_from(SampleRow)) or 0)
            labelled = int(s.scalar(select(func.count()).select_from(SampleRow)
                                    .where(SampleRow.label.is_not(None))) or 0)
            models = int(s.scalar(select(func.count()).select_from(ModelVersionRow)) or 0)
            active = int(s.scalar(select(func.count()).select_from(RolloutRow)
                                  .where(RolloutRow.status.in_(ACTIVE_ROLLOUT_STATUSES))) or 0)
        return FleetStatus(devices=devices, online=online, offline=devices - online, alarming=alarming,
                           versions=versions, drift_reports=drift, samples=samples, labelled_samples=labelled,
                           models=models, active_rollouts=active, ts=time.time())

    def pending_label_count(self) -> int:
        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(PendingLabel)) or 0)
