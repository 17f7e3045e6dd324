"""The operator side of issue 16 §6: dashboard sessions and logins, secret files, the API's
schema and metrics.  No wall clock: the authenticator's clock is injected, and timing-oracle
freedom is asserted as "one PBKDF2 per attempt, whoever the user"."""

from __future__ import annotations

import dataclasses
import grp
import os
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleet.api import create_app
from fleet.config import ApiConfig, BrokerConfig, default_config
from fleet.dashboard import auth as auth_mod
from fleet.dashboard.auth import Authenticator, hash_password
from fleet.dashboard.config import DashboardConfig, DashboardUser
from fleet.ingest import IngestService
from fleet.provision import provision_device
from fleet.registry import Registry


def _auth(now: list[float]) -> Authenticator:
    cfg = DashboardConfig(users=(DashboardUser(name="ann", password_hash=hash_password("right-pass", iterations=1000),
                                               role="operator"),))
    return Authenticator(cfg, clock=lambda: now[0])


def test_logout_revokes_the_session() -> None:
    now = [1000.0]
    a = _auth(now)
    s = a.login(user="ann", password="right-pass")
    assert s is not None
    cookie = a.encode(s)
    assert a.decode(cookie) == s
    a.revoke(s)
    assert a.decode(cookie) is None  # the stolen or kept cookie is dead


def test_logins_are_throttled_per_user_and_client() -> None:
    now = [1000.0]
    a = _auth(now)
    for _ in range(5):
        assert a.login(user="ann", password="wrong", client="10.0.0.9") is None
    assert a.login(user="ann", password="right-pass") is None  # locked out, even with the right password
    now[0] += 31.0
    assert a.login(user="ann", password="right-pass") is not None  # the lock-out ends
    for _ in range(5):
        a.login(token="guess-" + "x" * 10, client="10.0.0.7")
    assert a.locked_out("client:10.0.0.7") and not a.locked_out("client:10.0.0.8")


def test_unknown_user_names_cost_the_same_pbkdf2(monkeypatch: pytest.MonkeyPatch) -> None:
    a = _auth([1000.0])
    calls: list[str] = []
    real = auth_mod.verify_password
    monkeypatch.setattr(auth_mod, "verify_password", lambda p, h: calls.append(h.split("$")[1]) or real(p, h))
    a.login(user="ann", password="wrong")
    a.login(user="nobody", password="wrong")
    assert len(calls) == 2  # one PBKDF2 each: no early exit for a user that does not exist


def test_fleet_secrets_and_database_are_private_from_creation(tmp_path: Path) -> None:
    old = os.umask(0o000)  # the worst umask: anything not created 0600 would be world-readable
    try:
        cfg = dataclasses.replace(default_config(tmp_path / "fleet", prefix="p/v1"),
                                  broker=BrokerConfig(username="fleet", password="fleet-password"))
        reg = Registry.open(cfg.database_url)
        res = provision_device(cfg, reg, "cam-1")
        reg.status()
        private = [res.password_path, res.agent_toml, Path(cfg.database_url.removeprefix("sqlite:///")),
                   cfg.signing_key_path]
        for p in private:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        # the broker's files: the broker's group may read them (Debian runs mosquitto as user mosquitto)
        for p in (res.broker.password_file, res.broker.acl_file, res.broker.conf_snippet):
            if res.broker.readable_by_broker:
                assert stat.S_IMODE(p.stat().st_mode) == 0o640 and p.stat().st_gid == grp.getgrnam("mosquitto").gr_gid, p
            else:
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        conf = res.broker.conf_snippet.read_text()
        assert "127.0.0.1" in conf and "use_username_as_clientid true" in conf and "max_packet_size" in conf
        reg.close()
    finally:
        os.umask(old)


def test_api_schema_is_private_and_metrics_report_refusals(tmp_path: Path) -> None:
    cfg = dataclasses.replace(default_config(tmp_path / "fleet", prefix="p/v1"),
                              api=ApiConfig(token="t" * 16))
    reg = Registry.open(cfg.database_url)
    ingest = IngestService(cfg, reg)
    ingest.start(connect=False)
    try:
        ingest.submit("p/v1/devices/cam-1/jobs", b"{" * 100 + b"x" * (100 << 10))
        assert ingest.wait_idle(10)

        class Ctx:
            pass

        ctx = Ctx()
        ctx.ingest = ingest  # type: ignore[attr-defined]
        ctx.registry = reg  # type: ignore[attr-defined]
        app = create_app(dataclasses.replace(cfg, dashboard=dataclasses.replace(cfg.dashboard, enabled=False)), reg,
                         ctx=ctx)
        h = {"Authorization": "Bearer " + "t" * 16}
        with TestClient(app) as c:
            assert c.get("/openapi.json").status_code == 404 and c.get("/docs").status_code == 404
            assert c.get("/api/openapi.json").status_code == 401 and c.get("/metrics").status_code == 401
            assert c.get("/api/openapi.json", headers=h).status_code == 200
            assert c.get("/api/drift", params={"since": "nan"}, headers=h).status_code == 422
            text = c.get("/metrics", headers=h).text
        assert 'edgeloop_ingest_refusals_total{rule="message_size"} 1' in text
        assert 'edgeloop_device_refusals_total{device="cam-1",rule="message_size"} 1' in text
        assert "edgeloop_ingest_malformed_total 0" in text and "edgeloop_devices 0" in text
    finally:
        ingest.stop()
        reg.close()
