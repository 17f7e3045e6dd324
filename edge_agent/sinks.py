"""Where continuous results go: MQTT results topic, HTTP latest + Server-Sent Events, a JSONL file.

Every sink takes a :class:`StreamResult` in :meth:`Sink.emit`, called on the inference
thread right after the prediction: sinks must be quick and must never block on a slow
consumer.  So the MQTT sink publishes QoS 0 without waiting and is rate-limited, the
HTTP hub only swaps "the latest result" (an SSE client that reads slowly skips results, it
never makes the agent buffer them), and the JSONL sink appends one short line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.protocol import InferenceResult

from .inference import Prediction

__all__ = ["StreamResult", "Sink", "JsonlSink", "MqttResultsSink", "ResultHub", "CallbackSink"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamResult:
    """One frame's prediction, with where and when the frame came from.

    ``pred`` is what ``predict`` returned (a :class:`~edge_agent.inference.Prediction`, or a
    task layer's dict); :attr:`prediction`, its plain dict, is made on first use only, so a
    result a rate-limited sink skips costs no conversion.
    """

    source: str
    seq: int
    ts: float  # capture time, Unix seconds
    latency_ms: float  # capture -> result (queue wait included)
    inference_ms: float  # the model path alone
    pred: Any  # Prediction (to_dict()) or a dict
    ref: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def prediction(self) -> dict[str, Any]:
        """The prediction as a plain dict, without per-class vectors (ask the HTTP API for those)."""
        return _as_dict(self.pred)

    def to_dict(self) -> dict[str, Any]:
        # the prediction's own latency_ms (the model path) is inference_ms here; latency_ms is capture -> result
        d = {"source": self.source, "seq": self.seq, "ts": self.ts} | self.prediction | {
            "latency_ms": round(self.latency_ms, 3), "inference_ms": round(self.inference_ms, 3)}
        if self.ref:
            d["ref"] = self.ref
        return d | self.extra

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False, default=_jsonable)


def _as_dict(pred: Any) -> dict[str, Any]:
    """A prediction as a plain dict: ``Prediction.to_dict()``, or a task result that is a dict already."""
    if isinstance(pred, dict):
        return pred
    to_dict = getattr(pred, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"predict() returned {type(pred).__name__}, which has no to_dict()")
    # per-class vectors make every line and message long (and cost their floats): ask the HTTP API for them
    d = to_dict(probs=False) if isinstance(pred, Prediction) else to_dict()
    d.pop("probs", None)
    return d


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "__float__"):
        return float(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


class Sink:
    """A destination for results."""

    name = "sink"

    def emit(self, result: StreamResult) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release (idempotent)."""


class CallbackSink(Sink):
    """Calls ``fn(result)``: tests, and code embedding the pipeline."""

    name = "callback"

    def __init__(self, fn: Callable[[StreamResult], None]) -> None:
        self.fn = fn

    def emit(self, result: StreamResult) -> None:
        self.fn(result)


class JsonlSink(Sink):
    """Appends one JSON object per line; rotates to ``FILE.1`` above ``max_bytes`` (one old file kept)."""

    name = "jsonl"

    def __init__(self, path: Path, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - owned until close()
        self._size = self._fh.tell()
        self._lock = threading.Lock()

    def emit(self, result: StreamResult) -> None:
        line = result.to_json() + "\n"
        with self._lock:
            if self._fh is None:
                return
            if self._size + len(line) > self.max_bytes and self._size:
                self._fh.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                self._size = 0
            self._fh.write(line)
            self._size += len(line)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class MqttResultsSink(Sink):
    """:class:`~core.protocol.InferenceResult` on ``{prefix}/devices/{id}/results``, QoS 0, rate-limited.

    ``publish(topic, payload)`` is the link's non-blocking publish; while the broker is
    away results are dropped (they are live data, not a record: the JSONL sink keeps one).
    The rate limit keeps evenly spaced results (a token bucket of one), and each message
    says how many it skipped.
    """

    name = "mqtt"

    def __init__(self, publish: Callable[[str, bytes], None], topic: str, device_id: str, *, per_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.publish = publish
        self.topic = topic
        self.device_id = device_id
        self.period = 1.0 / per_s if per_s > 0 else 0.0
        self._clock = clock
        self._next = 0.0
        self.skipped = 0  # since the last message
        self.sent = 0
        self.failed = 0

    def emit(self, result: StreamResult) -> None:
        t = self._clock()
        if t < self._next:
            self.skipped += 1
            return
        self._next = max(self._next + self.period, t - self.period / 2) if self.period else t
        p = result.prediction
        msg = InferenceResult(
            device_id=self.device_id, source=result.source, seq=result.seq, ts=result.ts,
            model_version=p.get("model_version"), variant=p.get("variant"), label=p.get("label"),
            index=p.get("index"), confidence=p.get("confidence"), latency_ms=round(result.latency_ms, 3),
            inference_ms=round(result.inference_ms, 3), drift_alarm=bool(p.get("drift_alarm", False)),
            skipped=self.skipped, output=_task_output(p))
        try:
            self.publish(self.topic, msg.encode())
            self.sent += 1
            self.skipped = 0
        except Exception as exc:  # noqa: BLE001 - a broker hiccup must not stop inference
            self.failed += 1
            log.debug("results publish failed: %s", exc)


_CORE_KEYS = frozenset({"label", "index", "confidence", "probs", "latency_ms", "model_version", "variant",
                        "drift_alarm", "sample_score"})


def _task_output(pred: dict[str, Any]) -> dict[str, Any]:
    """What a task layer adds beyond a classification (detections, tensors); probs are left out (size)."""
    return {k: v for k, v in pred.items() if k not in _CORE_KEYS}


class ResultHub(Sink):
    """The latest result for ``GET /results/latest`` and its Server-Sent-Events stream.

    Holds one result; readers wait for a newer sequence number.  A slow SSE client gets
    the newest result when it next reads (it skips, the agent never queues for it).  The
    result is turned into JSON when someone reads it (once), not for every frame: with no
    client connected the hub costs a swap per frame.
    """

    name = "http"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: tuple[int, StreamResult] | None = None  # (its number, the result): swapped whole
        self._text: tuple[int, str] | None = None  # (n, JSON) of the last result read
        self._n = 0
        self._waiting = 0
        self._closed = False

    def emit(self, result: StreamResult) -> None:
        n = self._n + 1  # one writer: the inference thread
        self._latest = (n, result)  # one reference swap: a reader gets a result with its own number
        self._n = n
        if self._waiting:
            with self._cond:
                self._cond.notify_all()

    def _read(self) -> tuple[int, str | None]:
        latest = self._latest
        if latest is None:
            return self._n, None
        n, res = latest
        cached = self._text
        if cached is not None and cached[0] == n:
            return cached
        text = res.to_json()
        self._text = (n, text)
        return n, text

    def latest(self) -> tuple[int, str | None]:
        with self._cond:
            return self._read()

    def wait_newer(self, seen: int, timeout: float) -> tuple[int, str | None]:
        """The latest result once it is newer than ``seen`` (or what there is after ``timeout``)."""
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: self._n > seen or self._closed, timeout)
            finally:
                self._waiting -= 1
            return self._read()

    def events(self, *, keepalive_s: float = 15.0, stop: Callable[[], bool] = lambda: False) -> Iterator[bytes]:
        """SSE frames: ``id: N`` + ``data: {json}`` per new result, a comment line as keep-alive."""
        seen, _ = self.latest()
        while not self._closed and not stop():
            n, text = self.wait_newer(seen, keepalive_s)
            if n > seen and text is not None:
                seen = n
                yield f"id: {n}\nevent: result\ndata: {text}\n\n".encode()
            else:
                yield b": keep-alive\n\n"

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
