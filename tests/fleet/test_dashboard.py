"""Dashboard routes, auth, CSRF and pages, with FastAPI's TestClient over a real SQLite registry.

The registry is filled through ``Registry.apply`` with real protocol messages and real
sample payloads (``encode_sample``), exactly as ingestion writes them.  Rollout actions
go through the real :class:`RolloutDriver`; its publisher is the seam the driver offers
(``Publisher``), recorded here instead of an MQTT client — the browser test covers MQTT.
"""

from __future__ import annotations

import re
import struct
import time
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from core.protocol import DeviceState, DriftReportMsg, JobStatus, Telemetry  # noqa: E402
from core.sampling import DriftSample, encode_sample  # noqa: E402
from fleet.dashboard import DashboardConfig, create_router, hash_password, mount_dashboard  # noqa: E402
from fleet.dashboard.auth import Authenticator  # noqa: E402
from fleet.dashboard.config import DashboardUser  # noqa: E402
from fleet.dashboard.png import encode_png  # noqa: E402
from fleet.registry import IngestBatch, Registry  # noqa: E402
from fleet.rollout_driver import RolloutDriver  # noqa: E402
from fleet.samples import SampleStore, sample_record  # noqa: E402

OP = "operator-token-0123456789"
VIEW = "viewer-token-0123456789ab"
LOCAL = ("127.0.0.1", 50000)


class RecordingPublisher:
    """The driver's ``Publisher`` seam: keeps what would go over MQTT."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.sent.append((topic, payload))


def fill(reg: Registry, store: SampleStore, n_devices: int = 6, *, bundle: Path) -> None:
    t = time.time() - 300
    batch = IngestBatch()
    for i in range(n_devices):
        dev = f"cam-{i:02d}"
        batch.states.append((DeviceState(dev, True, ts=t, model_name="digits", model_version="1",
                                         delivery=("mqtt",)), t))
        for k in range(5):
            ts = t + 10 * k
            batch.telemetry.append((Telemetry(dev, k, ts=ts, model_version="1", inferences=100 * k,
                                              inferences_interval=100, latency_p50_ms=1.0 + k,
                                              latency_p99_ms=3.0 + k, mean_confidence=0.9, queue_depth=k), ts))
            alarm = i < 2 and k >= 3
            batch.drift.append((DriftReportMsg(dev, k, window=k, n=64, ts=ts, model_version="1",
                                               risk=0.9 if alarm else 0.1, alarm=alarm), ts))
        batch.seen[dev] = t + 40
    batch.jobs.append((JobStatus("cam-00", "job-a", "1", "completed", ts=t), t))
    reg.apply(batch)
    samples = []
    for j in range(5):
        img = (np.arange(64, dtype=np.uint8).reshape(8, 8) * (j + 1)).astype(np.uint8)
        s = DriftSample(f"s-{j}", "cam-00", t + j, "1", j % 10, 0.4, 2.0, "drift", img)
        samples.append(sample_record(store, "cam-00", f"s-{j}", encode_sample(s), {}, received=t + j))
    reg.add_samples(samples)
    reg.add_model_version("digits", "1", status="accepted", bundle_path=str(bundle), sha256="a" * 64, size=10,
                          metrics={"variants": {"fp32": {"test_accuracy": 0.98, "accuracy_drop": 0.0,
                                                         "latency_ms": 1.2, "size": 100}}},
                          lineage={"run_id": "r1"}, created=t - 100)
    reg.add_model_version("digits", "2", status="accepted", parent_version="1", bundle_path=str(bundle),
                          sha256="b" * 64, size=10, metrics={"gate": {"improvement": 0.05}},
                          lineage={"trigger": "drift"}, created=t - 50)
    reg.add_model_version("digits", "3", status="rejected", parent_version="1", reason="no improvement",
                          created=t - 40)


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Any]:
    reg = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    store = SampleStore(tmp_path / "samples")
    bundle = tmp_path / "digits-2.elb"
    bundle.write_bytes(b"0123456789")
    fill(reg, store, bundle=bundle)
    pub = RecordingPublisher()
    driver = RolloutDriver(reg, pub, delivery="mqtt")
    from fleet.dashboard.data import DashContext

    ctx = DashContext(registry=reg, samples_dir=store.root, driver=driver, page_size=5)
    cfg = DashboardConfig(operator_token=OP, viewer_token=VIEW, session_secret="s" * 32,
                          users=(DashboardUser("alice", hash_password("wonderland", iterations=1000), "viewer"),))
    app = FastAPI()
    mount_dashboard(app, ctx, cfg)
    yield {"app": app, "reg": reg, "pub": pub, "driver": driver}
    reg.close()


def login(app: FastAPI, token: str = OP) -> TestClient:
    c = TestClient(app, client=LOCAL, follow_redirects=False)
    page = c.get("/dashboard/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/dashboard/login", data={"token": token, "csrf_token": csrf, "next": "/dashboard/"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/"
    return c


def csrf_of(c: TestClient, path: str = "/dashboard/") -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', c.get(path).text).group(1)


def test_pages_need_login_and_loopback(fleet: dict[str, Any]) -> None:
    c = TestClient(fleet["app"], client=LOCAL, follow_redirects=False)
    r = c.get("/dashboard/devices")
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login?next=")
    assert c.get("/dashboard/api/overview").status_code == 401
    assert c.get("/dashboard/samples/s-0.png").status_code == 401
    remote = TestClient(fleet["app"], client=("192.0.2.7", 4000))
    assert remote.get("/dashboard/login").status_code == 403


def test_login_with_wrong_token_or_without_csrf_fails(fleet: dict[str, Any]) -> None:
    c = TestClient(fleet["app"], client=LOCAL, follow_redirects=False)
    page = c.get("/dashboard/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    assert c.post("/dashboard/login", data={"token": OP}).status_code == 403  # no CSRF token
    r = c.post("/dashboard/login", data={"token": "wrong-token-000000000", "csrf_token": csrf})
    assert r.status_code == 303 and "/login" in r.headers["location"]
    assert c.get("/dashboard/api/overview").status_code == 401


def test_user_password_login_is_read_only(fleet: dict[str, Any]) -> None:
    c = TestClient(fleet["app"], client=LOCAL, follow_redirects=False)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/dashboard/login").text).group(1)
    r = c.post("/dashboard/login", data={"username": "alice", "password": "wonderland", "csrf_token": csrf})
    assert r.status_code == 303
    page_csrf = csrf_of(c)
    assert "alice · viewer" in c.get("/dashboard/").text
    r = c.post("/dashboard/actions/label", data={"sample_id": "s-0", "label": "3", "csrf_token": page_csrf})
    assert r.status_code == 403
    assert fleet["reg"].sample("s-0").label is None


def test_every_page_renders(fleet: dict[str, Any]) -> None:
    c = login(fleet["app"])
    for path, needle in [("/dashboard/", "in drift alarm"), ("/dashboard/devices", "cam-00"),
                         ("/dashboard/devices/cam-00", "Model history"), ("/dashboard/drift", "Alarmed windows"),
                         ("/dashboard/labels", "more labelled samples"), ("/dashboard/samples?device=cam-00", "s-0"),
                         ("/dashboard/models", "no improvement"), ("/dashboard/rollouts", "No rollout yet")]:
        r = c.get(path)
        assert r.status_code == 200, path
        assert needle in r.text, path
        assert "vNone" not in r.text and "vunknown" not in r.text and ">None<" not in r.text, path
        assert 'id="nav-samples"' in r.text, path  # every page links every other one
    assert c.get("/dashboard/devices/nope").status_code == 404
    assert "<svg" in c.get("/dashboard/devices/cam-00").text


def test_pages_read_like_a_person_wrote_them(fleet: dict[str, Any]) -> None:
    """Issue 15: no vNone, counts as integers, sizes in units, the gate as a table, one labels statement."""
    reg = fleet["reg"]
    from core.protocol import DeviceState as DS
    from fleet.registry import IngestBatch as IB

    reg.apply(IB(states=[(DS("cam-new", True, ts=time.time()), time.time())]))  # no model yet
    reg.upsert_device("cam-01", tags={"group": "cams-north"})
    reg.add_model_version("digits", "4", status="rejected", parent_version="2", size=90_000, sha256="c" * 64,
                          metrics={"gate": {"holdout_current": 0.62, "holdout_candidate": 0.63, "test_current": 0.98,
                                            "test_candidate": 0.95, "n_holdout": 40, "min_improvement": 0.02,
                                            "max_original_drop": 0.01, "passed": False}})
    c = login(fleet["app"])
    devices = c.get("/dashboard/devices").text + c.get("/dashboard/devices?page=2").text
    row = re.search(r'data-device="cam-new">(.*?)</tr>', devices, re.S).group(1)
    assert "<td>—</td>" in row and "vNone" not in row
    north = re.search(r'data-device="cam-01">(.*?)</tr>', devices, re.S).group(1)
    assert "<td>cams-north</td>" in north  # the group column is the group tag, not the model version
    assert c.get("/dashboard/api/devices/cam-02").json()["group"] == "—"
    models = c.get("/dashboard/models").text
    assert "87.9 KB" in models and "90000" not in models
    gate = c.get("/dashboard/api/models").json()["items"][0]["gate"]
    assert [(g["metric"].split(" (")[0], g["verdict"]) for g in gate] == [
        ("held-out drift accuracy", "fail"), ("original test accuracy", "fail"), ("overall", "fail")]
    assert 'id="gate-4"' in models and "+1.0 pt" in models and "-3.0 pt" in models and "{" not in \
        re.search(r'id="gate-4".*?</table>', models, re.S).group(0)
    overview = c.get("/dashboard/").text
    assert re.search(r'id="stat-devices"><b>7</b>', overview) and ">7.0<" not in overview
    assert 'href="/metrics"' in overview
    needs = re.search(r'id="labels-needed">(.*?)</p>', overview, re.S).group(1)
    assert "more labelled samples" in needs and needs.count("needs") == 1, needs
    dev = c.get("/dashboard/devices/cam-00").text
    assert 'id="cpu-chart"' in dev and 'id="memory-chart"' in dev


def test_device_group_tag_and_rollout_target_from_the_ui(fleet: dict[str, Any]) -> None:
    c = login(fleet["app"])
    token = csrf_of(c)
    for dev in ("cam-03", "cam-04"):
        r = c.post(f"/dashboard/actions/devices/{dev}/group", data={"group": "cams-north", "csrf_token": token})
        assert r.status_code == 303 and "msg=" in r.headers["location"]
    assert fleet["reg"].device("cam-03").tags["group"] == "cams-north"
    r = c.post("/dashboard/actions/devices/cam-03/group", data={"group": "a b", "csrf_token": token})
    assert "err=" in r.headers["location"]
    assert 'value="group=cams-north"' in c.get("/dashboard/models").text  # offered as a target
    r = c.post("/dashboard/actions/rollout", data={"name": "digits", "version": "2", "target": "group=cams-north",
                                                   "canary": "50%", "waves": "100", "soak": "0s",
                                                   "csrf_token": token}, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["devices"] == 2 and body["target"] == "group=cams-north"
    page = c.get(f"/dashboard/rollouts/{body['rollout_id']}").text
    assert "group=cams-north" in page and "canary, stage 1 of 2" in page


def test_device_page_shows_the_agents_log_and_asks_for_more(fleet: dict[str, Any]) -> None:
    from core.protocol import LogLines, LogsRequest, decode
    from fleet.repos.logs import LogRepo

    c = login(fleet["app"])
    assert "no log lines" in c.get("/dashboard/devices/cam-00").text
    lines = tuple({"seq": i, "ts": time.time(), "level": lv, "logger": "edge_agent", "msg": msg}
                  for i, (lv, msg) in enumerate([("INFO", "model digits 1 loaded"),
                                                 ("ERROR", "<script>alert(1)</script> broker down")], 1))
    LogRepo.of(fleet["reg"]).add(LogLines("cam-00", "req-1", "boot1", lines=lines))
    page = c.get("/dashboard/devices/cam-00").text
    assert "model digits 1 loaded" in page and "&lt;script&gt;alert(1)" in page and "<script>alert" not in page
    assert "model digits 1 loaded" not in c.get("/dashboard/devices/cam-00?level=ERROR").text
    assert c.get("/dashboard/api/devices/cam-00?level=loud").status_code == 404
    r = c.post("/dashboard/actions/devices/cam-00/logs", data={"csrf_token": csrf_of(c)})
    assert r.status_code == 303 and "msg=" in r.headers["location"]
    (req,) = [decode(p) for t, p in fleet["pub"].sent if t.endswith("/cmd/logs")]
    assert isinstance(req, LogsRequest) and (req.boot, req.since_seq) == ("boot1", 2)


def test_drift_page_shows_concept_drift_from_labels(fleet: dict[str, Any]) -> None:
    c = login(fleet["app"])
    assert 'id="concept-none"' in c.get("/dashboard/drift").text
    fleet["reg"].label_samples([(f"s-{j}", str((j + 1) % 10), "operator") for j in range(5)])  # every answer wrong
    concept = c.get("/dashboard/api/drift").json()["concept"]
    assert concept["labels"] == 5 and concept["devices_judged"] == 1
    fleet_row = next(s for s in concept["slices"] if s["kind"] == "fleet")
    assert fleet_row["n"] == 5 and fleet_row["accuracy"] == 0.0
    page = c.get("/dashboard/drift").text
    assert 'id="concept-slices"' in page and "fleet <b>fleet</b>" in page


def test_concept_drift_is_cached_until_a_label_arrives(fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.dashboard import data

    ctx = data.DashContext(registry=fleet["reg"])
    calls: list[int] = []
    real = data._concept_drift
    monkeypatch.setattr(data, "_concept_drift", lambda c: calls.append(1) or real(c))
    assert data.concept_drift(ctx) == data.concept_drift(ctx) and len(calls) == 1  # the live page polls
    fleet["reg"].label_samples([("s-0", "3", "operator")])
    assert data.concept_drift(ctx)["labels"] == 1 and len(calls) == 2  # a new label: computed afresh


def test_completed_rollout_reads_completed(fleet: dict[str, Any]) -> None:
    from fleet.dashboard.data import rollout_summary

    rec = fleet["reg"]
    state = {"status": "completed", "wave": 2, "n_waves": 3, "plan": {"canary": 0.1, "waves": [0.5, 1.0], "soak_s": 60.0, "max_failures": 0.05},
             "devices": [
        {"device_id": f"d{i}", "wave": w, "status": "updated"} for i, w in enumerate((0, 1, 2))]}
    rec.create_rollout("r-done", "digits", "2", {"d0": 0, "d1": 1, "d2": 2}, state=state, status="completed")
    s = rollout_summary(rec.rollout("r-done"))
    assert s["progress"] == "completed, 3 of 3 waves" and s["target"] == "all devices"
    c = login(fleet["app"])
    assert "completed, 3 of 3 waves" in c.get("/dashboard/rollouts/r-done").text
    assert "wave 2 of 3" not in c.get("/dashboard/rollouts").text


def test_model_upload_registers_trusted_bundles_only(tmp_path: Path) -> None:
    from core.signing import save_keypair
    from fleet.config import default_config
    from fleet.dashboard.data import DashContext
    from fleet.setup import trust_key
    from tests.plugins.agent_kit import make_bundle

    cfg = default_config(tmp_path / "fleet-data")
    reg = Registry.open(cfg.database_url)
    app = FastAPI()
    mount_dashboard(app, DashContext.for_fleet(cfg, reg), DashboardConfig(operator_token=OP, session_secret="s" * 32))
    c = login(app)
    token = csrf_of(c, "/dashboard/models")
    assert 'id="upload-form"' in c.get("/dashboard/models").text
    mine = save_keypair(tmp_path / "me")
    signed = make_bundle(tmp_path / "tiny.elb", signing_key=mine.private).read_bytes()

    def upload(data: bytes, name: str = "tiny.elb") -> str:
        r = c.post("/dashboard/actions/models", data={"csrf_token": token},
                   files={"bundle": (name, data, "application/octet-stream")})
        assert r.status_code == 303, r.text
        return urllib.parse.unquote(r.headers["location"])

    try:
        for data, why in [(signed, "not trusted"), (b"PK\x03\x04 not a zip", "not a bundle"),
                          (make_bundle(tmp_path / "u.elb", sign=False).read_bytes(), "not signed")]:
            where = upload(data)
            assert "err=" in where and why in where and "\n" not in where, where
            assert "tiny.elb" in where or "bundle not registered" in where
            assert str(tmp_path) not in where  # no server path leaks
        assert reg.models.find() == [] and not list(cfg.bundles_dir.glob("*.elb"))  # nothing stored
        assert c.post("/dashboard/actions/models", files={"bundle": ("x.elb", signed)}).status_code == 403  # CSRF
        trust_key(cfg, mine.public)
        where = upload(signed)
        assert "msg=registered tiny-mlp 1.0.0" in where, where
        (rec,) = reg.models.find()
        assert rec.status == "accepted" and Path(rec.bundle_path).parent == cfg.bundles_dir
        assert [p.name for p in cfg.bundles_dir.iterdir()] == ["tiny-mlp-1.0.0.elb"]  # no temporary left
        # scripts: the raw bundle as the body, with a bearer token
        r = c.post("/dashboard/actions/models?filename=again.elb", content=signed,
                   headers={"Authorization": f"Bearer {OP}", "Content-Type": "application/octet-stream"})
        assert r.status_code == 200 and r.json()["version"] == "1.0.0"
    finally:
        reg.close()


def test_presentation_helpers() -> None:
    from fleet.dashboard.present import count, gate_rows, human_bytes, version

    assert [version(v) for v in (None, "", "None", "unknown", "2", "v3")] == ["—", "—", "—", "—", "v2", "v3"]
    assert [count(v) for v in (8.0, 3, None, 1234.0)] == ["8", "3", "—", "1,234"]
    assert [human_bytes(v) for v in (10, 90_000, 5 * 1024 ** 2, None)] == ["10 B", "87.9 KB", "5.0 MB", "—"]
    rows = gate_rows({"holdout_current": 0.5, "holdout_candidate": 0.6, "min_improvement": 0.02, "variant": "fp32",
                      "acc_current": 0.9, "acc_candidate": 0.8, "current_f1": 0.7, "candidate_f1": 0.75})
    assert [r["verdict"] for r in rows] == ["pass", "—", "—", "—"] and [r["metric"] for r in rows[1:3]] == ["acc", "f1"]
    assert rows[2]["change"] == pytest.approx(0.05) and rows[3]["metric"] == "variant: fp32" and gate_rows(None) == []


def test_json_api_matches_and_paginates(fleet: dict[str, Any]) -> None:
    c = login(fleet["app"])
    o = c.get("/dashboard/api/overview").json()
    assert (o["devices"], o["online"], o["alarming"], o["unlabelled_samples"]) == (6, 6, 2, 5)
    assert {a["id"] for a in o["alarmed_devices"]} == {"cam-00", "cam-01"}
    p1 = c.get("/dashboard/api/devices?page=1").json()
    p2 = c.get("/dashboard/api/devices?page=2").json()
    assert (p1["total"], p1["pages"], len(p1["items"]), len(p2["items"])) == (6, 2, 5, 1)
    assert c.get("/dashboard/api/devices?alarm=1").json()["total"] == 2
    drift = c.get("/dashboard/api/drift").json()
    assert drift["total"] == 4 and set(drift["groups"]) == {"no group"}
    dev = c.get("/dashboard/api/devices/cam-00").json()
    assert len(dev["telemetry"]) == 5 and dev["telemetry"][-1]["queue_depth"] == 4
    assert dev["history"][0]["version"] == "1"
    models = c.get("/dashboard/api/models").json()["items"]
    assert [m["version"] for m in models] == ["3", "2", "1"] and models[2]["children"] == ["2", "3"]
    # the JSON endpoints are part of the app's OpenAPI schema
    paths = fleet["app"].openapi()["paths"]
    assert "/dashboard/api/overview" in paths and "/dashboard/actions/rollout" in paths


def test_bearer_token_reads_and_acts_without_csrf(fleet: dict[str, Any]) -> None:
    c = TestClient(fleet["app"], client=LOCAL)
    assert c.get("/dashboard/api/overview", headers={"Authorization": f"Bearer {VIEW}"}).status_code == 200
    r = c.post("/dashboard/actions/label", json={"sample_id": "s-1", "label": "7"},
               headers={"Authorization": f"Bearer {VIEW}"})
    assert r.status_code == 403
    r = c.post("/dashboard/actions/label", json={"sample_id": "s-1", "label": "7"},
               headers={"Authorization": f"Bearer {OP}"})
    assert r.status_code == 200 and r.json()["labelled"] == 1
    assert fleet["reg"].sample("s-1").label == "7"


def test_label_needs_csrf_and_updates_counts(fleet: dict[str, Any]) -> None:
    c = login(fleet["app"])
    assert c.post("/dashboard/actions/label", data={"sample_id": "s-0", "label": "3"}).status_code == 403
    bad = csrf_of(c)[:-2] + "xx"
    assert c.post("/dashboard/actions/label", data={"sample_id": "s-0", "label": "3",
                                                    "csrf_token": bad}).status_code == 403
    token = csrf_of(c)
    r = c.post("/dashboard/actions/label", data={"sample_id": "s-0", "label": "3", "csrf_token": token,
                                                 "next": "/dashboard/labels"})
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/labels?msg=")
    assert fleet["reg"].sample("s-0").label == "3"
    assert c.get("/dashboard/api/labels").json()["total"] == 4
    r = c.post("/dashboard/actions/label", data={"sample_id": "s-2", "label": "", "csrf_token": token},
               headers={"Accept": "application/json"})
    assert r.status_code == 400 and "not a class" in r.json()["error"]
    # an open redirect is refused: next must stay inside the dashboard
    r = c.post("/dashboard/actions/label", data={"sample_id": "s-2", "label": "1", "csrf_token": token,
                                                 "next": "https://evil.example/"})
    assert r.headers["location"].startswith("/dashboard/")


def test_rollout_start_pause_resume_rollback(fleet: dict[str, Any]) -> None:
    c = login(fleet["app"])
    token = csrf_of(c)
    r = c.post("/dashboard/actions/rollout", data={"name": "digits", "version": "2", "canary": "20%",
                                                   "waves": "50,100", "soak": "0s", "max_failures": "0%",
                                                   "csrf_token": token})
    assert r.status_code == 303
    rid = re.search(r"/dashboard/rollouts/([^?]+)", r.headers["location"]).group(1)
    deploys = [t for t, _ in fleet["pub"].sent if t.endswith("/cmd/deploy")]
    assert len(deploys) == 2  # canary: 20% of 6 devices, rounded up
    detail = c.get(f"/dashboard/api/rollouts/{rid}").json()
    assert detail["status"] == "running" and detail["waves"][0]["label"] == "canary"
    for verb, status in [("pause", "paused"), ("resume", "running"), ("rollback", "halted")]:
        r = c.post(f"/dashboard/actions/rollouts/{rid}/{verb}", data={"csrf_token": token},
                   headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text
        assert fleet["reg"].rollout(rid).status == status
    assert [t for t, _ in fleet["pub"].sent if t.endswith("/cmd/rollback")]
    page = c.get(f"/dashboard/rollouts/{rid}").text
    assert "halted" in page and "rolling_back" in page
    r = c.post("/dashboard/actions/rollout", data={"name": "digits", "version": "3", "csrf_token": token})
    assert r.status_code == 303 and "err=" in r.headers["location"]  # rejected model: refused with a reason


def test_session_cookie_is_signed_and_expires() -> None:
    now = [1000.0]
    a = Authenticator(DashboardConfig(operator_token=OP, session_secret="k" * 32, session_ttl_s=60),
                      clock=lambda: now[0])
    s = a.login(token=OP)
    assert s is not None and s.role == "operator"
    cookie = a.encode(s)
    assert a.decode(cookie) == s
    body, sig = cookie.split(".")
    forged = body.replace(body[-4:], "AAAA") + "." + sig
    assert a.decode(forged) is None
    other = Authenticator(DashboardConfig(operator_token=OP, session_secret="x" * 32), clock=lambda: now[0])
    assert other.decode(cookie) is None
    now[0] += 61
    assert a.decode(cookie) is None
    assert a.check_csrf(s.sid, a.csrf_token(s.sid)) and not a.check_csrf(s.sid, a.csrf_token("other"))


def test_config_validation() -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="operator_token"):
        DashboardConfig(operator_token="short")
    with pytest.raises(ConfigError, match=r"\[dashboard\].tokn: unknown key"):
        DashboardConfig.from_dict({"tokn": "x"})
    with pytest.raises(ConfigError, match="password_hash"):
        DashboardConfig.from_dict({"users": [{"name": "bob", "password_hash": "plain", "role": "viewer"}]})
    cfg = DashboardConfig.from_dict({"viewer_token": VIEW, "users": [
        {"name": "bob", "password_hash": hash_password("pw-123456", iterations=1000), "role": "operator"}]})
    assert cfg.users[0].role == "operator" and cfg.has_logins


def test_png_encoder_roundtrip() -> None:
    img = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
    png = encode_png(img)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, ctype = struct.unpack(">IIBB", png[16:26])
    assert (w, h, depth, ctype) == (7, 12, 8, 0)
    idat = png[33 + 8:-12]
    raw = zlib.decompress(idat[:-4])
    rows = np.frombuffer(raw, np.uint8).reshape(12, 8)
    assert (rows[:, 0] == 0).all() and (rows[:, 1:] == img).all()


def test_sample_thumbnail_is_png(fleet: dict[str, Any]) -> None:
    c = login(fleet["app"])
    r = c.get("/dashboard/samples/s-3.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    w, h = struct.unpack(">II", r.content[16:24])
    assert (w, h) == (96, 96)  # 8x8 enlarged 12x
    assert c.get("/dashboard/samples/nope.png").status_code == 404


def test_router_accepts_a_bare_registry(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path / 'f.db'}")
    app = FastAPI()
    app.include_router(create_router(reg, {"operator_token": OP}))
    c = login(app)
    assert c.get("/dashboard/api/overview").json()["devices"] == 0
    assert "No model registered" in c.get("/dashboard/models").text
    reg.close()


def test_package_import_is_light() -> None:
    """fleet.config may import DashboardConfig: that must not pull in FastAPI or Jinja2."""
    import subprocess
    import sys

    code = ("import sys, fleet.dashboard as d; assert 'fastapi' not in sys.modules and 'jinja2' not in sys.modules;"
            "assert all(hasattr(d, n) for n in d.__all__)")
    subprocess.run([sys.executable, "-c", code], check=True)



def test_hostile_login_bodies_are_400s_and_nan_filters_nothing(fleet: dict[str, Any]) -> None:
    from fleet.dashboard.routes import _float

    c = TestClient(fleet["app"], client=LOCAL, follow_redirects=False)
    c.get("/dashboard/login")
    for body in (b"[1, 2]", b'"token"', b"{" * 5000, b"not json"):
        r = c.post("/dashboard/login", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body[:10], r.status_code)
    assert _float("nan") is None and _float("inf") is None and _float("1.5") == 1.5 and _float("x") is None


def test_logout_revokes_the_cookie_even_if_a_copy_survives(fleet: dict[str, Any]) -> None:
    c = login(fleet["app"])
    cookies = dict(c.cookies)
    assert c.get("/dashboard/api/overview").status_code == 200
    r = c.post("/dashboard/logout", data={"csrf_token": csrf_of(c)})
    assert r.status_code == 303
    copy = TestClient(fleet["app"], client=LOCAL, follow_redirects=False, cookies=cookies)
    assert copy.get("/dashboard/api/overview").status_code == 401
