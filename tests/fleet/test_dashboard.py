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
                         ("/dashboard/labels", "still needs"), ("/dashboard/samples?device=cam-00", "s-0"),
                         ("/dashboard/models", "no improvement"), ("/dashboard/rollouts", "No rollout yet")]:
        r = c.get(path)
        assert r.status_code == 200, path
        assert needle in r.text, path
    assert c.get("/dashboard/devices/nope").status_code == 404
    assert "<svg" in c.get("/dashboard/devices/cam-00").text


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
    assert drift["total"] == 4 and set(drift["groups"]) == {"v1"}
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
