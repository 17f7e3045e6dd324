"""The wire protocol between agents and the fleet: topics, message schemas, chunking.

Every message is a frozen dataclass with a ``type`` and a ``schema_version``; JSON on the
wire (UTF-8), except chunks, which carry binary data in a small framed envelope so a
128 KiB broker limit is not eaten by base64 (:mod:`core.chunks`, re-exported here).
``fleet`` imports all of this from here: this module holds the topics (:class:`TopicScheme`),
kinds, priorities and routing, and re-exports the message types (:mod:`core.messages`),
the :class:`Message` base with :func:`decode` (:mod:`core.codec`), the JSON limits
(:mod:`core.jsonsafe`) and the name validators (:mod:`core.identifiers`).  ``docs/protocol.md`` documents the topics, every
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
    {p}/devices/{device}/logs         device -> fleet  LogLines answering a LogsRequest (recent log lines)
    {p}/devices/{device}/cmd/deploy   fleet -> device  DeployCommand
    {p}/devices/{device}/cmd/rollback fleet -> device  RollbackCommand
    {p}/devices/{device}/cmd/bundle   fleet -> device  Chunk frames of a bundle
    {p}/devices/{device}/cmd/receipt  fleet -> device  Receipt: outbox ids the fleet has committed
    {p}/devices/{device}/cmd/logs     fleet -> device  LogsRequest: send me your recent log lines
    {p}/feedback                      operator -> fleet Feedback

A device may publish only under ``{p}/devices/{its id}/`` (not ``cmd/``) and read only
``{p}/devices/{its id}/cmd/#``: the fleet's Mosquitto ACL (rendered by ``fleet/acl.py``)
enforces exactly that.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .chunks import (
    CHUNK_MAGIC,
    DEFAULT_CHUNK_SIZE,
    Completed,
    Dropped,
    Frame,
    OverBudgetError,
    Reassembler,
    is_frame,
    parse_frame,
    split,
)
from .codec import PROTOCOL_SCHEMA_VERSION, Message, decode, decode_as
from .errors import ProtocolError
from .identifiers import validate_device_id, validate_name, validate_topic_prefix
from .jsonsafe import MAX_JSON_DEPTH, MAX_MESSAGE_BYTES, parse_json
from .manifest import (  # noqa: F401  (the manifest is part of the protocol)
    MANIFEST_SCHEMA_VERSION,
    InputSpec,
    Lineage,
    Manifest,
    OutputSpec,
    Preprocessing,
    Variant,
)
from .messages import (
    LATENCY_BUCKET_BASE_MS,
    LATENCY_BUCKETS,
    LATENCY_BUCKETS_PER_OCTAVE,
    LOG_LEVELS,
    MAX_LOG_LINE_CHARS,
    MAX_LOG_LINES_PER_MESSAGE,
    MAX_LOG_LOGGER_CHARS,
    MAX_LOG_MESSAGE_BYTES,
    MAX_LOG_REQUEST_LINES,
    BundleRequest,
    DeployCommand,
    DeviceState,
    DriftReportMsg,
    Feedback,
    InferenceResult,
    JobStatus,
    LogLines,
    LogsRequest,
    Receipt,
    RollbackCommand,
    Telemetry,
    latency_bucket,
    latency_bucket_ms,
    now,
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
    # remote logs
    "LogsRequest", "LogLines", "LOG_LEVELS", "MAX_LOG_LINES_PER_MESSAGE", "MAX_LOG_MESSAGE_BYTES",
    "MAX_LOG_LINE_CHARS", "MAX_LOG_LOGGER_CHARS", "MAX_LOG_REQUEST_LINES",
    # chunk framing (core.chunks)
    "CHUNK_MAGIC", "Frame", "Completed", "Dropped", "Reassembler", "split", "parse_frame", "is_frame",
    "OverBudgetError",
    # the manifest is part of the protocol
    "MANIFEST_SCHEMA_VERSION", "InputSpec", "Lineage", "Manifest", "OutputSpec", "Preprocessing", "Variant",
]

DEFAULT_PREFIX = "edgeloop/v1"

# Outbox priorities (lower drains first; under a full disk, higher numbers are dropped first).
PRIORITY_CONTROL = 0  # state, job status, bundle requests: never dropped
PRIORITY_REPORT = 1  # drift reports, telemetry, feedback
PRIORITY_SAMPLES = 2  # chunked drift samples: first to go when the outbox is full

# ``Frame.kind`` of the two chunked payloads
SAMPLES_KIND = "samples"
BUNDLE_KIND = "bundle"

# device -> fleet kinds, and fleet -> device command kinds
DEVICE_KINDS = ("state", "telemetry", "drift", "samples", "jobs", "feedback", "bundle-req", "results", "logs")
COMMAND_KINDS = ("deploy", "rollback", "bundle", "receipt", "logs")

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


# The MQTT protocol version, spelled one way in every config: "auto" (MQTT 5, falling back
# to 3.1.1), "5" or "3.1.1".  The agent config's older "mqtt5" / "mqtt311" still load.
MqttVersion = Literal["auto", "5", "3.1.1"]
MQTT_VERSIONS: tuple[str, ...] = typing.get_args(MqttVersion)
MQTT_VERSION_ALIASES = {"mqtt5": "5", "mqtt311": "3.1.1"}


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
    # An answer the operator waits for; not receipted (a lost one is asked for again).
    LogLines.TYPE: Route("logs", PRIORITY_REPORT, False),
}


def route(msg: Message) -> Route:
    """Topic kind, outbox priority and retain flag of a device -> fleet message."""
    try:
        return _ROUTES[msg.TYPE]
    except KeyError:
        raise ValueError(f"{msg.TYPE} messages are not sent by devices") from None

