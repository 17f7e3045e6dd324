"""Provisioning and the Mosquitto ACL, on a real Mosquitto: devices are confined to their own topics."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from core.agent_config import load_config as load_agent_config
from fleet.acl import check_password, hash_password, render_acl
from fleet.config import BrokerConfig, default_config
from fleet.provision import provision_device
from fleet.registry import Registry
from tests.plugins.broker import MosquittoBroker, find_mosquitto

pytestmark = pytest.mark.broker

PREFIX = "acltest/v1"


class Watcher:
    """A connected paho client that records what arrives, with an event per topic."""

    def __init__(self, port: int, user: str, password: str, subscribe: list[str]) -> None:
        self.got: dict[str, list[bytes]] = {}
        self.events: dict[str, threading.Event] = {}
        self.suback: list[int] = []
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"w-{user}", protocol=mqtt.MQTTv311)
        self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p=None: (self._connected.set(),
                                                          c.subscribe([(t, 1) for t in subscribe]) if subscribe
                                                          else self._subscribed.set())
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self._connected.wait(10) and self._subscribed.wait(10)

    def _on_subscribe(self, _c: object, _u: object, _mid: int, codes: list, _p: object = None) -> None:
        self.suback = [int(c.value) for c in codes]
        self._subscribed.set()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.got.setdefault(msg.topic, []).append(msg.payload)
        self.events.setdefault(msg.topic, threading.Event()).set()

    def event(self, topic: str) -> threading.Event:
        return self.events.setdefault(topic, threading.Event())

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_password_hash_matches_mosquitto_format() -> None:
    h = hash_password("s3cret", salt=b"0123456789ab")
    assert h.startswith("$7$101$") and check_password("s3cret", h) and not check_password("other", h)
    acl = render_acl("p/v1", fleet_users=["fleet"], devices={"cam-1": "cam-1"})
    assert "topic readwrite p/v1/#" in acl and "topic read p/v1/devices/cam-1/cmd/#" in acl
    assert "topic write p/v1/devices/cam-1/drift" in acl


@pytest.mark.skipif(find_mosquitto() is None, reason="no mosquitto binary (apt-get install -y mosquitto)")
def test_device_cannot_publish_as_another_nor_read_its_commands(tmp_path: Path) -> None:
    cfg = dataclasses.replace(default_config(tmp_path / "fleet", prefix=PREFIX),
                              broker=BrokerConfig(username="fleet", password="fleet-password"))
    reg = Registry.open(cfg.database_url)
    a = provision_device(cfg, reg, "dev-a")
    b = provision_device(cfg, reg, "dev-b")
    assert load_agent_config(a.agent_toml).agent.device_id == "dev-a"  # the kit is a valid agent config
    pw_a = a.password_path.read_text().strip()
    assert pw_a not in a.broker.password_file.read_text()  # only hashes on the fleet side

    broker = MosquittoBroker(tmp_path / "mq", password_file=b.broker.password_file,
                             acl_file=b.broker.acl_file).start()
    try:
        fleet = Watcher(broker.port, "fleet", "fleet-password", [f"{PREFIX}/#"])
        dev_a = Watcher(broker.port, "dev-a", pw_a,
                        [f"{PREFIX}/devices/dev-a/cmd/#", f"{PREFIX}/devices/dev-b/cmd/#"])
        own, forged = f"{PREFIX}/devices/dev-a/telemetry", f"{PREFIX}/devices/dev-b/telemetry"
        # A publishes as B first, then as itself: QoS 1 from one client keeps its order, so once
        # the allowed message reaches the fleet the denied one would have arrived before it.
        dev_a.publish(forged, b"forged")
        dev_a.publish(own, b"own")
        assert fleet.event(own).wait(10)
        assert forged not in fleet.got

        own_cmd, b_cmd = f"{PREFIX}/devices/dev-a/cmd/deploy", f"{PREFIX}/devices/dev-b/cmd/deploy"
        fleet.publish(b_cmd, b"for-b")
        fleet.publish(own_cmd, b"for-a")
        assert dev_a.event(own_cmd).wait(10)
        assert b_cmd not in dev_a.got
        # (Mosquitto 2.0 may grant the SUBACK for B's filter; the ACL is applied on delivery.)

        # a wrong password is refused outright
        refused = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder")
        c.username_pw_set("dev-b", "wrong-password")
        c.on_connect = lambda _c, _u, _f, rc, _p=None: refused.set() if rc.is_failure else None
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert refused.wait(10)
        c.loop_stop()
        fleet.close()
        dev_a.close()
    finally:
        broker.stop()
        reg.close()
