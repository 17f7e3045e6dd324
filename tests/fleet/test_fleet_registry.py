"""The fleet registry on SQLite (WAL) and, when a server is reachable, PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core import signing
from core.bundle import write_bundle
from core.errors import FleetError, RolloutError, SignatureError
from core.protocol import DeviceState, DriftReportMsg, Feedback, JobStatus, Telemetry
from fleet.registry import IngestBatch, Registry, SampleRecord
from tests.plugins.bundles import FILES, make_manifest


def test_sqlite_is_in_wal_mode(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path / 'f.db'}")
    with reg.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
    reg.close()


def test_devices_from_state_telemetry_and_last_will(registry: Registry) -> None:
    t0 = time.time()
    b = IngestBatch()
    b.states.append((DeviceState("cam-1", True, model_name="digits", model_version="1", variant="onnx-fp32",
                                 hardware={"machine": "aarch64"}), t0))
    b.telemetry.append((Telemetry("cam-2", 1, model_version="1", errors=2, latency_p50_ms=1.5), t0))
    b.seen.update({"cam-1": t0, "cam-2": t0})
    registry.apply(b)
    cam1, cam2 = registry.devices.get("cam-1"), registry.devices.get("cam-2")
    assert cam1 is not None and cam2 is not None
    assert cam1.online and cam1.model_version == "1" and cam1.variant == "onnx-fp32"
    assert cam1.hardware == {"machine": "aarch64"} and cam1.first_seen == t0
    assert cam2.telemetry is not None and cam2.telemetry["errors"] == 2 and cam2.model_version == "1"

    # the Last Will: offline, but what we knew about the device stays
    registry.apply(IngestBatch(states=[(DeviceState("cam-1", False), t0 + 5)]))
    cam1 = registry.devices.get("cam-1")
    assert cam1 is not None and not cam1.online and cam1.model_version == "1" and cam1.first_seen == t0
    assert [d.id for d in registry.devices(online=False)] == ["cam-1"]
    st = registry.status()
    assert (st.devices, st.online, st.offline, st.versions) == (2, 1, 1, {"1": 2})


def test_drift_time_series_and_alarm_streaks(registry: Registry) -> None:
    t = 1000.0
    reports = [DriftReportMsg("cam-1", i, 100, 100, ts=t + i, risk=0.1 * i, alarm=i >= 2) for i in range(5)]
    registry.apply(IngestBatch(drift=[(r, t + 10) for r in reports[:3]], seen={"cam-1": t + 10}))
    registry.apply(IngestBatch(drift=[(r, t + 20) for r in reports[3:]], seen={"cam-1": t + 20}))
    series = registry.drift(device_id="cam-1")
    assert [r.seq for r in series] == [0, 1, 2, 3, 4]
    assert [r.seq for r in registry.drift(device_id="cam-1", limit=2)] == [3, 4]
    assert [r.seq for r in registry.drift(since=t + 3)] == [3, 4]
    dev = registry.devices.get("cam-1")
    assert dev is not None and dev.drift_alarm and dev.alarm_since == t + 2  # the streak's start survives batches
    assert [d.id for d in registry.devices.alarming(min_duration_s=1.5, now=t + 4)] == ["cam-1"]
    assert registry.devices.alarming(min_duration_s=5, now=t + 4) == []
    registry.apply(IngestBatch(drift=[(DriftReportMsg("cam-1", 5, 100, 100, ts=t + 5), t + 30)]))
    dev = registry.devices.get("cam-1")
    assert dev is not None and not dev.drift_alarm and dev.alarm_since is None


def test_an_older_report_committed_later_does_not_put_the_drift_state_back(registry: Registry) -> None:
    """Two ingest processes can commit one device's reports out of order (ingest.workers > 1)."""
    t = 2000.0
    registry.apply(IngestBatch(drift=[(DriftReportMsg("cam-9", 2, 100, 100, ts=t + 2, risk=0.9, alarm=True), t + 3)]))
    registry.apply(IngestBatch(drift=[(DriftReportMsg("cam-9", 1, 100, 100, ts=t + 1, risk=0.1), t + 4)],
                               seen={"cam-9": t + 4}))
    dev = registry.devices.get("cam-9")
    assert dev is not None and dev.drift_alarm and dev.drift_risk == 0.9 and dev.drift_ts == t + 2
    assert dev.alarm_since == t + 2 and dev.last_seen == t + 4  # the rest of the row still moves on
    assert [r.seq for r in registry.drift(device_id="cam-9")] == [1, 2]  # both stored


def test_jobs_samples_and_labels(registry: Registry) -> None:
    t = time.time()
    jobs = [JobStatus("cam-1", "r1-w0-cam-1", "2", step, ts=t + i) for i, step in
            enumerate(("received", "downloading", "completed"))]
    # feedback before its sample: parked, then applied when the sample arrives
    registry.apply(IngestBatch(jobs=[(j, t) for j in jobs], feedback=[Feedback("s-2", "7", source="device")]))
    assert registry.labels.pending_count() == 1
    latest = registry.jobs.latest_steps(["r1-w0-cam-1"])
    assert latest[("r1-w0-cam-1", "cam-1")].step == "completed"
    registry.add_samples([SampleRecord(f"s-{i}", "cam-1", t, f"cam-1/s-{i}.bin", 10, received=t + i,
                                       model_version="1", prediction=str(i + 5), confidence=0.4, reason="drift")
                          for i in range(3)])
    assert registry.labels.pending_count() == 0
    s2 = registry.samples.get("s-2")
    assert s2 is not None and s2.label == "7" and s2.label_source == "device"
    assert registry.labels.apply([("s-0", "1", "operator"), ("nope", "3", "operator")]) == 1
    assert registry.samples.count(labelled=True) == 2 and registry.samples.count(labelled=False) == 1
    assert registry.labels.feedback_accuracy() == (1, 2)  # s-2 predicted 7 and is 7; s-0 predicted 5, is 1
    page = registry.samples(limit=2, offset=1)
    assert [s.id for s in page] == ["s-1", "s-2"]
    registry.add_samples([SampleRecord("s-0", "cam-1", t, "x", 1)])  # a re-sent sample keeps its record
    s0 = registry.samples.get("s-0")
    assert s0 is not None and s0.path == "cam-1/s-0.bin" and s0.label == "1"


def test_models_need_a_valid_signature_and_keep_lineage(registry: Registry, tmp_path: Path) -> None:
    priv, pub = signing.generate_keypair()
    other, _ = signing.generate_keypair()
    good = write_bundle(tmp_path / "d-1.elb", make_manifest(version="1"), FILES, signing_key=priv)
    forged = write_bundle(tmp_path / "d-2.elb", make_manifest(version="2"), FILES, signing_key=other)
    unsigned = write_bundle(tmp_path / "d-3.elb", make_manifest(version="3"), FILES)
    m = registry.models.register(good, trusted_key=pub, status="accepted")
    assert m.sha256 and m.size == good.stat().st_size and m.signed_by == pub.key_id
    assert m.metrics["variants"]["onnx-fp32"]["test_accuracy"] == 0.98
    for bad in (forged, unsigned):
        with pytest.raises(SignatureError):
            registry.models.register(bad, trusted_key=pub)
    assert [x.version for x in registry.models()] == ["1"]
    registry.models.add("digits", "2", parent_version="1", lineage={"samples": 500})
    rejected = registry.models.set_status("digits", "2", "rejected", reason="drift accuracy +0.4 < +2.0 points",
                                         metrics={"drift_acc": 0.8})
    assert rejected.status == "rejected" and rejected.reason and rejected.metrics == {"drift_acc": 0.8}
    assert registry.models.latest("digits") == registry.models.get("digits", "1")
    with pytest.raises(FleetError):
        registry.models.set_status("digits", "9", "accepted")


def test_rollouts_state_and_targets(registry: Registry) -> None:
    r = registry.rollouts.create("r1", "digits", "2", {"a": 0, "b": 1, "c": 1}, state={"wave": 0})
    assert r.status == "pending"
    with pytest.raises(RolloutError):
        registry.rollouts.create("r1", "digits", "2", {})
    registry.rollouts.update("r1", status="running", state={"phase": "deploying"})
    assert registry.rollouts.get("r1").state == {"wave": 0, "phase": "deploying"}  # type: ignore[union-attr]
    assert registry.rollouts.update_targets("r1", ["b", "c"], status="sent", job_ids={"b": "j-b", "c": "j-c"},
                                   previous_version="1") == 2
    assert [t.device_id for t in registry.rollouts.targets("r1", wave=1, statuses=["sent"])] == ["b", "c"]
    tgt = registry.rollouts.target_for_job("j-c")
    assert tgt is not None and tgt.device_id == "c" and tgt.previous_version == "1"
    assert [x.id for x in registry.rollouts(statuses=("running",))] == ["r1"]
    assert registry.status().active_rollouts == 1
    with pytest.raises(RolloutError):
        registry.rollouts.update("r1", status="exploded")


def test_fleet_toml_round_trip_and_errors_name_the_key(tmp_path: Path) -> None:
    from core.errors import ConfigError
    from fleet.config import default_config, load_config, render_config

    cfg = default_config(tmp_path / "data")
    p = tmp_path / "fleet.toml"
    p.write_text(render_config(cfg))
    back = load_config(p)
    assert back.rollout == cfg.rollout and back.broker == cfg.broker and back.data_dir == tmp_path / "data"
    for text, key in (("[broker]\nport = 70000\n", "broker.port"), ("[rollout]\nmax_failure = 0.1\n",
                                                                     "rollout.max_failure"),
                      ("[rollout]\nwaves = [0.5, 0.25]\n", "rollout.waves"), ("[nope]\n", "nope"),
                      ("[ingest]\nreceipt_ms = -1\n", "ingest.receipt_ms"),
                      ("[rollout]\nresend_after_s = 0\n", "rollout.resend_after_s")):
        p.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(p)
        assert err.value.context["key"] == key and key.split(".")[-1] in str(err.value)


def test_resent_messages_are_stored_once(registry: Registry) -> None:
    t = 1000.0
    drift = [DriftReportMsg("cam-1", i, 100, 100, ts=t + i, alarm=i >= 1) for i in range(3)]
    tel = [Telemetry("cam-1", i, ts=t + i, inferences=10 * i) for i in range(3)]
    jobs = [JobStatus("cam-1", "j1", "2", step, ts=t + i) for i, step in enumerate(("received", "completed"))]
    # a duplicate inside one batch does not fail it
    registry.apply(IngestBatch(drift=[(m, t) for m in [*drift, drift[0]]], telemetry=[(m, t) for m in [*tel, tel[1]]],
                               jobs=[(m, t) for m in [*jobs, jobs[0]]]))
    # the device had no receipt and sends the older ones again, after the newer ones
    registry.apply(IngestBatch(drift=[(drift[0], t + 50)], telemetry=[(tel[0], t + 50)], jobs=[(jobs[0], t + 50)],
                               seen={"cam-1": t + 50}))
    assert [r.seq for r in registry.drift(device_id="cam-1")] == [0, 1, 2]
    assert [r.seq for r in registry.telemetry(device_ids=["cam-1"])] == [0, 1, 2]
    assert [j.step for j in registry.jobs.find(job_id="j1")] == ["received", "completed"]
    assert registry.jobs.latest_steps(["j1"])[("j1", "cam-1")].step == "completed"
    dev = registry.devices.get("cam-1")
    # the re-sent report changed nothing but "last seen": the alarm stays on, the telemetry newest
    assert dev is not None and dev.drift_alarm and dev.alarm_since == t + 1 and dev.drift_ts == t + 2
    assert dev.telemetry is not None and dev.telemetry["seq"] == 2 and dev.last_seen == t + 50
    # the same seq after an agent restart is a new message (ts differs)
    registry.apply(IngestBatch(drift=[(DriftReportMsg("cam-1", 0, 100, 100, ts=t + 60), t + 60)]))
    assert len(registry.drift(device_id="cam-1")) == 4


def _reopen(registry: Registry) -> Registry:
    return Registry.open(registry.engine.url.render_as_string(hide_password=False))


def test_an_old_database_gets_the_new_column_and_unique_indexes(registry: Registry,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy import inspect

    from fleet.models import DEDUPE_KEYS, Base

    unique = {t: str(next(ix.name for ix in Base.metadata.tables[t].indexes if ix.unique)) for t in DEDUPE_KEYS}
    report = DriftReportMsg("cam-1", 1, 100, 100, ts=5.0)
    registry.apply(IngestBatch(drift=[(report, 5.0)], states=[(DeviceState("cam-1", True), 5.0)]))
    with registry.engine.begin() as c:  # what a fleet from before deduplication left behind
        for ix in unique.values():
            c.exec_driver_sql(f"DROP INDEX {ix}")
        c.exec_driver_sql("ALTER TABLE devices DROP COLUMN state_seen")
        c.exec_driver_sql("INSERT INTO drift_reports (device_id, ts, received, seq, \"window\", n, risk, alarm, "
                          "input_shift, scores, thresholds, flags, class_counts) "
                          "SELECT device_id, ts, received, seq, \"window\", n, risk, alarm, input_shift, scores, "
                          "thresholds, flags, class_counts FROM drift_reports")
    with caplog.at_level("WARNING", logger="fleet.db"):
        again = _reopen(registry)
    try:
        assert again.without_dedupe == {"drift_reports"}
        assert [r.levelname for r in caplog.records] == ["WARNING"] and unique["drift_reports"] in caplog.text
        names = {t: {ix["name"] for ix in inspect(again.engine).get_indexes(t)} for t in DEDUPE_KEYS}
        assert unique["telemetry"] in names["telemetry"] and unique["job_statuses"] in names["job_statuses"]
        assert unique["drift_reports"] not in names["drift_reports"]
        # ingestion goes on: drift without dedupe, the rest with it; the new column is there
        again.apply(IngestBatch(drift=[(report, 6.0)], telemetry=[(Telemetry("cam-1", 1, ts=6.0), 6.0)] * 2,
                                states=[(DeviceState("cam-1", True), 7.0)]))
        assert len(again.drift_reports(device_id="cam-1")) == 3 and len(again.telemetry()) == 1
        dev = again.device("cam-1")
        assert dev is not None and dev.state_seen == 7.0
    finally:
        again.close()


def test_dashboard_and_provisioning_queries(registry: Registry) -> None:
    """The queries that were raw SQL in the dashboard, provisioning and the benchmark."""
    t = 1000.0
    states = [(DeviceState(f"cam-{i}", i % 2 == 0, model_name="digits" if i else "other", model_version="1"), t)
              for i in range(5)]
    drift = [(DriftReportMsg(f"cam-{i % 2}", i, 100, 100, ts=t + 10 * i, risk=0.2 * (i % 3), alarm=i % 3 == 2), t)
             for i in range(6)]
    registry.apply(IngestBatch(states=states, drift=drift))
    page = registry.devices.page(page=9, size=2, online=True)
    assert (page.total, page.page, page.pages, [d.id for d in page.items]) == (3, 2, 2, ["cam-4"])
    assert [d.id for d in registry.devices.page(q="cam-3").items] == ["cam-3"]
    assert registry.devices.most_common_model_name() == "digits"
    assert registry.drift.first_ts() == t
    cells = {(b.device_id, b.bucket): (b.n, b.alarms) for b in registry.drift.buckets(t, 20.0)}
    assert cells == {("cam-0", 0): (1, 0), ("cam-1", 0): (1, 0), ("cam-0", 1): (1, 1), ("cam-1", 1): (1, 0),
                     ("cam-0", 2): (1, 0), ("cam-1", 2): (1, 1)}
    alarms = registry.drift.alarms_page(t, size=1)
    assert (alarms.total, [r.seq for r in alarms.items]) == (2, [5])
    assert registry.drift.count(device_prefix="cam-1") == 3 and ("cam-0", 4) in registry.drift.identities()
    assert registry.drift.delete(["cam-1"]) == 3 and registry.devices.delete(["cam-1"]) == 1
    assert registry.drift.count() == 3 and registry.devices.get("cam-1") is None
    registry.add_samples([SampleRecord(f"s-{i}", "cam-0", t + i, f"s-{i}", 1, prediction=str(i)) for i in range(3)])
    registry.labels.apply([("s-0", "7", "operator")])
    newest = registry.samples.page_by_capture(size=2, since=t + 1)
    assert (newest.total, [s.id for s in newest.items]) == (2, ["s-2", "s-1"])
    assert registry.samples.classes_seen() == {"0", "1", "2", "7"}
    registry.credentials.put("fleet", "fleet", "hash-1")
    registry.credentials.put("fleet", "fleet", "hash-2")
    registry.credentials.put("cam-0", "device", "hash-3")
    assert [(c.username, c.role, c.password_hash) for c in registry.credentials.find()] == [
        ("cam-0", "device", "hash-3"), ("fleet", "fleet", "hash-2")]


def test_the_flat_names_from_before_the_split_still_answer(registry: Registry) -> None:
    registry.rollouts.create("r1", "digits", "2", {"a": 0})
    assert registry.rollout("r1") == registry.rollouts.get("r1")
    assert registry.rollout_targets("r1") == registry.rollouts.targets("r1")
    assert registry.device("a") is None and registry.upsert_device("a").id == "a" and registry.device("a")
    assert registry.models() == registry.models.find() == [] and registry.latest_model("digits") is None


def test_reports_in_transit_is_how_late_the_newest_reports_arrive(registry: Registry) -> None:
    """The canary judge's measure of a backlog: sending -> arrival of each device's newest report, counted only
    for devices whose newest report arrived lately (a silent device is not a backlog)."""
    from fleet.canary_data import TRANSIT_FRESH_S, reports_in_transit

    now = 10_000.0
    registry.apply(IngestBatch(telemetry=[
        (Telemetry("cam-1", 0, ts=now - 200.0), now - 199.5),  # on time, then behind: its newest was sent
        (Telemetry("cam-1", 1, ts=now - 150.0), now - 2.0),  # 148 s before it arrived
        (Telemetry("cam-2", 0, ts=now - 5.0), now - 4.0),  # on time
        (Telemetry("cam-3", 0, ts=now - 900.0), now - TRANSIT_FRESH_S - 10.0),  # silent since
    ]))
    assert reports_in_transit(registry, ["cam-1", "cam-2", "cam-3"], now) == pytest.approx(148.0)
    assert reports_in_transit(registry, ["cam-2"], now) == pytest.approx(1.0)
    assert reports_in_transit(registry, ["cam-3", "cam-9"], now) == 0.0
