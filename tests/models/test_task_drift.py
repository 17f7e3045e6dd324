"""Drift for models without an embedding, end to end against a real Mosquitto (issue 10, "Done means").

A detector (a YOLOv8-style raw head built here) and a tensor model (two dense layers) are
bundled with ``bundle create --baseline-dir`` (the baseline calibrated from the task's own
drift features: detection score / count / box-size summaries, tensor output summaries,
input statistics); an agent connected to the broker predicts fresh reference inputs (no
alarm in the drift reports a subscriber receives) and then shifted inputs (the alarm
comes on, in a report on the broker).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core import protocol as proto
from core.mqtt import connect_client
from edge_agent.agent import Agent
from tests.plugins.agent_kit import agent_config, keys
from tests.plugins.broker import MosquittoBroker
from tests.plugins.models import cli
from tests.plugins.optimize_kit import blob_image, cell_detector, tensor_model, write_vectors

pytestmark = [pytest.mark.broker, pytest.mark.slow]
WAIT = 30.0
BASELINE_SAMPLES = 110  # split in halves: enough for the 25-inference window (25 reference + 50 calibration)


class DriftSubscriber:
    """Records the drift reports a device publishes."""

    def __init__(self, broker: MosquittoBroker, topics: proto.TopicScheme, device: str) -> None:
        self.reports: list[proto.DriftReportMsg] = []
        self._cond = threading.Condition()
        self.conn = connect_client(broker.host, broker.port, client_id=f"sub-{device}", clean=True,
                                   subscriptions=[f"{topics.prefix}/devices/{device}/#"],
                                   on_message=self._on_message, wait_s=WAIT)

    def _on_message(self, msg: Any) -> None:
        if msg.topic.endswith("/drift"):
            with self._cond:
                self.reports.append(proto.decode_as(bytes(msg.payload), proto.DriftReportMsg))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[proto.DriftReportMsg]], bool]) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.reports), WAIT)


def _bundle(tmp: Path, model: Path, baseline: Path, flags: list[str]) -> Path:
    out = tmp / f"{model.stem}.elb"
    rc, text = cli(["bundle", "create", "--model", model, "--name", model.stem, "--version", "1.0.0", *flags,
                    "--baseline-dir", baseline, "--sign", keys().private, "--out", out])
    assert rc == 0, text
    from core.bundle import read_manifest_unverified

    assert read_manifest_unverified(out).baseline == "baseline.npz"  # claimed only when the agent will use it
    return out


def _alarm_off_then_on(broker: MosquittoBroker, prefix: str, tmp: Path, bundle: Path,
                       reference: Callable[[int], Any], shifted: Callable[[int], Any]) -> None:
    device = f"dev-{bundle.stem}"
    sub = DriftSubscriber(broker, proto.TopicScheme(prefix), device)
    cfg = agent_config(tmp / "state", agent={"device_id": device},
                       broker={"enabled": True, "host": broker.host, "port": broker.port, "topic_prefix": prefix})
    try:
        with Agent(cfg).start() as agent:
            agent.install(bundle)
            assert agent.model.monitor is not None, "the bundle's baseline was not used"
            window = agent.model.monitor.window
            for i in range(2 * window):
                agent.predict(reference(i))
            assert sub.wait_for(lambda r: len(r) >= 2)
            assert not any(r.alarm for r in sub.reports), [(r.risk, r.flags) for r in sub.reports]
            alarm_at = next((i for i in range(8 * window) if agent.predict(shifted(i)).drift_alarm), None)
            assert alarm_at is not None, [r.risk for r in sub.reports]
            assert sub.wait_for(lambda r: any(x.alarm for x in r))
            report = next(r for r in sub.reports if r.alarm)
            assert report.model_version == "1.0.0" and report.n == window and report.scores and report.input_shift
    finally:
        sub.conn.close()


def test_detector_drift_reports_over_mqtt(session_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path) -> None:
    from PIL import Image

    base = tmp_path / "baseline"
    base.mkdir()
    rng = np.random.default_rng(1)
    for i in range(BASELINE_SAMPLES):
        Image.fromarray(blob_image(rng)).save(base / f"b{i:03d}.png")
    (tmp_path / "labels.txt").write_text("red\ngreen\n")
    bundle = _bundle(tmp_path, cell_detector(tmp_path / "blobs.onnx"), base,
                     ["--labels", tmp_path / "labels.txt", "--detector", "yolov8"])
    ref_rng, shift_rng = np.random.default_rng(2), np.random.default_rng(3)
    _alarm_off_then_on(session_broker, topic_prefix, tmp_path, bundle, lambda i: blob_image(ref_rng),
                       lambda i: blob_image(shift_rng, shift=True))


def test_tensor_model_drift_reports_over_mqtt(session_broker: MosquittoBroker, topic_prefix: str,
                                             tmp_path: Path) -> None:
    base = write_vectors(tmp_path / "baseline", BASELINE_SAMPLES, seed=1)
    bundle = _bundle(tmp_path, tensor_model(tmp_path / "dense.onnx"), base, ["--task", "tensor"])
    ref_rng, shift_rng = np.random.default_rng(2), np.random.default_rng(3)
    _alarm_off_then_on(session_broker, topic_prefix, tmp_path, bundle,
                       lambda i: ref_rng.standard_normal(16).astype(np.float32),
                       lambda i: (shift_rng.standard_normal(16) * 1.5 + 1.0).astype(np.float32))
