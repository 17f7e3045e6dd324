"""Remote logs, the fleet's side: ask a device for its recent log lines, check and store the answer.

The fleet publishes a :class:`~core.protocol.LogsRequest` on the device's ``cmd/logs``
naming the last line it holds; the agent answers with :class:`~core.protocol.LogLines`
on its ``logs`` topic (``docs/protocol.md``, "Remote logs").  Every answer goes through
:class:`LogIntake`: the per-device rules of :mod:`fleet.ingest_guard` (size and rate,
before decoding), strict decoding, the sender bound to its topic, then the bounded store
(:class:`fleet.repos.LogRepo`, the latest 1000 lines per device).  Ingestion
(:class:`fleet.ingest_dispatch.IngestDispatch`) uses it for every answer it receives on a
device's ``logs`` topic; :class:`LogClient` (``edgeloop fleet logs``) asks
and listens on a connection of its own, so it works with or without a running fleet.

An agent from before remote logs drops the request (an unknown command topic) and never
answers: :meth:`LogClient.ask` then reports ``answered=False`` and the CLI says "no log
lines (agent too old or offline)".
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import EdgeloopError, ProtocolError
from core.protocol import MAX_LOG_REQUEST_LINES, LogLines, LogsRequest, TopicScheme, decode_as

from .ingest_guard import Budgets, Counters, SenderChecks
from .repos.logs import LogRepo

__all__ = ["LogIntake", "LogClient", "LogAnswer", "make_request", "request_logs", "device_logs", "NO_LINES"]

log = logging.getLogger(__name__)

NO_LINES = "no log lines (agent too old or offline)"


class LogIntake:
    """Checks one device's LogLines message and stores it (writer thread of one process)."""

    def __init__(self, repo: LogRepo, checks: SenderChecks) -> None:
        self.repo = repo
        self.checks = checks

    def check(self, device_id: str, payload: bytes) -> LogLines:
        """The message, or ``ProtocolError`` (with ``context["budget"]`` when a rule refused it)."""
        self.checks.check_log_lines(device_id, len(payload))
        msg = decode_as(payload, LogLines)
        if msg.device_id != device_id:
            raise ProtocolError(f"log lines for device {msg.device_id!r} published on {device_id!r}'s topic")
        return msg

    def store(self, msg: LogLines, received: float) -> int:
        """Store its lines; how many were new."""
        return self.repo.add(msg, received=received)


def make_request(repo: LogRepo, device_id: str, *, request_id: str | None = None,
                 max_lines: int = MAX_LOG_REQUEST_LINES) -> LogsRequest:
    """The request for ``device_id``'s lines after the newest one stored (all levels: the store
    filters when read, so a later ``--level`` needs no new request)."""
    last = repo.last(device_id)
    boot, since = last if last is not None else (None, 0)
    return LogsRequest(request_id=request_id or f"logs-{uuid.uuid4().hex[:16]}", since_seq=since, boot=boot,
                       max_lines=max_lines, min_level="DEBUG")


def request_logs(publish: Callable[..., Any], topics: TopicScheme, registry: Any, device_id: str) -> LogsRequest:
    """Ask ``device_id`` for its new lines through a running fleet's connection (``publish(topic,
    payload, qos=)``, e.g. :attr:`fleet.app.FleetApp.publisher`); ingestion stores the answer."""
    req = make_request(LogRepo.of(registry), device_id)
    publish(topics.command(device_id, "logs"), req.encode(), qos=1)
    return req


def device_logs(registry: Any, device_id: str, *, lines: int = 200, min_level: str = "DEBUG") -> dict[str, Any]:
    """The stored lines of ``device_id`` as JSON-ready data (the API route and the dashboard's device page):
    ``{"device_id", "lines": [{seq, boot, ts, received, level, logger, msg}], "note"}``, ``note`` being
    :data:`NO_LINES` when there are none."""
    rows = LogRepo.of(registry).find(device_id, lines=lines, min_level=min_level)
    return {"device_id": device_id, "lines": [r.to_dict() for r in rows], "note": None if rows else NO_LINES}


@dataclass
class LogAnswer:
    """What came back for one request: ``answered`` once its last part (``more=False``) arrived."""

    device_id: str
    request_id: str
    answered: bool = False
    parts: int = 0
    new_lines: int = 0
    dropped: int = 0  # lines the device no longer held (its ring turned over since the last request)


@dataclass
class _Pending:
    answer: LogAnswer
    done: threading.Event = field(default_factory=threading.Event)


class LogClient:
    """Asks devices for their log lines over a broker connection of its own (``edgeloop fleet logs``).

    ``connect(filter, on_message) -> client`` opens the connection (default: the fleet's
    tool user, :func:`fleet.ingest_workers.connect_client`); every answer arriving on any
    device's ``logs`` topic is checked and stored, whoever asked.  Refusals are counted in
    ``counters`` (per rule and device) and malformed messages in ``malformed``.
    """

    def __init__(self, config: Any, registry: Any, *, budgets: Budgets | None = None,
                 connect: Callable[[str, Callable[[Any], None]], Any] | None = None) -> None:
        self.topics = TopicScheme(config.prefix)
        self.repo = LogRepo.of(registry)
        self.counters = Counters()
        self.malformed = 0
        self.last_error: str | None = None
        self.intake = LogIntake(self.repo, SenderChecks(registry, budgets or Budgets(), self.counters))
        self._config = config
        self._connect = connect
        self._lock = threading.Lock()  # paho's thread stores, the caller waits
        self._pending: dict[str, _Pending] = {}
        self._client: Any = None

    def __enter__(self) -> LogClient:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> LogClient:
        """Connect and subscribe to every device's ``logs`` topic; raises ``BrokerError``."""
        filt = self.topics.all_devices("logs")
        if self._connect is not None:
            self._client = self._connect(filt, self._on_message)
        else:
            from .ingest_workers import connect_client

            self._client, _version = connect_client(self._config.broker,
                                                    client_id=f"edgeloop-logs-{uuid.uuid4().hex[:12]}",
                                                    subscriptions=[filt], on_message=self._on_message)
        return self

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # A deliberate disconnect: without this the connection's handler warns "disconnected ...;
            # reconnecting" (fleet.ingest_workers.connect_client hands out the bare paho client).
            client.on_disconnect = None
            client.disconnect()
            client.loop_stop()

    def ask(self, device_id: str, *, timeout_s: float = 5.0) -> LogAnswer:
        """Request ``device_id``'s new lines and wait up to ``timeout_s`` for the whole answer."""
        if self._client is None:
            raise RuntimeError("LogClient.ask before open()")
        req = make_request(self.repo, device_id)
        pending = _Pending(LogAnswer(device_id, req.request_id))
        with self._lock:
            self._pending[req.request_id] = pending
        try:
            self._client.publish(self.topics.command(device_id, "logs"), req.encode(), qos=1)
            pending.done.wait(timeout_s)
        finally:
            with self._lock:
                self._pending.pop(req.request_id, None)
        return pending.answer

    # ------------------------------------------------------------------ paho's thread
    def _on_message(self, msg: Any) -> None:
        payload = bytes(msg.payload)
        try:
            device_id, kind = self.topics.parse(msg.topic)
            if kind != "logs":
                return
            answer = self.intake.check(device_id, payload)
            new = self.intake.store(answer, time.time())
        except EdgeloopError as exc:
            self.last_error = f"{msg.topic}: {exc}"
            if "budget" in exc.context:
                self.counters.count(str(exc.context["budget"]), _device_of(self.topics, msg.topic))
            else:
                self.malformed += 1
            log.debug("log lines refused on %s: %s", msg.topic, exc)
            return
        except Exception as exc:  # noqa: BLE001 - hostile bytes or a database error must not end paho's thread
            self.malformed += 1
            self.last_error = f"{msg.topic}: {exc}"
            log.warning("log lines on %s not stored: %s", msg.topic, exc)
            return
        with self._lock:
            pending = self._pending.get(answer.request_id)
            if pending is None or pending.answer.device_id != device_id:
                return  # someone else's request (or a late part): stored all the same
            a = pending.answer
            a.parts += 1
            a.new_lines += new
            a.dropped += answer.dropped
            if not answer.more:
                a.answered = True
                pending.done.set()


def _device_of(topics: TopicScheme, topic: str) -> str | None:
    try:
        return topics.parse(topic)[0]
    except ProtocolError:
        return None
