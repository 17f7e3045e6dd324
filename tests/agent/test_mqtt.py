"""AgentLink and connect_client against a real Mosquitto (and a scripted 3.1.1-only peer)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from core import protocol as proto
from core.chunks import Reassembler
from core.mqtt import MqttConnection, connect_client
from edge_agent.link import AgentLink, Command
from edge_agent.outbox import Outbox
from tests.plugins.broker import MosquittoBroker, Mqtt311OnlyProxy, write_password_file

pytestmark = pytest.mark.broker
WAIT = 15.0  # generous upper bound for any single wait; tests finish long before


class Observer:
    """A fleet-side subscriber that records (topic, payload, retained) and can wait for a condition."""

    def __init__(self, host: str, port: int, filters: Sequence[str], *, client_id: str | None = None,
                 clean: bool = True, cond: threading.Condition | None = None, **kw: Any) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = cond or threading.Condition()  # shared by observers waited on together
        self.conn: MqttConnection = connect_client(
            host, port, client_id=client_id or f"obs-{random.getrandbits(32):x}", clean=clean,
            subscriptions=filters, on_message=self._on_message, reconnect_min_s=0.05, reconnect_max_s=0.2,
            wait_s=WAIT, **kw)

    def _on_message(self, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def decoded(self, kind: str | None = None) -> list[proto.Message]:
        with self._cond:
            return [proto.decode(p) for t, p, _ in self.messages if kind is None or t.endswith("/" + kind)]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def topics(topic_prefix: str) -> proto.TopicScheme:
    return proto.TopicScheme(topic_prefix)


def make_link(b: MosquittoBroker | Mqtt311OnlyProxy, tmp_path: Path, topics: proto.TopicScheme,
              device_id: str = "dev-1", **kw: Any) -> AgentLink:
    kw.setdefault("outbox", Outbox(tmp_path / f"{device_id}-outbox.sqlite"))
    return AgentLink(host=b.host, port=b.port, device_id=device_id, topics=topics,
                     reconnect_min_s=0.05, reconnect_max_s=0.2, **kw)


def states(obs: Observer) -> list[bool]:
    return [m.online for m in obs.decoded("state") if isinstance(m, proto.DeviceState)]


def seqs(obs: Observer) -> list[int]:
    return [m.seq for m in obs.decoded("telemetry") if isinstance(m, proto.Telemetry)]


def first_occurrences(values: list[int]) -> list[int]:
    seen: set[int] = set()
    return [v for v in values if not (v in seen or seen.add(v))]  # type: ignore[func-returns-value]


def test_birth_will_on_abrupt_disconnect_and_clean_close(session_broker: MosquittoBroker, tmp_path: Path,
                                                         topics: proto.TopicScheme) -> None:
    obs = Observer(session_broker.host, session_broker.port, [topics.device("dev-1", "state")])
    link = make_link(session_broker, tmp_path, topics).start()
    try:
        assert obs.wait_for(lambda: states(obs) == [True])
        # Kill the TCP connection under paho: no DISCONNECT, so the broker publishes the Will.
        sock = link.connection.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        assert obs.wait_for(lambda: states(obs)[:3] == [True, False, True]), states(obs)  # Will, re-birth
        link.update_state(proto.DeviceState(device_id="dev-1", online=True, model_version="2.0"))
        assert obs.wait_for(lambda: any(getattr(m, "model_version", None) == "2.0" for m in obs.decoded("state")))
    finally:
        link.close()
    assert obs.wait_for(lambda: states(obs)[-1] is False)
    last = obs.decoded("state")[-1]
    assert isinstance(last, proto.DeviceState) and last.model_version == "2.0"  # the Will knew the state
    obs.close()
    # Retained: a late subscriber learns the device is offline.
    late = Observer(session_broker.host, session_broker.port, [topics.device("dev-1", "state")])
    assert late.wait_for(lambda: states(late) == [False])
    assert late.messages[0][2] is True
    late.close()


def test_outbox_delivers_in_order_across_broker_restart(tmp_path: Path, topics: proto.TopicScheme) -> None:
    with MosquittoBroker(tmp_path / "mosq", persistence=True) as b:
        # A persistent fleet session: the broker keeps its subscription and queue across the restart.
        obs = Observer(b.host, b.port, [topics.all_devices("telemetry")], client_id="fleet-obs", clean=False)
        b.stop()
        link = make_link(b, tmp_path, topics).start()  # the agent starts while the broker is down
        try:
            for i in range(1, 21):
                link.send(proto.Telemetry(device_id="dev-1", seq=i))
            assert not link.connected and link.outbox.stats().depth == 20
            b.start()
            assert obs.wait_for(lambda: len(set(seqs(obs))) == 20)
            b.stop()
            for i in range(21, 61):  # queued while the broker is down
                link.send(proto.Telemetry(device_id="dev-1", seq=i))
            assert link.outbox.stats().depth >= 40 - 16  # at most max_inflight handed to paho
            b.start()  # same port
            assert obs.wait_for(lambda: len(set(seqs(obs))) == 60), b.log_tail()
            assert first_occurrences(seqs(obs)) == list(range(1, 61))
            assert link.wait_drained(WAIT)
            assert link.outbox.stats().depth == 0
        finally:
            link.close()
            obs.close()


_KILLED_AGENT = textwrap.dedent("""
    import sys, threading
    from core import protocol as proto
    from edge_agent.link import AgentLink
    from edge_agent.outbox import Outbox
    host, port, prefix, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    link = AgentLink(host=host, port=port, device_id="dev-k", outbox=Outbox(path),
                     topics=proto.TopicScheme(prefix)).start()
    assert link.wait_connected(15)
    for i in range(1, n + 1):
        link.send(proto.Telemetry(device_id="dev-k", seq=i))
    print("queued", flush=True)
    threading.Event().wait()
""")


def test_nothing_lost_when_the_agent_is_killed(session_broker: MosquittoBroker, tmp_path: Path,
                                               topics: proto.TopicScheme) -> None:
    n = 300
    obs = Observer(session_broker.host, session_broker.port,
                   [topics.device("dev-k", "telemetry"), topics.device("dev-k", "state")])
    path = tmp_path / "outbox.sqlite"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_AGENT, session_broker.host, str(session_broker.port),
                             topics.prefix, str(path), str(n)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"queued"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert obs.wait_for(lambda: states(obs)[-1:] == [False])  # the broker sent the Will
    box = Outbox(path)
    left = box.stats().depth
    assert left <= n and left + len(set(seqs(obs))) >= n  # every message is delivered or still queued
    link = make_link(session_broker, tmp_path, topics, device_id="dev-k", outbox=box).start()
    try:
        assert obs.wait_for(lambda: set(seqs(obs)) == set(range(1, n + 1)))
        assert first_occurrences(seqs(obs)) == list(range(1, n + 1))  # duplicates allowed, reordering not
        assert link.wait_drained(WAIT)
    finally:
        link.close()
        obs.close()


def test_malformed_commands_are_dropped_and_the_link_keeps_working(
        session_broker: MosquittoBroker, tmp_path: Path, topics: proto.TopicScheme) -> None:
    got: list[Command] = []
    cond = threading.Condition()

    def on_command(cmd: Command) -> None:
        with cond:
            got.append(cmd)
            cond.notify_all()

    def boom(cmd: Command) -> None:
        on_command(cmd)
        raise RuntimeError("a handler bug must not kill the link")

    link = make_link(session_broker, tmp_path, topics, on_command=boom).start()
    fleet = Observer(session_broker.host, session_broker.port, [topics.device("dev-1", "telemetry")])
    try:
        assert link.wait_connected(WAIT) and link.connection.ready.wait(WAIT)
        deploy, bundle = topics.command("dev-1", "deploy"), topics.command("dev-1", "bundle")
        bad = [
            (deploy, b"not json"),
            (deploy, b'{"type": "deploy"}'),  # no schema_version
            (deploy, proto.Telemetry(device_id="dev-1", seq=1).encode()),  # wrong type for the topic
            (deploy, b'{"type":"deploy","schema_version":1,"job_id":"j","name":"m","version":"1","size":"big",'
                     b'"sha256":"' + b"0" * 64 + b'","delivery":"mqtt"}'),  # wrong field type
            (deploy, b'{"type":"rollback","schema_version":99,"job_id":"j","reason":"x"}'),
            (bundle, b"ELC1garbage"),
            (f"{topics.prefix}/devices/dev-1/cmd/selfdestruct", b"{}"),  # unknown command topic
        ]
        good = proto.RollbackCommand(job_id="j1", reason="operator")
        for topic, payload in bad:
            fleet.conn.publish(topic, payload, qos=1)
        fleet.conn.publish(topics.command("dev-1", "rollback"), good.encode(), qos=1)
        with cond:
            assert cond.wait_for(lambda: len(got) == 1, WAIT)
        assert got == [good]
        assert link.rejected_commands == len(bad)
        link.send(proto.Telemetry(device_id="dev-1", seq=7))
        assert fleet.wait_for(lambda: seqs(fleet) == [7])
    finally:
        link.close()
        fleet.close()


def test_bundle_chunks_reassemble_despite_reordering_and_duplicates(
        session_broker: MosquittoBroker, tmp_path: Path, topics: proto.TopicScheme) -> None:
    frames: list[proto.Frame] = []
    cond = threading.Condition()

    def on_command(cmd: Command) -> None:
        with cond:
            if isinstance(cmd, proto.Frame):
                frames.append(cmd)
                cond.notify_all()

    link = make_link(session_broker, tmp_path, topics, on_command=on_command).start()
    fleet = Observer(session_broker.host, session_broker.port, [])
    try:
        assert link.connection.ready.wait(WAIT)
        data = random.Random(1).randbytes(300_000)
        wire = proto.split("job-1", data, chunk_size=32 * 1024, kind=proto.BUNDLE_KIND, meta={"version": "2"})
        sent = wire + wire[:3]
        random.Random(2).shuffle(sent)
        for f in sent:
            assert len(f) <= 32 * 1024
            fleet.conn.publish(topics.command("dev-1", "bundle"), f, qos=1)
        with cond:
            assert cond.wait_for(lambda: len(frames) == len(sent), WAIT)
        r = Reassembler()
        done = [c for c in (r.add(f) for f in frames) if c is not None]
        assert len(done) == 1 and done[0].data == data and done[0].meta == {"version": "2"}
    finally:
        link.close()
        fleet.close()


def test_forced_mqtt311(session_broker: MosquittoBroker, tmp_path: Path, topics: proto.TopicScheme) -> None:
    obs = Observer(session_broker.host, session_broker.port, [topics.all_devices("#")], protocol="3.1.1")
    link = make_link(session_broker, tmp_path, topics, protocol="3.1.1").start()
    try:
        link.send(proto.Telemetry(device_id="dev-1", seq=1))
        assert obs.wait_for(lambda: seqs(obs) == [1] and states(obs) == [True])
        assert link.connection.protocol_version == "3.1.1" and obs.conn.protocol_version == "3.1.1"
    finally:
        link.close()
        obs.close()


def test_auto_falls_back_to_311_when_the_broker_refuses_mqtt5(
        session_broker: MosquittoBroker, tmp_path: Path, topics: proto.TopicScheme) -> None:
    proxy = Mqtt311OnlyProxy((session_broker.host, session_broker.port))
    obs = Observer(session_broker.host, session_broker.port, [topics.all_devices("telemetry")])
    link = make_link(proxy, tmp_path, topics, protocol="auto").start()
    try:
        assert link.wait_connected(WAIT)
        link.send(proto.Telemetry(device_id="dev-1", seq=1))
        assert obs.wait_for(lambda: seqs(obs) == [1])
        assert link.connection.protocol_version == "3.1.1" and proxy.refused >= 1
    finally:
        link.close()
        obs.close()
        proxy.close()


def test_auto_falls_back_when_an_mqtt5_connect_goes_unanswered(session_broker: MosquittoBroker) -> None:
    proxy = Mqtt311OnlyProxy((session_broker.host, session_broker.port), silent=True)
    try:
        conn = connect_client(proxy.host, proxy.port, client_id="silent-probe", connack_timeout_s=0.3,
                              reconnect_min_s=0.05, wait_s=WAIT)
        assert conn.protocol_version == "3.1.1" and proxy.refused == 1
        conn.close()
    finally:
        proxy.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_shared_subscription_splits_load_only_on_mqtt5(session_broker: MosquittoBroker, topic_prefix: str,
                                                       protocol: str) -> None:
    topics = proto.TopicScheme(topic_prefix)
    cond = threading.Condition()
    subs = [Observer(session_broker.host, session_broker.port, [], protocol=protocol,  # type: ignore[arg-type]
                     shared_subscriptions=[topics.all_devices("telemetry")], share_group="g", cond=cond)
            for _ in range(2)]
    pub = Observer(session_broker.host, session_broker.port, [])
    try:
        for i in range(40):
            pub.conn.publish(topics.device(f"d{i % 4}", "telemetry"),
                             proto.Telemetry(device_id=f"d{i % 4}", seq=i).encode(), qos=1)
        want = 40 if protocol == "5" else 80  # 3.1.1: plain subscriptions, each gets everything
        assert subs[0].wait_for(lambda: len(subs[0].messages) + len(subs[1].messages) >= want)
        got = sorted(seqs(subs[0]) + seqs(subs[1]))
        assert got == (list(range(40)) if protocol == "5" else sorted(list(range(40)) * 2))
    finally:
        for o in (*subs, pub):
            o.close()


def test_acl_confines_a_device_to_its_own_topics(tmp_path: Path, topic_prefix: str) -> None:
    topics = proto.TopicScheme(topic_prefix)
    acl = tmp_path / "acl"
    from fleet.acl import render_acl  # the one ACL renderer (what `fleet provision` writes)

    acl.write_text(render_acl(topics.prefix, fleet_users=["fleet"], devices={"dev-a": "dev-a", "dev-b": "dev-b"}))
    pw = write_password_file(tmp_path / "passwd", {"fleet": "f-secret", "dev-a": "a-secret", "dev-b": "b-secret"})
    with MosquittoBroker(tmp_path / "mosq", password_file=pw, acl_file=acl) as b:
        fleet = Observer(b.host, b.port, [f"{topics.prefix}/#"], username="fleet", password="f-secret")
        link = make_link(b, tmp_path, topics, device_id="dev-a", username="dev-a", password="a-secret").start()
        rogue_acks: list[str | None] = []
        acked = threading.Event()

        def on_publish(mid: int, failure: str | None) -> None:
            rogue_acks.append(failure)
            acked.set()

        rogue = connect_client(b.host, b.port, client_id="dev-a-rogue", username="dev-a", password="a-secret",
                               wait_s=WAIT, on_publish=on_publish)
        try:
            # Impersonating dev-b: the broker refuses (MQTT 5 PUBACK "Not authorized").
            rogue.publish(topics.device("dev-b", "telemetry"), proto.Telemetry(device_id="dev-b", seq=1).encode())
            link.send(proto.Telemetry(device_id="dev-a", seq=2))
            assert fleet.wait_for(lambda: seqs(fleet) == [2] and states(fleet) == [True])
            assert acked.wait(WAIT)
            assert rogue_acks[0] is not None and "authoriz" in rogue_acks[0].lower()
            fleet.conn.publish(topics.command("dev-b", "rollback"), proto.RollbackCommand("j", "x").encode())
            fleet.conn.publish(topics.command("dev-a", "rollback"), proto.RollbackCommand("j", "x").encode())
            assert fleet.wait_for(lambda: len([m for m in fleet.messages if "/cmd/" in m[0]]) == 2)
            assert not link.connection.last_error
        finally:
            link.close()
            rogue.close()
            fleet.close()
