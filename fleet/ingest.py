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

Receipts (``docs/protocol.md``): an MQTT 5 device tags each message of the
``RECEIPT_KINDS`` with its outbox id (user property ``oid``) and keeps it until the
fleet names that id in a :class:`~core.protocol.Receipt` on ``cmd/receipt``.
The writer collects the ids of a batch and hands them to the receipt queue only once
the batch is **committed** (a failed write receipts nothing: the devices send again and
the unique indexes drop what was stored twice); malformed messages are receipted too,
since they will never be accepted.  A sample frame is receipted once its whole transfer
is committed, or when the reassembler gives the transfer up.  Receipts go out QoS 0, one
per device every ``ingest.receipt_ms``; a lost one only costs a re-send.
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

from core.chunks import Completed, Dropped, Reassembler, is_frame, parse_frame
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
    Receipt,
    Telemetry,
    TopicScheme,
    decode,
)

from .config import BrokerConfig, FleetConfig
from .registry import IngestBatch, Registry, SampleRecord
from .samples import SampleStore, sample_record

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

# (device id, outbox id): one message a device waits to hear about
Ack = tuple[str, int]

# Receipts are QoS 0 JSON: ~8 bytes an id keeps one well under a 128 KiB broker limit.
_RECEIPT_MAX_IDS = 4096
# Ids waiting for one sample transfer to finish.  Beyond this a frame's id is not kept;
# the device sends that frame again, and once the transfer is complete a late duplicate
# is receipted at once, so the cap costs re-sends, never a sample.
_MAX_IDS_PER_TRANSFER = 1024
# Completed samples whose batch failed to commit are retried with the next batches
# (their frames, sent again, would be late duplicates the reassembler ignores).
_MAX_UNSAVED_SAMPLES = 256


def _parse_oid(value: Any) -> int | None:
    """The ``oid`` user property: a non-negative decimal integer, else None (no receipt)."""
    if isinstance(value, str) and 0 < len(value) <= 19 and value.isascii() and value.isdigit():
        return int(value)
    return None


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
    receipts: int = 0  # Receipt messages published
    receipted: int = 0  # outbox ids they named
    last_error: str | None = None


class IngestService:
    """Subscribes to every device kind and writes what arrives into the registry.

    ``start()`` connects and returns once subscribed; ``stop()`` flushes and disconnects.
    :meth:`submit` feeds raw messages without MQTT (benchmarks, replays).
    """

    def __init__(self, config: FleetConfig, registry: Registry, *, store: SampleStore | None = None,
                 client_id: str | None = None, bulk_only: bool = False) -> None:
        """``bulk_only``: subscribe only to :data:`BULK_KINDS` (an extra ingest process)."""
        self.config = config
        self.bulk_only = bulk_only
        self.registry = registry
        self.store = store or SampleStore(config.samples_dir)
        self.topics = TopicScheme(config.prefix)
        self.stats = IngestStats()
        self.reassembler = Reassembler(max_transfers=256, max_bytes=256 << 20, ttl_s=600.0,
                                       on_drop=self._on_drop)
        self._client_id = client_id or config.broker.client_id
        self._pending: list[tuple[str, bytes, float, int | None]] = []
        # Receipt bookkeeping, touched by the writer thread only.
        self._receipts: dict[str, set[int]] = {}  # device id -> ids ready to be receipted
        self._last_receipts = time.monotonic()
        self._transfer_ids: dict[str, list[Ack]] = {}  # open sample transfer -> its frames' ids
        # completed sample transfer -> (record, frame ids) until a batch holding it commits
        self._unsaved: dict[str, tuple[SampleRecord, list[Ack]]] = {}
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
        else:
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
                    oid = _parse_oid(value)
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
            except EdgeloopError as exc:
                self._malformed(topic, exc, oid)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad message must never stop ingestion
                self._malformed(topic, exc, oid)
                continue
            if msg is not None:
                decoded.append(msg)
        batch.samples.extend(rec for rec, _ids in self._unsaved.values())
        if self._write(batch):
            for _rec, frame_acks in self._unsaved.values():
                acks.extend(frame_acks)
            self._unsaved.clear()
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
            while len(self._unsaved) > _MAX_UNSAVED_SAMPLES:  # oldest first: their frames are not receipted
                tid = next(iter(self._unsaved))
                log.error("gave up storing sample %s after repeated database errors", tid)
                del self._unsaved[tid]
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

    def _decode_one(self, topic: str, payload: bytes, received: float, oid: int | None, batch: IngestBatch,
                    acks: list[Ack]) -> Message | None:
        if topic == self.topics.operator_feedback:  # from an operator, not a device: no receipt
            fb = decode(payload)
            if not isinstance(fb, Feedback):
                raise ProtocolError(f"expected feedback on {topic}, got {fb.TYPE}")
            batch.feedback.append(fb)
            return fb
        device_id, kind = self.topics.parse(topic)
        if kind == "samples":
            self._add_frame(device_id, payload, received, oid, batch, acks)
            return None
        msg = decode(payload)
        expected = _KIND_TYPES.get(kind)
        if expected is None or not isinstance(msg, expected):
            raise ProtocolError(f"{msg.TYPE} message on the {kind!r} topic")
        sender = getattr(msg, "device_id", device_id)
        if sender != device_id:
            raise ProtocolError(f"{msg.TYPE} for device {sender!r} published on {device_id!r}'s topic")
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
        elif isinstance(msg, Feedback):
            batch.feedback.append(msg)
        return msg

    def _add_frame(self, device_id: str, payload: bytes, received: float, oid: int | None, batch: IngestBatch,
                   acks: list[Ack]) -> None:
        """One sample chunk frame; its id waits for the transfer's fate (see the module docstring)."""
        if not is_frame(payload):
            raise ProtocolError("samples topic carries a non-chunk payload")
        batch.seen[device_id] = received
        frame = parse_frame(payload)
        tid = frame.transfer_id
        done = self.reassembler.add(frame)  # may drop transfers: _on_drop receipts their frames
        if done is not None:
            ids = self._transfer_ids.pop(tid, [])
            try:
                record = self._store_sample(device_id, done, received)
            except ProtocolError:
                self._receipt_now(ids)  # never accepted; this frame's id goes the malformed way
                raise
            if oid is not None:
                ids.append((device_id, oid))
            self._unsaved[tid] = (record, ids)
            return
        if oid is None:
            return
        if tid in self.reassembler:  # still open
            ids = self._transfer_ids.setdefault(tid, [])
            if len(ids) < _MAX_IDS_PER_TRANSFER:
                ids.append((device_id, oid))
        elif tid in self._unsaved:  # a late duplicate of a sample not committed yet
            self._unsaved[tid][1].append((device_id, oid))
        else:  # a late duplicate of a committed sample
            acks.append((device_id, oid))

    def _store_sample(self, device_id: str, done: Completed, received: float) -> SampleRecord:
        if len(done.data) > self.config.ingest.max_sample_bytes:
            raise ProtocolError(f"sample of {len(done.data)} bytes exceeds ingest.max_sample_bytes")
        record = sample_record(self.store, device_id, done.transfer_id, done.data, done.meta, received=received)
        self.stats.samples += 1
        return record

    def _malformed(self, topic: str, exc: BaseException, oid: int | None = None) -> None:
        if oid is not None:  # it will never be accepted: let the device stop sending it
            try:
                device_id, kind = self.topics.parse(topic)
            except ProtocolError:
                pass
            else:
                if kind in RECEIPT_KINDS:
                    self._receipt_now([(device_id, oid)])
        self.stats.malformed += 1
        self.stats.last_error = f"{topic}: {exc}"
        # One line per bad message at INFO would flood the log under attack: warn on powers of two.
        n = self.stats.malformed
        level = logging.WARNING if n & (n - 1) == 0 else logging.DEBUG
        log.log(level, "malformed message #%d on %s: %s", n, topic, exc)

    def _on_drop(self, dropped: Dropped) -> None:
        self.stats.dropped_transfers += 1
        # Corrupt, superseded, expired or evicted: the fleet will not wait for it any more.
        self._receipt_now(self._transfer_ids.pop(dropped.transfer_id, ()))
        log.info("sample transfer %s dropped: %s (%s)", dropped.transfer_id, dropped.reason, dropped.detail)

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
        client = self._client
        if client is None or not self.config.ingest.receipts:
            return  # no connection (submit() without MQTT): nobody to tell
        ts = time.time()
        for device_id, ids in receipts.items():
            topic = self.topics.command(device_id, "receipt")
            ordered = sorted(ids)
            for i in range(0, max(1, len(ordered)), _RECEIPT_MAX_IDS):  # an empty one too: "I receipt"
                part = tuple(ordered[i:i + _RECEIPT_MAX_IDS])
                try:
                    info = client.publish(topic, Receipt(part, ts=ts).encode(), qos=0)
                except Exception as exc:  # noqa: BLE001 - a lost receipt costs a re-send, nothing more
                    log.warning("receipt to %s not sent: %s", device_id, exc)
                    continue
                if getattr(info, "rc", 0):  # not connected: paho drops QoS 0 at once
                    log.debug("receipt to %s not sent: paho rc %s", device_id, info.rc)
                    continue
                self.stats.receipts += 1
                self.stats.receipted += len(part)




def connect_client(broker: BrokerConfig, *, client_id: str, subscriptions: Sequence[str] = (),
                   on_message: Callable[[Any], None] | None = None, timeout: float = 15.0) -> tuple[Any, str]:
    """Connect a publisher/subscriber for fleet tools; returns ``(paho client, "5" | "3.1.1")``.

    Built on :func:`core.mqtt.connect_client` (MQTT 5 with a 3.1.1 fallback);
    the returned object is the plain paho client, so ``publish``, ``disconnect`` and
    ``loop_stop`` work as in paho.  Raises :class:`BrokerError` when it cannot connect.
    """
    from core.mqtt import TlsConfig
    from core.mqtt import connect_client as _connect

    conn = _connect(broker.host, broker.port, client_id=client_id, username=broker.username,
                    password=broker.password,
                    tls=TlsConfig(ca_file=Path(broker.ca_file) if broker.ca_file else None) if broker.tls else None,
                    keepalive=broker.keepalive, protocol=broker.protocol,  # type: ignore[arg-type]
                    clean=True, subscriptions=list(subscriptions), on_message=on_message, wait_s=timeout)
    return conn.client, conn.protocol_version


# --------------------------------------------------------------------------- extra processes
def run_bulk_worker(config: FleetConfig, index: int, conn: Any) -> None:
    """Entry point of one extra ingest process: bulk kinds only, until ``conn`` says stop.

    It opens its own registry connection; its client id is the main one's plus
    ``-bulk<index>`` (a persistent session of its own when the main one has one).
    """
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s ingest-{index} %(levelname)s %(message)s")
    registry = Registry.open(config.database.url)
    base = config.broker.client_id
    service = IngestService(config, registry, client_id=f"{base}-bulk{index}" if base else None, bulk_only=True)
    try:
        service.start()
        conn.send(("ready", None))
        while conn.recv() != "stop":
            pass
    except EOFError:
        pass  # the parent is gone: stop
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        service.stop()
        registry.close()
        conn.close()


class IngestWorkers:
    """``ingest.workers - 1`` extra ingest processes next to the main :class:`IngestService`.

    One Python process tops out near 3k MQTT messages/s on one core (paho's per-packet
    work, the decode and the write share one interpreter lock); MQTT 5 shared subscriptions let the
    broker deal the high-volume kinds (:data:`BULK_KINDS`) round-robin to every process of
    the share group.  Needs MQTT 5 (a 3.1.1 broker would give every process every message:
    the unique indexes would drop the duplicates, but nothing would be gained).
    """

    def __init__(self, config: FleetConfig, count: int) -> None:
        import multiprocessing

        self.config = config
        self.count = max(0, count)
        self._ctx = multiprocessing.get_context("spawn")  # no inherited threads, sockets or DB handles
        self.procs: list[Any] = []
        self._conns: list[Any] = []

    def start(self, timeout: float = 60.0) -> IngestWorkers:
        for i in range(self.count):
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=run_bulk_worker, args=(self.config, i + 1, child),
                                     name=f"edgeloop-ingest-{i + 1}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self._conns.append(parent)
        for i, c in enumerate(self._conns):
            if not c.poll(timeout):
                raise EdgeloopError(f"ingest worker {i + 1} did not start within {timeout:g} s",
                                    hint="check the broker and database settings in fleet.toml")
            kind, detail = c.recv()
            if kind != "ready":
                raise EdgeloopError(f"ingest worker {i + 1} failed to start: {detail}",
                                    hint="check the broker and database settings in fleet.toml")
        return self

    def cpu_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def stop(self, timeout: float = 30.0) -> None:
        for c in self._conns:
            try:
                c.send("stop")
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in self._conns:
            c.close()
        self.procs, self._conns = [], []
