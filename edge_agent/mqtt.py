"""MQTT for agents and the fleet: one connection helper, and the agent's link.

:func:`connect_client` returns a :class:`MqttConnection`: a paho-mqtt 2.x client
(``CallbackAPIVersion.VERSION2``) that keeps itself connected (exponential back-off),
speaks MQTT 5 where the broker does (``protocol="auto"`` falls back to 3.1.1 when the
broker refuses 5, as amqtt does), keeps a persistent session, and re-subscribes on every
connect — as a shared subscription ``$share/<group>/...`` under MQTT 5 when a group is
given, plainly otherwise.  The fleet's subscriber uses it as is.  A 3.1.1-only broker
either refuses MQTT 5 with a CONNACK (amqtt, for a bare CONNECT) or never answers (amqtt,
for a CONNECT with properties): both make ``auto`` switch, the second after
``connack_timeout_s``.

:class:`AgentLink` is the device side: a retained birth ``DeviceState(online=True)`` on
every connect, the same with ``online=False`` as retained Last Will, a sender thread
that drains the :class:`~edge_agent.outbox.Outbox` in order and acknowledges a message
only on the broker's PUBACK (at-least-once across broker outages, restarts and
``kill -9``), and a command thread that decodes ``cmd/#`` and hands valid commands to
``on_command``; anything malformed is logged and dropped.

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
import queue
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from . import protocol as proto
from .errors import BrokerError, ProtocolError
from .outbox import Outbox, SendWindow

__all__ = ["TlsConfig", "Will", "MqttConnection", "connect_client", "AgentLink", "Command", "ProtocolChoice"]

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")
# paho 2.2 logs "Client is not connected" at ERROR when a never-connected client's loop is
# stopped: a normal shutdown path, not an error worth a red line in the agent's log.
_paho_log.addFilter(lambda record: not str(record.msg).startswith("Client is not connected"))

ProtocolChoice = Literal["auto", "5", "3.1.1"]
_PROTOCOL_ALIASES = {"mqtt5": "5", "mqtt311": "3.1.1", "5": "5", "3.1.1": "3.1.1", "auto": "auto"}
Command = proto.DeployCommand | proto.RollbackCommand | proto.Frame
_UNSUPPORTED_PROTOCOL = (1, 132)  # CONNACK: 3.1.1 return code 1, MQTT 5 reason 0x84
_SESSION_EXPIRY_S = 7 * 24 * 3600  # how long the broker keeps a device's queued commands
_REQUEUE_EVERY_S = 1.0  # how often the sender looks for messages whose receipt is overdue
_MAX_PENDING_RECEIPTS = 4096  # receipts not yet applied; beyond, the oldest are forgotten (resent later)
# Connected time without any receipt while messages wait for one, in receipt timeouts, after
# which the fleet is taken to have stopped sending receipts: twice the longest back-off.
_RECEIPT_LAPSE_TIMEOUTS = 2 * 2**4


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the broker.  No ``ca_file``: the system's trusted CAs.  ``cert_file`` +
    ``key_file``: client-certificate auth.  ``insecure`` skips hostname checks (lab only)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise BrokerError("TLS client auth needs both cert_file and key_file")
        for f in (self.ca_file, self.cert_file, self.key_file):
            if f is not None and not Path(f).is_file():
                raise BrokerError(f"TLS file {f} does not exist", hint="fix the path in the agent config", path=f)


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes if the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttConnection:
    """A paho client that stays connected; build it with :func:`connect_client`.

    ``connected`` is set while connected; ``ready`` once the subscriptions of the current
    connection are acknowledged.  Callbacks run on paho's network thread and must be
    quick: ``on_connect(conn, session_present)``, ``on_disconnect(conn)``,
    ``on_message(msg: paho.MQTTMessage)``, ``on_publish(mid, failure_reason_or_None)``.
    """

    def __init__(self, host: str, port: int, *, client_id: str, username: str | None, password: str | None,
                 tls: TlsConfig | None, keepalive: int, protocol: ProtocolChoice, clean: bool,
                 will: Will | None, subscriptions: Sequence[str], shared_subscriptions: Sequence[str],
                 share_group: str, qos: int,
                 on_connect: Callable[[MqttConnection, bool], None] | None,
                 on_disconnect: Callable[[MqttConnection], None] | None,
                 on_message: Callable[[paho.MQTTMessage], None] | None,
                 on_publish: Callable[[int, str | None], None] | None,
                 reconnect_min_s: float, reconnect_max_s: float, connack_timeout_s: float = 5.0) -> None:
        mode = _PROTOCOL_ALIASES.get(protocol)
        if mode is None:
            raise BrokerError(f"unknown MQTT protocol {protocol!r}", hint="use 'auto', '5' or '3.1.1'")
        self.host, self.port, self.client_id = host, port, client_id
        self._auth, self._tls, self._keepalive, self._clean = (username, password), tls, keepalive, clean
        self._will = will
        self._subs = [(f, False) for f in subscriptions] + [(f, True) for f in shared_subscriptions]
        self._share_group, self._qos = share_group, qos
        self._hooks = (on_connect, on_disconnect, on_message, on_publish)
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._lock = threading.RLock()
        self._sub_mid: int | None = None
        self.connected = threading.Event()
        self.ready = threading.Event()
        self.last_error: str | None = None
        self.protocol_version: str = "3.1.1" if mode == "3.1.1" else "5"
        self._probing = mode == "auto"  # until the broker first accepts MQTT 5
        self._connack_timeout_s = connack_timeout_s
        self._closing = False
        self._client = self._build()

    # ------------------------------------------------------------------ public

    @property
    def client(self) -> paho.Client:
        """The underlying paho client (replaced once if ``auto`` falls back to 3.1.1)."""
        return self._client

    def start(self) -> MqttConnection:
        """Connect in the background; paho retries until the broker answers."""
        self._client.connect_async(self.host, self.port, self._keepalive, **self._connect_args())
        self._client.loop_start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """True once connected (within ``timeout`` seconds)."""
        return self.connected.wait(timeout)

    def subscribe(self, topic_filter: str, *, shared: bool = False) -> None:
        """Subscribe now and after every reconnect (``shared``: under the share group on MQTT 5)."""
        with self._lock:
            self._subs.append((topic_filter, shared))
            if self.connected.is_set():
                self._client.subscribe(self._sub_list([(topic_filter, shared)]))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> paho.MQTTMessageInfo:
        """Publish through paho (QoS 1 messages are queued by paho while disconnected).

        ``properties`` (MQTT 5 PUBLISH properties, e.g. user properties) are sent only on an
        MQTT 5 connection; 3.1.1 has no properties, so they are left out there.
        """
        if self.protocol_version != "5":
            properties = None
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def set_will(self, will: Will | None) -> None:
        """Replace the Last Will; the broker takes it at the next connect."""
        with self._lock:
            self._will = will
            self._apply_will(self._client)

    def close(self) -> None:
        """DISCONNECT cleanly (the broker drops the Will) and stop the network thread."""
        with self._lock:
            self._closing = True
            client = self._client
        if client.is_connected():  # else paho logs a spurious error; loop_stop alone ends the retries
            client.disconnect()
        client.loop_stop()
        self.connected.clear()
        self.ready.clear()

    # ------------------------------------------------------------------ internals

    def _sub_list(self, subs: Sequence[tuple[str, bool]]) -> list[tuple[str, Any]]:
        """paho's subscribe list; shared filters get ``$share/<group>/`` only on MQTT 5
        (3.1.1 brokers such as amqtt do not know shared subscriptions)."""
        out: list[tuple[str, Any]] = []
        for f, shared in subs:
            if shared and self.protocol_version == "5":
                f = f"$share/{self._share_group}/{f}"
            out.append((f, SubscribeOptions(qos=self._qos) if self.protocol_version == "5" else self._qos))
        return out

    def _connect_args(self) -> dict[str, Any]:
        if self.protocol_version != "5":
            return {}
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if self._clean else _SESSION_EXPIRY_S
        return {"clean_start": self._clean, "properties": props}

    def _apply_will(self, client: paho.Client) -> None:
        if self._will is None:
            client.will_clear()
        else:
            client.will_set(self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain)

    def _build(self) -> paho.Client:
        if self.protocol_version == "5":
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        else:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho.MQTTv311, clean_session=self._clean)
        client.enable_logger(_paho_log)  # packet log at DEBUG
        if self._auth[0] is not None:
            client.username_pw_set(*self._auth)
        if self._tls is not None:
            t = self._tls
            client.tls_set(ca_certs=str(t.ca_file) if t.ca_file else None,
                           certfile=str(t.cert_file) if t.cert_file else None,
                           keyfile=str(t.key_file) if t.key_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            client.tls_insecure_set(t.insecure)
        self._apply_will(client)
        client.reconnect_delay_set(*self._reconnect)  # type: ignore[arg-type]  # floats work
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        return client

    def _fall_back(self, old: paho.Client) -> None:
        """Replace a v5 client the broker refused with a 3.1.1 one (runs on its own thread:
        paho's thread cannot stop itself)."""
        with self._lock:
            if self._closing or old is not self._client or not self._probing:
                return  # closed meanwhile, or already switched
            self._probing = False
        old.disconnect()
        old.loop_stop()
        with self._lock:
            if self._closing:
                return
            self.protocol_version = "3.1.1"
            self._client = self._build()
            self.start()

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._probing:
            timer = threading.Timer(self._connack_timeout_s, self._connack_overdue, args=(client,))
            timer.daemon = True
            timer.start()

    def _connack_overdue(self, client: paho.Client) -> None:
        if self._probing and not self.connected.is_set():
            log.info("no CONNACK to MQTT 5 from %s:%s within %g s; using 3.1.1", self.host, self.port,
                     self._connack_timeout_s)
            self._fall_back(client)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            self.last_error = f"broker {self.host}:{self.port} refused the connection: {reason}"
            if self._probing and reason.value in _UNSUPPORTED_PROTOCOL:
                log.info("broker %s:%s does not speak MQTT 5; using 3.1.1", self.host, self.port)
                threading.Thread(target=self._fall_back, args=(client,), daemon=True, name="mqtt-fallback").start()
            else:
                log.warning("%s", self.last_error)
            return
        self.last_error = None
        self._probing = False
        with self._lock:
            subs = self._sub_list(self._subs)
        if subs:
            self._sub_mid = client.subscribe(subs)[1]
        else:
            self.ready.set()
        self.connected.set()
        log.info("connected to %s:%s as %s (MQTT %s, session present: %s)", self.host, self.port,
                 self.client_id, self.protocol_version, flags.session_present)
        if self._hooks[0]:
            self._hooks[0](self, flags.session_present)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.ready.clear()
        if was and not self._closing:
            log.warning("disconnected from %s:%s (%s); reconnecting", self.host, self.port, reason)
        if was and self._hooks[1]:
            self._hooks[1](self)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:  # an ACL that forbids a filter: say so, the rest still works
            log.warning("broker %s:%s refused %d subscription(s): %s", self.host, self.port, len(refused), refused)
        if mid == self._sub_mid:
            self.ready.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._hooks[2]:
            self._hooks[2](msg)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if self._hooks[3]:
            self._hooks[3](mid, str(reason) if reason.is_failure else None)


def connect_client(host: str, port: int = 1883, *, client_id: str, username: str | None = None,
                   password: str | None = None, tls: TlsConfig | None = None, keepalive: int = 30,
                   protocol: ProtocolChoice = "auto", clean: bool = False, will: Will | None = None,
                   subscriptions: Sequence[str] = (), shared_subscriptions: Sequence[str] = (),
                   share_group: str = "edgeloop", qos: int = 1,
                   on_connect: Callable[[MqttConnection, bool], None] | None = None,
                   on_disconnect: Callable[[MqttConnection], None] | None = None,
                   on_message: Callable[[paho.MQTTMessage], None] | None = None,
                   on_publish: Callable[[int, str | None], None] | None = None,
                   reconnect_min_s: float = 1.0, reconnect_max_s: float = 60.0,
                   connack_timeout_s: float = 5.0, wait_s: float | None = None) -> MqttConnection:
    """Build and start a self-reconnecting client; see :class:`MqttConnection`.

    ``clean=False`` keeps a persistent session (stable ``client_id`` required): the broker
    queues QoS 1 messages for subscriptions while the client is away.  ``subscriptions``
    are plain; ``shared_subscriptions`` become ``$share/<share_group>/<filter>`` on MQTT 5
    so several subscriber processes split the load.  ``wait_s``: block until connected and
    subscribed, raising :class:`BrokerError` if that takes longer (the client is closed).
    ``connack_timeout_s``: with ``protocol="auto"``, how long an MQTT 5 CONNECT may go
    unanswered before trying 3.1.1.
    """
    conn = MqttConnection(host, port, client_id=client_id, username=username, password=password, tls=tls,
                          keepalive=keepalive, protocol=protocol, clean=clean, will=will,
                          subscriptions=subscriptions, shared_subscriptions=shared_subscriptions,
                          share_group=share_group, qos=qos, on_connect=on_connect, on_disconnect=on_disconnect,
                          on_message=on_message, on_publish=on_publish, reconnect_min_s=reconnect_min_s,
                          reconnect_max_s=reconnect_max_s, connack_timeout_s=connack_timeout_s).start()
    if wait_s is not None and not conn.ready.wait(wait_s):
        conn.close()
        raise BrokerError(conn.last_error or f"no answer from MQTT broker {host}:{port} within {wait_s:g} s",
                          hint="check the broker host, port and credentials, and that the broker runs",
                          host=host, port=port)
    return conn


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
        self.on_command = on_command
        self.rejected_commands = 0  # malformed commands and receipts dropped
        self.receipts = receipts
        self.receipt_grace_s = receipt_grace_s
        self.receipt_timeout_s = receipt_timeout_s
        self._rejected_lock = threading.Lock()  # the command and the sender thread both count
        self._state = state or proto.DeviceState(device_id=device_id, online=True)
        self._state_topic = self.topics.device(device_id, "state")
        self._receipt_topic = self.topics.command(device_id, "receipt")
        self._receipt_topics = frozenset(self.topics.device(device_id, k) for k in proto.RECEIPT_KINDS)
        self._window = SendWindow(outbox, max_inflight)  # keyed by paho mid; sender thread only
        self._acked: collections.deque[tuple[int, str | None]] = collections.deque()  # from paho's thread
        # receipt payloads from paho's thread, applied by the sender thread
        self._receipts_in: collections.deque[bytes] = collections.deque(maxlen=_MAX_PENDING_RECEIPTS)
        self._reconnected = threading.Event()
        self._silent_s = 0.0  # connected seconds with messages held and no receipt; sender thread
        self._last_tick = time.monotonic()
        self._commands: queue.Queue[paho.MQTTMessage | None] = queue.Queue(maxsize=256)
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
        for target, name in ((self._send_loop, "outbox-sender"), (self._command_loop, "mqtt-commands")):
            t = threading.Thread(target=target, name=f"{name}-{self.device_id}", daemon=True)
            t.start()
            self._threads.append(t)
        self._conn.start()
        return self

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
        return self.wait_until(lambda: self._drained() and not self._receipts_in
                               and self.outbox.stats().awaiting_receipt == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop sending, publish the offline state, disconnect cleanly (no Will), stop the threads.

        The outbox stays open (it belongs to the caller); undelivered messages stay in it
        and go out after the next start.  Call :meth:`wait_drained` first to flush.
        """
        self._stop.set()  # first, so no queued (online) state can land after the offline one
        self.outbox.notify()
        try:
            self._commands.put_nowait(None)
        except queue.Full:
            pass  # the command thread sees _stop after its next get
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
            self._receipts_in.append(bytes(msg.payload))
            self.outbox.notify()
            return
        try:
            self._commands.put(msg, timeout=5)
        except queue.Full:
            with self._rejected_lock:
                self.rejected_commands += 1
            log.error("command queue full; dropped a message on %s", msg.topic)

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
        """Apply the receipts paho's thread queued, all in one outbox transaction."""
        if not self._receipts_in:
            return
        # Take the receipts first, then every PUBACK paho queued before them (the broker
        # PUBACKs a message before the fleet can receipt it, and paho's thread queues both
        # in wire order), and write those `sent` times: the watermark reads them.
        payloads = [self._receipts_in.popleft() for _ in range(len(self._receipts_in))]
        self._settle_acks()
        self._window.flush()
        ids: list[int] = []
        valid = 0
        for payload in payloads:
            try:
                ids.extend(proto.decode_as(payload, proto.Receipt).ids)
                valid += 1
            except ProtocolError as exc:
                self._reject(self._receipt_topic, exc)
        if not valid:
            return
        if not self.receipts:
            log.debug("receipts are off ([broker].receipts = false); ignored %d", valid)
            return
        self._silent_s = 0.0
        removed = self.outbox.receipt(ids)
        log.debug("fleet receipted %d id(s); %d removed from the outbox", len(ids), removed)

    def _requeue_overdue(self) -> None:
        tick = time.monotonic()
        elapsed, self._last_tick = tick - self._last_tick, tick
        # Only connected time counts: a device cut off from the broker hears no receipts either.
        waiting = (self.outbox.receipts_seen and self._conn.connected.is_set()
                   and self.outbox.oldest_held() is not None)
        n = self.outbox.requeue_overdue(time.time(), watermark=self.outbox.watermark,
                                        grace_s=self.receipt_grace_s, timeout_s=self.receipt_timeout_s)
        if n:
            log.warning("%d message(s) PUBACKed by the broker but not receipted by the fleet; sending again", n)
        if not waiting:
            return
        self._silent_s += elapsed
        if self._silent_s >= _RECEIPT_LAPSE_TIMEOUTS * self.receipt_timeout_s:
            self._silent_s = 0.0
            n = self.outbox.forget_receipts()
            log.warning("no receipt from the fleet for %.0f s while connected; deleting messages on the broker's "
                        "PUBACK again until the next receipt (%d held message(s) go out once more)",
                        _RECEIPT_LAPSE_TIMEOUTS * self.receipt_timeout_s, n)

    def _reject(self, topic: str, exc: ProtocolError) -> None:
        with self._rejected_lock:
            self.rejected_commands += 1
        log.warning("dropped malformed command on %s: %s", topic, exc)

    def _command_loop(self) -> None:
        while True:
            msg = self._commands.get()
            if msg is None or self._stop.is_set():
                return
            try:
                cmd = self._decode_command(msg.topic, bytes(msg.payload))
            except ProtocolError as exc:
                self._reject(msg.topic, exc)
                continue
            if self.on_command is None:
                continue
            try:
                self.on_command(cmd)
            except Exception:  # the link must outlive a failing handler
                log.exception("command handler failed on %s", msg.topic)

    def _decode_command(self, topic: str, payload: bytes) -> Command:
        device, kind = self.topics.parse(topic)
        if device != self.device_id:
            raise ProtocolError(f"command for {device} reached {self.device_id}")
        if kind == "cmd/bundle":
            return proto.parse_frame(payload)
        expected = {"cmd/deploy": proto.DeployCommand, "cmd/rollback": proto.RollbackCommand}.get(kind)
        if expected is None:  # cmd/receipt: applied by the sender thread, never handed to on_command
            raise ProtocolError(f"{kind} is not a command for on_command")
        return proto.decode_as(payload, expected)
