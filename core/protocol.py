"""The wire protocol between agents and the fleet: topics, message schemas, chunking.

Every message is a frozen dataclass with a ``type`` and a ``schema_version``; JSON on the
wire (UTF-8), except chunks, which carry binary data in a small framed envelope so a
128 KiB broker limit is not eaten by base64 (:mod:`core.chunks`, re-exported here).
``fleet`` imports all of this from here.  ``docs/protocol.md`` documents the topics, every
field, QoS/retain and delivery guarantees.

Decoding is strict: unknown types, unknown fields, wrong field types and other schema
versions raise :class:`ProtocolError`, so a receiver can log and drop instead of acting
on half-understood input.  Any change to a schema bumps ``PROTOCOL_SCHEMA_VERSION``.

Topic scheme (``{p}`` = ``TopicScheme.prefix``, default ``edgeloop/v1``)::

    {p}/devices/{device}/state        device -> fleet  retained DeviceState; Last Will = offline
    {p}/devices/{device}/telemetry    device -> fleet  Telemetry every N seconds
    {p}/devices/{device}/drift        device -> fleet  DriftReportMsg per window
    {p}/devices/{device}/samples      device -> fleet  Chunk frames of encoded drift samples
    {p}/devices/{device}/jobs         device -> fleet  JobStatus for every update step
    {p}/devices/{device}/feedback     device -> fleet  Feedback (true label for a sample)
    {p}/devices/{device}/bundle-req   device -> fleet  BundleRequest (MQTT delivery, resumable)
    {p}/devices/{device}/results      device -> any    InferenceResult of a continuous source (QoS 0, rate-limited)
    {p}/devices/{device}/cmd/deploy   fleet -> device  DeployCommand
    {p}/devices/{device}/cmd/rollback fleet -> device  RollbackCommand
    {p}/devices/{device}/cmd/bundle   fleet -> device  Chunk frames of a bundle
    {p}/devices/{device}/cmd/receipt  fleet -> device  Receipt: outbox ids the fleet has committed
    {p}/feedback                      operator -> fleet Feedback

A device may publish only under ``{p}/devices/{its id}/`` (not ``cmd/``) and read only
``{p}/devices/{its id}/cmd/#``: the fleet's Mosquitto ACL enforces exactly that.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
import types
import typing
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar, Union

from .chunks import (
    CHUNK_MAGIC,
    DEFAULT_CHUNK_SIZE,
    Completed,
    Dropped,
    Frame,
    Reassembler,
    is_frame,
    parse_frame,
    split,
)
from .errors import ProtocolError
from .manifest import (  # noqa: F401  (the manifest is part of the protocol)
    MANIFEST_SCHEMA_VERSION,
    InputSpec,
    Lineage,
    Manifest,
    OutputSpec,
    Preprocessing,
    Variant,
)

__all__ = [
    "PROTOCOL_SCHEMA_VERSION", "DEFAULT_PREFIX", "DEFAULT_CHUNK_SIZE", "DEVICE_KINDS", "COMMAND_KINDS",
    "PRIORITY_CONTROL", "PRIORITY_REPORT", "PRIORITY_SAMPLES", "SAMPLES_KIND", "BUNDLE_KIND",
    "validate_device_id", "now", "TopicScheme", "Route", "route",
    "Message", "DeviceState", "Telemetry", "DriftReportMsg", "JobStatus", "Feedback", "InferenceResult",
    "DeployCommand", "RollbackCommand", "BundleRequest", "Receipt", "RECEIPT_PROPERTY", "RECEIPT_KINDS",
    "wants_receipt", "decode", "decode_as", "parse_json", "validate_name", "MAX_MESSAGE_BYTES", "MAX_JSON_DEPTH",
    "validate_topic_prefix", "MqttVersion", "MQTT_VERSIONS", "MQTT_VERSION_ALIASES",
    "LATENCY_BUCKET_BASE_MS", "LATENCY_BUCKETS_PER_OCTAVE", "LATENCY_BUCKETS", "latency_bucket", "latency_bucket_ms",
    # chunk framing (core.chunks)
    "CHUNK_MAGIC", "Frame", "Completed", "Dropped", "Reassembler", "split", "parse_frame", "is_frame",
    # the manifest is part of the protocol
    "MANIFEST_SCHEMA_VERSION", "InputSpec", "Lineage", "Manifest", "OutputSpec", "Preprocessing", "Variant",
]

PROTOCOL_SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgeloop/v1"

# Outbox priorities (lower drains first; under a full disk, higher numbers are dropped first).
PRIORITY_CONTROL = 0  # state, job status, bundle requests: never dropped
PRIORITY_REPORT = 1  # drift reports, telemetry, feedback
PRIORITY_SAMPLES = 2  # chunked drift samples: first to go when the outbox is full

# ``Frame.kind`` of the two chunked payloads
SAMPLES_KIND = "samples"
BUNDLE_KIND = "bundle"

_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Job ids (and other names a device may turn into a file name): no '/', no leading '.'.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,199}$")

# Hostile-input limits of :func:`decode` (every message is far below both).
MAX_MESSAGE_BYTES = 1 << 20
MAX_JSON_DEPTH = 32

# device -> fleet kinds, and fleet -> device command kinds
DEVICE_KINDS = ("state", "telemetry", "drift", "samples", "jobs", "feedback", "bundle-req", "results")
COMMAND_KINDS = ("deploy", "rollback", "bundle", "receipt")

# End-to-end delivery (``docs/protocol.md``, "Receipts"): a device tags every publish of
# these kinds with the MQTT 5 user property ``RECEIPT_PROPERTY`` = its outbox id (decimal),
# and keeps the message after the broker's PUBACK until the fleet's ``Receipt`` names that
# id.  Not ``state`` (retained, re-published on every connect) nor ``bundle-req`` (the
# device asks again when chunks stop coming; a duplicate would resend the bundle).
RECEIPT_PROPERTY = "oid"
RECEIPT_KINDS = frozenset({"telemetry", "drift", "samples", "jobs", "feedback"})


def wants_receipt(kind: str) -> bool:
    """Whether a device keeps a message of this topic kind until the fleet's receipt."""
    return kind in RECEIPT_KINDS


def validate_device_id(device_id: str) -> str:
    """Device ids become topic levels and file names: letters, digits, ``_ . -``, max 64."""
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.fullmatch(device_id):
        raise ProtocolError(
            f"invalid device id {device_id!r}",
            hint="use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return device_id


def validate_topic_prefix(prefix: str) -> str:
    """The one rule for a topic prefix (configs and :class:`TopicScheme` alike).

    Non-empty levels separated by ``/`` (so no leading, trailing or double ``/``), none
    starting with ``$`` (reserved by brokers) nor holding a wildcard ``+``/``#`` or NUL.
    """
    levels = prefix.split("/") if isinstance(prefix, str) and prefix else [""]
    if any(not lv or lv.startswith("$") or set(lv) & {"+", "#", "\0"} for lv in levels):
        raise ProtocolError(f"invalid topic prefix {prefix!r}",
                            hint="use non-empty levels without wildcards, e.g. 'edgeloop/v1'")
    return prefix


# The MQTT protocol version, spelled one way in every config: "auto" (MQTT 5, falling back
# to 3.1.1), "5" or "3.1.1".  The agent config's older "mqtt5" / "mqtt311" still load.
MqttVersion = Literal["auto", "5", "3.1.1"]
MQTT_VERSIONS: tuple[str, ...] = typing.get_args(MqttVersion)
MQTT_VERSION_ALIASES = {"mqtt5": "5", "mqtt311": "3.1.1"}


def validate_name(value: str, what: str = "job id") -> str:
    """Names that may become file names on a device (job ids): 1-200 letters, digits and
    ``_ . : @ + = -``, starting with a letter or digit -- never a path (no ``/``, no ``..``)."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ProtocolError(f"invalid {what} {str(value)[:80]!r}",
                            hint="use 1-200 letters, digits, '_', '.', ':', '@', '+', '=' or '-', "
                                 "starting with a letter or digit")
    return value


def now() -> float:
    """Wall-clock timestamp (Unix seconds) put in every message's ``ts``."""
    return time.time()


@dataclass(frozen=True)
class TopicScheme:
    """Builds and parses topics under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_topic_prefix(self.prefix)

    def device(self, device_id: str, kind: str) -> str:
        validate_device_id(device_id)
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self.prefix}/devices/{device_id}/{kind}"

    def command(self, device_id: str, kind: str) -> str:
        validate_device_id(device_id)
        if kind not in COMMAND_KINDS:
            raise ValueError(f"unknown command kind {kind!r}")
        return f"{self.prefix}/devices/{device_id}/cmd/{kind}"

    def device_commands(self, device_id: str) -> str:
        """Subscription filter for everything sent to one device."""
        return f"{self.prefix}/devices/{validate_device_id(device_id)}/cmd/#"

    def all_devices(self, kind: str) -> str:
        """Subscription filter for one kind from every device (fleet side)."""
        return f"{self.prefix}/devices/+/{kind}"

    @property
    def operator_feedback(self) -> str:
        """Topic where operators (not devices) post :class:`Feedback`."""
        return f"{self.prefix}/feedback"

    def mosquitto_acl(self, fleet_users: Sequence[str] = ("fleet",)) -> str:
        """A Mosquitto ``acl_file`` enforcing the protocol's access model.

        Devices log in with their device id as username (``%u``): each may write only its own
        device topics (not ``cmd/``) and read only its own ``cmd/#``.  ``fleet_users`` may read
        and write everything under the prefix (shared subscriptions included).
        """
        lines = ["# generated by edgeloop: devices authenticate with username = device id"]
        lines += [f"pattern write {self.prefix}/devices/%u/{kind}" for kind in DEVICE_KINDS]
        lines += [f"pattern read {self.prefix}/devices/%u/cmd/#", ""]
        for user in fleet_users:
            lines += [f"user {user}", f"topic readwrite {self.prefix}/#", ""]
        return "\n".join(lines)

    def parse(self, topic: str) -> tuple[str, str]:
        """``topic`` -> ``(device_id, kind)``; kind is ``cmd/<x>`` for commands."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            raise ProtocolError(f"topic {topic!r} is not under {head}")
        rest = topic[len(head):].split("/")
        if len(rest) == 2 and rest[1] in DEVICE_KINDS:
            return validate_device_id(rest[0]), rest[1]
        if len(rest) == 3 and rest[1] == "cmd" and rest[2] in COMMAND_KINDS:
            return validate_device_id(rest[0]), f"cmd/{rest[2]}"
        raise ProtocolError(f"unknown topic {topic!r}")


# --------------------------------------------------------------------------- messages

_REGISTRY: dict[str, type[Message]] = {}


@dataclass(frozen=True)
class Message:
    """Base of every JSON message; subclasses set ``TYPE``."""

    TYPE: ClassVar[str] = ""
    # Fields added after a message type shipped: decoding is strict (an older peer rejects
    # unknown fields), so these stay out of the JSON while they hold their default and a
    # message that does not use them is exactly what an older peer expects.
    OPTIONAL_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls

    def __post_init__(self) -> None:
        device_id = getattr(self, "device_id", None)
        if device_id is not None:
            validate_device_id(device_id)
        self._validate()

    def _validate(self) -> None:
        """Per-message checks beyond field types; subclasses override."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with ``type`` and ``schema_version`` (containers are copies)."""
        d = {name: _plain(getattr(self, name)) for name in _wire_names(self)}
        d["type"] = self.TYPE
        d["schema_version"] = PROTOCOL_SCHEMA_VERSION
        return d

    def encode(self) -> bytes:
        """Compact UTF-8 JSON; NaN/Infinity are refused because JSON has no such numbers."""
        # json.dumps only reads the values: no copies (``dataclasses.asdict`` deep-copies
        # recursively and cost ~4x the JSON encoding on every message a device sends).
        d = {name: getattr(self, name) for name in _wire_names(self)}
        d["type"] = self.TYPE
        d["schema_version"] = PROTOCOL_SCHEMA_VERSION
        try:
            return json.dumps(d, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:
            raise ProtocolError(f"cannot encode {self.TYPE} message: {exc}",
                                hint="replace NaN/inf with None before sending") from exc

    @classmethod
    def from_dict(cls: type[M], data: dict[str, Any]) -> M:
        """The inverse of :meth:`to_dict`; validates like :func:`decode`."""
        return decode_as(json.dumps(data, allow_nan=False), cls)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _optional_defaults(cls: type[Message]) -> dict[str, Any]:
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls) if f.name in cls.OPTIONAL_FIELDS}


def _wire_names(msg: Message) -> tuple[str, ...]:
    """The fields a message puts on the wire: all but optional ones at their default."""
    names = _field_names(type(msg))
    optional = _optional_defaults(type(msg)) if msg.OPTIONAL_FIELDS else None
    if not optional:
        return names
    return tuple(n for n in names if n not in optional or getattr(msg, n) != optional[n])


def _plain(value: Any) -> Any:
    """A copy of a field value's containers (what ``dataclasses.asdict`` gave, without its cost)."""
    t = type(value)
    if t is dict:
        return {k: _plain(v) for k, v in value.items()}
    if t is tuple or t is list:
        return t(_plain(v) for v in value)
    return value


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


# --------------------------------------------------------------------------- routing


class Route(NamedTuple):
    """Where and how a device sends one message type."""

    kind: str  # the device topic kind
    priority: int  # outbox priority
    retain: bool


_ROUTES: dict[str, Route] = {
    DeviceState.TYPE: Route("state", PRIORITY_CONTROL, True),
    JobStatus.TYPE: Route("jobs", PRIORITY_CONTROL, False),
    BundleRequest.TYPE: Route("bundle-req", PRIORITY_CONTROL, False),
    DriftReportMsg.TYPE: Route("drift", PRIORITY_REPORT, False),
    Telemetry.TYPE: Route("telemetry", PRIORITY_REPORT, False),
    Feedback.TYPE: Route("feedback", PRIORITY_REPORT, False),
    InferenceResult.TYPE: Route("results", PRIORITY_REPORT, False),  # published directly, QoS 0 (not the outbox)
}


def route(msg: Message) -> Route:
    """Topic kind, outbox priority and retain flag of a device -> fleet message."""
    try:
        return _ROUTES[msg.TYPE]
    except KeyError:
        raise ValueError(f"{msg.TYPE} messages are not sent by devices") from None


# --------------------------------------------------------------------------- decoding

M = TypeVar("M", bound=Message)


Checker = Callable[[Any, str], Any]
_CHECKERS: dict[type[Message], dict[str, tuple[Checker, str]]] = {}


def _field_checkers(cls: type[Message]) -> dict[str, tuple[Checker, str]]:
    """Per field: a checker compiled once from the annotation, and the name used in errors.

    Annotations are strings under ``from __future__ import annotations``; resolving and
    walking them per message cost ~10x the JSON parse on the fleet's ingestion path.
    """
    checkers = _CHECKERS.get(cls)
    if checkers is None:
        hints = typing.get_type_hints(cls)
        checkers = {f.name: (_compile(hints[f.name]), f"{cls.TYPE}.{f.name}") for f in dataclasses.fields(cls)}
        _CHECKERS[cls] = checkers
    return checkers


def _fail(value: Any, tp: Any, where: str) -> ProtocolError:
    return ProtocolError(f"{where}: {value!r} is not {getattr(tp, '__name__', tp)}")


def _compile(tp: Any) -> Checker:
    """A function checking a JSON value against ``tp``; lists become tuples where declared."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return lambda v, where: v
    if origin in (Union, types.UnionType):
        arms = typing.get_args(tp)
        optional = type(None) in arms
        rest = [_compile(a) for a in arms if a is not type(None)]

        def check_union(v: Any, where: str) -> Any:
            if v is None and optional:
                return None
            for arm in rest:
                try:
                    return arm(v, where)
                except ProtocolError:
                    continue
            raise _fail(v, tp, where)

        return check_union
    if tp is type(None):
        def check_none(v: Any, where: str) -> Any:
            if v is None:
                return None
            raise _fail(v, tp, where)
        return check_none
    if tp is bool:
        def check_bool(v: Any, where: str) -> Any:
            if v is True or v is False:
                return v
            raise _fail(v, tp, where)
        return check_bool
    if tp is int:
        def check_int(v: Any, where: str) -> Any:
            if type(v) is int:
                return v
            raise _fail(v, tp, where)
        return check_int
    if tp is float:
        def check_float(v: Any, where: str) -> Any:
            t = type(v)
            if (t is float or t is int) and math.isfinite(v):
                return float(v)
            raise _fail(v, tp, where)
        return check_float
    if tp is str:
        def check_str(v: Any, where: str) -> Any:
            if type(v) is str:
                return v
            raise _fail(v, tp, where)
        return check_str
    if origin is tuple:
        item = _compile(typing.get_args(tp)[0])

        def check_tuple(v: Any, where: str) -> Any:
            if isinstance(v, (list, tuple)):
                return tuple(item(x, where + "[]") for x in v)
            raise _fail(v, tp, where)
        return check_tuple
    if origin is dict:
        val = _compile(typing.get_args(tp)[1])

        def check_dict(v: Any, where: str) -> Any:
            if isinstance(v, dict) and all(type(k) is str for k in v):
                return {k: val(x, where + "." + k) for k, x in v.items()}
            raise _fail(v, tp, where)
        return check_dict
    raise TypeError(f"unsupported annotation {tp}")  # pragma: no cover - a schema bug, found at import


def parse_json(payload: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_JSON_DEPTH,
               what: str = "message") -> Any:
    """``json.loads`` for untrusted bytes: over ``max_bytes``, nested deeper than
    ``max_depth``, or not JSON at all -> one :class:`ProtocolError` (never a RecursionError,
    MemoryError or a huge-integer ValueError)."""
    if not isinstance(payload, (bytes, bytearray, memoryview, str)):
        raise ProtocolError(f"{what} is {type(payload).__name__}, not bytes")
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what} of {len(payload)} bytes is over the {max_bytes}-byte limit")
    try:
        data = json.loads(payload)
    except RecursionError:
        raise ProtocolError(f"{what} is nested more than {max_depth} levels deep") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints over Python's digit limit
        raise ProtocolError(f"{what} is not JSON: {str(exc)[:200]}") from None
    raw = payload if isinstance(payload, (bytes, str)) else bytes(payload)
    opens = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if opens > max_depth and _deeper_than(data, max_depth):  # cheap: only when it could be deep at all
        raise ProtocolError(f"{what} is nested more than {max_depth} levels deep")
    return data


def _deeper_than(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return True
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


def decode(payload: bytes | str) -> Message:
    """JSON bytes -> the message dataclass; anything malformed -> ProtocolError.

    Payloads over ``MAX_MESSAGE_BYTES`` or nested deeper than ``MAX_JSON_DEPTH`` are
    malformed too (:func:`parse_json`).
    """
    data = parse_json(payload)
    if not isinstance(data, dict):
        raise ProtocolError("message is not a JSON object")
    mtype = data.pop("type", None)
    version = data.pop("schema_version", None)
    cls = _REGISTRY.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype!r}")
    if version != PROTOCOL_SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema_version {version!r} for {mtype}",
                            hint=f"this side speaks version {PROTOCOL_SCHEMA_VERSION}")
    checkers = _field_checkers(cls)
    unknown = data.keys() - checkers.keys()
    if unknown:
        raise ProtocolError(f"{mtype} message has unknown fields {sorted(unknown)}")
    try:
        for k, v in data.items():
            check, where = checkers[k]
            data[k] = check(v, where)
        return cls(**data)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"invalid {mtype} message: {exc}") from exc


def decode_as(payload: bytes | str, cls: type[M]) -> M:
    """:func:`decode`, insisting on one message class."""
    msg = decode(payload)
    if not isinstance(msg, cls):
        raise ProtocolError(f"expected a {cls.TYPE} message, got {msg.TYPE}")
    return msg

