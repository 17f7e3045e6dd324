"""Fleet ingestion on a real Mosquitto: devices, Last Will, drift, samples, feedback, bad input, receipts."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.chunks import split
from core.protocol import (
    RECEIPT_PROPERTY,
    SAMPLES_KIND,
    DeviceState,
    DriftReportMsg,
    Feedback,
    JobStatus,
    Message,
    Receipt,
    Telemetry,
    TopicScheme,
    decode_as,
)
from core.sampling import DriftSample, decode_sample, encode_sample
from fleet.config import BrokerConfig, IngestConfig, default_config
from fleet.ingest import IngestService
from fleet.registry import IngestBatch, Registry
from tests.plugins.broker import MosquittoBroker

pytestmark = pytest.mark.broker


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait for a condition on state another thread changes (an Event paces the re-checks)."""
    tick = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        tick.wait(0.02)
    return pred()


class FlakyRegistry(Registry):
    """A registry whose writes fail while ``failing`` is set (the database went away)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing = threading.Event()

    def apply(self, batch: IngestBatch) -> None:
        if self.failing.is_set():
            raise OSError("database unreachable")
        super().apply(batch)


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path, topic_prefix: str) -> Iterator[tuple[IngestService, Registry]]:
    cfg = dataclasses.replace(default_config(tmp_path / "fleet", prefix=topic_prefix),
                              broker=BrokerConfig(host=broker.host, port=broker.port),
                              ingest=IngestConfig(flush_ms=20, receipt_ms=20))
    reg = FlakyRegistry.open(cfg.database_url)
    svc = IngestService(cfg, reg)
    svc.start()
    try:
        yield svc, reg
    finally:
        svc.stop()
        reg.close()


def device_client(broker: MosquittoBroker, topics: TopicScheme, device_id: str) -> mqtt.Client:
    """A device connection with its retained offline state as Last Will, as the agent sets it."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
    c.will_set(topics.device(device_id, "state"), DeviceState(device_id, False).encode(), qos=1, retain=True)
    connected = threading.Event()
    c.on_connect = lambda *_a: connected.set()
    c.connect(broker.host, broker.port, keepalive=5)
    c.loop_start()
    assert connected.wait(10)
    return c


def publish(c: mqtt.Client, topic: str, payload: bytes, retain: bool = False, oid: int | None = None) -> None:
    props = None
    if oid is not None:  # as an MQTT 5 agent tags what it keeps until the fleet's receipt
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = (RECEIPT_PROPERTY, str(oid))
    c.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)


class ReceiptDevice:
    """A paho MQTT 5 device subscribed to its own commands; collects the receipts it gets."""

    def __init__(self, broker: MosquittoBroker, topics: TopicScheme, device_id: str) -> None:
        self.device_id, self.topics = device_id, topics
        self.receipts: queue.Queue[Receipt] = queue.Queue()
        self.client = device_client(broker, topics, device_id)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.receipts.put(decode_as(bytes(m.payload), Receipt))
        self.client.subscribe(topics.device_commands(device_id), qos=1)
        assert subscribed.wait(10)

    def send(self, kind: str, payload: bytes, oid: int | None = None) -> None:
        publish(self.client, self.topics.device(self.device_id, kind), payload, oid=oid)

    def next_receipt(self, timeout: float = 10.0) -> tuple[int, ...]:
        return self.receipts.get(timeout=timeout).ids

    def receipted(self, ids: set[int], timeout: float = 10.0) -> set[int]:
        """Everything receipted until ``ids`` all were (they may come in several receipts)."""
        got: set[int] = set()
        while not ids <= got:
            got.update(self.next_receipt(timeout))
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_devices_drift_jobs_and_offline_from_last_will(fleet: tuple[IngestService, Registry],
                                                       broker: MosquittoBroker) -> None:
    svc, reg = fleet
    topics = svc.topics
    seen: list[Message] = []
    offline = threading.Event()

    def hook(msgs: list[Message]) -> None:
        seen.extend(msgs)
        if any(isinstance(m, DeviceState) and not m.online for m in msgs):
            offline.set()

    svc.add_hook(hook)
    assert svc.protocol == "5"
    dev = device_client(broker, topics, "cam-1")
    publish(dev, topics.device("cam-1", "state"),
            DeviceState("cam-1", True, model_name="digits", model_version="1").encode(), retain=True)
    for i in range(50):
        publish(dev, topics.device("cam-1", "drift"), DriftReportMsg("cam-1", i, 100, 100, risk=i / 50,
                                                                     alarm=i >= 40).encode())
    publish(dev, topics.device("cam-1", "jobs"), JobStatus("cam-1", "j1", "2", "completed").encode())
    assert wait_until(lambda: len(reg.drift_reports(device_id="cam-1")) == 50 and bool(reg.job_statuses()))
    d = reg.device("cam-1")
    assert d is not None and d.online and d.model_version == "1" and d.drift_alarm
    assert any(isinstance(m, JobStatus) for m in seen)  # hooks see the decoded messages after the commit

    dev._sock_close()  # type: ignore[attr-defined]  # die without DISCONNECT: the broker sends the Will
    dev.loop_stop()
    assert offline.wait(20)
    assert wait_until(lambda: not reg.device("cam-1").online)  # type: ignore[union-attr]


def test_samples_are_reassembled_stored_and_labelled(fleet: tuple[IngestService, Registry],
                                                     broker: MosquittoBroker) -> None:
    svc, reg = fleet
    topics = svc.topics
    dev = device_client(broker, topics, "cam-2")
    image = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible
    payload = encode_sample(DriftSample("smp-1", "cam-2", time.time(), "1", 3, 0.41, 2.5, "drift", image))
    publish(dev, topics.operator_feedback, Feedback("smp-1", "8").encode())  # the label may come first
    frames = split("smp-1", payload, chunk_size=400, kind=SAMPLES_KIND)
    assert len(frames) > 3
    for frame in [frames[-1], *frames[:-1], frames[0]]:  # out of order, and a QoS 1 duplicate
        publish(dev, topics.device("cam-2", "samples"), frame)
    assert wait_until(lambda: reg.sample("smp-1") is not None)
    rec = reg.sample("smp-1")
    assert rec is not None and rec.prediction == "3" and rec.confidence == pytest.approx(0.41)
    assert rec.reason == "drift" and rec.model_version == "1"
    assert rec.label == "8" and rec.label_source == "operator"
    stored = decode_sample(svc.store.read(rec))
    assert np.array_equal(stored.image, image) and svc.stats.samples == 1
    # A device's own feedback never overwrites an operator's label (fleet.ingest_guard).
    publish(dev, topics.device("cam-2", "feedback"), Feedback("smp-1", "9", source="device").encode())
    assert svc.wait_idle(20)
    rec = reg.sample("smp-1")
    assert rec is not None and rec.label == "8" and rec.label_source == "operator"
    dev.disconnect()
    dev.loop_stop()


def test_malformed_messages_are_counted_not_fatal(fleet: tuple[IngestService, Registry],
                                                  broker: MosquittoBroker) -> None:
    svc, reg = fleet
    topics = svc.topics
    dev = device_client(broker, topics, "cam-3")
    bad = [b"\xff not json", b'{"type":"drift","schema_version":99}', b"[1,2]",
           DriftReportMsg("someone-else", 1, 100, 100).encode(),  # payload names another device
           DeviceState("cam-3", True).encode()]  # a state message on the drift topic
    for payload in bad:
        publish(dev, topics.device("cam-3", "drift"), payload)
    publish(dev, topics.device("cam-3", "samples"), b"not a chunk frame")
    publish(dev, topics.device("cam-3", "drift"), DriftReportMsg("cam-3", 1, 100, 100).encode())
    assert wait_until(lambda: len(reg.drift_reports(device_id="cam-3")) == 1)
    assert svc.stats.malformed == len(bad) + 1 and svc.stats.db_errors == 0
    assert reg.device("someone-else") is None
    dev.disconnect()
    dev.loop_stop()


def test_batches_are_written_in_one_go_without_mqtt(tmp_path: Path) -> None:
    cfg = default_config(tmp_path / "f")
    reg = Registry.open(cfg.database_url)
    svc = IngestService(cfg, reg)
    topics = TopicScheme(cfg.prefix)
    # queued before the writer starts: on a loaded machine a slow submitter would feed it a few messages per
    # flush interval, and the count of batches would measure the machine, not the batching
    for i in range(3000):
        svc.submit(topics.device(f"d{i % 100}", "drift"), DriftReportMsg(f"d{i % 100}", i, 10, 10).encode())
    svc.start(connect=False)
    assert svc.wait_idle(120)
    svc.stop()
    assert reg.status().drift_reports == 3000 and reg.status().devices == 100
    assert svc.stats.batches < 3000 / 10  # batched, not one transaction per message
    reg.close()


def test_job_reports_and_bundle_requests_jump_a_queue_of_bulk_uploads(tmp_path: Path) -> None:
    """The rollout engine's inputs are not processed after a backlog of bulk messages (order kept per lane):
    job reports first, then the reports the canary analysis reads, then the bulk (labels here)."""
    cfg = default_config(tmp_path / "f")
    reg = Registry.open(cfg.database_url)
    svc = IngestService(cfg, reg)
    batches: list[list[Message]] = []
    svc.add_hook(batches.append)
    topics = TopicScheme(cfg.prefix)
    backlog = 3 * cfg.ingest.batch_max
    for i in range(backlog):  # queued before the writer runs: a backlog of bulk, then of reports
        svc.submit(topics.device("d1", "feedback"), Feedback(f"s{i}", "3", source="device").encode())
    for i in range(backlog):
        svc.submit(topics.device("d1", "drift"), DriftReportMsg("d1", i, 10, 10).encode())
    for j in ("j1", "j2"):
        svc.submit(topics.device("d2", "jobs"), JobStatus("d2", j, "2", "downloading").encode())
    svc.start(connect=False)
    assert svc.wait_idle(60)
    svc.stop()
    first = [m for m in batches[0] if isinstance(m, JobStatus)]
    assert [m.job_id for m in first] == ["j1", "j2"]  # in the first batch, in order
    order = [type(m).__name__ for b in batches for m in b]
    assert order.index("Feedback") > len(order) - 1 - order[::-1].index("DriftReportMsg")  # reports before labels
    assert [m.seq for b in batches for m in b if isinstance(m, DriftReportMsg)] == list(range(backlog))
    assert len(reg.drift_reports()) == backlog and len(reg.job_statuses()) == 2
    reg.close()


# --------------------------------------------------------------------------- receipts


def test_committed_and_malformed_messages_are_receipted_with_their_outbox_ids(
        fleet: tuple[IngestService, Registry], broker: MosquittoBroker) -> None:
    svc, reg = fleet
    dev = ReceiptDevice(broker, svc.topics, "cam-r")
    dev.send("drift", DriftReportMsg("cam-r", 0, 100, 100, ts=1.0).encode())  # no oid: nothing to receipt
    assert wait_until(lambda: len(reg.drift_reports(device_id="cam-r")) == 1)
    for i in range(3):
        dev.send("drift", DriftReportMsg("cam-r", i + 1, 100, 100, ts=2.0 + i).encode(), oid=11 + i)
    dev.send("jobs", JobStatus("cam-r", "j1", "2", "received").encode(), oid=14)
    dev.send("telemetry", Telemetry("cam-r", 1).encode(), oid=15)
    dev.send("drift", b"\xff not json", oid=16)  # malformed: receipted, it will never be accepted
    dev.send("drift", DriftReportMsg("someone-else", 9, 100, 100).encode(), oid=17)
    first = set(dev.next_receipt())
    assert first <= set(range(11, 18))
    # a receipt comes only after the commit: what it names is in the database already
    stored = {r.seq for r in reg.drift_reports(device_id="cam-r")}
    assert {i - 10 for i in first & {11, 12, 13}} <= stored
    assert first | dev.receipted(set(range(11, 18)) - first) == set(range(11, 18))
    assert len(reg.drift_reports(device_id="cam-r")) == 4 and len(reg.job_statuses(job_id="j1")) == 1
    assert svc.stats.malformed == 2
    dev.close()


def test_a_device_coming_online_gets_an_empty_receipt(fleet: tuple[IngestService, Registry],
                                                      broker: MosquittoBroker) -> None:
    """The birth tells the device at once that this fleet receipts, before it sends anything."""
    svc, _reg = fleet
    dev = ReceiptDevice(broker, svc.topics, "cam-born")
    dev.send("state", DeviceState("cam-born", online=True).encode())
    assert dev.next_receipt() == ()
    dev.close()


def test_no_receipt_without_an_oid_or_on_mqtt_311(fleet: tuple[IngestService, Registry],
                                                  broker: MosquittoBroker) -> None:
    svc, reg = fleet
    old = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cam-311", protocol=mqtt.MQTTv311)
    got_311: list[object] = []
    old.on_message = lambda _c, _u, m: got_311.append(m.payload)
    connected = threading.Event()
    old.on_connect = lambda *_a: connected.set()
    old.connect(broker.host, broker.port)
    old.loop_start()
    assert connected.wait(10)
    old.subscribe(svc.topics.device_commands("cam-311"), qos=1)
    publish(old, svc.topics.device("cam-311", "drift"), DriftReportMsg("cam-311", 1, 100, 100).encode())
    dev = ReceiptDevice(broker, svc.topics, "cam-5")
    dev.send("drift", DriftReportMsg("cam-5", 1, 100, 100).encode())  # MQTT 5 but no oid (an old agent)
    dev.send("drift", DriftReportMsg("cam-5", 2, 100, 100).encode(), oid=7)
    assert dev.next_receipt() == (7,)  # the first receipt: nothing for the untagged one
    assert wait_until(lambda: len(reg.drift_reports()) == 3)
    svc.stop()  # flushes every receipt still gathered
    assert svc.stats.receipted == 1 and got_311 == []
    dev.close()
    old.disconnect()
    old.loop_stop()


def test_a_failed_database_write_is_not_receipted(fleet: tuple[IngestService, Registry],
                                                   broker: MosquittoBroker) -> None:
    svc, reg = fleet
    assert isinstance(reg, FlakyRegistry)
    dev = ReceiptDevice(broker, svc.topics, "cam-db")
    report = DriftReportMsg("cam-db", 1, 100, 100)
    reg.failing.set()
    dev.send("drift", report.encode(), oid=1)
    assert wait_until(lambda: svc.stats.db_errors == 1)
    reg.failing.clear()
    dev.send("drift", DriftReportMsg("cam-db", 2, 100, 100).encode(), oid=2)
    assert dev.next_receipt() == (2,)  # not 1: that batch was never committed
    dev.send("drift", report.encode(), oid=1)  # so the device sends it again
    assert dev.next_receipt() == (1,)
    assert sorted(r.seq for r in reg.drift_reports(device_id="cam-db")) == [1, 2]
    dev.close()


def test_sample_frames_are_receipted_when_their_transfer_is_committed_or_dropped(
        fleet: tuple[IngestService, Registry], broker: MosquittoBroker) -> None:
    svc, reg = fleet
    dev = ReceiptDevice(broker, svc.topics, "cam-s")
    image = np.random.default_rng(1).integers(0, 256, (48, 48), dtype=np.uint8)
    payload = encode_sample(DriftSample("smp-r", "cam-s", time.time(), "1", 3, 0.5, 2.0, "drift", image))
    frames = split("smp-r", payload, chunk_size=600, kind=SAMPLES_KIND)
    ids = list(range(100, 100 + len(frames)))
    for frame, oid in zip(frames[:-1], ids[:-1], strict=True):
        dev.send("samples", frame, oid=oid)
    dev.send("samples", frames[0], oid=ids[0])  # a duplicate frame, sent again with its id
    dev.send("drift", DriftReportMsg("cam-s", 1, 100, 100).encode(), oid=1)
    assert dev.next_receipt() == (1,)  # the transfer is incomplete: its frames wait
    dev.send("samples", frames[-1], oid=ids[-1])
    assert dev.receipted(set(ids)) == set(ids)
    assert reg.sample("smp-r") is not None
    dev.send("samples", frames[2], oid=ids[2])  # a late duplicate of a committed sample: at once
    assert dev.next_receipt() == (ids[2],)
    # a corrupt transfer (sha256 mismatch) is dropped; its frames are receipted, none is stored
    bad = [bytearray(f) for f in split("smp-bad", payload, chunk_size=600, kind=SAMPLES_KIND)]
    bad[1][-1] ^= 0xFF  # same size, other bytes
    bad_ids = set(range(500, 500 + len(bad)))
    for bad_frame, oid in zip(bad, sorted(bad_ids), strict=True):
        dev.send("samples", bytes(bad_frame), oid=oid)
    assert dev.receipted(bad_ids) == bad_ids
    assert reg.sample("smp-bad") is None and svc.stats.dropped_transfers == 1
    dev.close()


def test_a_message_sent_twice_is_stored_once(tmp_path: Path) -> None:
    cfg = default_config(tmp_path / "f")
    reg = Registry.open(cfg.database_url)
    svc = IngestService(cfg, reg)
    svc.start(connect=False)
    topics = TopicScheme(cfg.prefix)
    msgs = [("drift", DriftReportMsg("d1", 1, 10, 10).encode()), ("telemetry", Telemetry("d1", 1).encode()),
            ("jobs", JobStatus("d1", "j1", "2", "completed").encode())]
    for _ in range(2):  # twice in one batch...
        for kind, payload in msgs:
            svc.submit(topics.device("d1", kind), payload, oid=3)
    assert svc.wait_idle(30)
    for kind, payload in msgs:  # ...and once more in another
        svc.submit(topics.device("d1", kind), payload, oid=3)
    assert svc.wait_idle(30)
    svc.stop()
    assert len(reg.drift_reports()) == 1 and len(reg.telemetry()) == 1 and len(reg.job_statuses()) == 1
    assert svc.stats.db_errors == 0 and svc.stats.processed == 9
    reg.close()


def test_drift_reports_lost_in_a_broker_restart_reach_the_database_once(broker: MosquittoBroker, tmp_path: Path,
                                                                         topic_prefix: str) -> None:
    """The measured loss, end to end: a real agent link, Mosquitto restarted without
    persistence, the device back before the fleet's subscriber.  The broker PUBACKs what
    the device sends meanwhile and delivers it to nobody; the fleet's receipts for later
    reports tell the device, which sends the lost ones again."""
    from edge_agent.link import AgentLink
    from edge_agent.outbox import Outbox

    cfg = dataclasses.replace(default_config(tmp_path / "fleet", prefix=topic_prefix),
                              broker=BrokerConfig(host=broker.host, port=broker.port, protocol="5"),
                              ingest=IngestConfig(flush_ms=20, receipt_ms=20))
    reg = Registry.open(cfg.database_url)
    box = Outbox(tmp_path / "outbox.sqlite")
    link = AgentLink(host=broker.host, port=broker.port, device_id="cam-e2e", outbox=box, topics=TopicScheme(cfg.prefix),
                     protocol="5", reconnect_min_s=0.05, reconnect_max_s=0.2, receipt_grace_s=0.0,
                     receipt_timeout_s=1000.0).start()

    def report(seq: int) -> None:
        link.send(DriftReportMsg("cam-e2e", seq, 100, 100, ts=1000.0 + seq))

    def stored() -> list[int]:
        return [r.seq for r in reg.drift_reports(device_id="cam-e2e")]

    svc = IngestService(cfg, reg)
    svc.start()
    try:
        report(1)
        assert wait_until(lambda: stored() == [1]) and link.wait_receipted(10)
        svc.stop()
        broker.stop()
        # the device must see the broker go, or its old connection's ``ready`` would pass the wait below
        assert link.wait_until(lambda: not link.connection.connected.is_set(), 30)
        broker.start()  # no persistence: every session and queued message is gone
        assert link.wait_until(lambda: link.connection.ready.is_set(), 30)
        for seq in (2, 3, 4):
            report(seq)
        assert link.wait_until(lambda: box.stats().awaiting_receipt == 3, 30), box.stats()  # PUBACKed, to nobody
        svc = IngestService(cfg, reg)
        svc.start()  # the fleet's subscriber is back
        report(5)
        assert link.wait_receipted(15), box.stats()
        assert wait_until(lambda: stored() == [1, 2, 3, 4, 5])
        assert box.stats().resent == 3 and svc.stats.db_errors == 0
    finally:
        link.close()
        svc.stop()
        reg.close()
