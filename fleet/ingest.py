"""The fleet's MQTT ingestion service: subscribe, decode, batch, write.

Threads: paho's network thread only appends ``(topic, payload, received)`` to a
list; one writer thread swaps that list out every ``ingest.flush_ms`` (or as soon as
``ingest.batch_max`` messages wait), decodes, reassembles sample chunks and writes the
whole batch in **one** transaction.  Per-message commits top out near 4.5k msg/s on
SQLite here; batches keep up with ~10k (``DEPENDENCIES.md``).

Subscriptions: on an MQTT 5 broker every device kind except ``state`` goes through a
shared subscription ``$share/<group>/...`` so several fleet workers split the load.
``state`` is subscribed plainly by every worker because brokers do not deliver
retained messages to shared subscriptions, and the retained birth / Last Will is how
a restarted fleet learns who is online.  On MQTT 3.1.1 (amqtt) all are plain.

A malformed message is logged and counted (``stats.malformed``), never fatal; a
payload whose ``device_id`` differs from its topic's is refused (the ACL vouches for
the topic, not the payload).  Everything a device message refers to must be the
sender's own, and every device has budgets (:mod:`fleet.ingest_guard`); refusals are
counted per rule in ``guard_counters`` (``/metrics``, the dashboard).  After each commit, registered hooks see the decoded
messages (the rollout engine follows job statuses and bundle requests that way).

Receipts (``docs/protocol.md``): an MQTT 5 device tags each message of the
``RECEIPT_KINDS`` with its outbox id (user property ``oid``) and keeps it until the
fleet names that id in a :class:`~core.protocol.Receipt` on ``cmd/receipt``.
The writer collects the ids of a batch and hands them to the receipt queue only once
the batch is **committed** (a failed write receipts nothing: the devices send again and
the unique indexes drop what was stored twice); malformed messages are receipted too,
since they will never be accepted.  A sample frame is receipted once its whole transfer
is committed, or when the reassembler gives it up as corrupt or superseded — never when it
was evicted or expired for lack of room or time, nor when a budget refused the frame: the
device keeps those frames and sends them again.  Receipts go out QoS 0, one per device
every ``ingest.receipt_ms``; a lost one only costs a re-send.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.chunks import OverBudgetError
from core.errors import EdgeloopError, ProtocolError
from core.protocol import (
    RECEIPT_KINDS,
    RECEIPT_PROPERTY,
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

from .config import FleetConfig
from .ingest_guard import Budgets, Counters, SenderChecks, refused, write_device_labels
from .ingest_samples import Ack, SampleIntake
from .receipts import parse_oid, publish_receipts
from .registry import IngestBatch, Registry
from .samples import SampleStore

__all__ = ["IngestStats", "IngestService", "Hook", "connect_client", "BULK_KINDS", "IngestWorkers",
           "run_bulk_worker"]

log = logging.getLogger(__name__)

Hook = Callable[[list[Message]], None]

_SHARED_KINDS = ("telemetry", "drift", "samples", "jobs", "feedback", "bundle-req")
# What extra ingest processes (``ingest.workers`` > 1) take: the high-volume kinds whose
# messages stand alone.  Samples stay with the main process (a transfer's chunks must meet
# in one reassembler), and so do jobs and bundle requests (the main process's hooks drive
# rollouts from them) and retained states (never delivered to shared subscriptions).
BULK_KINDS = ("telemetry", "drift", "feedback")


# topic kind -> the message class it must carry
_KIND_TYPES: dict[str, type[Message]] = {
    "state": DeviceState, "telemetry": Telemetry, "drift": DriftReportMsg, "jobs": JobStatus,
    "feedback": Feedback, "bundle-req": BundleRequest,
}


@dataclass
class IngestStats:
    """Counters since start (read them from any thread; they only grow)."""

    received: int = 0
    processed: int = 0
    malformed: int = 0
    batches: int = 0
    db_errors: int = 0
    samples: int = 0
    dropped_transfers: int = 0
    refused: int = 0  # messages refused by a per-device rule (by rule: IngestService.guard_counters)
    receipts: int = 0  # Receipt messages published
    receipted: int = 0  # outbox ids they named
    last_error: str | None = None


class IngestService:
    """Subscribes to every device kind and writes what arrives into the registry.

    ``start()`` connects and returns once subscribed; ``stop()`` flushes and disconnects.
    :meth:`submit` feeds raw messages without MQTT (benchmarks, replays).
    """

    def __init__(self, config: FleetConfig, registry: Registry, *, store: SampleStore | None = None,
                 client_id: str | None = None, bulk_only: bool = False, budgets: Budgets | None = None,
                 username: str | None = None) -> None:
        """``bulk_only``: subscribe only to :data:`BULK_KINDS` (an extra ingest process);
        ``username``: the broker user instead of ``[broker].username`` (each fleet process has its own)."""
        self.config = config
        self.bulk_only = bulk_only
        self.registry = registry
        self.store = store or SampleStore(config.samples_dir)
        self.topics = TopicScheme(config.prefix)
        self.stats = IngestStats()
        self.budgets = budgets or Budgets(max_frame_bytes=max(Budgets.max_frame_bytes,
                                                              min(config.ingest.max_sample_bytes, 16 << 20)))
        b = self.budgets
        self.guard_counters = Counters()
        self.checks = SenderChecks(registry, b, self.guard_counters)
        self.samples = SampleIntake(config, registry, self.store, b, self.guard_counters, self.stats,
                                    receipt_now=self._receipt_now)
        self.reassembler = self.samples.reassembler
        self._username = username
        self._client_id = client_id or config.broker.client_id
        self._pending: list[tuple[str, bytes, float, int | None]] = []
        # Receipt bookkeeping, touched by the writer thread only.
        self._receipts: dict[str, set[int]] = {}  # device id -> ids ready to be receipted
        self._last_receipts = time.monotonic()
        # this batch's device feedback, written after the batch: (device id, feedback, receipt)
        self._device_labels: list[tuple[str, Feedback, Ack | None]] = []
        self._cond = threading.Condition()
        self._hooks: list[Hook] = []
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._writer: threading.Thread | None = None
        self._client: Any = None
        self.protocol: str | None = None  # "5" or "3.1.1" once connected

    # ------------------------------------------------------------------ lifecycle
    def add_hook(self, hook: Hook) -> None:
        """Call ``hook(messages)`` in the writer thread after each committed batch."""
        self._hooks.append(hook)

    def start(self, *, connect: bool = True) -> None:
        """Start the writer thread and (unless ``connect=False``) subscribe on the broker."""
        self._stop.clear()
        self._writer = threading.Thread(target=self._run, name="fleet-ingest-writer", daemon=True)
        self._writer.start()
        if connect:
            self._connect()

    def _connect(self) -> None:
        from core.mqtt import TlsConfig
        from core.mqtt import connect_client as _connect

        b = self.config.broker
        if self.bulk_only:
            plain, shared = [], [self.topics.all_devices(k) for k in BULK_KINDS]
        elif self.config.ingest.workers > 1:
            plain = [self.topics.all_devices("state"), self.topics.operator_feedback]
            shared = [self.topics.all_devices(k) for k in _SHARED_KINDS]
        else:  # one ingest process: no shared subscription a device could try to join
            plain = [self.topics.all_devices(k) for k in ("state", *_SHARED_KINDS)] + [self.topics.operator_feedback]
            shared = []
        # A configured client id gets a persistent session (the broker queues QoS 1 messages
        # while the fleet restarts); without one, a unique id and a clean session.
        client_id = self._client_id or f"edgeloop-fleet-{uuid.uuid4().hex[:12]}"
        self._client = _connect(
            b.host, b.port, client_id=client_id, username=self._username or b.username, password=b.password,
            tls=TlsConfig(ca_file=Path(b.ca_file) if b.ca_file else None) if b.tls else None,
            keepalive=b.keepalive, protocol=b.protocol,  # type: ignore[arg-type]
            clean=self._client_id is None, subscriptions=plain, shared_subscriptions=shared,
            share_group=b.shared_group, on_message=self._on_message, wait_s=15.0)
        self.protocol = self._client.protocol_version

    def stop(self) -> None:
        """Write what is pending, send its receipts, disconnect, write what came meanwhile."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join(timeout=30)
        if self._client is not None:
            self._client.close()
            self._client = None
        if writer is not None and writer.is_alive():
            log.error("ingest writer still busy after 30 s; %d messages not written", len(self._pending))
            return
        # Arrived while the writer finished: stored, not receipted (those devices send again).
        self._drain()
        self._receipts.clear()
        self._idle.set()

    @property
    def client(self) -> Any:
        """The connected MQTT connection (``publish(topic, payload, qos=, retain=)``), or None."""
        return self._client

    def __enter__(self) -> IngestService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ input
    def _on_message(self, msg: Any) -> None:
        oid = None
        props = msg.properties  # None on MQTT 3.1.1: such devices get no receipts
        if props is not None and self.config.ingest.receipts:
            for key, value in getattr(props, "UserProperty", ()):
                if key == RECEIPT_PROPERTY:
                    oid = parse_oid(value)
        self.submit(msg.topic, msg.payload, oid=oid)

    def submit(self, topic: str, payload: bytes, received: float | None = None, oid: int | None = None) -> None:
        """Queue one raw message (thread-safe); blocks while ``ingest.queue_max`` messages wait.

        ``oid``: the sender's outbox id (its ``oid`` user property), receipted once the
        message is committed or found malformed.
        """
        t = received if received is not None else time.time()
        with self._cond:
            while len(self._pending) >= self.config.ingest.queue_max and not self._stop.is_set():
                self._cond.wait(0.05)  # back-pressure: let the broker hold the backlog
            self._pending.append((topic, payload, t, oid))
            self.stats.received += 1
            self._idle.clear()
            if len(self._pending) >= self.config.ingest.batch_max:
                self._cond.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._pending and self.stats.processed >= self.stats.received:
                    return True
                self._cond.notify_all()
            self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return False

    # ------------------------------------------------------------------ writer
    def _run(self) -> None:
        flush_s = self.config.ingest.flush_ms / 1000
        batch_max = self.config.ingest.batch_max
        while not self._stop.is_set():
            with self._cond:
                if len(self._pending) < batch_max and not self._stop.is_set():
                    # wait out the flush interval to gather a bigger batch (or for work at all)
                    self._cond.wait(flush_s)
                raw, self._pending = self._pending[:batch_max], self._pending[batch_max:]
                self._cond.notify_all()
            if raw:
                self._process(raw)
            self._flush_receipts()
            if not raw and not self._pending:
                self._idle.set()
        # Stopping: write what is queued and say so while the connection is still up.
        self._drain()
        self._flush_receipts(force=True)
        self._idle.set()

    def _drain(self) -> None:
        """Process everything queued now, in batches."""
        batch_max = self.config.ingest.batch_max
        while True:
            with self._cond:
                raw, self._pending = self._pending[:batch_max], self._pending[batch_max:]
                self._cond.notify_all()
            if not raw:
                return
            self._process(raw)

    def _process(self, raw: list[tuple[str, bytes, float, int | None]]) -> None:
        batch = IngestBatch()
        decoded: list[Message] = []
        acks: list[Ack] = []  # receipted once this batch is committed
        for topic, payload, received, oid in raw:
            try:
                msg = self._decode_one(topic, payload, received, oid, batch, acks)
            except OverBudgetError as exc:  # the device keeps the frame and sends it again
                self._refused(topic, refused("transfer_budget", str(exc), retry=True), oid)
                continue
            except EdgeloopError as exc:
                if "budget" in exc.context:
                    self._refused(topic, exc, oid)
                else:
                    self._malformed(topic, exc, oid)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad message must never stop ingestion
                self._malformed(topic, exc, oid)
                continue
            if msg is not None:
                decoded.append(msg)
        batch.samples.extend(self.samples.unsaved_records())
        device_labels, self._device_labels = self._device_labels, []
        if self._write(batch):
            self.samples.committed(acks)
            if device_labels and self._write_device_labels(device_labels):
                acks.extend(a for _d, _f, a in device_labels if a is not None)
            receipts = self._receipts
            for device_id, oid in acks:
                ready = receipts.get(device_id)
                if ready is None:
                    ready = receipts[device_id] = set()
                ready.add(oid)
            # A device that (re)connects hears at once, not at the next interval, that this
            # fleet receipts: a Receipt (empty, or with what is ready for it) makes it hold
            # its messages from then on, so even its first ones survive a broker restart.
            born = {state.device_id for state, _received in batch.states if state.online}
            if born:
                self._publish_receipts({d: receipts.pop(d, set()) for d in born})
        else:
            self.samples.write_failed()
        self.stats.processed += len(raw)
        self.stats.batches += 1
        if decoded:
            for hook in list(self._hooks):
                try:
                    hook(decoded)
                except Exception:  # noqa: BLE001 - a failing hook must not stop ingestion
                    log.exception("ingest hook %r failed", hook)

    def _write(self, batch: IngestBatch) -> bool:
        """Commit ``batch``, retrying twice; False when it could not be written."""
        for attempt in range(3):
            try:
                self.registry.apply(batch)
                return True
            except Exception as exc:  # noqa: BLE001 - DB busy/gone: retry, then count and drop
                self.stats.last_error = f"database: {exc}"
                log.warning("ingest batch write failed (attempt %d): %s", attempt + 1, exc)
                if self._stop.wait(0.2 * (attempt + 1)):
                    break
        self.stats.db_errors += 1
        log.error("dropped an ingest batch of %d messages after repeated database errors", len(batch))
        return False

    def _write_device_labels(self, items: list[tuple[str, Feedback, Ack | None]]) -> bool:
        """Devices' feedback, in its own transaction after the batch (see :mod:`fleet.ingest_guard`)."""
        try:
            n = write_device_labels(self.registry.engine, [(d, f) for d, f, _a in items], self.checks)
        except Exception as exc:  # noqa: BLE001 - not receipted: the devices send it again
            self.stats.db_errors += 1
            self.stats.last_error = f"database: {exc}"
            log.warning("device feedback not written: %s", exc)
            return False
        self.stats.refused += n
        return True

    def _decode_one(self, topic: str, payload: bytes, received: float, oid: int | None, batch: IngestBatch,
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
            self._device_labels.append((device_id, dataclasses.replace(msg, source="device"), ack))
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

    def _receipt_final(self, topic: str, oid: int | None) -> None:
        """A message that will never be accepted: let the device stop sending it."""
        if oid is not None:
            try:
                device_id, kind = self.topics.parse(topic)
            except ProtocolError:
                return
            if kind in RECEIPT_KINDS:
                self._receipt_now([(device_id, oid)])

    def _malformed(self, topic: str, exc: BaseException, oid: int | None = None) -> None:
        self._receipt_final(topic, oid)
        self.stats.malformed += 1
        self.stats.last_error = f"{topic}: {exc}"
        # One line per bad message at INFO would flood the log under attack: warn on powers of two.
        n = self.stats.malformed
        level = logging.WARNING if n & (n - 1) == 0 else logging.DEBUG
        log.log(level, "malformed message #%d on %s: %s", n, topic, exc)

    def _refused(self, topic: str, exc: EdgeloopError, oid: int | None) -> None:
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
            self._receipt_final(topic, oid)
        n = self.stats.refused
        log.log(logging.WARNING if n & (n - 1) == 0 else logging.DEBUG, "refused #%d (%s) on %s: %s", n, rule,
                topic, exc)

    # ------------------------------------------------------------------ receipts
    def _receipt_now(self, acks: Sequence[Ack]) -> None:
        """Queue receipts that do not wait for a commit (writer thread)."""
        for device_id, oid in acks:
            self._receipts.setdefault(device_id, set()).add(oid)

    def _flush_receipts(self, *, force: bool = False) -> None:
        """Publish one :class:`Receipt` per device, at most every ``ingest.receipt_ms``."""
        if not self._receipts:
            return
        now = time.monotonic()
        if not force and (now - self._last_receipts) * 1000 < self.config.ingest.receipt_ms:
            return
        self._last_receipts = now
        receipts, self._receipts = self._receipts, {}
        self._publish_receipts(receipts)

    def _publish_receipts(self, receipts: dict[str, set[int]]) -> None:
        if self._client is not None and self.config.ingest.receipts:  # else: nobody to tell
            publish_receipts(self._client, self.topics, receipts, self.stats)


# The fleet's other MQTT connections and the extra ingest processes (kept here for importers).
from .ingest_workers import IngestWorkers, connect_client, run_bulk_worker  # noqa: E402
