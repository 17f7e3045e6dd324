"""Fleet -> device commands on the MQTT link: queued by paho's thread, decoded and handed
to ``on_command`` one at a time on a thread of their own (:class:`CommandInbox`).

Nothing a message carries may end that thread -- a device whose command thread died looks
healthy but never takes a deploy or rollback again -- so every decoding failure
(``ProtocolError``, and whatever else hostile bytes may raise) is logged and counted, and
a failing handler is logged.

A :class:`~core.protocol.LogsRequest` (``cmd/logs``) goes to ``on_logs`` instead of
``on_command``: answering it takes milliseconds and needs none of the update machinery.
With no ``on_logs`` set it is dropped, as an agent from before remote logs does.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from core import protocol as proto
from core.errors import ProtocolError

__all__ = ["Command", "CommandInbox"]

log = logging.getLogger(__name__)

Command = proto.DeployCommand | proto.RollbackCommand | proto.Frame


class CommandInbox:
    """The command queue and thread body of one device's link."""

    def __init__(self, device_id: str, topics: proto.TopicScheme,
                 on_command: Callable[[Command], None] | None = None, *, maxsize: int = 256,
                 on_logs: Callable[[proto.LogsRequest], None] | None = None) -> None:
        self.device_id = device_id
        self.topics = topics
        self.on_command = on_command
        self.on_logs = on_logs  # the agent sets it after building the link (edge_agent.agent)
        self.rejected = 0  # malformed commands (and receipts) dropped, and commands dropped for a full queue
        self._lock = threading.Lock()  # the command and the sender thread both count
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._closed = threading.Event()

    def put(self, msg: Any) -> None:
        """Queue a paho message (paho's thread; waits at most 5 s for room, then drops it)."""
        try:
            self._queue.put(msg, timeout=5)
        except queue.Full:
            self._count()
            log.error("command queue full; dropped a message on %s", msg.topic)

    def close(self) -> None:
        """End :meth:`run` after the message it is handling."""
        self._closed.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # run() sees _closed after its next get

    def reject(self, topic: str, exc: Exception) -> None:
        self._count()
        log.warning("dropped malformed command on %s: %s", topic, str(exc)[:300] or type(exc).__name__)

    def _count(self) -> None:
        with self._lock:
            self.rejected += 1

    def run(self) -> None:
        """The command thread: decode and hand over until :meth:`close`."""
        while True:
            msg = self._queue.get()
            if msg is None or self._closed.is_set():
                return
            try:
                cmd = self.decode(msg.topic, bytes(msg.payload))
            except Exception as exc:  # ProtocolError, and whatever else hostile bytes may raise
                self.reject(msg.topic, exc)
                continue
            handler: Callable[[Any], None] | None = (
                self.on_logs if isinstance(cmd, proto.LogsRequest) else self.on_command)
            if handler is None:
                continue
            try:
                handler(cmd)
            except Exception:  # the link must outlive a failing handler
                log.exception("command handler failed on %s", msg.topic)

    def decode(self, topic: str, payload: bytes) -> Command | proto.LogsRequest:
        """A command's topic and payload -> the command; :class:`ProtocolError` if malformed."""
        device, kind = self.topics.parse(topic)
        if device != self.device_id:
            raise ProtocolError(f"command for {device} reached {self.device_id}")
        if kind == "cmd/bundle":
            return proto.parse_frame(payload)
        if kind == "cmd/logs":
            return proto.decode_as(payload, proto.LogsRequest)
        expected = {"cmd/deploy": proto.DeployCommand, "cmd/rollback": proto.RollbackCommand}.get(kind)
        if expected is None:  # cmd/receipt: applied by the sender thread, never handed to on_command
            raise ProtocolError(f"{kind} is not a command for on_command")
        return proto.decode_as(payload, expected)
