"""The fleet registry: the fleet database behind one facade, one repository per aggregate.

Callers never see ORM objects or sessions: every repository method opens one short
transaction and returns plain frozen records (:mod:`fleet.repos.records`), so records
can cross threads (ingest writer, HTTP API, rollout driver) safely.  Ingestion writes
through :meth:`Registry.apply`, one transaction per :class:`IngestBatch`.

    reg = Registry.open("sqlite:///fleet-data/fleet.db")     # or postgresql+psycopg://...
    reg.apply(batch)                                         # ingest: devices, series, jobs, samples, labels
    reg.devices.get("cam-1"); reg.devices(online=True)       # calling a repository lists it
    reg.drift(device_id="cam-1", since=t0); reg.drift.buckets(t0, 60.0)
    reg.models.register(bundle_path, trusted_key=pub)        # verifies the signature first
    reg.rollouts.create("r1", "digits", "2", {"cam-1": 0, "cam-2": 1}, state={...})

The repositories live in :mod:`fleet.repos` (devices, telemetry, drift, jobs, samples,
labels, models, rollouts, credentials).  The flat names from before the split
(``reg.drift_reports(...)``, ``reg.register_model(...)``) remain as aliases because
many modules call them; new code uses the repositories.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from . import db
from .repos import (
    CredentialRepo,
    DeviceRepo,
    DriftRepo,
    JobRepo,
    LabelRepo,
    LogRepo,
    ModelRepo,
    RolloutRepo,
    SampleRepo,
    TelemetryRepo,
    file_sha256,
    fleet_status,
)
from .repos.records import (
    ACTIVE_ROLLOUT_STATUSES,
    MODEL_STATUSES,
    ROLLOUT_STATUSES,
    TARGET_STATUSES,
    CredentialRecord,
    DeviceRecord,
    DriftRecord,
    FleetStatus,
    IngestBatch,
    JobRecord,
    ModelVersion,
    RolloutRecord,
    RolloutTarget,
    SampleRecord,
    TelemetryRecord,
)

__all__ = [
    "MODEL_STATUSES", "ROLLOUT_STATUSES", "ACTIVE_ROLLOUT_STATUSES", "TARGET_STATUSES",
    "DeviceRecord", "TelemetryRecord", "DriftRecord", "SampleRecord", "JobRecord", "ModelVersion",
    "RolloutRecord", "RolloutTarget", "CredentialRecord", "FleetStatus", "IngestBatch", "Registry", "file_sha256",
]


class _Alias:
    """The pre-split spelling of a repository method: ``Registry.drift_reports`` is ``registry.drift.find``."""

    def __init__(self, repo: str, method: str) -> None:
        self.repo, self.method = repo, method

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.repo), self.method)


class Registry:
    """Typed access to the fleet database.  Thread-safe: each call uses its own session."""

    def __init__(self, engine: Engine, *, create: bool = True) -> None:
        self.engine = engine
        sessions: sessionmaker[Session] = db.make_sessionmaker(engine)
        self._sessions = sessions
        # Tables whose dedupe index old duplicate rows prevent (see fleet.db): plain inserts there.
        self.without_dedupe: frozenset[str] = db.create_schema(engine) if create else frozenset()
        self.devices = DeviceRepo(sessions)
        self.telemetry = TelemetryRepo(sessions)
        self.drift = DriftRepo(sessions)
        self.jobs = JobRepo(sessions)
        self.samples = SampleRepo(sessions)
        self.labels = LabelRepo(sessions)
        self.models = ModelRepo(sessions)
        self.rollouts = RolloutRepo(sessions)
        self.credentials = CredentialRepo(sessions)
        self.logs = LogRepo(sessions)

    @classmethod
    def open(cls, url: str, *, busy_timeout_ms: int = 10_000, echo: bool = False) -> Registry:
        """Open (and create if needed) the registry at ``url``."""
        return cls(db.make_engine(url, busy_timeout_ms=busy_timeout_ms, echo=echo))

    def close(self) -> None:
        self.engine.dispose()

    def apply(self, batch: IngestBatch) -> None:
        """Write one ingest batch (devices, telemetry, drift, jobs, samples, labels) in one transaction."""
        if not len(batch) and not batch.seen:
            return
        from . import _ingest_sql

        with self._sessions.begin() as s:
            _ingest_sql.apply_batch(s, batch, without_dedupe=self.without_dedupe)

    def add_samples(self, samples: list[SampleRecord]) -> None:
        """Store sample records (what ingestion does for uploaded samples)."""
        self.apply(IngestBatch(samples=list(samples)))

    def status(self) -> FleetStatus:
        """Counts for ``edgeloop fleet status`` and ``GET /api/status``."""
        return fleet_status(self._sessions)

    # The flat names from before the split, kept where many modules call them.
    device = _Alias("devices", "get")
    devices_by_id = _Alias("devices", "by_ids")
    upsert_device = _Alias("devices", "upsert")
    drift_reports = _Alias("drift", "find")
    job_statuses = _Alias("jobs", "find")
    latest_job_steps = _Alias("jobs", "latest_steps")
    sample = _Alias("samples", "get")
    count_samples = _Alias("samples", "count")
    label_samples = _Alias("labels", "apply")
    feedback_accuracy = _Alias("labels", "feedback_accuracy")
    register_model = _Alias("models", "register")
    add_model_version = _Alias("models", "add")
    model = _Alias("models", "get")
    latest_model = _Alias("models", "latest")
    set_model_status = _Alias("models", "set_status")
    create_rollout = _Alias("rollouts", "create")
    rollout = _Alias("rollouts", "get")
    rollout_ids = _Alias("rollouts", "ids")
    replace_rollout_state = _Alias("rollouts", "replace_state")
    rollout_targets = _Alias("rollouts", "targets")
    update_targets = _Alias("rollouts", "update_targets")
    target_for_job = _Alias("rollouts", "target_for_job")
