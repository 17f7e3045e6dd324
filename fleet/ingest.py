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

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.protocol import RECEIPT_PROPERTY, Feedback, Message, TopicScheme

from .config import FleetConfig
from .ingest_dispatch import IngestDispatch, Raw
from .ingest_guard import Budgets, Counters, SenderChecks, write_device_labels
from .ingest_samples import Ack, SampleIntake
from .receipts import ReceiptBook, parse_oid
from .registry import IngestBatch, Registry
from .samples import SampleStore

__all__ = ["IngestStats", "IngestService", "Hook", "connect_client", "BULK_KINDS", "IngestWorkers",
           "run_bulk_worker"]

log = logging.getLogger(__name__)

Hook = Callable[[list[Message]], None]

_SHARED_KINDS = ("telemetry", "drift", "samples", "jobs", "feedback", "bundle-req", "logs")
# What extra ingest processes (``ingest.workers`` > 1) take: the high-volume kinds whose
# messages stand alone.  Samples stay with the main process (a transfer's chunks must meet
# in one reassembler), and so do jobs and bundle requests (the main process's hooks drive
# rollouts from them) and retained states (never delivered to shared subscriptions).
BULK_KINDS = ("telemetry", "drift", "feedback")
# The writer's queue has three lanes, taken in this order; order within each lane is kept.
# What the rollout engine waits on jumps the queue: a wave must not wait behind thousands of
# queued sample uploads (the quick demo under load: 21,000 samples queued while the canary's
# job reports and bundle requests sat behind them for minutes).  Urgent messages get batches
# of their own, so their hooks run at once.  Then the reports the canary analysis reads
# (telemetry, drift windows): behind the samples, a shadowing canary's first telemetry
# reached the fleet 35 s late and its stage waited for it.  Samples, their labels (a label
# must not overtake its sample) and logs last.
URGENT_KINDS = frozenset({"jobs", "bundle-req", "state"})
REPORT_KINDS = frozenset({"telemetry", "drift"})
LANES = 3  # urgent, reports, the rest


def _lane(topic: str) -> int:
    kind = topic.rpartition("/")[2]
    return 0 if kind in URGENT_KINDS else 1 if kind in REPORT_KINDS else 2


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
    :meth:`submit` feeds raw messages without MQTT (benchmarks, replays).  The writer thread
    hands each batch to an :class:`~fleet.ingest_dispatch.IngestDispatch` (``dispatch``:
    decoding, per-kind filing, malformed/refused accounting) and its receipts to a
    :class:`~fleet.receipts.ReceiptBook` (``receipts``).
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
        # Receipt bookkeeping, touched by the writer thread only.
        self.receipts = ReceiptBook(self.topics, self.stats, lambda: self._client,
                                    interval_ms=config.ingest.receipt_ms, enabled=config.ingest.receipts)
        self.samples = SampleIntake(config, registry, self.store, b, self.guard_counters, self.stats,
                                    receipt_now=self.receipts.queue)
        self.reassembler = self.samples.reassembler
        self.dispatch = IngestDispatch(self.topics, b, self.checks, self.samples, self.stats, self.guard_counters,
                                       self.receipts)
        self._username = username
        self._client_id = client_id or config.broker.client_id
        self._lanes: tuple[list[Raw], ...] = tuple([] for _ in range(LANES))  # see LANES
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
            log.error("ingest writer still busy after 30 s; %d messages not written",
                      self._queued())
            return
        # Arrived while the writer finished: stored, not receipted (those devices send again).
        self._drain()
        self.receipts.clear()
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
        which = _lane(topic)
        lane = self._lanes[which]
        with self._cond:
            while len(lane) >= self.config.ingest.queue_max and not self._stop.is_set():
                self._cond.wait(0.05)  # back-pressure (per lane): let the broker hold the backlog
            lane.append((topic, payload, t, oid))
            self.stats.received += 1
            self._idle.clear()
            if which == 0 or self._queued() >= self.config.ingest.batch_max:
                self._cond.notify_all()

    def _queued(self) -> int:
        return sum(len(lane) for lane in self._lanes)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._queued() and self.stats.processed >= self.stats.received:
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
                if self._queued() < batch_max and not self._lanes[0] and not self._stop.is_set():
                    # wait out the flush interval to gather a bigger batch (or for work at all)
                    self._cond.wait(flush_s)
                raw = self._take(batch_max)
            if raw:
                self._process(raw)
            self.receipts.flush()
            if not raw and not self._queued():
                self._idle.set()
        # Stopping: write what is queued and say so while the connection is still up.
        self._drain()
        self.receipts.flush(force=True)
        self._idle.set()

    def _drain(self) -> None:
        """Process everything queued now, in batches."""
        batch_max = self.config.ingest.batch_max
        while True:
            with self._cond:
                raw = self._take(batch_max)
            if not raw:
                return
            self._process(raw)

    def _take(self, n: int) -> list[Raw]:
        """Up to ``n`` queued messages in lane order (call with ``_cond`` held): urgent ones alone in their own
        batch, so their hooks run without waiting for a batch of bulk messages to be decoded and written."""
        urgent = self._lanes[0]
        if urgent:
            raw = urgent[:n]
            del urgent[:n]
        else:
            raw = []
            for lane in self._lanes[1:]:
                part = lane[:n - len(raw)]
                del lane[:len(part)]
                raw += part
        self._cond.notify_all()
        return raw

    def _process(self, raw: list[Raw]) -> None:
        batch = IngestBatch()
        acks: list[Ack] = []  # receipted once this batch is committed
        decoded = self.dispatch.decode_all(raw, batch, acks)
        batch.samples.extend(self.samples.unsaved_records())
        device_labels = self.dispatch.take_device_labels()
        if self._write(batch):
            self.samples.committed(acks)
            if device_labels and self._write_device_labels(device_labels):
                acks.extend(a for _d, _f, a in device_labels if a is not None)
            # devices (re)connected in this batch hear at once that this fleet receipts
            self.receipts.committed(acks, {state.device_id for state, _received in batch.states if state.online})
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


# The fleet's other MQTT connections and the extra ingest processes (kept here for importers).
from .ingest_workers import IngestWorkers, connect_client, run_bulk_worker  # noqa: E402
