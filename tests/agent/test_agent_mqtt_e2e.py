"""The whole agent against a real Mosquitto: state, deploy over HTTP and over MQTT chunks, drift, samples."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core import chunks
from core import protocol as proto
from core.mqtt import connect_client
from core.sampling import decode_sample
from edge_agent.agent import Agent
from tests.plugins.agent_kit import agent_config, digits
from tests.plugins.broker import MosquittoBroker
from tests.plugins.files import deploy_command

pytestmark = pytest.mark.broker
WAIT = 30.0  # upper bound for one wait; the tests finish long before


class Fleet:
    """A fleet-side MQTT client: records everything a device sends, answers bundle requests."""

    def __init__(self, broker: MosquittoBroker, topics: proto.TopicScheme, device: str) -> None:
        self.topics, self.device = topics, device
        self.messages: list[tuple[str, bytes]] = []
        self.bundles: dict[str, bytes] = {}  # job id -> bundle bytes served over MQTT
        self.requests: list[proto.BundleRequest] = []
        self._cond = threading.Condition()
        self.conn = connect_client(broker.host, broker.port, client_id=f"fleet-{device}", clean=True,
                                   subscriptions=[f"{topics.prefix}/devices/{device}/#"],
                                   on_message=self._on_message, wait_s=WAIT)

    def _on_message(self, msg: Any) -> None:
        payload = bytes(msg.payload)
        if msg.topic.endswith("/bundle-req"):
            req = proto.decode_as(payload, proto.BundleRequest)
            self.requests.append(req)
            frames = chunks.split(req.job_id, self.bundles[req.job_id], chunk_size=16 * 1024, kind="bundle")
            for f in frames[req.start:]:
                self.conn.publish(self.topics.command(self.device, "bundle"), f, qos=1)
        with self._cond:
            self.messages.append((msg.topic, payload))
            self._cond.notify_all()

    def of(self, kind: str) -> list[Any]:
        with self._cond:
            rows = [p for t, p in self.messages if t.endswith("/" + kind)]
        return rows if kind == "samples" else [proto.decode(p) for p in rows]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def send(self, kind: str, msg: proto.Message) -> None:
        self.conn.publish(self.topics.command(self.device, kind), msg.encode(), qos=1)

    def job_steps(self, job: str) -> list[str]:
        return [m.step for m in self.of("jobs") if isinstance(m, proto.JobStatus) and m.job_id == job]


@pytest.fixture()
def setup(broker: MosquittoBroker, topic_prefix: str, tmp_path: Path) -> Iterator[tuple[Agent, Fleet]]:
    topics = proto.TopicScheme(topic_prefix)
    fleet = Fleet(broker, topics, "dev-e2e")
    cfg = agent_config(tmp_path / "state", agent={"device_id": "dev-e2e"},
                       broker={"enabled": True, "host": broker.host, "port": broker.port,
                               "topic_prefix": topic_prefix},
                       sampling={"low_confidence": 0.9, "chunk_size": 4096, "burst": 5})
    agent = Agent(cfg).start()
    agent.worker.retry_wait_s = 0.0
    yield agent, fleet
    agent.close()
    fleet.conn.close()


def _states(fleet: Fleet) -> list[proto.DeviceState]:
    return [m for m in fleet.of("state") if isinstance(m, proto.DeviceState)]


def test_deploy_over_http_then_mqtt_chunks_state_and_offline(setup: tuple[Agent, Fleet], file_server: Any,
                                                             tiny_bundles: dict[str, Path]) -> None:
    agent, fleet = setup
    assert fleet.wait_for(lambda: any(s.online for s in _states(fleet)))  # birth, no model yet

    fleet.send("deploy", deploy_command(file_server, tiny_bundles["v1"], "job-http", "1.0.0"))
    assert fleet.wait_for(lambda: "completed" in fleet.job_steps("job-http")), fleet.job_steps("job-http")
    assert fleet.job_steps("job-http")[:2] == ["received", "downloading"]
    assert fleet.wait_for(lambda: _states(fleet)[-1].model_version == "1.0.0")
    assert _states(fleet)[-1].variant == "onnx-fp32" and _states(fleet)[-1].variant_latency_ms

    data = tiny_bundles["v2"].read_bytes()
    fleet.bundles["job-mqtt"] = data
    fleet.send("deploy", proto.DeployCommand(job_id="job-mqtt", name="tiny-mlp", version="1.1.0", size=len(data),
                                             sha256=hashlib.sha256(data).hexdigest(), delivery="mqtt"))
    assert fleet.wait_for(lambda: "completed" in fleet.job_steps("job-mqtt")), fleet.job_steps("job-mqtt")
    assert fleet.requests and fleet.requests[0].start == 0
    assert agent.predict(digits().test_x[0]).model_version == "1.1.0"
    assert fleet.wait_for(lambda: _states(fleet)[-1].model_version == "1.1.0")  # state follows "completed"
    assert _states(fleet)[-1].previous_version == "1.0.0"

    fleet.send("rollback", proto.RollbackCommand(job_id="job-rb", reason="canary"))
    assert fleet.wait_for(lambda: fleet.job_steps("job-rb") == ["rolled_back"])
    assert fleet.wait_for(lambda: _states(fleet)[-1].model_version == "1.0.0")

    # a malformed command is logged and dropped; the agent keeps serving
    fleet.conn.publish(fleet.topics.command("dev-e2e", "deploy"), b"{not json", qos=1)
    fleet.send("deploy", deploy_command(file_server, tiny_bundles["tampered"], "job-bad", "1.1.0"))
    assert fleet.wait_for(lambda: "failed" in fleet.job_steps("job-bad"))
    assert agent.predict(digits().test_x[0]).model_version == "1.0.0"

    agent.close()
    assert fleet.wait_for(lambda: _states(fleet)[-1].online is False)


def test_drift_reports_alarm_and_samples_over_mqtt(setup: tuple[Agent, Fleet],
                                                   tiny_bundles: dict[str, Path]) -> None:
    agent, fleet = setup
    agent.install(tiny_bundles["v1"])
    window = agent.model.monitor.window
    d = digits()
    rng = np.random.default_rng(0)
    clean = d.test_x[rng.integers(0, len(d.test_x), 2 * window)]
    for img in clean:
        agent.predict(img)
    assert fleet.wait_for(lambda: len(fleet.of("drift")) == 2)
    assert not any(r.alarm for r in fleet.of("drift"))

    # a realistic shift: darker, rotated digits
    shifted = [(np.rot90(img, 1) * 0.5).astype(np.uint8) for img in d.test_x[rng.integers(0, len(d.test_x), 6 * window)]]
    alarm_at = None
    for i, img in enumerate(shifted):
        if agent.predict(img).drift_alarm:
            alarm_at = i
            break
    assert alarm_at is not None, [r.risk for r in agent.reports]
    assert fleet.wait_for(lambda: any(r.alarm for r in fleet.of("drift")))
    report = [r for r in fleet.of("drift") if r.alarm][0]
    assert report.model_version == "1.0.0" and report.scores and report.thresholds

    # captured samples: chunked (<= 4 KiB frames here), reassembled and decoded bit-exact
    assert fleet.wait_for(lambda: len(fleet.of("samples")) > 0)
    agent.link.wait_drained(WAIT)
    frames = fleet.of("samples")
    assert all(len(f) <= 4096 for f in frames)
    re = chunks.Reassembler()
    done = [c for c in (re.add(f) for f in frames) if c is not None]
    assert done
    samples = [decode_sample(c.data) for c in done]
    originals = {img.tobytes() for img in shifted} | {img.tobytes() for img in clean}
    assert all(s.image.tobytes() in originals for s in samples)
    assert all(s.device_id == "dev-e2e" and s.model_version == "1.0.0" for s in samples)
