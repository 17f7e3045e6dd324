"""Per-message decoding and dispatch of the fleet's ingestion (:class:`fleet.ingest.IngestService`).

:class:`IngestDispatch` turns one raw ``(topic, payload)`` into its message, checks it
against its topic and the sender's rules (:mod:`fleet.ingest_guard`), and files it into the
writer's :class:`~fleet.registry.IngestBatch` by kind: sample frames to the reassembler,
device feedback to its own transaction after the batch, log lines (remote logs, rare: an
operator asked) straight to their bounded store (:mod:`fleet.remote_logs`), everything
else into the batch.
A malformed or refused message is counted and logged (never fatal) and, when it will never
be accepted, receipted so the device stops sending it.  Writer thread only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from core.errors import EdgeloopError, OverBudgetError, ProtocolError
from core.protocol import (
    RECEIPT_KINDS,
    BundleRequest,
    DeviceState,
    DriftReportMsg,
    Feedback,
    JobStatus,
    Message,
    Telemetry,
    TopicScheme,
    decode,
)

from .ingest_guard import Budgets, Counters, SenderChecks, refused
from .ingest_samples import Ack, SampleIntake
from .receipts import ReceiptBook
from .registry import IngestBatch
from .remote_logs import LogIntake
from .repos.logs import LogRepo

__all__ = ["IngestDispatch", "Raw"]

log = logging.getLogger("fleet.ingest")  # the service's logger: operators filter on it

# One queued message: (topic, payload, received, the sender's outbox id or None)
Raw = tuple[str, bytes, float, int | None]

# topic kind -> the message class it must carry
_KIND_TYPES: dict[str, type[Message]] = {
    "state": DeviceState, "telemetry": Telemetry, "drift": DriftReportMsg, "jobs": JobStatus,
    "feedback": Feedback, "bundle-req": BundleRequest,
}


class IngestDispatch:
    """Decodes a batch's raw messages into an :class:`IngestBatch`; counts into the service's stats."""

    def __init__(self, topics: TopicScheme, budgets: Budgets, checks: SenderChecks, samples: SampleIntake,
                 stats: Any, guard_counters: Counters, receipts: ReceiptBook, *,
                 logs: LogIntake | None = None) -> None:
        self.topics = topics
        self.budgets = budgets
        self.checks = checks
        self.samples = samples
        self.stats = stats
        self.guard_counters = guard_counters
        self.receipts = receipts
        self.logs = logs or LogIntake(LogRepo.of(checks.registry), checks)
        # this batch's device feedback, written after the batch: (device id, feedback, receipt)
        self.device_labels: list[tuple[str, Feedback, Ack | None]] = []

    def decode_all(self, raw: Sequence[Raw], batch: IngestBatch, acks: list[Ack]) -> list[Message]:
        """File every message of ``raw`` into ``batch``; the decoded messages (for the hooks)."""
        decoded: list[Message] = []
        for topic, payload, received, oid in raw:
            try:
                msg = self.decode_one(topic, payload, received, oid, batch, acks)
            except OverBudgetError as exc:  # the device keeps the frame and sends it again
                self.on_refused(topic, refused("transfer_budget", str(exc), retry=True), oid)
                continue
            except EdgeloopError as exc:
                if "budget" in exc.context:
                    self.on_refused(topic, exc, oid)
                else:
                    self.on_malformed(topic, exc, oid)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad message must never stop ingestion
                self.on_malformed(topic, exc, oid)
                continue
            if msg is not None:
                decoded.append(msg)
        return decoded

    def take_device_labels(self) -> list[tuple[str, Feedback, Ack | None]]:
        """The device feedback gathered since the last call (written after the batch)."""
        labels, self.device_labels = self.device_labels, []
        return labels

    def decode_one(self, topic: str, payload: bytes, received: float, oid: int | None, batch: IngestBatch,
                   acks: list[Ack]) -> Message | None:
        b = self.budgets
        if topic == self.topics.operator_feedback:  # from an operator (ACL: fleet users only): no receipt
            if len(payload) > b.max_message_bytes:
                raise refused("message_size", f"{len(payload)}-byte operator feedback")
            fb = decode(payload)
            if not isinstance(fb, Feedback):
                raise ProtocolError(f"expected feedback on {topic}, got {fb.TYPE}")
            batch.feedback.append(fb)
            return fb
        device_id, kind = self.topics.parse(topic)
        if kind == "samples":
            if len(payload) > b.max_frame_bytes:
                raise refused("frame_size", f"{len(payload)}-byte chunk frame (limit {b.max_frame_bytes})")
            batch.seen[device_id] = received
            self.samples.add_frame(device_id, payload, received, oid, acks)
            return None
        if len(payload) > b.max_message_bytes:
            raise refused("message_size", f"{len(payload)}-byte {kind} message (limit {b.max_message_bytes})")
        if kind == "logs":
            return self._log_lines(device_id, payload, received, batch)
        msg = decode(payload)
        expected = _KIND_TYPES.get(kind)
        if expected is None or not isinstance(msg, expected):
            raise ProtocolError(f"{msg.TYPE} message on the {kind!r} topic")
        sender = getattr(msg, "device_id", device_id)
        if sender != device_id:
            raise ProtocolError(f"{msg.TYPE} for device {sender!r} published on {device_id!r}'s topic")
        if isinstance(msg, JobStatus):
            self.checks.check_job(device_id, msg)
        elif isinstance(msg, BundleRequest):
            self.checks.check_bundle_request(device_id, msg)
        elif isinstance(msg, Feedback):
            self.checks.check_feedback_source(payload)
            batch.seen[device_id] = received
            ack = (device_id, oid) if oid is not None else None
            self.device_labels.append((device_id, dataclasses.replace(msg, source="device"), ack))
            return msg
        if oid is not None and kind in RECEIPT_KINDS:
            acks.append((device_id, oid))
        if isinstance(msg, DeviceState):
            batch.states.append((msg, received))
            if msg.online:
                batch.seen[device_id] = received
            return msg
        batch.seen[device_id] = received
        if isinstance(msg, Telemetry):
            batch.telemetry.append((msg, received))
        elif isinstance(msg, DriftReportMsg):
            batch.drift.append((msg, received))
        elif isinstance(msg, JobStatus):
            batch.jobs.append((msg, received))
        return msg

    def _log_lines(self, device_id: str, payload: bytes, received: float, batch: IngestBatch) -> Message:
        """A device's answer to a logs request: checked (size, rate, sender), stored at once."""
        msg = self.logs.check(device_id, payload)
        batch.seen[device_id] = received
        try:
            self.logs.store(msg, received)
        except Exception as exc:  # noqa: BLE001 - not malformed: the database failed; the operator asks again
            self.stats.db_errors += 1
            self.stats.last_error = f"database: {exc}"
            log.warning("log lines of %s not stored: %s", device_id, exc)
        return msg

    def on_malformed(self, topic: str, exc: BaseException, oid: int | None = None) -> None:
        """A message that could not be understood: counted, logged, receipted (it never will be)."""
        self.receipts.final(topic, oid)
        self.stats.malformed += 1
        self.stats.last_error = f"{topic}: {exc}"
        # One line per bad message at INFO would flood the log under attack: warn on powers of two.
        n = self.stats.malformed
        level = logging.WARNING if n & (n - 1) == 0 else logging.DEBUG
        log.log(level, "malformed message #%d on %s: %s", n, topic, exc)

    def on_refused(self, topic: str, exc: EdgeloopError, oid: int | None) -> None:
        """A message a per-device rule refused: counted by rule and device; receipted unless the
        device should send it again later (``retry``)."""
        rule = str(exc.context.get("budget"))
        try:
            device_id: str | None = self.topics.parse(topic)[0]
        except ProtocolError:
            device_id = None
        self.guard_counters.count(rule, device_id)
        self.stats.refused += 1
        self.stats.last_error = f"{topic}: {exc}"
        if not exc.context.get("retry"):
            self.receipts.final(topic, oid)
        n = self.stats.refused
        log.log(logging.WARNING if n & (n - 1) == 0 else logging.DEBUG, "refused #%d (%s) on %s: %s", n, rule,
                topic, exc)
