"""Simulated cameras for the demo: the real agent fed by a stream of digits, and a labeller.

Each :class:`Camera` runs a real :class:`edge_agent.agent.Agent` (its MQTT link, outbox,
drift monitor, sampler and updater) in this process and a thread that shows it one
image after another, as a camera would.  The demo knows the truth of every image it
shows, so it records whether each answer was right; that is what the accuracy plots
are made of.  The :class:`Labeller` plays the human in the loop: it looks at the drift
samples the fleet stored, recognises the image (by content hash) and sends its true
label on the feedback topic for a fraction of them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import EdgeloopError
from core.protocol import Feedback, TopicScheme

from .report import Observation
from .shifts import NO_SHIFT, CameraShift

if TYPE_CHECKING:
    from fleet.registry import Registry

__all__ = ["Truth", "Camera", "Labeller", "agent_config"]

log = logging.getLogger(__name__)


class Truth:
    """image content hash -> true class index, for every image the demo showed (thread-safe)."""

    def __init__(self) -> None:
        self._d: dict[bytes, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(image: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(image).tobytes() + str(image.shape).encode(), digest_size=16).digest()

    def add(self, image: np.ndarray, label: int) -> None:
        with self._lock:
            self._d[self.key(image)] = label

    def get(self, image: np.ndarray) -> int | None:
        with self._lock:
            return self._d.get(self.key(image))


def agent_config(device_id: str, state_dir: Path, *, host: str, port: int, protocol: str, trusted_key: Path,
                 prefix: str, drift_window: int, telemetry_s: float) -> Any:
    """An agent config for one simulated camera: fast telemetry, generous sampling, no HTTP."""
    from core.agent_config import (
        AgentConfig,
        AgentSection,
        BrokerSection,
        DriftSection,
        HttpSection,
        ModelSection,
        SamplingSection,
        TelemetrySection,
    )

    return AgentConfig(
        agent=AgentSection(device_id=device_id, state_dir=str(state_dir), trusted_key=str(trusted_key)),
        model=ModelSection(variant="auto", threads=1, benchmark_runs=5),
        broker=BrokerSection(host=host, port=port, protocol="mqtt5" if protocol == "5" else "mqtt311",
                             topic_prefix=prefix, keepalive=10),
        drift=DriftSection(window=drift_window),
        # The demo wants hundreds of labelled samples in a minute, not six per device.  Not fewer than this: at 5
        # a second the ~600 labels that trigger retraining were 45 % clean cameras' low-confidence captures, the
        # "adapted" drift domain calibrated on them fitted neither domain, and recovered cameras kept alarming.
        sampling=SamplingSection(low_confidence=0.7, reservoir_size=8, reservoir_interval_s=5.0,
                                 max_per_minute=1200.0, burst=50),
        telemetry=TelemetrySection(interval_s=telemetry_s),
        http=HttpSection(enabled=False, port=0),
    )


@dataclass
class _Stream:
    shift: CameraShift = NO_SHIFT
    phase: str = "baseline"


class Camera:
    """One simulated device: a real agent plus the thread that feeds it images."""

    def __init__(self, device_id: str, group: str, agent: Any, pool: tuple[np.ndarray, np.ndarray], *,
                 fps: float, seed: int, truth: Truth, record: Callable[[Observation], None],
                 clock: Callable[[], float]) -> None:
        self.device_id, self.group, self.agent = device_id, group, agent
        self.images, self.labels = pool
        self.fps = fps
        self.rng = np.random.default_rng(seed)
        self.truth, self.record, self.clock = truth, record, clock
        self.stream = _Stream()
        self.shown: dict[str, int] = {}  # phase -> predictions made in it
        self.errors = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def set_phase(self, phase: str, shift: CameraShift | None = None) -> None:
        self.stream = _Stream(self.stream.shift if shift is None else shift, phase)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._feed, name=f"cam-{self.device_id}", daemon=True),
                         threading.Thread(target=self.agent.run, args=(self._stop,), name=f"agent-{self.device_id}",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _feed(self) -> None:
        period = 1.0 / self.fps
        order = self.rng.permutation(len(self.images))
        i = 0
        next_t = time.monotonic()
        while not self._stop.is_set():
            if i == len(order):
                order, i = self.rng.permutation(len(self.images)), 0
            stream = self.stream
            idx = order[i]
            i += 1
            image = stream.shift.apply(self.images[idx:idx + 1], self.rng)[0]
            label = int(self.labels[idx])
            self.truth.add(image, label)
            try:
                pred = self.agent.predict(image)
            except EdgeloopError as exc:  # e.g. mid-switch; the agent counts its own errors
                self.errors += 1
                log.debug("%s: %s", self.device_id, exc)
            else:
                model = self.agent.model
                self.record(Observation(self.clock(), self.device_id, self.group, pred.index == label,
                                        model.version if model else None, stream.phase))
                self.shown[stream.phase] = self.shown.get(stream.phase, 0) + 1
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_t = time.monotonic()  # behind (training hogs the CPU): do not burst to catch up

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self.agent.close()


class Labeller:
    """Sends true labels for a fraction of the stored drift samples, as an operator would."""

    def __init__(self, registry: Registry, store_root: Path, publisher: Any, topics: TopicScheme, truth: Truth,
                 class_names: tuple[str, ...], *, fraction: float, interval_s: float = 0.5) -> None:
        self.registry, self.publisher, self.topics, self.truth = registry, publisher, topics, truth
        from fleet.samples import SampleStore

        self.store = SampleStore(store_root)
        self.class_names = class_names
        self.fraction = fraction
        self.interval_s = interval_s
        self.sent = 0
        self.seen: set[str] = set()
        self._since = 0.0  # the newest fleet receive time seen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def chosen(self, sample_id: str) -> bool:
        """A stable pseudo-random choice of which samples get a label."""
        h = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:4], "big")
        return h / 2**32 < self.fraction

    def step(self) -> int:
        from core.sampling import decode_sample

        n = 0
        # only what arrived since the last look (less a margin; ``seen`` drops repeats): reading every unlabelled
        # sample each step grew with the run and held the demo's GIL (20,000 samples in a loaded run)
        for rec in self.registry.samples.find(labelled=False, since=self._since - 5.0):
            self._since = max(self._since, rec.received)
            if rec.id in self.seen:
                continue
            self.seen.add(rec.id)
            if not self.chosen(rec.id):
                continue
            try:
                image = decode_sample(self.store.read(rec)).image
            except EdgeloopError as exc:
                log.warning("labeller: sample %s unreadable: %s", rec.id, exc)
                continue
            y = self.truth.get(image)
            if y is None:
                continue
            fb = Feedback(sample_id=rec.id, label=self.class_names[y], source="operator")
            self.publisher.publish(self.topics.operator_feedback, fb.encode(), qos=1)
            n += 1
        self.sent += n
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except EdgeloopError as exc:
                log.warning("labeller: %s", exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-labeller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
