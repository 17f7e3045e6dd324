"""The shadow stage on the device: a candidate model beside the serving one, never served.

A fleet's ``DeployCommand(shadow=True)`` installs the candidate into a slot without
switching to it (:meth:`edge_agent.updates.Updates.install_shadow`), and a
:class:`ShadowRunner` then sees every answer the serving model gives
(``InferencePipeline.shadow``): on every ``every``-th input it runs the candidate on the
same input, on a thread of its own, and compares -- the same top answer or not, both
models' latencies and confidences, the candidate's failures.  Nothing the candidate
computes is ever returned to a caller.

The device's extra cost is bounded twice: one input in ``every`` (default
:data:`DEFAULT_EVERY`), and at most one candidate run at a time -- an N-th input that
finds the candidate still busy is skipped and counted (``shadow_skipped``), so a slow
candidate costs at most one core's share and never delays a served answer.  The cost
actually spent (the candidate's compute time) goes out with the rest in each telemetry
interval (:meth:`ShadowRunner.telemetry_fields`, the additive ``shadow_*`` fields of
:class:`core.protocol.Telemetry`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.protocol import latency_bucket

__all__ = ["DEFAULT_EVERY", "ShadowRunner", "ShadowCounts"]

log = logging.getLogger(__name__)

DEFAULT_EVERY = 10


@dataclass
class ShadowCounts:
    """One telemetry interval of shadowing."""

    inputs: int = 0
    agree: int = 0
    errors: int = 0
    skipped: int = 0
    cost_ms: float = 0.0
    hist: dict[str, int] = field(default_factory=dict)  # candidate latencies
    serving_hist: dict[str, int] = field(default_factory=dict)  # the serving model's, on the same inputs
    conf_sum: float = 0.0
    serving_conf_sum: float = 0.0
    conf_n: int = 0


def _bump(hist: dict[str, int], ms: float) -> None:
    k = str(latency_bucket(ms))
    hist[k] = hist.get(k, 0) + 1


class ShadowRunner:
    """Runs ``model`` (a :class:`~edge_agent.inference.LoadedModel` of the candidate) on every
    ``every``-th input the serving model answered; see the module docstring."""

    def __init__(self, model: Any, *, every: int = DEFAULT_EVERY,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if every < 1:
            raise ValueError("shadow every must be >= 1")
        self.model = model
        self.version: str = model.version
        self.every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = 0
        self._c = ShadowCounts()
        self.total = ShadowCounts()  # since the start (status, tests)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._busy = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shadow-{self.version}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the serving path
    def offer(self, item: Any, serving: Any) -> None:
        """The serving model answered ``item`` with ``serving`` (a Prediction); cheap, never blocks."""
        with self._lock:
            self._seen += 1
            if self._seen % self.every:
                return
            if self._busy or self._queue.full():
                self._c.skipped += 1
                self.total.skipped += 1
                return
            self._busy = True
        copy = np.array(item, copy=True) if isinstance(item, np.ndarray) else item  # callers may reuse buffers
        self._queue.put_nowait((copy, serving))

    # ------------------------------------------------------------------ the candidate's thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if job is None:
                return
            item, serving = job
            t0 = self._clock()
            result, failed = None, False
            try:
                result = self.model.predict_result(item)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is evidence, never a crash
                failed = True
                log.debug("shadow %s failed on an input: %s", self.version, exc)
            ms = (self._clock() - t0) * 1000.0
            with self._lock:
                for c in (self._c, self.total):
                    c.inputs += 1
                    c.cost_ms += ms
                    _bump(c.serving_hist, float(serving.latency_ms))
                    if failed or result is None:
                        c.errors += 1
                        continue
                    _bump(c.hist, ms)
                    c.agree += int(result.index == serving.index and result.label == serving.label)
                    c.conf_sum += float(result.confidence)
                    c.serving_conf_sum += float(serving.confidence)
                    c.conf_n += 1
                self._busy = False

    # ------------------------------------------------------------------ reporting
    def telemetry_fields(self, *, reset: bool = True) -> dict[str, Any]:
        """This interval's ``shadow_*`` fields of :class:`core.protocol.Telemetry`."""
        with self._lock:
            c = self._c
            if reset:
                self._c = ShadowCounts()
        n = c.conf_n
        return {"shadow_version": self.version, "shadow_inputs": c.inputs, "shadow_agree": c.agree,
                "shadow_errors": c.errors, "shadow_skipped": c.skipped, "shadow_latency_hist": dict(c.hist),
                "shadow_serving_hist": dict(c.serving_hist),
                "shadow_confidence": round(c.conf_sum / n, 6) if n else None,
                "shadow_serving_confidence": round(c.serving_conf_sum / n, 6) if n else None,
                "shadow_cost_ms": round(c.cost_ms, 3)}

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no candidate run is queued or running (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._busy:
                    return True
            self._stop.wait(0.01)
        return False

    def close(self) -> None:
        """Stop the thread and close the candidate's runtime."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(5)
        self.model.close()
