"""A fleet as a hostile device meets it: a real Mosquitto loaded with the files ``fleet provision``
generates (password file, ACL, and the generated ``mosquitto.conf`` settings: client id bound
to user name, packet size cap), a real :class:`~fleet.ingest.IngestService`, and a victim
and an attacker device provisioned with their own credentials.

``hardened_fleet`` yields a :class:`HostileFleet`; :class:`Peer` is a device (or anyone
else) connected with paho over MQTT 5, recording what arrives.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from core.protocol import TopicScheme
from fleet.config import BrokerConfig, FleetConfig, default_config
from fleet.ingest import IngestService
from fleet.mosquitto import MosquittoBroker, find_mosquitto
from fleet.provision import provision_device
from fleet.registry import Registry

__all__ = ["HostileFleet", "Peer", "hardened_fleet", "wait_until", "PREFIX"]

PREFIX = "hostile/v1"
FLEET_PASSWORD = "fleet-password-for-tests"


def wait_until(pred: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Wait for state another thread changes (an Event paces the re-checks)."""
    tick = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        tick.wait(0.02)
    return pred()


class Peer:
    """One MQTT 5 connection with a user and password; ``got`` maps topic -> payloads."""

    def __init__(self, port: int, user: str, password: str, *, client_id: str | None = None,
                 subscribe: tuple[str, ...] = ()) -> None:
        self.got: dict[str, list[bytes]] = {}
        self.suback: list[int] = []
        self.disconnects = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.connected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p=None: self._on_connect(rc, subscribe)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self._ready.wait(10), "no CONNACK/SUBACK"

    def _on_connect(self, rc: Any, subscribe: tuple[str, ...]) -> None:
        self.rc = rc
        if rc.is_failure:
            self._ready.set()
            return
        self.connected.set()
        if subscribe:
            self.c.subscribe([(t, SubscribeOptions(qos=1)) for t in subscribe])
        else:
            self._ready.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any = None) -> None:
        self.suback = [int(c.value) for c in codes]
        self._ready.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.setdefault(msg.topic, []).append(msg.payload)

    def _on_disconnect(self, *_a: Any) -> None:
        self.disconnects += 1
        self.connected.clear()

    def count(self, topic: str) -> int:
        with self._lock:
            return len(self.got.get(topic, []))

    def publish(self, topic: str, payload: bytes, *, oid: int | None = None) -> None:
        props = None
        if oid is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ("oid", str(oid))
        self.c.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@dataclasses.dataclass
class HostileFleet:
    config: FleetConfig
    registry: Registry
    broker: MosquittoBroker
    ingest: IngestService
    topics: TopicScheme
    passwords: dict[str, str]
    peers: list[Peer] = dataclasses.field(default_factory=list)

    def device(self, name: str, **kw: Any) -> Peer:
        """Connect as the provisioned device ``name`` (its own credentials)."""
        p = Peer(self.broker.port, name, self.passwords[name], **kw)
        self.peers.append(p)
        return p

    def operator(self, **kw: Any) -> Peer:
        """Connect as the fleet's tool user (what the CLI and the demo use)."""
        b = self.config.broker
        p = Peer(self.broker.port, f"{b.username}.tool", FLEET_PASSWORD, **kw)
        self.peers.append(p)
        return p

    def counted(self, rule: str) -> int:
        return self.ingest.guard_counters.rules().get(rule, 0)


def generated_broker_settings(conf: Path) -> list[str]:
    """The generated mosquitto.conf's settings, less what the test launcher sets itself
    (listener and port, password and ACL paths)."""
    skip = ("listener", "password_file", "acl_file", "#")
    return [ln for ln in conf.read_text().splitlines() if ln.strip() and not ln.startswith(skip)]


@pytest.fixture
def hardened_fleet(tmp_path: Path) -> Iterator[HostileFleet]:
    """Victim and attacker devices, a fleet ingesting over the hardened broker (see the module docstring)."""
    if find_mosquitto() is None:
        pytest.skip("no mosquitto binary (apt-get install -y mosquitto)")
    cfg = default_config(tmp_path / "fleet", prefix=PREFIX)
    group = f"fleet-{secrets.token_hex(12)}"
    cfg = dataclasses.replace(cfg, broker=BrokerConfig(username="fleet", password=FLEET_PASSWORD, shared_group=group))
    reg = Registry.open(cfg.database_url)
    passwords = {}
    files = None
    for name in ("victim", "attacker"):
        res = provision_device(cfg, reg, name)
        passwords[name] = res.password_path.read_text().strip()
        files = res.broker
    assert files is not None
    broker = MosquittoBroker(tmp_path / "mq", password_file=files.password_file, acl_file=files.acl_file,
                             extra_conf=generated_broker_settings(files.conf_snippet)).start()
    cfg = dataclasses.replace(cfg, broker=dataclasses.replace(cfg.broker, port=broker.port),
                              ingest=dataclasses.replace(cfg.ingest, flush_ms=20, receipt_ms=0))
    ingest = IngestService(cfg, reg)
    fleet = HostileFleet(cfg, reg, broker, ingest, TopicScheme(PREFIX), passwords)
    try:
        ingest.start()
        yield fleet
    finally:
        for p in fleet.peers:
            p.close()
        ingest.stop()
        broker.stop()
        reg.close()
