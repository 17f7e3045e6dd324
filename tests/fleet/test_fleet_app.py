"""The fleet's front door: FleetApp builds, starts and stops every part; `fleet serve` runs it.

Real Mosquitto, real SQLite, the real HTTP API (uvicorn) on a free port.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from core.errors import BrokerError, FleetError
from core.protocol import DeviceState, TopicScheme
from fleet.app import FleetApp
from fleet.config import ApiConfig, BrokerConfig, FleetConfig, RolloutConfig, default_config, render_config
from fleet.dashboard.routes import build_context
from tests.plugins.broker import MosquittoBroker

pytestmark = pytest.mark.broker

TOKEN = "app-test-token-0123"


def _config(tmp_path: Path, broker: MosquittoBroker, prefix: str, **overrides: Any) -> FleetConfig:
    return default_config(tmp_path / "fleet-data", prefix=prefix, broker=BrokerConfig(host=broker.host,
                                                                                     port=broker.port),
                          api=ApiConfig(port=0, token=TOKEN), **overrides)


class _Recorder:
    """A publisher wrapper, as the benchmark's fault injection uses one."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.topics = inner, []  # type: ignore[var-annotated]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        self.topics.append(topic)
        return self.inner.publish(topic, payload, qos=qos, retain=retain)


def test_the_app_runs_ingestion_api_dashboard_driver_and_worker(broker: MosquittoBroker, tmp_path: Path,
                                                                 topic_prefix: str) -> None:
    cfg = _config(tmp_path, broker, topic_prefix, rollout=RolloutConfig(delivery="mqtt"))
    wrapped: list[_Recorder] = []
    app = FleetApp.from_config(cfg, publisher=lambda inner: wrapped.append(_Recorder(inner)) or wrapped[-1])
    committed = threading.Event()
    app.ingest.add_hook(lambda msgs: committed.set() if any(isinstance(m, DeviceState) for m in msgs) else None)
    with app:
        with pytest.raises(FleetError):
            app.start()  # one start per app
        assert app.worker is not None and app.dashboard.driver is app.driver and app.publisher is wrapped[0]
        assert build_context(app) is app.dashboard and app.ingest_processes == 1
        assert app.api_url is not None and app.driver.api_base_url == app.api_url
        assert app.driver.delivery == "mqtt" and app.driver.topics.prefix == topic_prefix
        # a device's birth goes through ingestion into the registry
        dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="app-cam-1")
        dev.connect(broker.host, broker.port)
        dev.loop_start()
        dev.publish(TopicScheme(topic_prefix).device("app-cam-1", "state"),
                    DeviceState("app-cam-1", True, model_version="1").encode(), qos=1).wait_for_publish(10)
        assert committed.wait(30)
        dev.loop_stop()
        dev.disconnect()
        rec = app.registry.devices.get("app-cam-1")
        assert rec is not None and rec.online
        # the API (behind its token) and the dashboard's JSON over the same registry
        req = urllib.request.Request(f"{app.api_url}/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp)["devices"] == 1
        # the driver publishes through the wrapper, over ingestion's connection
        app.publisher.publish(f"{topic_prefix}/probe", b"x")
        assert wrapped[0].topics == [f"{topic_prefix}/probe"]
    with pytest.raises(BrokerError):
        app.publisher.publish(f"{topic_prefix}/probe", b"x")  # stopped: no connection left


def test_parts_can_be_left_out(broker: MosquittoBroker, tmp_path: Path, topic_prefix: str) -> None:
    cfg = _config(tmp_path, broker, topic_prefix)
    with FleetApp.from_config(cfg, api=False, workers=False) as app:
        assert app.api is None and app.api_url is None and app.worker is None
        assert app.driver.api_base_url == cfg.api.base_url  # devices are told [api]'s address
        assert app.describe().endswith(f"API off, database {cfg.database_url}")
    app.stop()  # twice is harmless


def test_fleet_serve_starts_and_stops_on_sigterm(broker: MosquittoBroker, tmp_path: Path,
                                                 topic_prefix: str) -> None:
    toml = tmp_path / "fleet.toml"
    toml.write_text(render_config(_config(tmp_path, broker, topic_prefix)))
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop", "fleet", "serve", "--config", str(toml)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("fleet serving: broker ") and "1 ingest process(es)" in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
