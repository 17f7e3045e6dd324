"""The device's link to the fleet (:class:`AgentLink`), built on :mod:`core.mqtt`.

A retained birth ``DeviceState(online=True)`` on every connect, the same with
``online=False`` as retained Last Will, a sender thread that drains the
:class:`~edge_agent.outbox.Outbox` in order and acknowledges a message only on the
broker's PUBACK (at-least-once across broker outages, restarts and ``kill -9``), and a
command thread that decodes ``cmd/#`` and hands valid commands to ``on_command``;
anything malformed is logged and dropped.

End-to-end receipts (``docs/protocol.md``, "Receipts"): on MQTT 5 the link tags every
message of a ``protocol.RECEIPT_KINDS`` topic with the user property ``oid`` = its outbox
id.  Once the fleet has ever receipted (``Outbox.receipts_seen``), such a message stays
in the outbox after its PUBACK until a ``Receipt`` on ``cmd/receipt`` names it; the
sender thread puts overdue ones back in the queue (``Outbox.requeue_overdue``) every
second and after each reconnect.  Receipts are taken off paho's thread straight to the
sender thread, never through the command thread, which may be busy installing a model
for minutes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core import protocol as proto
from core.errors import ProtocolError
from core.mqtt import MqttConnection, ProtocolChoice, TlsConfig, Will

from .link_commands import Command, CommandInbox
from .link_receipts import LinkReceipts
from .outbox import Outbox, SendWindow

__all__ = ["AgentLink", "Command"]

log = logging.getLogger(__name__)

_REQUEUE_EVERY_S = 1.0  # how often the sender looks for messages whose receipt is overdue


class AgentLink:
    """A device's link to the fleet: birth/Will, outbox draining, inbound commands.

    ``on_command`` runs on the link's own command thread, one command at a time, so it may
    take long (an install) without stalling PUBACKs, receipts or keep-alives.  The birth
    message and Will carry the latest :class:`DeviceState` the link has seen: ``state``,
    then whatever :meth:`update_state` or the outbox (the state topic) last carried.

    ``receipts`` (on by default) takes part in end-to-end receipts on MQTT 5: tag messages
    with their outbox id, and once the fleet has receipted anything, keep them until it
    receipts them.  A held message goes out again when the fleet has receipted one
    PUBACKed ``receipt_grace_s`` later (it was lost), or after ``receipt_timeout_s``
    without a receipt (doubling per resend, up to 16x).  After ``32 * receipt_timeout_s``
    of connected time with messages held and no receipt at all, the fleet is taken to
    have stopped sending receipts (its switch turned off): the link deletes on PUBACK
    again (``Outbox.forget_receipts``) until the next receipt.  ``receipts=False`` behaves
    as before receipts existed: no tag, deleted on PUBACK, receipts ignored.
    """

    def __init__(self, *, host: str, port: int = 1883, device_id: str, outbox: Outbox,
                 client_id: str | None = None, username: str | None = None, password: str | None = None,
                 tls: TlsConfig | None = None, keepalive: int = 30, protocol: ProtocolChoice = "auto",
                 topics: proto.TopicScheme | None = None, on_command: Callable[[Command], None] | None = None,
                 state: proto.DeviceState | None = None, max_inflight: int = 16,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 60.0, receipts: bool = True,
                 receipt_grace_s: float = 10.0, receipt_timeout_s: float = 60.0) -> None:
        if receipt_grace_s < 0 or receipt_timeout_s <= 0:
            raise ValueError("receipt_grace_s must be >= 0 and receipt_timeout_s > 0")
        self.device_id = proto.validate_device_id(device_id)
        self.topics = topics or proto.TopicScheme()
        self.outbox = outbox
        self.commands = CommandInbox(self.device_id, self.topics, on_command)  # decoded on a thread of its own
        self.receipts = receipts
        self._state = state or proto.DeviceState(device_id=device_id, online=True)
        self._state_topic = self.topics.device(device_id, "state")
        self._receipt_topic = self.topics.command(device_id, "receipt")
        self._receipt_topics = frozenset(self.topics.device(device_id, k) for k in proto.RECEIPT_KINDS)
        self._window = SendWindow(outbox, max_inflight)  # keyed by paho mid; sender thread only
        self._acked: collections.deque[tuple[int, str | None]] = collections.deque()  # from paho's thread
        # receipt payloads from paho's thread, applied by the sender thread
        self._receipts = LinkReceipts(outbox, enabled=receipts, grace_s=receipt_grace_s, timeout_s=receipt_timeout_s,
                                      reject=lambda exc: self.commands.reject(self._receipt_topic, exc))
        self._reconnected = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()  # notified after every sender pass
        self._client_seen: paho.Client | None = None
        self._threads: list[threading.Thread] = []
        self._conn = MqttConnection(
            host, port, client_id=client_id or device_id, username=username, password=password, tls=tls,
            keepalive=keepalive, protocol=protocol, clean=False, will=self._will(),
            subscriptions=[self.topics.device_commands(device_id)], shared_subscriptions=(),
            share_group="", qos=1,
            on_connect=self._on_connect, on_disconnect=lambda c: self.outbox.notify(),
            on_message=self._on_message, on_publish=self._on_publish,
            reconnect_min_s=reconnect_min_s, reconnect_max_s=reconnect_max_s)

    # ------------------------------------------------------------------ public

    def start(self) -> AgentLink:
        """Connect in the background and start the sender and command threads."""
        for target, name in ((self._send_loop, "outbox-sender"), (self.commands.run, "mqtt-commands")):
            t = threading.Thread(target=target, name=f"{name}-{self.device_id}", daemon=True)
            t.start()
            self._threads.append(t)
        self._conn.start()
        return self

    @property
    def rejected_commands(self) -> int:
        """Malformed commands and receipts dropped, and commands dropped for a full queue."""
        return self.commands.rejected

    @property
    def connection(self) -> MqttConnection:
        """The underlying :class:`MqttConnection`."""
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn.connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._conn.wait_connected(timeout)

    def send(self, msg: proto.Message) -> int | None:
        """Queue a device -> fleet message on its topic and priority (see ``protocol.route``)."""
        r = proto.route(msg)
        return self.outbox.put(self.topics.device(self.device_id, r.kind), msg.encode(), r.priority, retain=r.retain)

    def send_samples(self, transfer_id: str, data: bytes, *, meta: dict[str, Any] | None = None,
                     chunk_size: int = proto.DEFAULT_CHUNK_SIZE) -> int:
        """Queue ``data`` as chunk frames on the samples topic; returns how many frames were kept
        (the outbox may drop samples when full — a partial transfer then expires at the fleet)."""
        topic = self.topics.device(self.device_id, "samples")
        frames = proto.split(transfer_id, data, chunk_size=chunk_size, kind=proto.SAMPLES_KIND, meta=meta)
        return sum(self.outbox.put(topic, f, proto.PRIORITY_SAMPLES) is not None for f in frames)

    def update_state(self, state: proto.DeviceState) -> None:
        """New retained state: it becomes the birth message and Will, and is queued now."""
        if state.device_id != self.device_id:
            raise ValueError("state is for another device")
        self._remember(state)
        self.send(self._state)

    def _remember(self, state: proto.DeviceState) -> None:
        self._state = dataclasses.replace(state, online=True)
        self._conn.set_will(self._will())

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate()`` holds, checking it after every pass of the sender
        thread (PUBACKs, receipts, requeues and puts each cause one); False on timeout."""
        self.outbox.notify()
        with self._progress:
            return self._progress.wait_for(predicate, timeout)

    def _drained(self) -> bool:
        return self._window.idle and not self.outbox.peek_batch(1)

    def wait_drained(self, timeout: float | None = None) -> bool:
        """True once nothing is unsent and nothing in flight (tests, shutdown); messages
        awaiting the fleet's receipt do not count: the broker has them."""
        return self.wait_until(self._drained, timeout)

    def wait_receipted(self, timeout: float | None = None) -> bool:
        """True once drained and nothing awaits a receipt either (tests)."""
        return self.wait_until(lambda: self._drained() and not self._receipts.pending
                               and self.outbox.stats().awaiting_receipt == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop sending, publish the offline state, disconnect cleanly (no Will), stop the threads.

        The outbox stays open (it belongs to the caller); undelivered messages stay in it
        and go out after the next start.  Call :meth:`wait_drained` first to flush.
        """
        self._stop.set()  # first, so no queued (online) state can land after the offline one
        self.outbox.notify()
        self.commands.close()
        for t in self._threads:
            t.join(timeout)
        if self._conn.connected.is_set():
            info = self._conn.publish(self._state_topic, self._offline(), retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:  # lost the connection meanwhile
                log.warning("offline state not confirmed: %s", exc)
            self._settle_acks()  # PUBACKs that arrived before the offline one's
        self._window.flush()
        self._settle_receipts()
        self._conn.close()

    stop = close  # the agent's lifecycle verb

    # ------------------------------------------------------------------ paho thread

    def _offline(self) -> bytes:
        return dataclasses.replace(self._state, online=False, ts=proto.now()).encode()

    def _will(self) -> Will:
        return Will(self._state_topic, self._offline(), qos=1, retain=True)

    def _on_connect(self, conn: MqttConnection, session_present: bool) -> None:
        # Birth first: the broker may have published our Will while we were away.
        birth = dataclasses.replace(self._state, online=True, ts=proto.now())
        conn.publish(self._state_topic, birth.encode(), retain=True)
        self._reconnected.set()
        self.outbox.notify()

    def _on_publish(self, mid: int, failure: str | None) -> None:
        # Never block here: paho holds its message lock while calling us.
        self._acked.append((mid, failure))
        self.outbox.notify()

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        if msg.topic == self._receipt_topic:  # not behind a minutes-long install on the command thread
            self._receipts.pending.append(bytes(msg.payload))
            self.outbox.notify()
            return
        self.commands.put(msg)

    # ------------------------------------------------------------------ worker threads

    def _send_loop(self) -> None:
        next_requeue = 0.0
        while not self._stop.is_set():
            try:
                if self._conn.client is not self._client_seen:
                    # a new paho client (protocol fallback) has none of the old one's messages
                    self._client_seen = self._conn.client
                    self._window.reset()
                self._settle_acks()
                self._settle_receipts()
                if self._reconnected.is_set() or time.monotonic() >= next_requeue:
                    self._reconnected.clear()
                    next_requeue = time.monotonic() + _REQUEUE_EVERY_S
                    self._requeue_overdue()
                if self._conn.connected.is_set():
                    self._publish_next()
            except Exception:  # a sender that dies silently loses everything after it
                log.exception("outbox sender error; retrying")
            with self._progress:
                self._progress.notify_all()
            # woken by put, PUBACK, receipt, connect, disconnect and close
            self.outbox.wait(max(0.0, next_requeue - time.monotonic()))

    def _publish_next(self) -> None:
        while (m := self._window.next()) is not None:
            if m.topic == self._state_topic:  # the agent's newest state becomes birth and Will
                try:
                    self._remember(proto.decode_as(m.payload, proto.DeviceState))
                except ProtocolError as exc:
                    log.warning("queued state message is invalid: %s", exc)
            # Tag before receipts_seen too: the fleet's first receipt is what turns holding on.
            tag = self.receipts and m.topic in self._receipt_topics and self._conn.protocol_version == "5"
            props = None
            if tag:
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = (proto.RECEIPT_PROPERTY, str(m.id))
            info = self._conn.publish(m.topic, m.payload, qos=m.qos, retain=m.retain, properties=props)
            if m.qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._window.unsend(m)  # paho does not keep QoS 0 while offline: leave it queued
                break
            # QoS 1/2: paho keeps it and resends after a reconnect; the PUBACK acks it (deletes
            # it, or marks it sent to wait for the fleet's receipt).
            self._window.sent(info.mid, m, receipt=tag and self.outbox.receipts_seen)

    def _settle_acks(self) -> None:
        while self._acked:
            mid, failure = self._acked.popleft()
            # None: the birth message, or a close-time publish
            oid = self._window.delivered(mid, failed=failure is not None)
            if oid is not None and failure:  # e.g. MQTT 5 "Not authorized": a retry would block the queue
                log.error("broker rejected outbox message %d: %s; dropping it", oid, failure)

    def _settle_receipts(self) -> None:
        """Apply the receipts paho's thread queued (after the PUBACKs queued before them)."""
        self._receipts.settle(before=self._settle_acks_and_flush)

    def _settle_acks_and_flush(self) -> None:
        self._settle_acks()
        self._window.flush()

    def _requeue_overdue(self) -> None:
        self._receipts.requeue_overdue(connected=self._conn.connected.is_set())
