"""What the dashboard shows, as JSON-ready dicts: one function per page, shared by HTML and JSON.

Every page is rendered from exactly the dict its ``/dashboard/api/...`` endpoint
returns, so the browser, the CLI and scripts see the same numbers.  Anything that
grows with the fleet is paginated or aggregated in SQL (``GROUP BY``, ``LIMIT``):
a page of 50 devices or a drift chart of 40 buckets costs the same with 10 or
10,000 devices.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import FleetError

from ..config import FleetConfig, RolloutConfig
from ..policy import RetrainPolicyConfig
from ..registry import ACTIVE_ROLLOUT_STATUSES, Registry
from ..repos import Page
from ..rollout_state import iso_utc
from .present import gate_rows, human_bytes

if TYPE_CHECKING:
    from ..rollout_driver import RolloutDriver

__all__ = ["DashContext", "overview", "devices_page", "device_detail", "drift_overview", "labelling",
           "models_page", "rollouts_page", "rollout_detail", "samples_page", "class_names", "model_labels",
           "device_group", "NO_GROUP"]

NO_GROUP = "—"


@dataclass
class DashContext:
    """What the pages read from and act on (:meth:`fleet.app.FleetApp.dashboard_context` builds the
    running fleet's).  Without a ``driver`` (the fleet's MQTT link) the rollout actions are off."""

    registry: Registry
    samples_dir: Path | None = None
    driver: RolloutDriver | None = None
    policy: RetrainPolicyConfig = field(default_factory=RetrainPolicyConfig)
    rollout_defaults: RolloutConfig = field(default_factory=RolloutConfig)
    model_name: str | None = None
    page_size: int = 50
    config: FleetConfig | None = None  # the fleet's config: trusted keys and bundle store for model uploads
    cache: dict[str, tuple[float, Any, Any]] = field(default_factory=dict, repr=False)  # name -> (ts, key, value)

    @classmethod
    def for_fleet(cls, cfg: FleetConfig, registry: Registry, *, driver: RolloutDriver | None = None,
                  samples_dir: Path | None = None, page_size: int | None = None) -> DashContext:
        """The context of a fleet run from ``cfg`` (its samples, policy, rollout defaults, model)."""
        from ..policy import policy_from_fleet_config

        return cls(registry=registry, samples_dir=samples_dir or cfg.samples_dir, driver=driver,
                   policy=policy_from_fleet_config(cfg), rollout_defaults=cfg.rollout, model_name=cfg.model_name,
                   page_size=page_size or cfg.dashboard.page_size, config=cfg)

    def get_driver(self) -> RolloutDriver | None:
        """The rollout driver, or None when this dashboard cannot reach devices."""
        return self.driver


def _asdict(rec: Any) -> dict[str, Any]:
    return dataclasses.asdict(rec)


def device_group(dev: Any) -> str:
    """A device's group: its ``group`` tag (else the ``group`` its agent reports), or ``"—"``."""
    tags = dev.tags or {}
    hw = dev.hardware or {}
    group = tags.get("group") or hw.get("group")
    return str(group) if group else NO_GROUP


def _pages(total: int, page: int, size: int) -> dict[str, int]:
    n, pages = Page.bounds(total, page, size)
    return {"page": n, "pages": pages, "page_size": size, "total": total}


def _page_info(p: Page[Any]) -> dict[str, int]:
    return {"page": p.page, "pages": p.pages, "page_size": p.size, "total": p.total}


def served_model(ctx: DashContext) -> Any:
    """The newest accepted model of the fleet's model name (or of the most common name)."""
    reg = ctx.registry
    name = ctx.model_name or reg.devices.most_common_model_name()
    if name is None:
        models = reg.models(status="accepted")
        return models[-1] if models else None
    return reg.models.latest(name, status="accepted")


def model_labels(ctx: DashContext) -> list[str] | None:
    """The served model's class names from its bundle manifest, or None when no bundle is readable."""
    model = served_model(ctx)
    if model is None or not model.bundle_path or not Path(model.bundle_path).exists():
        return None
    try:
        from core.bundle import open_bundle

        # The registry verified the signature when the bundle was registered; here we only read labels.
        return list(open_bundle(model.bundle_path, require_signature=False).manifest.labels)
    except Exception:  # noqa: BLE001 - an unreadable bundle must not break the labelling page
        return None


def class_names(ctx: DashContext) -> list[str]:
    """Label choices: the served model's ``labels``, else labels and predictions seen so far."""
    labels = model_labels(ctx)
    if labels is not None:
        return labels
    seen = ctx.registry.samples.classes_seen()
    if seen and all(x.isdigit() for x in seen) and max(int(x) for x in seen) < 100:
        return [str(i) for i in range(max(int(x) for x in seen) + 1)]  # class indices: offer the gaps too
    return sorted(seen)


def label_needs(ctx: DashContext) -> dict[str, Any]:
    """How many labelled samples the retraining policy still needs (since the model in service)."""
    model = served_model(ctx)
    since = model.created if model is not None else None
    labelled = ctx.registry.samples.count(labelled=True, since=since)
    pol = ctx.policy
    by_count, by_drift = max(0, pol.min_labelled_samples - labelled), max(0, pol.min_labels_for_drift - labelled)
    alarming = ctx.registry.status().alarming
    drift_applies = alarming >= pol.alarm_devices
    # One statement: the rule that applies now (a drift alarm on enough devices, else the label count).
    needed, target = (by_drift, pol.min_labels_for_drift) if drift_applies else (by_count, pol.min_labelled_samples)
    return {"labelled_since_model": labelled, "target": target, "needed": needed, "rule": "drift" if drift_applies
            else "count", "alarming": alarming, "alarm_devices": pol.alarm_devices,
            "count_target": pol.min_labelled_samples, "drift_target": pol.min_labels_for_drift,
            "needed_by_count": by_count, "needed_for_drift_trigger": by_drift,
            "model_version": model.version if model else None}


# --------------------------------------------------------------------------- overview / devices
def _wave_health(counts: dict[str, int], n: int, bad: int) -> str:
    if bad:
        return "failing"
    if counts.get("rolled_back", 0) == n:
        return "rolled back"
    if counts.get("updated", 0) == n:
        return "healthy"
    if counts.get("sent", 0) or counts.get("rolling_back", 0):
        return "in progress"
    return "pending"


def _rollout_progress(status: str, wave: int, n_waves: int, waves: list[dict[str, Any]]) -> str:
    """``canary, stage 1 of 3`` while running; ``completed, 3 of 3 waves`` once done."""
    finished = sum(1 for w in waves if w["health"] == "healthy")
    if status == "completed":
        return f"completed, {n_waves} of {n_waves} waves"
    stage = "canary" if wave == 0 else f"wave {wave}"
    if status in ("pending", "running", "paused"):
        return f"{stage}, stage {wave + 1} of {n_waves}"
    return f"{status.replace('_', ' ')} at {stage} ({finished} of {n_waves} waves completed)"


def rollout_summary(rec: Any) -> dict[str, Any]:
    """A rollout record with its per-wave progress (from the engine's persisted state)."""
    state = rec.state or {}
    waves: dict[int, dict[str, Any]] = {}
    for d in state.get("devices", []):
        w = waves.setdefault(int(d["wave"]), {"wave": int(d["wave"]), "devices": 0, "counts": {}})
        w["devices"] += 1
        w["counts"][d["status"]] = w["counts"].get(d["status"], 0) + 1
    out = []
    for w in sorted(waves.values(), key=lambda x: x["wave"]):
        c = w["counts"]
        done = sum(c.get(k, 0) for k in ("updated", "failed", "timed_out", "unhealthy", "rolled_back",
                                          "rollback_failed"))
        bad = sum(c.get(k, 0) for k in ("failed", "timed_out", "unhealthy", "rollback_failed"))
        w.update(label="canary" if w["wave"] == 0 else f"wave {w['wave']}", done=done, failed=bad,
                 progress=done / w["devices"] if w["devices"] else 0.0,
                 health=_wave_health(c, w["devices"], bad))
        out.append(w)
    plan = state.get("plan", {})
    n_waves = int(state.get("n_waves", len(out)) or 0)
    start_at = state.get("start_at")
    progress = f"scheduled for {iso_utc(start_at)}" if rec.status == "scheduled" and start_at is not None \
        else _rollout_progress(rec.status, int(state.get("wave", 0) or 0), n_waves, out)
    return {"progress": progress, "start_at": None if start_at is None else iso_utc(start_at),
            "target": state.get("target") or "all devices", "id": rec.id, "model_name": rec.model_name, "version": rec.version, "status": rec.status,
            "machine_status": state.get("status"), "phase": state.get("phase", ""), "wave": state.get("wave", 0),
            "n_waves": state.get("n_waves", len(out)),
            "reason": None if rec.status == "scheduled" else rec.reason,  # the progress says "scheduled for" "created": rec.created,
            "updated": rec.updated, "waves": out, "plan": plan,
            "events": list(state.get("events", []))[-50:],
            "active": rec.status in ACTIVE_ROLLOUT_STATUSES or rec.status == "halted"}


def overview(ctx: DashContext, *, alarm_limit: int = 20) -> dict[str, Any]:
    """Fleet overview: counts, model versions, devices in alarm, labelling backlog, active rollout."""
    reg = ctx.registry
    st = reg.status()
    alarmed = reg.devices(alarm=True)
    active = reg.rollouts(statuses=(*ACTIVE_ROLLOUT_STATUSES, "halted"))
    latest = reg.rollouts()[-1:] if not active else []
    return {
        "ts": st.ts, "devices": st.devices, "online": st.online, "offline": st.offline,
        "alarming": st.alarming, "drift_reports": st.drift_reports, "samples": st.samples,
        "labelled_samples": st.labelled_samples, "unlabelled_samples": st.samples - st.labelled_samples,
        "models": st.models,
        "versions": [{"version": v, "devices": n} for v, n in sorted(st.versions.items(), key=lambda x: -x[1])],
        "alarmed_devices": [{"id": d.id, "risk": d.drift_risk, "since": d.alarm_since, "online": d.online,
                             "model_version": d.model_version} for d in alarmed[:alarm_limit]],
        "labels": label_needs(ctx),
        "active_rollouts": [rollout_summary(r) for r in active],
        "last_rollout": rollout_summary(latest[0]) if latest else None,
    }


def devices_page(ctx: DashContext, *, page: int = 1, q: str | None = None, online: bool | None = None,
                 alarm: bool | None = None, page_size: int | None = None) -> dict[str, Any]:
    """One page of devices (SQL LIMIT/OFFSET), filtered by id substring, online and alarm."""
    found = ctx.registry.devices.page(page=page, size=page_size or ctx.page_size, q=q, online=online, alarm=alarm)
    items = [{"id": r.id, "online": r.online, "last_seen": r.last_seen, "model_version": r.model_version,
              "variant": r.variant, "drift_alarm": r.drift_alarm, "drift_risk": r.drift_risk,
              "group": device_group(r),
              "latency_p99_ms": (r.telemetry or {}).get("latency_p99_ms"),
              "queue_depth": (r.telemetry or {}).get("queue_depth")} for r in found.items]
    return {**_page_info(found), "items": items, "q": q or "", "online": online, "alarm": alarm}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def device_detail(ctx: DashContext, device_id: str, *, points: int = 300, samples: int = 24,
                  log_level: str | None = None, log_lines: int = 100) -> dict[str, Any]:
    """A device with its telemetry and drift series (last ``points``), model history, recent samples
    and the newest ``log_lines`` of its agent's log at ``log_level`` or above (remote logs)."""
    from ..remote_logs import device_logs

    reg = ctx.registry
    level = (log_level or "INFO").upper()
    if level not in LOG_LEVELS:
        raise FleetError(f"unknown log level {log_level!r}", hint=f"one of {', '.join(LOG_LEVELS)}")
    dev = reg.devices.get(device_id)
    if dev is None:
        raise FleetError(f"no device {device_id}", device_id=device_id, hint="see the devices page")
    tel = reg.telemetry(device_ids=[device_id], limit=points)
    drift = reg.drift(device_id=device_id, limit=points)
    jobs = reg.jobs.find(device_id=device_id)
    history = [{"ts": j.ts, "version": j.version, "step": j.step, "ok": j.ok, "detail": j.detail,
                "job_id": j.job_id, "previous_version": j.previous_version,
                "kind": "rollback" if j.step == "rolled_back" or "-rb-" in j.job_id else "install"}
               for j in jobs if j.step in ("completed", "failed", "rolled_back")]
    total = reg.samples.count(device_ids=[device_id])
    recent = reg.samples(device_ids=[device_id], offset=max(0, total - samples))
    return {
        "device": _asdict(dev), "group": device_group(dev),
        "telemetry": [{"ts": t.ts, "p50": t.latency_p50_ms, "p99": t.latency_p99_ms,
                       "inferences": t.inferences_interval, "errors": t.errors,
                       "queue_depth": t.data.get("queue_depth"), "confidence": t.mean_confidence,
                       "cpu_percent": t.data.get("cpu_percent"), "memory_mb": t.data.get("memory_mb"),
                       "model_version": t.model_version} for t in tel],
        "drift": [{"ts": r.ts, "risk": r.risk, "alarm": r.alarm, "window": r.window,
                   "model_version": r.model_version} for r in drift],
        "history": history[::-1],
        "samples": [_sample(r) for r in reversed(recent)], "samples_total": total,
        "logs": device_logs(reg, device_id, lines=log_lines, min_level=level), "log_level": level,
        "can_request_logs": ctx.get_driver() is not None,
    }


def _sample(r: Any) -> dict[str, Any]:
    return {"id": r.id, "device_id": r.device_id, "ts": r.ts, "prediction": r.prediction,
            "confidence": r.confidence, "reason": r.reason, "label": r.label, "label_source": r.label_source,
            "model_version": r.model_version}


# --------------------------------------------------------------------------- drift
def _drift_group(dev: Any) -> str:
    group = device_group(dev)
    return "no group" if group == NO_GROUP else group


def drift_overview(ctx: DashContext, *, since: float | None = None, buckets: int = 40, page: int = 1,
                   now: float | None = None) -> dict[str, Any]:
    """Mean drift risk and share of alarmed windows per device group per time bucket, plus alarmed windows."""
    t1 = now if now is not None else time.time()
    reg = ctx.registry
    if since is None:
        since = reg.drift.first_ts() or t1 - 3600
    t0 = float(since)
    width = max(1.0, (t1 - t0) / buckets)
    # One row per (device, bucket): SQL does the heavy lifting, Python only maps devices to groups.
    cells_by_device = reg.drift.buckets(t0, width)
    groups = {d.id: _drift_group(d) for d in reg.devices.by_ids(sorted({c.device_id for c in cells_by_device}))
              .values()}
    found = reg.drift.alarms_page(t0, page=page, size=ctx.page_size)
    alarms = [{"device_id": r.device_id, "ts": r.ts, "window": r.window, "risk": r.risk, "n": r.n,
               "model_version": r.model_version, "group": groups.get(r.device_id, "no group"),
               "scores": r.scores, "input_shift": r.input_shift} for r in found.items]
    acc: dict[str, dict[int, list[float]]] = {}
    for c in cells_by_device:
        cell = acc.setdefault(groups.get(c.device_id, "no group"), {}).setdefault(c.bucket, [0.0, 0.0, 0.0])
        cell[0] += c.mean_risk * c.n
        cell[1] += c.n
        cell[2] += c.alarms
    series = {g: [{"ts": t0 + (b + 0.5) * width, "risk": c[0] / c[1], "alarm_share": c[2] / c[1], "n": int(c[1])}
                  for b, c in sorted(cells.items())] for g, cells in sorted(acc.items())}
    return {"since": t0, "until": t1, "bucket_s": width, "groups": series, "alarms": alarms,
            "concept": concept_drift(ctx), **_page_info(found)}


def concept_drift(ctx: DashContext, *, ttl_s: float = 10.0) -> dict[str, Any]:
    """Concept drift from feedback labels (:func:`fleet.concept_drift.fleet_concept_drift`): accuracy and
    CUSUM alarm per slice of the model in service.  Device slices only when alarmed (a fleet has many).

    It replays every label of the model in service, so the live drift page reuses the last answer
    for ``ttl_s`` seconds unless the number of labels changed (one ``COUNT`` per refresh).
    """
    labelled = ctx.registry.samples.count(labelled=True)
    hit = ctx.cache.get("concept")
    if hit is not None and hit[1] == labelled and time.monotonic() - hit[0] < ttl_s:
        return dict(hit[2])
    out = _concept_drift(ctx)
    ctx.cache["concept"] = (time.monotonic(), labelled, out)
    return dict(out)


def _concept_drift(ctx: DashContext) -> dict[str, Any]:
    from ..concept_drift import ConceptDriftConfig, concept_drift_status, fleet_concept_drift

    if ctx.config is not None:
        status = fleet_concept_drift(ctx.registry, ctx.config)
    else:
        status = concept_drift_status(ctx.registry, ConceptDriftConfig())
    out = status.to_dict()
    devices = [s for s in out["slices"] if s["kind"] == "device"]
    out["slices"] = [s for s in out["slices"] if s["kind"] != "device" or s["alarm"]]
    out["devices_judged"] = len(devices)
    return out


# --------------------------------------------------------------------------- samples and labels
def samples_page(ctx: DashContext, *, device_id: str | None = None, labelled: bool | None = None,
                 since: float | None = None, until: float | None = None, page: int = 1) -> dict[str, Any]:
    """Samples (newest first), filtered by device, label state and capture time."""
    found = ctx.registry.samples.page_by_capture(page=page, size=ctx.page_size, device_id=device_id,
                                                 labelled=labelled, since=since, until=until)
    items = [_sample(r) for r in found.items]
    return {**_page_info(found), "items": items, "device_id": device_id, "since": since, "until": until, "labelled": labelled}


def labelling(ctx: DashContext, *, page: int = 1, device_id: str | None = None) -> dict[str, Any]:
    """Unlabelled samples (oldest first, so nothing starves), the label choices, and the policy's needs."""
    size = min(ctx.page_size, 48)
    reg = ctx.registry
    ids = [device_id] if device_id else None
    total = reg.samples.count(labelled=False, device_ids=ids)
    p = _pages(total, page, size)
    recs = reg.samples.find(labelled=False, device_ids=ids, offset=(p["page"] - 1) * size, limit=size)
    return {**p, "items": [_sample(r) for r in recs], "classes": class_names(ctx), "needs": label_needs(ctx),
            "device_id": device_id}


# --------------------------------------------------------------------------- models and rollouts
def models_page(ctx: DashContext) -> dict[str, Any]:
    """Every model version with lineage (parent, data), per-variant metrics, gate results, reasons."""
    models = ctx.registry.models()
    children: dict[str, list[str]] = {}
    for m in models:
        if m.parent_version:
            children.setdefault(f"{m.name}:{m.parent_version}", []).append(m.version)
    counts = ctx.registry.status().versions
    items = []
    for m in reversed(models):
        metrics = dict(m.metrics or {})
        items.append({
            "name": m.name, "version": m.version, "status": m.status, "reason": m.reason, "created": m.created,
            "parent_version": m.parent_version, "children": children.get(f"{m.name}:{m.version}", []),
            "sha256": m.sha256, "size": m.size, "size_text": human_bytes(m.size) if m.size is not None else None,
            "signed_by": m.signed_by, "has_bundle": bool(m.bundle_path),
            "variants": metrics.pop("variants", {}) or {}, "gate": gate_rows(metrics.pop("gate", None)),
            "metrics": metrics, "lineage": m.lineage or {}, "devices": counts.get(m.version, 0)})
    defaults = ctx.rollout_defaults
    return {"items": items, "rollout_defaults": {
        "canary": defaults.canary, "waves": list(defaults.waves), "soak_s": defaults.soak_s,
        "max_failures": defaults.max_failures}, "can_roll_out": ctx.get_driver() is not None,
        "can_upload": ctx.config is not None, "groups": _group_choices(ctx)}


def _group_choices(ctx: DashContext, *, limit: int = 1000) -> list[str]:
    """The device groups the rollout form offers (from the first ``limit`` devices: a hint, not a rule)."""
    found = ctx.registry.devices.page(page=1, size=limit)
    return sorted({g for g in (device_group(d) for d in found.items) if g != NO_GROUP})


def rollouts_page(ctx: DashContext, *, limit: int = 100) -> dict[str, Any]:
    recs = ctx.registry.rollouts()[-limit:]
    return {"items": [rollout_summary(r) for r in reversed(recs)], "can_act": ctx.get_driver() is not None}


def rollout_detail(ctx: DashContext, rollout_id: str) -> dict[str, Any]:
    rec = ctx.registry.rollouts.get(rollout_id)
    if rec is None:
        raise FleetError(f"no rollout {rollout_id}", hint="see the rollouts page", rollout=rollout_id)
    out = rollout_summary(rec)
    out["devices"] = [{"device_id": d["device_id"], "wave": d["wave"], "status": d["status"],
                       "previous_version": d.get("previous_version"), "detail": d.get("detail", ""),
                       "job_id": d.get("job_id")} for d in (rec.state or {}).get("devices", [])]
    out["can_act"] = ctx.get_driver() is not None
    return out


def parse_shares(text: str, *, single: bool = False) -> Sequence[float]:
    """``"10%"`` / ``"0.1"`` / ``"25,50,100"`` -> fractions (what the rollout form accepts)."""
    out = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        pct = part.endswith("%")
        value = float(part.rstrip("%"))
        out.append(value / 100 if pct or value > 1 else value)
    if single and len(out) != 1:
        raise ValueError("one share expected")
    return out
