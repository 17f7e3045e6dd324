"""End-to-end receipts against a real Mosquitto: the device keeps a message after the broker's
PUBACK until the fleet's ``Receipt`` names it, and sends it again when it was lost.

The fleet here is a small scripted subscriber (:class:`ReceiptingFleet`) that does what
``docs/protocol.md`` asks of the real one: receipt the ``oid`` user property of what it
keeps.  The requeue rules themselves are tested without a broker in ``test_outbox.py``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core import protocol as proto
from core.agent_config import parse_config
from core.errors import ConfigError, ProtocolError
from core.mqtt import MqttConnection, connect_client
from edge_agent.link import AgentLink, Command
from edge_agent.outbox import Outbox
from tests.plugins.broker import MosquittoBroker

pytestmark = pytest.mark.broker
WAIT = 15.0  # generous upper bound for any single wait; tests finish long before
DEV = "dev-r"


class ReceiptingFleet:
    """Subscribes to one device's topics, records ``(topic, message, oid)`` and receipts what it keeps.

    ``lose(msg)`` drops a message as if it never arrived (asked once per message: a resent
    copy is kept); ``hold=True`` collects the oids until :meth:`send_receipts`.
    """

    def __init__(self, broker: MosquittoBroker, topics: proto.TopicScheme, *, receipts: bool = True,
                 hold: bool = False, lose: Callable[[proto.Message], bool] = lambda m: False,
                 protocol: str = "5") -> None:
        self.topics, self.receipts, self.hold, self.lose = topics, receipts, hold, lose
        self.got: list[tuple[str, proto.Message, int | None]] = []
        self.lost: list[proto.Message] = []
        self._pending: list[int] = []
        self._cond = threading.Condition()
        self.conn: MqttConnection = connect_client(
            broker.host, broker.port, client_id=f"fleet-{random.getrandbits(32):x}", clean=True,
            subscriptions=[topics.device(DEV, k) for k in proto.DEVICE_KINDS], on_message=self._on_message,
            protocol=protocol, reconnect_min_s=0.05, reconnect_max_s=0.2, wait_s=WAIT)  # type: ignore[arg-type]

    def _on_message(self, m: Any) -> None:
        msg = proto.decode(bytes(m.payload))
        props = dict(getattr(m.properties, "UserProperty", None) or [])
        oid = int(props[proto.RECEIPT_PROPERTY]) if proto.RECEIPT_PROPERTY in props else None
        with self._cond:
            if msg not in self.lost and self.lose(msg):
                self.lost.append(msg)
                return
            self.got.append((m.topic.rsplit("/", 1)[1], msg, oid))
            if oid is not None and self.receipts:
                self._pending.append(oid)
            self._cond.notify_all()
        if not self.hold:
            self.send_receipts()

    def send_receipts(self) -> None:
        """Receipt every oid kept so far (QoS 0, like the fleet)."""
        with self._cond:
            ids, self._pending = tuple(self._pending), []
        if ids:
            self.conn.publish(self.topics.command(DEV, "receipt"), proto.Receipt(ids=ids).encode(), qos=0)

    def seqs(self) -> list[int]:
        with self._cond:
            return [m.seq for _, m, _ in self.got if isinstance(m, proto.Telemetry)]

    def oids(self, kind: str) -> list[int | None]:
        with self._cond:
            return [oid for k, _, oid in self.got if k == kind]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def topics(topic_prefix: str) -> proto.TopicScheme:
    return proto.TopicScheme(topic_prefix)


def outbox(tmp_path: Path, *, receipts_seen: bool) -> Outbox:
    box = Outbox(tmp_path / "outbox.sqlite")
    if receipts_seen:
        box.receipt([])  # as after the fleet's first receipt
    return box


def make_link(b: MosquittoBroker, box: Outbox, topics: proto.TopicScheme, **kw: Any) -> AgentLink:
    kw.setdefault("receipt_grace_s", 0.0)
    kw.setdefault("receipt_timeout_s", 1000.0)  # a test that wants the timeout says so
    return AgentLink(host=b.host, port=b.port, device_id=DEV, outbox=box, topics=topics,
                     reconnect_min_s=0.05, reconnect_max_s=0.2, **kw)


def telemetry(link: AgentLink, *seqs: int) -> None:
    for s in seqs:
        link.send(proto.Telemetry(device_id=DEV, seq=s))


def test_receipts_turn_holding_on_and_delete_held_messages(session_broker: MosquittoBroker, tmp_path: Path,
                                                           topics: proto.TopicScheme) -> None:
    fleet = ReceiptingFleet(session_broker, topics, hold=True)
    box = outbox(tmp_path, receipts_seen=False)
    link = make_link(session_broker, box, topics).start()
    try:
        telemetry(link, 1)
        link.send(proto.JobStatus(device_id=DEV, job_id="j", version="1", step="received"))
        link.send(proto.BundleRequest(device_id=DEV, job_id="j", version="1"))
        assert fleet.wait_for(lambda: len(fleet.got) >= 4)  # + the birth state
        assert link.wait_drained(WAIT) and len(box) == 0  # no receipt seen yet: deleted on PUBACK
        # tagged with the outbox id: the receipt kinds only
        assert all(isinstance(o, int) for o in fleet.oids("telemetry") + fleet.oids("jobs"))
        assert fleet.oids("bundle-req") == [None] and set(fleet.oids("state")) == {None}
        fleet.send_receipts()  # ids the device no longer has: ignored, but receipts flow now
        assert link.wait_until(lambda: box.receipts_seen, WAIT)

        telemetry(link, 2, 3, 4)
        assert fleet.wait_for(lambda: fleet.seqs() == [1, 2, 3, 4])
        assert link.wait_until(lambda: box.stats().awaiting_receipt == 3, WAIT)
        assert not link.wait_receipted(0)
        fleet.send_receipts()
        assert link.wait_receipted(WAIT)
        st = box.stats()
        assert (st.depth, st.bytes, st.awaiting_receipt, st.resent) == (0, 0, 0, 0)
    finally:
        link.close()
        fleet.close()


def test_a_message_lost_before_later_receipted_ones_is_sent_again(session_broker: MosquittoBroker, tmp_path: Path,
                                                                  topics: proto.TopicScheme) -> None:
    fleet = ReceiptingFleet(session_broker, topics, lose=lambda m: isinstance(m, proto.Telemetry) and m.seq == 3)
    box = outbox(tmp_path, receipts_seen=True)
    link = make_link(session_broker, box, topics, receipt_grace_s=0.0, receipt_timeout_s=1000.0).start()
    try:
        telemetry(link, 1, 2, 3, 4, 5)
        assert fleet.wait_for(lambda: 5 in fleet.seqs())
        # PUBACKs are written back in batches, all with the batch's time: 3 may share its
        # `sent` with 4 and 5.  Once drained, 6 is PUBACKed strictly later than 3, so its
        # receipt moves the watermark past 3.
        assert link.wait_drained(WAIT)
        telemetry(link, 6)
        assert link.wait_receipted(WAIT)
        assert sorted(set(fleet.seqs())) == [1, 2, 3, 4, 5, 6] and len(fleet.lost) == 1
        assert fleet.seqs().index(3) > fleet.seqs().index(5)  # the resent copy
        assert box.stats().resent >= 1 and len(box) == 0
    finally:
        link.close()
        fleet.close()


def test_the_last_message_lost_is_sent_again_after_the_timeout(session_broker: MosquittoBroker, tmp_path: Path,
                                                               topics: proto.TopicScheme) -> None:
    fleet = ReceiptingFleet(session_broker, topics, lose=lambda m: isinstance(m, proto.Telemetry) and m.seq == 2)
    box = outbox(tmp_path, receipts_seen=True)
    link = make_link(session_broker, box, topics, receipt_grace_s=1000.0, receipt_timeout_s=0.2).start()
    try:
        telemetry(link, 1, 2)  # nothing after 2: no watermark can pass it, only the timeout
        assert link.wait_receipted(WAIT)
        assert sorted(set(fleet.seqs())) == [1, 2] and len(fleet.lost) == 1
        assert box.stats().resent >= 1  # more if a loaded machine delays the receipt past 2 x 0.2 s
    finally:
        link.close()
        fleet.close()


def test_messages_puback_ed_while_the_fleet_is_not_subscribed_after_a_broker_restart_arrive(
        broker: MosquittoBroker, tmp_path: Path, topics: proto.TopicScheme) -> None:
    before = ReceiptingFleet(broker, topics)
    box = outbox(tmp_path, receipts_seen=False)
    link = make_link(broker, box, topics, receipt_grace_s=0.0, receipt_timeout_s=1000.0).start()
    try:
        telemetry(link, 1)
        assert before.wait_for(lambda: before.seqs() == [1])
        assert link.wait_until(lambda: box.receipts_seen, WAIT)
        # Mosquitto restarts (no persistence: sessions gone); the device is back first.
        broker.stop()
        before.close()
        broker.start()
        assert link.wait_until(lambda: link.connection.ready.is_set(), WAIT)
        telemetry(link, 2, 3, 4, 5)
        # The broker PUBACKs them and delivers them to nobody; the device still holds them.
        assert link.wait_until(lambda: box.stats().awaiting_receipt == 4, WAIT)
        after = ReceiptingFleet(broker, topics)  # the fleet's subscriber is back
        telemetry(link, 6)  # its receipt tells the device that 2-5 were lost
        assert link.wait_receipted(WAIT), box.stats()
        assert sorted(set(after.seqs())) == [2, 3, 4, 5, 6]
        assert after.seqs()[0] == 6 and box.stats().resent == 4
        after.close()
    finally:
        link.close()


@pytest.mark.parametrize("case", ["no receipt seen yet", "mqtt 3.1.1", "receipts = false"])
def test_without_receipts_messages_are_deleted_on_puback(session_broker: MosquittoBroker, tmp_path: Path,
                                                         topics: proto.TopicScheme, case: str) -> None:
    fleet = ReceiptingFleet(session_broker, topics, receipts=False)  # a fleet that never receipts
    box = outbox(tmp_path, receipts_seen=case != "no receipt seen yet")
    kw: dict[str, Any] = {"mqtt 3.1.1": {"protocol": "3.1.1"}, "receipts = false": {"receipts": False}}.get(case, {})
    link = make_link(session_broker, box, topics, receipt_timeout_s=0.1, **kw).start()
    try:
        telemetry(link, 1, 2, 3)
        assert fleet.wait_for(lambda: fleet.seqs() == [1, 2, 3])
        assert link.wait_drained(WAIT)
        st = box.stats()
        assert (st.depth, st.awaiting_receipt, st.resent) == (0, 0, 0)
        # only an MQTT 5 link with receipts on tags messages (which lets the first receipt come)
        assert set(fleet.oids("telemetry")) == ({None} if kw else {1, 2, 3})
    finally:
        link.close()
        fleet.close()


def test_a_fleet_that_stops_receipting_lets_the_device_delete_on_puback_again(
        session_broker: MosquittoBroker, tmp_path: Path, topics: proto.TopicScheme) -> None:
    fleet = ReceiptingFleet(session_broker, topics, receipts=False)  # e.g. its receipts switched off
    box = outbox(tmp_path, receipts_seen=True)
    # lapse: 32 x 0.05 s of connected time with messages held and no receipt
    link = make_link(session_broker, box, topics, receipt_grace_s=1000.0, receipt_timeout_s=0.05).start()
    try:
        telemetry(link, 1, 2)
        assert link.wait_until(lambda: not box.receipts_seen, WAIT)
        assert link.wait_drained(WAIT) and len(box) == 0  # sent once more, deleted on the PUBACK
        assert box.stats().resent >= 2 and set(fleet.seqs()) == {1, 2}
        telemetry(link, 3)
        assert link.wait_drained(WAIT) and len(box) == 0
    finally:
        link.close()
        fleet.close()


def test_a_receipt_is_applied_while_the_command_thread_is_busy(session_broker: MosquittoBroker, tmp_path: Path,
                                                               topics: proto.TopicScheme) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_install(cmd: Command) -> None:
        entered.set()
        release.wait(WAIT)  # an install that takes minutes

    fleet = ReceiptingFleet(session_broker, topics, hold=True)
    box = outbox(tmp_path, receipts_seen=True)
    link = make_link(session_broker, box, topics, on_command=slow_install).start()
    try:
        assert link.connection.ready.wait(WAIT)
        fleet.conn.publish(topics.command(DEV, "rollback"), proto.RollbackCommand(job_id="j", reason="x").encode())
        assert entered.wait(WAIT)
        telemetry(link, 1, 2)
        assert link.wait_until(lambda: box.stats().awaiting_receipt == 2, WAIT)
        assert fleet.wait_for(lambda: fleet.seqs() == [1, 2])
        fleet.send_receipts()
        assert link.wait_receipted(WAIT)
        assert not release.is_set()  # still installing
    finally:
        release.set()
        link.close()
        fleet.close()


def test_malformed_receipts_are_rejected_and_never_reach_the_command_thread(
        session_broker: MosquittoBroker, tmp_path: Path, topics: proto.TopicScheme) -> None:
    commands: list[Command] = []
    fleet = ReceiptingFleet(session_broker, topics, hold=True)
    box = outbox(tmp_path, receipts_seen=True)
    link = make_link(session_broker, box, topics, on_command=commands.append).start()
    try:
        assert link.connection.ready.wait(WAIT)
        receipt_topic = topics.command(DEV, "receipt")
        bad = [b"not json", b'{"type":"receipt","schema_version":1,"ids":[-1],"ts":1.0}',
               proto.Telemetry(device_id=DEV, seq=1).encode()]
        for payload in bad:
            fleet.conn.publish(receipt_topic, payload, qos=1)
        assert link.wait_until(lambda: link.rejected_commands == len(bad), WAIT)
        telemetry(link, 1)  # the link keeps working
        assert link.wait_until(lambda: box.stats().awaiting_receipt == 1, WAIT)
        assert fleet.wait_for(lambda: fleet.seqs() == [1])
        fleet.send_receipts()
        assert link.wait_receipted(WAIT)
        assert commands == []
        with pytest.raises(ProtocolError, match="not a command"):  # never a KeyError
            link.commands.decode(receipt_topic, proto.Receipt(ids=(1,)).encode())
    finally:
        link.close()
        fleet.close()


def test_receipt_settings_in_the_config() -> None:
    agent = {"allow_unsigned": True}
    cfg = parse_config({"agent": agent, "broker": {"receipts": False, "receipt_grace_s": 0.5, "receipt_timeout_s": 2}})
    assert (cfg.broker.receipts, cfg.broker.receipt_grace_s, cfg.broker.receipt_timeout_s) == (False, 0.5, 2)
    assert cfg.update.mqtt_corrupt_retries == 2
    for section, key, value in [("broker", "receipts", "yes"), ("broker", "receipt_grace_s", -1),
                                ("broker", "receipt_timeout_s", 0), ("update", "mqtt_corrupt_retries", -1)]:
        with pytest.raises(ConfigError, match=rf"\[{section}\]\.{key}") as err:  # the message names the key
            parse_config({"agent": agent, section: {key: value}}, source="agent.toml")
        assert "\n" not in str(err.value) and err.value.hint
