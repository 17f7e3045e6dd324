"""The message types of the wire protocol (``docs/protocol.md`` documents every field).

Device -> fleet: :class:`DeviceState`, :class:`Telemetry` (with the shared latency
histogram buckets), :class:`DriftReportMsg`, :class:`JobStatus`, :class:`Feedback`,
:class:`BundleRequest`, :class:`InferenceResult`, :class:`LogLines`; fleet -> device:
:class:`DeployCommand`, :class:`RollbackCommand`, :class:`Receipt`, :class:`LogsRequest`.  Each registers itself with
:func:`core.codec.decode` by subclassing :class:`core.codec.Message`.  Re-exported by
:mod:`core.protocol`.
"""

from __future__ import annotations

import math
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .chunks import DEFAULT_CHUNK_SIZE
from .codec import Message
from .errors import ProtocolError
from .identifiers import validate_name

__all__ = [
    "now", "DeviceState", "Telemetry", "DriftReportMsg", "InferenceResult", "JobStatus", "Feedback",
    "DeployCommand", "RollbackCommand", "BundleRequest", "Receipt", "LogsRequest", "LogLines",
    "LOG_LEVELS", "MAX_LOG_LINES_PER_MESSAGE", "MAX_LOG_MESSAGE_BYTES", "MAX_LOG_LINE_CHARS",
    "MAX_LOG_LOGGER_CHARS", "MAX_LOG_REQUEST_LINES",
    "LATENCY_BUCKET_BASE_MS", "LATENCY_BUCKETS_PER_OCTAVE", "LATENCY_BUCKETS", "latency_bucket", "latency_bucket_ms",
]


def now() -> float:
    """Wall-clock timestamp (Unix seconds) put in every message's ``ts``."""
    return time.time()


@dataclass(frozen=True)
class DeviceState(Message):
    """Retained birth/state message; the Last Will carries the same with ``online=False``."""

    TYPE: ClassVar[str] = "state"
    device_id: str
    online: bool
    ts: float = field(default_factory=now)
    model_name: str | None = None
    model_version: str | None = None
    variant: str | None = None
    variants: tuple[str, ...] = ()
    variant_latency_ms: dict[str, float] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    agent_version: str | None = None
    delivery: tuple[str, ...] = ("http", "mqtt")  # update deliveries this device accepts
    previous_version: str | None = None


@dataclass(frozen=True)
class Telemetry(Message):
    TYPE: ClassVar[str] = "telemetry"
    device_id: str
    seq: int
    ts: float = field(default_factory=now)
    model_version: str | None = None
    inferences: int = 0  # total since start
    inferences_interval: int = 0  # since the last telemetry
    errors: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    mean_confidence: float | None = None
    cpu_percent: float | None = None
    memory_mb: float | None = None
    queue_depth: int = 0
    queue_bytes: int = 0
    dropped_samples: int = 0
    drift_alarm: bool = False
    # Added for the fleet's canary analysis (absent from older agents' messages, whose
    # defaults say "not reported"): this interval's latencies as a sparse histogram
    # (bucket index, see latency_bucket, -> count) and its inference errors.
    latency_hist: dict[str, int] = field(default_factory=dict)
    errors_interval: int | None = None
    # Added for continuous sources (`agent run --source`; None / 0 without one): frames
    # captured and predicted per second, capture -> result latency, frames dropped because
    # the model fell behind (total since start).
    capture_fps: float | None = None
    inference_fps: float | None = None
    e2e_latency_p50_ms: float | None = None
    e2e_latency_p99_ms: float | None = None
    dropped_frames: int = 0
    # Added for the shadow stage (edge_agent.shadow; on the wire only while shadowing): the
    # candidate ``shadow_version`` ran beside the serving model on ``shadow_inputs`` inputs
    # this interval (every N-th), gave the same top answer on ``shadow_agree``, failed on
    # ``shadow_errors``; ``shadow_skipped`` N-th inputs found it still busy (the cost bound).
    # Latency histograms and mean confidences of both models on the same inputs, and the
    # candidate's compute time (the device's extra cost).
    shadow_version: str | None = None
    shadow_inputs: int = 0
    shadow_agree: int = 0
    shadow_errors: int = 0
    shadow_skipped: int = 0
    shadow_latency_hist: dict[str, int] = field(default_factory=dict)
    shadow_serving_hist: dict[str, int] = field(default_factory=dict)
    shadow_confidence: float | None = None
    shadow_serving_confidence: float | None = None
    shadow_cost_ms: float = 0.0

    OPTIONAL_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "shadow_version", "shadow_inputs", "shadow_agree", "shadow_errors", "shadow_skipped", "shadow_latency_hist",
        "shadow_serving_hist", "shadow_confidence", "shadow_serving_confidence", "shadow_cost_ms"})


# Latency histogram buckets shared by agents and the fleet: bucket k holds latencies in
# [LATENCY_BUCKET_BASE_MS * 2**(k/4), ... * 2**((k+1)/4)) ms (19 % wide); k >= 0.
LATENCY_BUCKET_BASE_MS = 0.01
LATENCY_BUCKETS_PER_OCTAVE = 4
LATENCY_BUCKETS = 100  # the last bucket (>= ~284 s) also holds everything slower


def latency_bucket(ms: float) -> int:
    """The histogram bucket of one latency in milliseconds."""
    if not ms > LATENCY_BUCKET_BASE_MS:  # also NaN
        return 0
    k = int(math.floor(math.log2(ms / LATENCY_BUCKET_BASE_MS) * LATENCY_BUCKETS_PER_OCTAVE))
    return min(k, LATENCY_BUCKETS - 1)


def latency_bucket_ms(k: float) -> float:
    """The lower edge (ms) of bucket ``k``; fractional ``k`` interpolates geometrically."""
    return LATENCY_BUCKET_BASE_MS * 2.0 ** (k / LATENCY_BUCKETS_PER_OCTAVE)


@dataclass(frozen=True)
class DriftReportMsg(Message):
    TYPE: ClassVar[str] = "drift"
    device_id: str
    seq: int
    window: int
    n: int
    ts: float = field(default_factory=now)
    model_version: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    risk: float = 0.0
    input_shift: bool = False
    alarm: bool = False
    mean_confidence: float | None = None
    class_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class InferenceResult(Message):
    """One prediction of a continuous source (camera, stream, video file), for local consumers.

    Sent QoS 0 straight to the broker (never queued in the outbox: a result is worth
    something now or not at all), at most ``[results].mqtt_per_s`` a second; ``skipped``
    says how many results the rate limit left out since the previous message.
    """

    TYPE: ClassVar[str] = "result"
    device_id: str
    source: str  # the source's name (its URI unless named)
    seq: int  # the frame's number in its source (dropped frames included)
    ts: float = field(default_factory=now)  # when the frame was captured (Unix seconds)
    model_version: str | None = None
    variant: str | None = None
    label: str | None = None
    index: int | None = None
    confidence: float | None = None
    latency_ms: float = 0.0  # capture -> result
    inference_ms: float = 0.0  # the model path alone (preprocess, runtime, post-processing)
    drift_alarm: bool = False
    skipped: int = 0
    output: dict[str, Any] = field(default_factory=dict)  # task-specific extras (detections, scores, ...)


@dataclass(frozen=True)
class JobStatus(Message):
    """One step of a model update on a device."""

    TYPE: ClassVar[str] = "job"
    STEPS: ClassVar[tuple[str, ...]] = (
        "received", "downloading", "verifying", "installing", "health_check",
        "switched", "completed", "failed", "rolled_back",
    )
    device_id: str
    job_id: str
    version: str
    step: str
    ok: bool = True
    detail: str = ""
    progress: float | None = None
    ts: float = field(default_factory=now)
    previous_version: str | None = None

    def _validate(self) -> None:
        validate_name(self.job_id)
        if self.step not in self.STEPS:
            raise ProtocolError(f"unknown job step {self.step!r}", hint=f"one of {', '.join(self.STEPS)}")


@dataclass(frozen=True)
class Feedback(Message):
    """The true label of a captured sample, from a device or an operator."""

    TYPE: ClassVar[str] = "feedback"
    sample_id: str
    label: str
    source: str = "operator"
    ts: float = field(default_factory=now)


@dataclass(frozen=True)
class DeployCommand(Message):
    TYPE: ClassVar[str] = "deploy"
    job_id: str
    name: str
    version: str
    size: int
    sha256: str
    url: str | None = None  # HTTP(S) URL with range support; None -> MQTT chunks
    delivery: str = "http"  # "http" | "mqtt"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    rollout_id: str | None = None
    ts: float = field(default_factory=now)
    # Added for the shadow stage (on the wire only when set; an older agent rejects such a
    # command, so it never serves a candidate it was only asked to shadow): install, do not
    # switch, run the candidate beside the serving model on every ``shadow_every``-th input
    # (0: the agent's default), outputs never served.  A deploy of the same version without
    # ``shadow`` switches to it; a rollback command ends the shadow.
    shadow: bool = False
    shadow_every: int = 0

    OPTIONAL_FIELDS: ClassVar[frozenset[str]] = frozenset({"shadow", "shadow_every"})

    def _validate(self) -> None:
        validate_name(self.job_id)
        if self.shadow_every < 0:
            raise ProtocolError("deploy command shadow_every must be >= 0")
        if self.delivery not in ("http", "mqtt"):
            raise ProtocolError(f"unknown delivery {self.delivery!r}", hint="use 'http' or 'mqtt'")
        if self.delivery == "http" and not self.url:
            raise ProtocolError("deploy command with http delivery has no url")
        if self.url is not None:
            parts = urllib.parse.urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ProtocolError(f"deploy url {self.url[:200]!r} is not an http(s) URL",
                                    hint="bundles come over http(s) or the fleet's MQTT transfer, never file:// "
                                         "or other schemes")
        if self.size <= 0 or len(self.sha256) != 64:
            raise ProtocolError("deploy command needs a positive size and a sha256 hex digest")
        if self.chunk_size < 1024:
            raise ProtocolError(f"deploy command chunk_size {self.chunk_size} is below 1024 bytes")


@dataclass(frozen=True)
class RollbackCommand(Message):
    TYPE: ClassVar[str] = "rollback"
    job_id: str
    reason: str
    to_version: str | None = None  # None: the previous slot
    rollout_id: str | None = None
    ts: float = field(default_factory=now)

    def _validate(self) -> None:
        validate_name(self.job_id)


@dataclass(frozen=True)
class BundleRequest(Message):
    """Asks the fleet for a bundle's chunks from ``start`` on (MQTT delivery, resumable)."""

    TYPE: ClassVar[str] = "bundle-req"
    device_id: str
    job_id: str
    version: str
    start: int = 0
    ts: float = field(default_factory=now)

    def _validate(self) -> None:
        validate_name(self.job_id)


@dataclass(frozen=True)
class Receipt(Message):
    """The fleet has committed (or deliberately dropped as malformed) the device's outbox
    messages with these ids; the device may forget them.  Sent QoS 0: a lost receipt only
    makes the device send the messages again, and receivers dedupe."""

    TYPE: ClassVar[str] = "receipt"
    ids: tuple[int, ...]
    ts: float = field(default_factory=now)

    def _validate(self) -> None:
        if any(type(i) is not int or i < 0 for i in self.ids):
            raise ProtocolError("receipt ids must be non-negative integers")


# --------------------------------------------------------------------------- remote logs
# An operator reads a device's recent log lines without SSH: the fleet sends a LogsRequest
# on cmd/logs, the agent answers from its in-memory ring (edge_agent.logring) with one or
# more LogLines on its logs topic.  Every bound below is checked on both sides, so a
# hostile device cannot make the fleet store more than these per message.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_LOG_LINES_PER_MESSAGE = 100
MAX_LOG_MESSAGE_BYTES = 32 * 1024  # one encoded LogLines (the agent splits an answer to stay below)
MAX_LOG_LINE_CHARS = 1000  # one line's text (the agent truncates longer ones)
MAX_LOG_LOGGER_CHARS = 100
MAX_LOG_REQUEST_LINES = 1000
_LINE_KEYS = frozenset({"seq", "ts", "level", "logger", "msg"})
_BOOT_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")


def _check_level(level: str) -> None:
    if level not in LOG_LEVELS:
        raise ProtocolError(f"unknown log level {str(level)[:20]!r}", hint=f"one of {', '.join(LOG_LEVELS)}")


@dataclass(frozen=True)
class LogsRequest(Message):
    """Asks a device for its recent log lines (``cmd/logs``).

    ``boot`` and ``since_seq`` name the last line the fleet holds: the device answers with
    the lines after it, or with everything it holds when ``boot`` is not its own (it
    restarted, or the fleet holds nothing yet).  At most ``max_lines`` (the newest), at
    ``min_level`` or above.  An agent that predates this command drops it as an unknown
    topic: the fleet then gets no answer.
    """

    TYPE: ClassVar[str] = "logs-req"
    request_id: str
    since_seq: int = 0
    boot: str | None = None
    max_lines: int = 200
    min_level: str = "DEBUG"
    ts: float = field(default_factory=now)

    def _validate(self) -> None:
        validate_name(self.request_id, "request id")
        _check_level(self.min_level)
        if self.since_seq < 0:
            raise ProtocolError("logs request since_seq must be >= 0")
        if not 1 <= self.max_lines <= MAX_LOG_REQUEST_LINES:
            raise ProtocolError(f"logs request max_lines {self.max_lines} is not in 1..{MAX_LOG_REQUEST_LINES}")
        if self.boot is not None and not _BOOT_RE.fullmatch(self.boot):
            raise ProtocolError("logs request boot must be 1-32 letters or digits")


@dataclass(frozen=True)
class LogLines(Message):
    """Part of a device's answer to a :class:`LogsRequest` (on the device's ``logs`` topic).

    ``lines`` are ``{"seq", "ts", "level", "logger", "msg"}`` objects in ``seq`` order;
    ``seq`` counts the device's log records since ``boot`` (a random id per agent
    process).  An answer too big for one message comes as several, each with at most
    ``MAX_LOG_LINES_PER_MESSAGE`` lines and ``MAX_LOG_MESSAGE_BYTES`` bytes; ``more`` says
    another follows.  ``dropped``: lines after ``since_seq`` the device no longer holds.
    """

    TYPE: ClassVar[str] = "logs"
    device_id: str
    request_id: str
    boot: str
    lines: tuple[dict[str, Any], ...] = ()
    more: bool = False
    dropped: int = 0
    ts: float = field(default_factory=now)

    def _validate(self) -> None:
        validate_name(self.request_id, "request id")
        if not _BOOT_RE.fullmatch(self.boot):
            raise ProtocolError("log lines boot must be 1-32 letters or digits")
        if self.dropped < 0:
            raise ProtocolError("log lines dropped must be >= 0")
        if len(self.lines) > MAX_LOG_LINES_PER_MESSAGE:
            raise ProtocolError(f"{len(self.lines)} log lines in one message (at most {MAX_LOG_LINES_PER_MESSAGE})")
        for line in self.lines:
            _check_line(line)


def _check_line(line: dict[str, Any]) -> None:
    if line.keys() != _LINE_KEYS:
        raise ProtocolError(f"a log line has the fields {sorted(line)[:8]}, not {sorted(_LINE_KEYS)}")
    seq, ts, level, logger, msg = (line[k] for k in ("seq", "ts", "level", "logger", "msg"))
    if type(seq) is not int or seq < 0:
        raise ProtocolError("a log line's seq must be a non-negative integer")
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise ProtocolError("a log line's ts must be a finite number")
    _check_level(level)
    if type(logger) is not str or len(logger) > MAX_LOG_LOGGER_CHARS:
        raise ProtocolError(f"a log line's logger must be a string of at most {MAX_LOG_LOGGER_CHARS} characters")
    if type(msg) is not str or len(msg) > MAX_LOG_LINE_CHARS:
        raise ProtocolError(f"a log line's msg must be a string of at most {MAX_LOG_LINE_CHARS} characters")
