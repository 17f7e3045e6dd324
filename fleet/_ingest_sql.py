"""The SQL behind :meth:`fleet.registry.Registry.apply`: one ingest batch, one transaction.

Kept apart from ``registry.py`` because it is the hot path and reads differently:
rows go in with executemany (``insert(...)`` + a list of dicts), and each device row
is updated once per batch however many messages it sent.  New devices are inserted
with ``ON CONFLICT DO NOTHING`` so two fleet workers sharing a subscription can
meet the same new device without failing the batch; telemetry, drift reports and job
statuses the same way on their dedupe keys, so a message a device sent again (it had
no receipt, see ``docs/protocol.md``) is stored once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, case, insert, or_, select, update
from sqlalchemy.orm import Session

from .models import DEDUPE_KEYS, Device, DriftRow, JobRow, PendingLabel, SampleRow, TelemetryRow

_TELEMETRY_COLUMNS = ("seq", "model_version", "inferences", "inferences_interval", "errors", "latency_p50_ms",
                      "latency_p99_ms", "mean_confidence", "drift_alarm")


def _dialect_insert(s: Session) -> Any:
    """``insert`` of the session's dialect: ON CONFLICT is spelt per dialect in SQLAlchemy."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def _insert_ignore(s: Session, table: Any, rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO NOTHING on SQLite and PostgreSQL (Core executemany).

    ``keys`` name the columns of a unique index; a row that repeats one, already stored
    or earlier in ``rows``, is skipped instead of failing the transaction.
    """
    if rows:
        table = getattr(table, "__table__", table)
        stmt = _dialect_insert(s)(table).on_conflict_do_nothing(index_elements=list(keys))
        s.connection().execute(stmt, rows)


Key = tuple[Any, ...]


def _insert_new(s: Session, table: Any, rows: list[dict[str, Any]], without_dedupe: frozenset[str], *,
                returning: bool = True) -> set[Key] | None:
    """Insert time-series rows but none whose :data:`DEDUPE_KEYS` are already stored.

    Returns the keys of the rows actually inserted (``None``: all of them, or not asked
    for), so that only messages new to the fleet move a device's "latest" columns: a
    re-sent old report must not turn an alarm back off.  ``rows`` must not repeat a key
    (see :func:`_first_of_each`).
    """
    if not rows:
        return set()
    name = table.__tablename__
    t = table.__table__
    if name in without_dedupe:  # the unique index is missing (old duplicates): plain insert
        s.connection().execute(insert(t), rows)
        return None
    keys = DEDUPE_KEYS[name]
    stmt = _dialect_insert(s)(t).on_conflict_do_nothing(index_elements=list(keys))
    if not returning or not s.get_bind().dialect.insert_executemany_returning:  # SQLite < 3.35
        s.connection().execute(stmt, rows)
        return None
    # RETURNING costs ~6 us a row here (SQLite, measured): cheap next to the decode.
    result = s.connection().execute(stmt.returning(*(t.c[k] for k in keys)), rows)
    return {tuple(r) for r in result}


def _first_of_each(pairs: list[tuple[Any, float]], key: Any) -> list[tuple[Any, float]]:
    """``(message, received)`` pairs without repeats of ``key(message)`` (the first one stays)."""
    seen: set[Key] = set()
    out = []
    for pair in pairs:
        k = key(pair[0])
        if k not in seen:
            seen.add(k)
            out.append(pair)
    return out


def _series_key(m: Any) -> Key:
    return (m.device_id, m.seq, m.ts)


def _job_key(m: Any) -> Key:
    return (m.device_id, m.job_id, m.step, m.ts)


def apply_batch(s: Session, batch: Any, *, without_dedupe: frozenset[str] = frozenset()) -> None:
    """Write an :class:`~fleet.registry.IngestBatch` through session ``s`` (inside a transaction).

    Telemetry, drift reports and job statuses a device sent again (same dedupe key as a
    stored row, or as an earlier one in the batch) are skipped and change nothing else.
    """
    changes: dict[str, dict[str, Any]] = {}  # device id -> column updates, last message wins
    for device_id, received in batch.seen.items():
        changes.setdefault(device_id, {})["last_seen"] = received

    for msg, received in batch.states:
        changes.setdefault(msg.device_id, {}).update(
            online=msg.online, state_ts=msg.ts, state_seen=received, **({} if not msg.online else dict(
                model_name=msg.model_name, model_version=msg.model_version, variant=msg.variant,
                variants=list(msg.variants), variant_latency_ms=dict(msg.variant_latency_ms),
                hardware=dict(msg.hardware), agent_version=msg.agent_version, delivery=list(msg.delivery),
                previous_version=msg.previous_version)))
    if batch.telemetry:
        telemetry = _first_of_each(batch.telemetry, _series_key)
        rows, data = [], []
        for msg, received in telemetry:
            d = msg.to_dict()  # dataclasses.asdict deep-copies recursively: ~4x slower
            del d["type"], d["schema_version"]
            data.append(d)
            rows.append({"device_id": msg.device_id, "ts": msg.ts, "received": received,
                         **{k: d[k] for k in _TELEMETRY_COLUMNS}, "data": d})
        new = _insert_new(s, TelemetryRow, rows, without_dedupe)
        for (msg, _), d in zip(telemetry, data, strict=True):
            if new is None or _series_key(msg) in new:
                c = changes.setdefault(msg.device_id, {})
                c.update(telemetry=d, telemetry_ts=msg.ts)
                if msg.model_version:
                    c["model_version"] = msg.model_version
    alarms: dict[str, tuple[bool, float]] = {}
    if batch.drift:
        drift = _first_of_each(batch.drift, _series_key)
        new = _insert_new(s, DriftRow, [
            {"device_id": msg.device_id, "ts": msg.ts, "received": received, "seq": msg.seq,
             "window": msg.window, "n": msg.n, "model_version": msg.model_version, "risk": msg.risk,
             "alarm": msg.alarm, "input_shift": msg.input_shift, "mean_confidence": msg.mean_confidence,
             "scores": dict(msg.scores), "thresholds": dict(msg.thresholds), "flags": dict(msg.flags),
             "class_counts": list(msg.class_counts)} for msg, received in drift], without_dedupe)
        for msg, _ in drift:
            if new is not None and _series_key(msg) not in new:
                continue
            changes.setdefault(msg.device_id, {}).update(drift_alarm=msg.alarm, drift_risk=msg.risk,
                                                         drift_ts=msg.ts)
            prev = alarms.get(msg.device_id)
            # remember when the current streak of alarms started within this batch
            alarms[msg.device_id] = (msg.alarm, prev[1] if prev and prev[0] and msg.alarm else msg.ts)
    if batch.jobs:
        jobs = _first_of_each(batch.jobs, _job_key)
        _insert_new(s, JobRow, [{"device_id": m.device_id, "job_id": m.job_id, "version": m.version,
                                 "step": m.step, "ok": m.ok, "detail": m.detail, "progress": m.progress,
                                 "previous_version": m.previous_version, "ts": m.ts, "received": r}
                                for m, r in jobs], without_dedupe, returning=False)
        for m, _ in jobs:
            changes.setdefault(m.device_id, {})
    for rec in batch.samples:
        changes.setdefault(rec.device_id, {})

    if changes:
        _update_devices(s, changes, alarms)
    if batch.samples:
        _insert_samples(s, batch.samples)
    if batch.feedback:
        apply_labels(s, [(f.sample_id, f.label, f.source) for f in batch.feedback], {})


def _update_devices(s: Session, changes: dict[str, dict[str, Any]], alarms: dict[str, tuple[bool, float]]) -> None:
    ids = list(changes)
    existing = {row.id: row.alarm_since for row in s.execute(
        select(Device.id, Device.alarm_since, Device.drift_alarm).where(Device.id.in_(ids)))}
    now = time.time()
    new = [{"id": d, "first_seen": changes[d].get("last_seen", now), "last_seen": changes[d].get("last_seen", now),
            "online": True, "variants": [], "variant_latency_ms": {}, "hardware": {}, "delivery": [], "tags": {}}
           for d in ids if d not in existing]
    _insert_ignore(s, Device, new, ("id",))
    for d, (alarm, start) in alarms.items():
        prior = existing.get(d)
        changes[d]["alarm_since"] = (prior if prior is not None else start) if alarm else None
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for d, values in changes.items():
        values.setdefault("online", True)  # any message but an offline state is a sign of life
        groups.setdefault(tuple(sorted(values)), []).append({"_id": d, **values})
    # Core executemany, one statement per set of changed columns: the ORM's per-row
    # UPDATE path costs ~3 ms a device, which would cap ingestion near 300 msg/s.
    table = Device.__table__
    conn = s.connection()
    for cols, rows in groups.items():
        stmt = update(table).where(table.c.id == bindparam("_id")).values({c: _set(table, c, cols) for c in cols})
        conn.execute(stmt, rows)


_DRIFT_COLUMNS = frozenset({"drift_alarm", "drift_risk", "drift_ts", "alarm_since"})


def _set(table: Any, column: str, cols: tuple[str, ...]) -> Any:
    """The new value of one device column.  The drift columns change only for a report at
    least as new as the stored one: with several ingest processes (``ingest.workers``) an
    older report can commit after a newer one, and must not put the device's drift state back."""
    if column not in _DRIFT_COLUMNS or "drift_ts" not in cols:
        return bindparam(column)
    newer = or_(table.c.drift_ts.is_(None), table.c.drift_ts <= bindparam("drift_ts"))
    return case((newer, bindparam(column)), else_=table.c[column])


def _insert_samples(s: Session, samples: list[Any]) -> None:
    rows = [dataclasses.asdict(r) for r in samples]
    _insert_ignore(s, SampleRow, rows, ("id",))  # a re-sent sample keeps its first record
    owners = {r["id"]: r["device_id"] for r in rows}
    pending = list(s.scalars(select(PendingLabel).where(PendingLabel.sample_id.in_(list(owners)))))
    if pending:
        # A device's parked feedback labels only that device's sample (fleet.ingest_guard); stored
        # owners win over the batch's rows (a re-sent sample id keeps its first record).
        stored = dict(s.execute(select(SampleRow.id, SampleRow.device_id).where(SampleRow.id.in_(list(owners)))).all())
        ok = [p for p in pending if p.device_id is None or p.device_id == stored.get(p.sample_id)]
        s.execute(PendingLabel.__table__.delete().where(PendingLabel.sample_id.in_([p.sample_id for p in pending])))
        operator = [(p.sample_id, p.label, p.source) for p in ok if p.device_id is None]
        if operator:
            apply_labels(s, operator, {})
        for p in ok:
            if p.device_id is not None:
                s.execute(update(SampleRow).where(SampleRow.id == p.sample_id,
                                             or_(SampleRow.label_source.is_(None), SampleRow.label_source == "device"))
                          .values(label=p.label, label_source="device", labelled_at=time.time()))


def apply_labels(s: Session, labels: list[tuple[str, str, str]], confidence: dict[str, float]) -> int:
    """Label existing samples; park labels for unknown ones.  Returns the number of samples labelled."""
    if not labels:
        return 0
    now = time.time()
    latest: dict[str, tuple[str, str]] = {}
    for sample_id, label, source in labels:  # the last label for a sample wins
        latest[sample_id] = (str(label), source)
    known = set(s.scalars(select(SampleRow.id).where(SampleRow.id.in_(list(latest)))))
    for sample_id, (label, source) in latest.items():
        if sample_id in known:
            s.execute(update(SampleRow).where(SampleRow.id == sample_id).values(
                label=label, label_source=source, label_confidence=confidence.get(sample_id), labelled_at=now))
    s.execute(PendingLabel.__table__.delete().where(PendingLabel.sample_id.in_(list(known))))
    parked = [{"sample_id": k, "label": v[0], "source": v[1], "ts": now} for k, v in latest.items() if k not in known]
    if parked:
        s.execute(PendingLabel.__table__.delete().where(PendingLabel.sample_id.in_([p["sample_id"] for p in parked])))
        s.execute(insert(PendingLabel), parked)
    return len(known)
