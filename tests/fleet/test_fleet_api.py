"""The fleet HTTP API on a real uvicorn server: token auth, JSON status, resumable bundle downloads."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core import signing
from core.bundle import write_bundle
from core.protocol import DeviceState
from fleet.api import ApiServer
from fleet.config import ApiConfig, default_config
from fleet.registry import IngestBatch, Registry, SampleRecord
from tests.plugins.bundles import FILES, make_manifest

TOKEN = "test-token-0123456789"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, Registry, Path]]:
    cfg = dataclasses.replace(default_config(tmp_path / "fleet"), api=ApiConfig(port=0, token=TOKEN))
    reg = Registry.open(cfg.database_url)
    priv, pub = signing.generate_keypair()
    bundle = write_bundle(tmp_path / "digits-2.elb", make_manifest(version="2"), FILES, signing_key=priv)
    reg.register_model(bundle, trusted_key=pub, status="accepted")
    t = time.time()
    reg.apply(IngestBatch(states=[(DeviceState("cam-1", True, model_version="2"), t)], seen={"cam-1": t}))
    reg.add_samples([SampleRecord(f"s{i}", "cam-1", t, f"cam-1/s{i}.bin", 5, received=t + i) for i in range(7)])
    server = ApiServer(cfg, reg).start()
    assert server.host == "127.0.0.1"  # localhost unless told otherwise
    try:
        yield server.url, reg, bundle
    finally:
        server.stop()
        reg.close()


def test_api_requires_the_token_and_reports_status(api: tuple[str, Registry, Path]) -> None:
    url, _reg, _ = api
    with httpx.Client(base_url=url) as c:
        assert c.get("/api/status").status_code == 401
        assert c.get("/api/status", headers={"Authorization": "Bearer wrong-token-x"}).status_code == 401
        h = {"Authorization": f"Bearer {TOKEN}"}
        st = c.get("/api/status", headers=h).json()
        assert st["devices"] == 1 and st["online"] == 1 and st["samples"] == 7 and st["models"] == 1
        assert c.get("/api/devices", headers=h).json()[0]["id"] == "cam-1"
        assert c.get("/api/devices/cam-1", headers=h).json()["model_version"] == "2"
        assert c.get("/api/devices/nope", headers=h).status_code == 404
        assert c.get("/api/models", headers=h).json()[0]["status"] == "accepted"
        assert c.get("/api/rollouts", headers=h).json() == []
        assert c.get("/api/drift", headers=h).json() == []
        page = c.get("/api/samples", params={"limit": 3, "offset": 3}, headers=h).json()
        assert page["total"] == 7 and [s["id"] for s in page["items"]] == ["s3", "s4", "s5"]
        assert c.get("/openapi.json").status_code == 404 and c.get("/api/openapi.json").status_code == 401
        assert "/api/samples" in c.get("/api/openapi.json", headers=h).json()["paths"]  # not public (issue 16)


def test_device_logs_routes(api: tuple[str, Registry, Path]) -> None:
    """Remote logs over the API: stored lines (none yet: the note says why), and a request that
    needs the fleet's MQTT link (this API has none: 503, not a crash)."""
    url, _reg, _ = api
    h = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url) as c:
        assert c.get("/api/devices/cam-1/logs").status_code == 401
        got = c.get("/api/devices/cam-1/logs", headers=h).json()
        assert got["lines"] == [] and "agent too old or offline" in got["note"]
        assert c.get("/api/devices/nope/logs", headers=h).status_code == 404
        assert c.get("/api/devices/cam-1/logs", params={"level": "LOUD"}, headers=h).status_code == 422
        assert c.post("/api/devices/cam-1/logs/request", headers=h).status_code == 503


def test_bundles_support_range_requests(api: tuple[str, Registry, Path]) -> None:
    url, reg, bundle = api
    data = bundle.read_bytes()
    with httpx.Client(base_url=url) as c:
        full = c.get("/bundles/digits/2.elb")
        assert full.status_code == 200 and full.content == data
        assert full.headers["x-bundle-sha256"] == hashlib.sha256(data).hexdigest()
        # a download cut at 1000 bytes resumes from there
        first = c.get("/bundles/digits/2.elb", headers={"Range": "bytes=0-999"})
        assert first.status_code == 206 and first.content == data[:1000]
        assert first.headers["content-range"] == f"bytes 0-999/{len(data)}"
        rest = c.get("/bundles/digits/2.elb", headers={"Range": "bytes=1000-"})
        assert rest.status_code == 206 and first.content + rest.content == data
        assert c.get("/bundles/digits/2.elb", headers={"Range": f"bytes={len(data) + 10}-"}).status_code == 416
        assert c.get("/bundles/digits/9.elb").status_code == 404
        # a version recorded without a verified signature is never served
        reg.add_model_version("digits", "3", bundle_path=str(bundle))
        assert c.get("/bundles/digits/3.elb").status_code == 404
