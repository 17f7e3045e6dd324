"""The continuous pipeline on a real agent: video files, a live stream that dies and comes back, drops under load, sinks."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.agent_config import SourceSection
from core.errors import SourceError
from edge_agent.agent import Agent
from edge_agent.pipeline import ModelShaper, RateMeter, StreamPipeline, start_stream
from edge_agent.sinks import CallbackSink, MqttResultsSink, ResultHub, StreamResult
from edge_agent.sources import make_source
from edge_agent.telemetry import ProcessSampler
from tests.plugins.agent_kit import agent_config, make_bundle
from tests.plugins.streams import MjpegServer, write_video

WAIT = 60.0  # an upper bound for one wait on a loaded machine; the tests finish long before


class Collector:
    """A sink that records results and lets a test wait for a count."""

    def __init__(self) -> None:
        self.results: list[StreamResult] = []
        self._cond = threading.Condition()
        self.sink = CallbackSink(self._add)

    def _add(self, r: StreamResult) -> None:
        with self._cond:
            self.results.append(r)
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.results) >= n, timeout)


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MLP with the slow variant (~8 M multiply-adds): a model slower than any source here."""
    return make_bundle(tmp_path_factory.mktemp("pipeline") / "slow.elb", "1.0.0", slow_variant=True)


@pytest.fixture
def agent(tiny_bundles: dict[str, Path], tmp_path: Path) -> Iterator[Agent]:
    a = Agent(agent_config(tmp_path / "state", http={"enabled": True, "port": 0},
                           results={"jsonl": str(tmp_path / "results.jsonl")})).start(connect=False)
    a.install(tiny_bundles["v1"])
    yield a
    a.close()


def test_video_file_every_frame_predicted_once(agent: Agent, video_file: Path, tmp_path: Path) -> None:
    got = Collector()
    stream = start_stream(agent, [str(video_file)], extra_sinks=[got.sink])
    assert stream is not None and stream.wait(WAIT)
    st = stream.stats()
    assert [r.seq for r in got.results] == list(range(1, 61))  # finite source: waits, drops nothing
    assert st.inferences == 60 and st.dropped_frames == 0 and st.errors == 0 and st.sources[0].finished
    r = got.results[0].to_dict()
    assert r["model_version"] == "1.0.0" and r["label"] in [str(i) for i in range(10)]
    assert r["latency_ms"] >= r["inference_ms"] > 0  # capture -> result includes the model path
    assert "probs" not in r  # long vectors stay out of the stream
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 60 and json.loads(lines[-1])["seq"] == 60
    tele = agent.telemetry()
    assert tele.dropped_frames == 0 and tele.e2e_latency_p50_ms is not None and tele.e2e_latency_p99_ms is not None


def test_frame_rate_and_roi_reach_the_model(agent: Agent, video_file: Path) -> None:
    got = Collector()
    seen: list[tuple[int, ...]] = []

    def predict(image: np.ndarray) -> object:
        seen.append(image.shape)
        return agent.predict(image)

    spec = SourceSection(uri=str(video_file), every=4, roi=(8, 4, 16, 10))
    stream = StreamPipeline(predict, [(make_source(spec.uri), spec)], [got.sink]).start()
    assert stream.wait(WAIT)
    stream.stop()
    assert [r.seq for r in got.results] == list(range(1, 61, 4))
    assert set(seen) == {(10, 16, 3)}


def test_frames_reach_the_model_at_its_size_with_the_same_answers(agent: Agent, tmp_path: Path) -> None:
    """The capture thread resizes to the model's input; predictions match those of the whole frames."""
    video = write_video(tmp_path / "big.avi", 12, size=(120, 160))
    seen: list[tuple[int, ...]] = []
    answers: list[tuple[str, float]] = []

    def predict(image: np.ndarray) -> object:
        seen.append(image.shape)
        pred = agent.predict(image)
        answers.append((pred.label, pred.confidence))
        return pred

    spec = SourceSection(uri=str(video))
    stream = StreamPipeline(predict, [(make_source(spec.uri), spec)], shaper=ModelShaper(agent)).start()
    assert stream.wait(WAIT)
    stream.stop()
    model = agent.model
    assert model is not None and model.spec is not None
    assert len(seen) == 12 and set(seen) == {tuple(model.spec.size)}  # the tiny MLP is gray: (H, W)
    src = make_source(str(video))
    src.open()
    whole = [agent.predict(src.read(threading.Event())) for _ in range(12)]
    src.close()
    assert [a[0] for a in answers] == [p.label for p in whole]
    assert max(abs(a[1] - p.confidence) for a, p in zip(answers, whole, strict=True)) < 0.05


def test_model_shaper_follows_the_served_model(agent: Agent, tiny_bundles: dict[str, Path]) -> None:
    shaper = ModelShaper(agent)
    first = shaper()
    assert first is not None and shaper() is first  # one identity check per frame while the model stays
    agent.install(tiny_bundles["v2"])
    assert shaper() is not None and shaper() is not first


def test_two_sources_every_frame_of_each_predicted_once(agent: Agent, tmp_path: Path) -> None:
    got = Collector()
    a, b = write_video(tmp_path / "a.avi", 20), write_video(tmp_path / "b.avi", 30)
    specs = [SourceSection(uri=str(a), name="a"), SourceSection(uri=str(b), name="b")]
    stream = StreamPipeline(agent.predict, [(make_source(s.uri), s) for s in specs], [got.sink],
                            shaper=ModelShaper(agent)).start()
    assert stream.wait(WAIT)
    stream.stop()
    for name, n in (("a", 20), ("b", 30)):
        assert [r.seq for r in got.results if r.source == name] == list(range(1, n + 1))
    assert stream.stats().dropped_frames == 0


def test_live_source_faster_than_the_model_drops_oldest(slow_bundle: Path, tmp_path: Path) -> None:
    """Frames are dropped and counted; latency (in frames) and memory do not grow with the run."""
    agent = Agent(agent_config(tmp_path / "state")).start(connect=False)
    try:
        agent.install(slow_bundle)
        video = write_video(tmp_path / "fast.avi", 30)
        spec = SourceSection(uri=str(video), loop=True, drop="oldest", queue=2)
        got = Collector()
        rss = ProcessSampler()
        stream = StreamPipeline(agent.predict, [(make_source(spec.uri, loop=True), spec)], [got.sink]).start()
        assert got.wait(60)
        early_rss, early = rss.memory_mb(), stream.stats()
        assert got.wait(400)
        stream.stop()
        late_rss, st = rss.memory_mb(), stream.stats()
        src = st.sources[0]
        assert src.dropped > 0 and st.dropped_frames == src.dropped
        # every frame that passed the gate was either predicted, dropped, or still queued at the stop
        assert src.queued == st.inferences + st.errors + src.dropped + st.queue_depth
        assert src.captured == src.queued  # no rate gate here
        # each result's frame had at most queue-length newer frames ahead of it, early and late alike
        behind = [r.extra["behind"] for r in got.results]
        assert max(behind) <= spec.queue and early.max_behind <= spec.queue and st.max_behind <= spec.queue
        assert early.dropped_frames < st.dropped_frames
        if early_rss is not None and late_rss is not None:
            assert late_rss - early_rss < 25.0, (early_rss, late_rss)
    finally:
        agent.close()


def test_stream_that_dies_and_comes_back_is_reconnected(agent: Agent, mjpeg_server: MjpegServer) -> None:
    got = Collector()
    spec = SourceSection(uri=mjpeg_server.url, reconnect_min_s=0.05, reconnect_max_s=0.2)
    stream = StreamPipeline(agent.predict, [(make_source(spec.uri), spec)], [got.sink]).start()
    try:
        assert got.wait(5, timeout=WAIT)  # the first frames (a loaded machine may take a while to open the stream)
        mjpeg_server.stop()
        # the capture thread reads what was buffered, loses the stream, retries with back-off
        mjpeg_server.start()  # same port
        assert mjpeg_server.wait_connections(2, WAIT)
        before = len(got.results)
        assert got.wait(before + 5)
        assert stream.stats().sources[0].reconnects >= 1
    finally:
        stream.stop()


def test_uri_that_cannot_be_opened_fails_start_with_one_line(agent: Agent, tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        start_stream(agent, [str(tmp_path / "missing.mp4")])
    assert "cannot open source" in str(err.value) and "\n" not in str(err.value)
    assert agent.stream is None


def test_http_latest_and_server_sent_events(agent: Agent, tmp_path: Path) -> None:
    video = write_video(tmp_path / "loop.mp4", 10)
    spec = SourceSection(uri=str(video), loop=True, drop="oldest")
    agent.results = ResultHub()
    stream = StreamPipeline(agent.predict, [(make_source(spec.uri, loop=True), spec)], [agent.results]).start()
    agent.stream = stream
    try:
        host, port = "127.0.0.1", agent.http.port
        conn = http.client.HTTPConnection(host, port, timeout=WAIT)
        conn.request("GET", "/results/stream")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        events = []
        while len(events) < 3:
            line = resp.fp.readline().decode()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
        assert all(e["model_version"] == "1.0.0" for e in events)
        assert events[0]["seq"] < events[1]["seq"] < events[2]["seq"]  # newest each time, never repeated
        conn.close()
        c2 = http.client.HTTPConnection(host, port, timeout=WAIT)
        c2.request("GET", "/results/latest")
        latest = c2.getresponse()
        assert latest.status == 200 and "label" in json.loads(latest.read())
        c2.request("GET", "/metrics")
        text = c2.getresponse().read().decode()
        assert "edgeloop_stream_inference_fps" in text and "edgeloop_stream_dropped_frames_total" in text
        c2.close()
    finally:
        stream.stop()


def test_mqtt_results_sink_rate_limit() -> None:
    sent: list[bytes] = []
    now = [0.0]
    sink = MqttResultsSink(lambda t, p: sent.append(p), "p/devices/d/results", "d", per_s=2.0, clock=lambda: now[0])
    pred = {"label": "3", "index": 3, "confidence": 0.9, "model_version": "1", "variant": "v", "drift_alarm": False,
            "probs": [0.1] * 10, "boxes": [[1, 2, 3, 4]]}
    for i in range(40):  # 10 s at 4 results/s -> 2/s: every other one, each saying what it skipped
        now[0] = i * 0.25
        sink.emit(StreamResult("cam", i + 1, 1000.0 + i, 5.0, 1.0, pred))
    msgs = [json.loads(p) for p in sent]
    assert len(msgs) == 20 and msgs[0]["skipped"] == 0 and all(m["skipped"] == 1 for m in msgs[1:])
    assert msgs[0]["type"] == "result" and msgs[0]["schema_version"] >= 1 and msgs[0]["output"] == {"boxes": [[1, 2, 3, 4]]}


def test_rate_meter_counts_recent_events() -> None:
    now = [10.0]
    m = RateMeter(window_s=5.0, clock=lambda: now[0])
    for i in range(51):
        m.tick(5.0 + i * 0.1)
    assert m.rate() == pytest.approx(10.0, rel=0.05)
    now[0] = 100.0
    assert m.rate() == 0.0
