"""The wire protocol between agents and the fleet: topics, message schemas, chunking.

Every message is a frozen dataclass with a ``type`` and a ``schema_version``; JSON on the
wire (UTF-8), except chunks, which carry binary data in a small framed envelope so a
128 KiB broker limit is not eaten by base64.  ``fleet`` imports all of this from here.
``docs/protocol.md`` documents the topics and every field.

Topic scheme (``{p}`` = ``TopicScheme.prefix``, default ``edgeloop/v1``)::

    {p}/devices/{device}/state        device -> fleet  retained DeviceState; Last Will = offline
    {p}/devices/{device}/telemetry    device -> fleet  Telemetry every N seconds
    {p}/devices/{device}/drift        device -> fleet  DriftReportMsg per window
    {p}/devices/{device}/samples      device -> fleet  Chunk frames of encoded drift samples
    {p}/devices/{device}/jobs         device -> fleet  JobStatus for every update step
    {p}/devices/{device}/feedback     device -> fleet  Feedback (true label for a sample)
    {p}/devices/{device}/bundle-req   device -> fleet  BundleRequest (MQTT delivery, resumable)
    {p}/devices/{device}/cmd/deploy   fleet -> device  DeployCommand
    {p}/devices/{device}/cmd/rollback fleet -> device  RollbackCommand
    {p}/devices/{device}/cmd/bundle   fleet -> device  Chunk frames of a bundle
    {p}/feedback                      operator -> fleet Feedback

A device may publish only under ``{p}/devices/{its id}/`` (not ``cmd/``) and read only
``{p}/devices/{its id}/cmd/#``: the fleet's Mosquitto ACL enforces exactly that.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

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

PROTOCOL_SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgeloop/v1"
DEFAULT_CHUNK_SIZE = 128 * 1024

_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# device -> fleet kinds, and fleet -> device command kinds
DEVICE_KINDS = ("state", "telemetry", "drift", "samples", "jobs", "feedback", "bundle-req")
COMMAND_KINDS = ("deploy", "rollback", "bundle")


def validate_device_id(device_id: str) -> str:
    """Device ids become topic levels and file names: letters, digits, ``_ . -``, max 64."""
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.match(device_id):
        raise ProtocolError(
            f"invalid device id {device_id!r}",
            hint="use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return device_id


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class TopicScheme:
    """Builds and parses topics under one prefix."""

    prefix: str = DEFAULT_PREFIX

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
        return f"{self.prefix}/feedback"

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["type"] = self.TYPE
        d["schema_version"] = PROTOCOL_SCHEMA_VERSION
        return d

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()


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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        if self.delivery not in ("http", "mqtt"):
            raise ProtocolError(f"unknown delivery {self.delivery!r}", hint="use 'http' or 'mqtt'")
        if self.delivery == "http" and not self.url:
            raise ProtocolError("deploy command with http delivery has no url")
        if self.size <= 0 or len(self.sha256) != 64:
            raise ProtocolError("deploy command needs a positive size and a sha256 hex digest")


@dataclass(frozen=True)
class RollbackCommand(Message):
    TYPE: ClassVar[str] = "rollback"
    job_id: str
    reason: str
    to_version: str | None = None  # None: the previous slot
    rollout_id: str | None = None
    ts: float = field(default_factory=now)


@dataclass(frozen=True)
class BundleRequest(Message):
    """Asks the fleet for a bundle's chunks from ``start`` on (MQTT delivery, resumable)."""

    TYPE: ClassVar[str] = "bundle-req"
    device_id: str
    job_id: str
    version: str
    start: int = 0
    ts: float = field(default_factory=now)


M = TypeVar("M", bound=Message)


def decode(payload: bytes | str) -> Message:
    """JSON bytes -> the message dataclass; anything malformed -> ProtocolError."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from exc
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
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ProtocolError(f"{mtype} message has unknown fields {sorted(unknown)}")
    for f in dataclasses.fields(cls):  # JSON has lists where the dataclass has tuples
        if isinstance(data.get(f.name), list) and "tuple" in str(f.type):
            data[f.name] = tuple(data[f.name])
    try:
        return cls(**data)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"invalid {mtype} message: {exc}") from exc


def decode_as(payload: bytes | str, cls: type[M]) -> M:
    msg = decode(payload)
    if not isinstance(msg, cls):
        raise ProtocolError(f"expected a {cls.TYPE} message, got {msg.TYPE}")
    return msg

