"""What inference tells the fleet: drift reports and captured drift samples.

The inference pipeline calls :meth:`DriftReporter.on_report` after every drift window and
:meth:`DriftReporter.on_sample` after every prediction; this module turns them into
``DriftReportMsg`` messages and chunked samples on the outbox (through ``send`` /
``put``), with the sample selector rebuilt for each model put into service.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from core import chunks
from core.agent_config import AgentConfig
from core.drift import DriftReport
from core.protocol import PRIORITY_SAMPLES, SAMPLES_KIND, DriftReportMsg, Message, TopicScheme
from core.sampling import DriftSample, SampleSelector, encode_sample

from .inference import LoadedModel, Prediction

__all__ = ["DriftReporter", "drift_message"]

log = logging.getLogger(__name__)


def drift_message(device_id: str, seq: int, rep: DriftReport, model_version: str | None) -> DriftReportMsg:
    """One drift window as the wire message."""
    return DriftReportMsg(
        device_id=device_id, seq=seq, window=rep.window_index, n=rep.n, model_version=model_version,
        scores={t.name: float(t.score) for t in rep.tests} | {"risk": rep.risk, "input": rep.input_score},
        thresholds={t.name: float(t.threshold) for t in rep.tests} | {"risk": rep.risk_threshold,
                                                                      "input": rep.input_threshold},
        flags={t.name: bool(t.flag) for t in rep.tests} | {"risk": rep.risk_flag, "class_shift": rep.class_shift},
        risk=float(rep.risk), input_shift=bool(rep.input_shift), alarm=bool(rep.alarm),
        mean_confidence=float(rep.mean_confidence))


class DriftReporter:
    """Drift windows and captured samples of one device, queued for the fleet.

    ``send`` queues a message (the agent's outbox route); ``put(topic, frame, priority)``
    queues one raw sample frame, or is None while there is no outbox.
    """

    def __init__(self, config: AgentConfig, device_id: str, topics: TopicScheme, send: Callable[[Message], None],
                 put: Callable[[str, bytes, int], Any] | None = None) -> None:
        self.config = config
        self.device_id = device_id
        self.topics = topics
        self._send = send
        self.put = put
        self.selector: SampleSelector | None = None
        self.reports: deque[DriftReport] = deque(maxlen=50)
        self._seq = 0
        self._last_reservoir = time.monotonic()

    def use_model(self, model: LoadedModel) -> None:
        """A new model serves: a selector with its thresholds (none when sampling is off)."""
        s = self.config.sampling
        if not s.enabled:
            self.selector = None
            return
        thr = model.baseline.sample_score_q99 if model.baseline is not None else float("inf")
        self.selector = SampleSelector(self.device_id, model.version, low_confidence=s.low_confidence,
                                       drift_threshold=thr, reservoir_size=s.reservoir_size,
                                       rate=s.max_per_minute / 60.0, burst=s.burst)

    def on_report(self, rep: DriftReport, model: LoadedModel) -> None:
        self.reports.append(rep)
        self._seq += 1
        self._send(drift_message(self.device_id, self._seq, rep, model.version))
        if rep.alarm_changed:
            log.warning("drift alarm %s (risk %.2f, threshold %.2f)", "ON" if rep.alarm else "off", rep.risk,
                        rep.risk_threshold)

    def on_sample(self, image: np.ndarray, pred: Prediction, scores: dict[str, float]) -> None:
        sel = self.selector
        if sel is None:
            return
        img = np.asarray(image)
        if img.dtype != np.uint8:
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        captured = sel.offer_one(img, pred.index, pred.confidence, scores.get("sample_score", 0.0))
        now = time.monotonic()
        if now - self._last_reservoir >= self.config.sampling.reservoir_interval_s:
            self._last_reservoir = now
            captured += sel.take_reservoir()
        for sample in captured:
            self.send_sample(sample)

    def send_sample(self, sample: DriftSample) -> None:
        """Queue one captured sample as compressed chunk frames (each within ``[sampling].chunk_size``)."""
        if self.put is None:
            return
        frames = chunks.split(sample.sample_id, encode_sample(sample), chunk_size=self.config.sampling.chunk_size,
                              kind=SAMPLES_KIND, meta={"reason": sample.reason, "model_version": sample.model_version})
        topic = self.topics.device(self.device_id, "samples")
        for frame in frames:
            self.put(topic, frame, PRIORITY_SAMPLES)

    def flush_reservoir(self) -> int:
        """Upload the reservoir now (also done every ``reservoir_interval_s``); returns how many."""
        if self.selector is None:
            return 0
        samples = self.selector.take_reservoir()
        for s in samples:
            self.send_sample(s)
        return len(samples)
