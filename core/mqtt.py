"""MQTT for agents and the fleet: one connection helper (TLS, Will, MQTT 5 with fallback, back-off).

:func:`connect_client` returns a :class:`MqttConnection`: a paho-mqtt 2.x client
(``CallbackAPIVersion.VERSION2``) that keeps itself connected (exponential back-off),
speaks MQTT 5 where the broker does (``protocol="auto"`` falls back to 3.1.1 when the
broker refuses 5, as amqtt does), keeps a persistent session, and re-subscribes on every
connect — as a shared subscription ``$share/<group>/...`` under MQTT 5 when a group is
given, plainly otherwise.  The fleet's subscriber uses it as is.  A 3.1.1-only broker
either refuses MQTT 5 with a CONNACK (amqtt, for a bare CONNECT) or never answers (amqtt,
for a CONNECT with properties): both make ``auto`` switch, the second after
``connack_timeout_s``.

The device side, :class:`edge_agent.link.AgentLink`, is built on it.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from .errors import BrokerError
from .protocol import MQTT_VERSION_ALIASES, MQTT_VERSIONS, MqttVersion

__all__ = ["TlsConfig", "Will", "MqttConnection", "connect_client", "ProtocolChoice"]

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")
# paho 2.2 logs "Client is not connected" at ERROR when a never-connected client's loop is
# stopped: a normal shutdown path, not an error worth a red line in the agent's log.
_paho_log.addFilter(lambda record: not str(record.msg).startswith("Client is not connected"))

ProtocolChoice = MqttVersion  # one spelling for every config (core.protocol)
_PROTOCOL_ALIASES = {**{v: v for v in MQTT_VERSIONS}, **MQTT_VERSION_ALIASES}
_UNSUPPORTED_PROTOCOL = (1, 132)  # CONNACK: 3.1.1 return code 1, MQTT 5 reason 0x84
_SESSION_EXPIRY_S = 7 * 24 * 3600  # how long the broker keeps a device's queued commands


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
        self._failures = 0  # connection attempts failed in a row (logged at 1, 2, 4, 8...)
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
        client.on_connect_fail = self._on_connect_fail
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

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        """The broker cannot be reached: say so at once, then at the 2nd, 4th, 8th... failure in a row."""
        self._failures += 1
        n = self._failures
        self.last_error = f"cannot reach the MQTT broker at {self.host}:{self.port}"
        if n & (n - 1) == 0 and not self._closing:
            log.warning("%s (%d attempt%s so far; retrying every %g-%g s)", self.last_error, n, "" if n == 1 else "s",
                        *self._reconnect)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if self._failures:
            log.info("broker %s:%s reachable again after %d failed attempt(s)", self.host, self.port, self._failures)
            self._failures = 0
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
