"""The continuous pipeline: capture threads -> bounded queues -> inference -> sinks.

    sources (one capture thread each)                  inference thread                 sinks
    read -> rate gate -> ROI -> shape -> queue[2]  -->  oldest head frame -> predict  -->  MQTT / HTTP+SSE / JSONL

A live source never waits for the model: when its queue is full the OLDEST frame is
dropped (and counted), so what the model sees is always recent and the capture ->
result latency stays bounded by the queue length whatever the source's frame rate.
Finite sources (files, folders, tensor streams) block instead, so every item is
predicted.  A live stream that drops is reopened with exponential back-off.

The capture thread also *shapes* each frame to the model's input size in 8-bit
(:mod:`edge_agent.sources.shape`: decode and resize in C, GIL released), so on a device with
two cores decoding and resizing overlap inference, and the inference thread only
normalises a model-sized image into the runtime's buffer.  The queues are plain deques,
touched without a lock on the common path (one ``append`` / ``popleft`` each, atomic); a
thread takes the condition only to sleep when it has nothing to do, and the other wakes
it only when it sleeps.  Counters have one writer each.

:func:`start_stream` is the front door (``edgeloop agent run --source URI`` and the
``[[sources]]`` tables): it opens the sources (a URI that cannot be opened is a one-line
:class:`~core.errors.SourceError`), wires the sinks of ``[results]`` and hangs the
pipeline on the agent, whose telemetry and ``/metrics`` then report capture FPS,
inference FPS, end-to-end latency p50/p99 and dropped frames.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.agent_config import SourceSection
from core.errors import EdgeloopError, SourceError

from .sinks import JsonlSink, MqttResultsSink, ResultHub, Sink, StreamResult
from .sources import Frame, FrameGate, Source, SourceLost, crop, make_source
from .sources.shape import Shaper, frame_shaper
from .telemetry import LatencyRing

if TYPE_CHECKING:
    from .agent import Agent

__all__ = ["RateMeter", "SourceStats", "StreamStats", "StreamPipeline", "ModelShaper", "start_stream",
           "stream_metric_rows", "return_freed_frames"]

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], Any]
ShaperFor = Callable[[], "Shaper | None"]


class RateMeter:
    """Events per second over the last ``window_s`` seconds (at most ``keep`` timestamps held)."""

    def __init__(self, *, window_s: float = 5.0, keep: int = 512, clock: Callable[[], float] = time.monotonic) -> None:
        self._t: deque[float] = deque(maxlen=keep)
        self.window_s = window_s
        self._clock = clock

    def tick(self, t: float) -> None:
        self._t.append(t)

    def rate(self) -> float:
        now = self._clock()
        ts = [t for t in tuple(self._t) if now - t <= self.window_s]
        if len(ts) < 2:
            return 0.0
        span = max(now - ts[0], ts[-1] - ts[0])
        return (len(ts) - 1) / span if span > 0 else 0.0


@dataclass(frozen=True)
class SourceStats:
    name: str
    uri: str
    live: bool
    captured: int  # frames read from the source (before the rate gate)
    queued: int  # frames that passed the gate
    dropped: int  # queued frames dropped because the model fell behind
    reconnects: int
    capture_fps: float
    finished: bool


@dataclass(frozen=True)
class StreamStats:
    sources: tuple[SourceStats, ...]
    inferences: int
    errors: int
    inference_fps: float
    capture_fps: float
    e2e_latency_p50_ms: float | None
    e2e_latency_p99_ms: float | None
    dropped_frames: int
    queue_depth: int
    max_behind: int  # the most frames a predicted frame had behind it in its source (a latency in frames)


class ModelShaper:
    """The frame shaper for the model ``agent`` serves now (:func:`~edge_agent.sources.shape.frame_shaper`).

    Called by the capture threads for every frame: one identity check while the model
    stays; a new shaper after an update.  None (frames go whole) while no model is
    installed, for models the shaper leaves alone, and while a candidate is shadowed
    (it sees the served model's input and may want another size).
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._model: Any = None
        self._shaper: Shaper | None = None

    def __call__(self) -> Shaper | None:
        model = self.agent.model
        if model is not self._model:
            self._model = model
            self._shaper = None if model is None else frame_shaper(model.spec, model.task.kind)
        if self._shaper is not None and self.agent.pipeline.shadow is not None:
            return None
        return self._shaper


class _Feed:
    """One source's capture state and queue."""

    def __init__(self, source: Source, spec: SourceSection) -> None:
        self.source = source
        self.spec = spec
        self.name = spec.name or spec.uri
        self.drop = spec.drop == "oldest" or (spec.drop == "auto" and source.live)
        self.gate = FrameGate(fps=spec.fps, every=spec.every)
        self.queue: deque[Frame] = deque()
        self.captured = 0
        self.queued = 0
        self.dropped = 0
        self.reconnects = 0
        self.finished = False
        self.blocked = False  # a finite source waits for room in its queue (the inference thread wakes it)
        self.meter = RateMeter()
        self.thread: threading.Thread | None = None


def _oldest_head(feeds: list[_Feed]) -> _Feed | None:
    """The feed whose first queued frame was captured first (fair in time); None when all are empty."""
    if len(feeds) == 1:
        return feeds[0] if feeds[0].queue else None
    best, t_best = None, 0.0
    for f in feeds:
        try:
            t = f.queue[0].t_capture
        except IndexError:  # empty, or its capture thread dropped the head just now
            continue
        if best is None or t < t_best:
            best, t_best = f, t
    return best


class StreamPipeline:
    """Runs ``predict`` over frames of ``sources`` and hands each result to every sink.

    ``shaper``: what gives the capture threads the current model's frame shaper
    (:class:`ModelShaper`; None: frames go to ``predict`` as the source gave them, ROI applied).
    """

    def __init__(self, predict: Predict, sources: Sequence[tuple[Source, SourceSection]], sinks: Sequence[Sink] = (),
                 *, latency_window: int = 1024, shaper: ShaperFor | None = None) -> None:
        if not sources:
            raise ValueError("a pipeline needs at least one source")
        self.predict = predict
        self.shaper = shaper
        self.feeds = [_Feed(src, spec) for src, spec in sources]
        self.sinks = list(sinks)
        self.e2e = LatencyRing(latency_window)
        self.inferences = 0
        self.errors = 0
        self.max_behind = 0
        self._infer_meter = RateMeter()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._wall0 = time.time() - time.monotonic()
        self._last_error_log = 0.0
        self._idle = False  # the inference thread sleeps for want of a frame (a capture thread wakes it)
        self.done = threading.Event()  # set when every source has finished and its frames are predicted

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> StreamPipeline:
        """Open every source (all or none: a SourceError closes those already opened), then start the threads."""
        opened: list[Source] = []
        try:
            for feed in self.feeds:
                feed.source.open()
                opened.append(feed.source)
        except BaseException:
            for src in opened:
                src.close()
            raise
        for feed in self.feeds:
            feed.thread = threading.Thread(target=self._capture, args=(feed,), name=f"capture-{feed.name}"[:40],
                                           daemon=True)
            feed.thread.start()
        self._worker = threading.Thread(target=self._infer_loop, name="stream-inference", daemon=True)
        self._worker.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop capturing and predicting, close the sources and the sinks."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in [f.thread for f in self.feeds] + [self._worker]:
            if t is not None:
                t.join(timeout)
        for feed in self.feeds:
            if feed.thread is None or not feed.thread.is_alive():  # one stuck in a read keeps its device
                feed.source.close()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                log.exception("closing sink %s", sink.name)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every (finite) source is exhausted and predicted; True when it happened."""
        return self.done.wait(timeout)

    # ------------------------------------------------------------------ capture
    def _capture(self, feed: _Feed) -> None:
        src, spec = feed.source, feed.spec
        backoff = spec.reconnect_min_s
        roi = tuple(spec.roi)
        shaper_for = self.shaper
        while not self._stop.is_set():
            try:
                got = src.grab(self._stop)  # not decoded yet: the gate may skip it
            except SourceLost as exc:
                if not self._reconnect(feed, str(exc), backoff):
                    break
                backoff = min(backoff * 2, spec.reconnect_max_s)
                continue
            except EdgeloopError as exc:
                log.error("source %s: %s", feed.name, exc)
                break
            if not got:
                break
            backoff = spec.reconnect_min_s
            t = time.monotonic()
            feed.captured += 1
            feed.meter.tick(t)
            if not feed.gate.keep(t):
                continue
            try:
                data = crop(src.retrieve(), roi)  # type: ignore[arg-type]
            except SourceLost as exc:
                if not src.live:  # a damaged frame in a file: skip it (reopening would start the file again)
                    log.warning("source %s frame %d: %s", feed.name, feed.captured, exc)
                    continue
                if not self._reconnect(feed, str(exc), backoff):
                    break
                continue
            except SourceError as exc:
                log.error("source %s: %s", feed.name, exc)
                break
            shape = shaper_for() if shaper_for is not None else None
            if shape is not None:
                data = shape(data)
            self._put(feed, Frame(data, t, feed.captured, feed.name, src.ref))
        with self._cond:
            feed.finished = True
            self._cond.notify_all()

    def _reconnect(self, feed: _Feed, why: str, backoff: float) -> bool:
        """Close and reopen a dropped live source, waiting ``backoff`` s (doubling) between tries."""
        log.warning("source %s: %s; reconnecting in %.1f s", feed.name, why, backoff)
        feed.source.close()
        while not self._stop.wait(backoff):
            try:
                feed.source.open()
            except EdgeloopError as exc:
                backoff = min(backoff * 2, feed.spec.reconnect_max_s)
                log.info("source %s: still unavailable (%s); next try in %.1f s", feed.name, exc.message, backoff)
                continue
            feed.reconnects += 1
            log.info("source %s: reconnected", feed.name)
            return True
        return False

    def _put(self, feed: _Feed, frame: Frame) -> None:
        q, cap = feed.queue, feed.spec.queue
        if len(q) >= cap:
            if feed.drop:
                while len(q) >= cap:  # the inference thread may pop the same frame meanwhile: count what we took
                    try:
                        q.popleft()
                    except IndexError:
                        break
                    feed.dropped += 1
            else:
                with self._cond:
                    feed.blocked = True  # set before the re-check, so a pop after it wakes us
                    self._cond.wait_for(lambda: len(q) < cap or self._stop.is_set())
                    feed.blocked = False
                if self._stop.is_set():
                    return
        q.append(frame)
        feed.queued += 1
        if self._idle:  # read after the append: an inference thread about to sleep re-checks under the lock
            with self._cond:
                self._cond.notify_all()

    # ------------------------------------------------------------------ inference
    def _next_frame(self) -> tuple[_Feed, Frame, int] | None:
        """The oldest queued frame across sources; None when stopping or all done."""
        while not self._stop.is_set():
            feed = _oldest_head(self.feeds)
            if feed is not None:
                try:
                    frame = feed.queue.popleft()
                except IndexError:  # dropped by its capture thread between the look and the pop
                    continue
                if feed.blocked:  # a finite source waits for this room
                    with self._cond:
                        self._cond.notify_all()
                # frames the source read after this one before its turn: the latency in frames,
                # at most the queue length (+1 being read) when oldest frames are dropped
                return feed, frame, feed.captured - frame.seq
            with self._cond:
                self._idle = True  # set before the re-check, so a put after it wakes us
                try:
                    if _oldest_head(self.feeds) is None and not self._stop.is_set():
                        if all(f.finished for f in self.feeds):
                            return None
                        self._cond.wait(0.5)
                finally:
                    self._idle = False
        return None

    def _infer_loop(self) -> None:
        try:
            while True:
                item = self._next_frame()
                if item is None:
                    break
                self._infer(*item)
        finally:
            if not self._stop.is_set():
                self.done.set()

    def _infer(self, feed: _Feed, frame: Frame, behind: int) -> None:
        t0 = time.monotonic()
        try:
            pred = self.predict(frame.data)
        except EdgeloopError as exc:
            self.errors += 1
            if t0 - self._last_error_log > 10.0:  # one line per 10 s, not one per frame
                self._last_error_log = t0
                log.warning("source %s frame %d: %s", feed.name, frame.seq, exc)
            return
        t1 = time.monotonic()
        self.inferences += 1
        if behind > self.max_behind:
            self.max_behind = behind
        self._infer_meter.tick(t1)
        e2e_ms = (t1 - frame.t_capture) * 1000.0
        self.e2e.add(e2e_ms)
        if not self.sinks:  # nobody to tell: no result object, no dict of the prediction
            return
        result = StreamResult(feed.name, frame.seq, self._wall0 + frame.t_capture, e2e_ms, (t1 - t0) * 1000.0,
                              pred, frame.ref, {"behind": behind})
        for sink in self.sinks:
            try:
                sink.emit(result)
            except Exception:  # noqa: BLE001 - a failing sink must not stop the others
                log.exception("sink %s failed", sink.name)

    # ------------------------------------------------------------------ figures
    def stats(self) -> StreamStats:
        with self._cond:
            per = tuple(SourceStats(f.name, f.spec.uri, f.source.live, f.captured, f.queued, f.dropped, f.reconnects,
                                    round(f.meter.rate(), 2), f.finished) for f in self.feeds)
            depth = sum(len(f.queue) for f in self.feeds)
        p50, p99 = self.e2e.percentiles(50, 99)
        return StreamStats(per, self.inferences, self.errors, round(self._infer_meter.rate(), 2),
                           round(sum(s.capture_fps for s in per), 2), p50, p99, sum(s.dropped for s in per), depth,
                           self.max_behind)

    def telemetry_fields(self) -> dict[str, Any]:
        """The :class:`~core.protocol.Telemetry` fields this pipeline fills."""
        st = self.stats()
        return {"capture_fps": st.capture_fps, "inference_fps": st.inference_fps,
                "e2e_latency_p50_ms": st.e2e_latency_p50_ms, "e2e_latency_p99_ms": st.e2e_latency_p99_ms,
                "dropped_frames": st.dropped_frames}


def stream_metric_rows(stream: StreamPipeline | None, device_id: str) -> list[tuple[str, str, str, float | None,
                                                                                      dict[str, str]]]:
    """``/metrics`` rows of the pipeline (none without one)."""
    if stream is None:
        return []
    st = stream.stats()
    dev = {"device": device_id}
    rows: list[tuple[str, str, str, float | None, dict[str, str]]] = [
        ("edgeloop_stream_inference_fps", "gauge", "Frames predicted per second (last 5 s).", st.inference_fps, dev),
        ("edgeloop_stream_e2e_latency_ms", "gauge", "Capture -> result latency percentiles.", st.e2e_latency_p50_ms,
         dev | {"quantile": "0.5"}),
        ("edgeloop_stream_e2e_latency_ms", "gauge", "", st.e2e_latency_p99_ms, dev | {"quantile": "0.99"}),
        ("edgeloop_stream_queue_depth", "gauge", "Frames waiting for the model.", float(st.queue_depth), dev),
    ]
    for s in st.sources:
        lab = dev | {"source": s.name}
        rows += [("edgeloop_stream_capture_fps", "gauge", "Frames read per second from a source (last 5 s).",
                  s.capture_fps, lab),
                 ("edgeloop_stream_frames_total", "counter", "Frames read from a source.", float(s.captured), lab),
                 ("edgeloop_stream_dropped_frames_total", "counter",
                  "Frames dropped because the model fell behind (oldest first).", float(s.dropped), lab),
                 ("edgeloop_stream_reconnects_total", "counter", "Times a dropped stream was reopened.",
                  float(s.reconnects), lab)]
    return rows


def _sinks(agent: Agent) -> list[Sink]:
    r = agent.config.results
    sinks: list[Sink] = []
    if r.http:
        agent.results = ResultHub()  # read by GET /results/latest and /results/stream
        sinks.append(agent.results)
    if r.jsonl:
        path = Path(r.jsonl).expanduser()
        if not path.is_absolute() and agent.config.source not in ("<defaults>", "<string>"):
            path = Path(agent.config.source).resolve().parent / path
        sinks.append(JsonlSink(path, max_bytes=r.jsonl_max_bytes))
    if r.mqtt_per_s > 0 and agent.link is not None:
        conn = agent.link.connection
        topic = agent.topics.device(agent.device_id, "results")
        sinks.append(MqttResultsSink(lambda t, p: conn.publish(t, p, qos=0), topic, agent.device_id,
                                     per_s=r.mqtt_per_s))
    return sinks


def return_freed_frames(threshold: int = 128 * 1024) -> bool:
    """glibc: serve allocations above ``threshold`` bytes with mmap, so freed frames go back to the OS.

    glibc raises its mmap threshold to the size of the largest block freed (up to 32 MB), so
    after the first few camera frames and their float copies every one comes from the heap
    and the capture and inference threads' arenas stay at their high-water mark.  Fixing
    the threshold keeps a 640x480 camera + MobileNetV2 agent ~35 MB smaller and flat.  Then
    ``malloc_trim(0)`` hands back what the start-up left free in the heap (the model file
    parsed, the variant timing, the baseline read) before the threshold was fixed.  A
    no-op (False) off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not hasattr(libc, "mallopt"):
            return False
        fixed = bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        return fixed
    except OSError:
        return False


def start_stream(agent: Agent, uris: Sequence[str] = (), *, extra_sinks: Sequence[Sink] = ()) -> StreamPipeline | None:
    """Start predicting the config's ``[[sources]]`` plus ``uris`` on ``agent``; None when there are none.

    The agent must be started (model loaded, link up).  The pipeline is hung on
    ``agent.stream`` for telemetry and ``/metrics``; stop it with :meth:`StreamPipeline.stop`.
    """
    specs = list(agent.config.sources) + [SourceSection(uri=str(u)) for u in uris]
    if not specs:
        return None
    return_freed_frames()
    sources = [(make_source(s.uri, loop=s.loop, realtime=s.realtime), s) for s in specs]
    pipeline = StreamPipeline(agent.predict, sources, [*_sinks(agent), *extra_sinks],
                              latency_window=agent.config.telemetry.latency_window, shaper=ModelShaper(agent))
    try:
        pipeline.start()
    except BaseException:
        pipeline.stop()
        raise
    agent.stream = pipeline
    names = ", ".join(f"{f.name} ({'live' if f.source.live else 'finite'})" for f in pipeline.feeds)
    log.info("predicting %s; results to %s", names, ", ".join(s.name for s in pipeline.sinks) or "nowhere")
    return pipeline
