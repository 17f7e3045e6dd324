"""``edgeloop agent run --source video.mp4`` end to end, with results on a real Mosquitto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from core import protocol as proto
from core.mqtt import connect_client
from edge_agent.agent import Agent
from edge_agent.pipeline import start_stream
from tests.plugins.agent_kit import agent_config, keys
from tests.plugins.broker import MosquittoBroker
from tests.plugins.streams import write_video

pytestmark = pytest.mark.broker
WAIT = 60.0
REPO = Path(__file__).resolve().parents[2]


class Results:
    """A subscriber to one device's results topic."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.msgs: list[proto.InferenceResult] = []
        self._cond = threading.Condition()
        self.conn = connect_client(broker.host, broker.port, client_id=f"results-{os.getpid()}-{id(self)}", clean=True,
                                   subscriptions=[topic], on_message=self._on, wait_s=WAIT)

    def _on(self, msg: Any) -> None:
        with self._cond:
            self.msgs.append(proto.decode_as(bytes(msg.payload), proto.InferenceResult))
            self._cond.notify_all()

    def wait(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.msgs) >= n, WAIT)


def test_results_arrive_on_the_mqtt_results_topic(broker: MosquittoBroker, topic_prefix: str,
                                                   tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    topics = proto.TopicScheme(topic_prefix)
    sub = Results(broker, topics.device("dev-res", "results"))
    cfg = agent_config(tmp_path / "state", agent={"device_id": "dev-res"},
                       broker={"enabled": True, "host": broker.host, "port": broker.port, "topic_prefix": topic_prefix},
                       results={"mqtt_per_s": 1000.0})
    agent = Agent(cfg).start()
    try:
        agent.install(tiny_bundles["v1"])
        assert agent.link.wait_connected(WAIT)
        video = write_video(tmp_path / "clip.mp4", 40)
        stream = start_stream(agent, [str(video)])
        assert stream is not None and stream.wait(WAIT)
        assert sub.wait(5)  # QoS 0 and rate-limited: some, in order, each complete
        m = sub.msgs[0]
        assert m.device_id == "dev-res" and m.source == str(video) and m.model_version == "1.0.0"
        assert m.label is not None and m.confidence is not None and m.latency_ms >= m.inference_ms >= 0
        seqs = [x.seq for x in sub.msgs]
        assert seqs == sorted(seqs) and sum(x.skipped for x in sub.msgs) + len(sub.msgs) <= 40
    finally:
        agent.close()
        sub.conn.close()


def test_agent_run_source_video_end_to_end(broker: MosquittoBroker, topic_prefix: str,
                                          tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    """The CLI: install, then `agent run --source clip.mp4 --exit-when-done`: JSONL has every frame, MQTT some."""
    video = write_video(tmp_path / "clip.mp4", 300)  # long enough for the link to be up on a loaded machine
    toml = tmp_path / "agent.toml"
    toml.write_text(f"""
[agent]
device_id = "dev-cli"
state_dir = "state"
trusted_key = "{keys().public}"
[broker]
host = "{broker.host}"
port = {broker.port}
topic_prefix = "{topic_prefix}"
[http]
port = 0
[update]
min_free_mb = 0.0
[model]
benchmark_runs = 3
[results]
mqtt_per_s = 1000.0
jsonl = "results.jsonl"
""")
    sub = Results(broker, proto.TopicScheme(topic_prefix).device("dev-cli", "results"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "edgeloop"]
    try:
        inst = subprocess.run([*cli, "agent", "install", "-c", str(toml), str(tiny_bundles["v1"])],
                              capture_output=True, text=True, timeout=300, env=env)
        assert inst.returncode == 0, inst.stderr
        run = subprocess.run([*cli, "agent", "run", "-c", str(toml), "--source", str(video), "--exit-when-done"],
                             capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert [r["seq"] for r in rows] == list(range(1, 301)) and all(r["model_version"] == "1.0.0" for r in rows)
        assert sub.msgs, "no result reached the broker"
        bad = subprocess.run([*cli, "agent", "run", "-c", str(toml), "--source", str(tmp_path / "nope.avi")],
                             capture_output=True, text=True, timeout=300, env=env)
        assert bad.returncode != 0
        assert "cannot open source" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        sub.conn.close()
