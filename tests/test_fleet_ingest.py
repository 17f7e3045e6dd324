"""Fleet ingestion on a real Mosquitto: devices, Last Will, drift, samples, feedback, bad input."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_agent.chunks import split
from edge_agent.protocol import (
    SAMPLES_KIND,
    DeviceState,
    DriftReportMsg,
    Feedback,
    JobStatus,
    Message,
    TopicScheme,
)
from edge_agent.sampling import DriftSample, decode_sample, encode_sample
from fleet.config import BrokerConfig, default_config
from fleet.ingest import IngestService
from fleet.registry import Registry
from tests.broker import MosquittoBroker

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


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path, topic_prefix: str) -> Iterator[tuple[IngestService, Registry]]:
    cfg = dataclasses.replace(default_config(tmp_path / "fleet", prefix=topic_prefix),
                              broker=BrokerConfig(host=broker.host, port=broker.port))
    reg = Registry.open(cfg.database_url)
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


def publish(c: mqtt.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


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
    publish(dev, topics.device("cam-2", "feedback"), Feedback("smp-1", "9", source="device").encode())
    assert wait_until(lambda: reg.sample("smp-1").label == "9")  # type: ignore[union-attr]
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
    svc.start(connect=False)
    topics = TopicScheme(cfg.prefix)
    for i in range(3000):
        svc.submit(topics.device(f"d{i % 100}", "drift"), DriftReportMsg(f"d{i % 100}", i, 10, 10).encode())
    assert svc.wait_idle(60)
    svc.stop()
    assert reg.status().drift_reports == 3000 and reg.status().devices == 100
    assert svc.stats.batches < 3000 / 10  # batched, not one transaction per message
    reg.close()
