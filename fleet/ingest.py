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
the topic, not the payload).  After each commit, registered hooks see the decoded
messages (the rollout engine follows job statuses and bundle requests that way).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.chunks import Completed, Reassembler, is_frame, parse_frame
from edge_agent.errors import EdgeloopError, ProtocolError
from edge_agent.protocol import (
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

from .config import BrokerConfig, FleetConfig
from .registry import IngestBatch, Registry
from .samples import SampleStore, sample_record

__all__ = ["IngestStats", "IngestService", "Hook", "connect_client"]

log = logging.getLogger(__name__)

Hook = Callable[[list[Message]], None]

_SHARED_KINDS = ("telemetry", "drift", "samples", "jobs", "feedback", "bundle-req")

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
    last_error: str | None = None


class IngestService:
    """Subscribes to every device kind and writes what arrives into the registry.

    ``start()`` connects and returns once subscribed; ``stop()`` flushes and disconnects.
    :meth:`submit` feeds raw messages without MQTT (benchmarks, replays).
    """

    def __init__(self, config: FleetConfig, registry: Registry, *, store: SampleStore | None = None,
                 client_id: str | None = None) -> None:
        self.config = config
        self.registry = registry
        self.store = store or SampleStore(config.samples_dir)
        self.topics = TopicScheme(config.prefix)
        self.stats = IngestStats()
        self.reassembler = Reassembler(max_transfers=256, max_bytes=256 << 20, ttl_s=600.0,
                                       on_drop=self._on_drop)
        self._client_id = client_id or config.broker.client_id
        self._pending: list[tuple[str, bytes, float]] = []
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
        from edge_agent.mqtt import TlsConfig
        from edge_agent.mqtt import connect_client as _connect

        b = self.config.broker
        plain = [self.topics.all_devices("state"), self.topics.operator_feedback]
        shared = [self.topics.all_devices(k) for k in _SHARED_KINDS]
        # A configured client id gets a persistent session (the broker queues QoS 1 messages
        # while the fleet restarts); without one, a unique id and a clean session.
        client_id = self._client_id or f"edgeloop-fleet-{uuid.uuid4().hex[:12]}"
        self._client = _connect(
            b.host, b.port, client_id=client_id, username=b.username, password=b.password,
            tls=TlsConfig(ca_file=Path(b.ca_file) if b.ca_file else None) if b.tls else None,
            keepalive=b.keepalive, protocol=b.protocol,  # type: ignore[arg-type]
            clean=self._client_id is None, subscriptions=plain, shared_subscriptions=shared,
            share_group=b.shared_group, on_message=self._on_message, wait_s=15.0)
        self.protocol = self._client.protocol_version

    def stop(self) -> None:
        """Disconnect, write what is pending, stop the writer."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=30)
            self._writer = None

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
        self.submit(msg.topic, msg.payload)

    def submit(self, topic: str, payload: bytes, received: float | None = None) -> None:
        """Queue one raw message (thread-safe); blocks while ``ingest.queue_max`` messages wait."""
        t = received if received is not None else time.time()
        with self._cond:
            while len(self._pending) >= self.config.ingest.queue_max and not self._stop.is_set():
                self._cond.wait(0.05)  # back-pressure: let the broker hold the backlog
            self._pending.append((topic, payload, t))
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
        while True:
            with self._cond:
                if not self._pending and not self._stop.is_set():
                    self._cond.wait(flush_s)
                elif len(self._pending) < self.config.ingest.batch_max and not self._stop.is_set():
                    # wait out the rest of the flush interval to gather a bigger batch
                    self._cond.wait(flush_s)
                raw, self._pending = self._pending[: self.config.ingest.batch_max], \
                    self._pending[self.config.ingest.batch_max:]
                self._cond.notify_all()
            if raw:
                self._process(raw)
            if not raw and not self._pending:
                self._idle.set()
                if self._stop.is_set():
                    return

    def _process(self, raw: list[tuple[str, bytes, float]]) -> None:
        batch = IngestBatch()
        decoded: list[Message] = []
        for topic, payload, received in raw:
            try:
                msg = self._decode_one(topic, payload, received, batch)
            except EdgeloopError as exc:
                self._malformed(topic, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad message must never stop ingestion
                self._malformed(topic, exc)
                continue
            if msg is not None:
                decoded.append(msg)
        self._write(batch)
        self.stats.processed += len(raw)
        self.stats.batches += 1
        if decoded:
            for hook in list(self._hooks):
                try:
                    hook(decoded)
                except Exception:  # noqa: BLE001 - a failing hook must not stop ingestion
                    log.exception("ingest hook %r failed", hook)

    def _write(self, batch: IngestBatch) -> None:
        for attempt in range(3):
            try:
                self.registry.apply(batch)
                return
            except Exception as exc:  # noqa: BLE001 - DB busy/gone: retry, then count and drop
                self.stats.last_error = f"database: {exc}"
                log.warning("ingest batch write failed (attempt %d): %s", attempt + 1, exc)
                if self._stop.wait(0.2 * (attempt + 1)):
                    break
        self.stats.db_errors += 1
        log.error("dropped an ingest batch of %d messages after repeated database errors", len(batch))

    def _decode_one(self, topic: str, payload: bytes, received: float, batch: IngestBatch) -> Message | None:
        if topic == self.topics.operator_feedback:
            fb = decode(payload)
            if not isinstance(fb, Feedback):
                raise ProtocolError(f"expected feedback on {topic}, got {fb.TYPE}")
            batch.feedback.append(fb)
            return fb
        device_id, kind = self.topics.parse(topic)
        if kind == "samples":
            if not is_frame(payload):
                raise ProtocolError("samples topic carries a non-chunk payload")
            batch.seen[device_id] = received
            done = self.reassembler.add(parse_frame(payload))
            if done is not None:
                self._store_sample(device_id, done, received, batch)
            return None
        msg = decode(payload)
        expected = _KIND_TYPES.get(kind)
        if expected is None or not isinstance(msg, expected):
            raise ProtocolError(f"{msg.TYPE} message on the {kind!r} topic")
        sender = getattr(msg, "device_id", device_id)
        if sender != device_id:
            raise ProtocolError(f"{msg.TYPE} for device {sender!r} published on {device_id!r}'s topic")
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
        elif isinstance(msg, Feedback):
            batch.feedback.append(msg)
        return msg

    def _store_sample(self, device_id: str, done: Completed, received: float, batch: IngestBatch) -> None:
        if len(done.data) > self.config.ingest.max_sample_bytes:
            raise ProtocolError(f"sample of {len(done.data)} bytes exceeds ingest.max_sample_bytes")
        batch.samples.append(sample_record(self.store, device_id, done.transfer_id, done.data, done.meta,
                                           received=received))
        self.stats.samples += 1

    def _malformed(self, topic: str, exc: BaseException) -> None:
        self.stats.malformed += 1
        self.stats.last_error = f"{topic}: {exc}"
        # One line per bad message at INFO would flood the log under attack: warn on powers of two.
        n = self.stats.malformed
        level = logging.WARNING if n & (n - 1) == 0 else logging.DEBUG
        log.log(level, "malformed message #%d on %s: %s", n, topic, exc)

    def _on_drop(self, dropped: Any) -> None:
        self.stats.dropped_transfers += 1
        log.info("sample transfer %s dropped: %s (%s)", dropped.transfer_id, dropped.reason, dropped.detail)




def connect_client(broker: BrokerConfig, *, client_id: str, subscriptions: Sequence[str] = (),
                   on_message: Callable[[Any], None] | None = None, timeout: float = 15.0) -> tuple[Any, str]:
    """Connect a publisher/subscriber for fleet tools; returns ``(paho client, "5" | "3.1.1")``.

    Built on :func:`edge_agent.mqtt.connect_client` (MQTT 5 with a 3.1.1 fallback);
    the returned object is the plain paho client, so ``publish``, ``disconnect`` and
    ``loop_stop`` work as in paho.  Raises :class:`BrokerError` when it cannot connect.
    """
    from edge_agent.mqtt import TlsConfig
    from edge_agent.mqtt import connect_client as _connect

    conn = _connect(broker.host, broker.port, client_id=client_id, username=broker.username,
                    password=broker.password,
                    tls=TlsConfig(ca_file=Path(broker.ca_file) if broker.ca_file else None) if broker.tls else None,
                    keepalive=broker.keepalive, protocol=broker.protocol,  # type: ignore[arg-type]
                    clean=True, subscriptions=list(subscriptions), on_message=on_message, wait_s=timeout)
    return conn.client, conn.protocol_version
