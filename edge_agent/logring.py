"""The agent's recent log lines in memory, for the fleet to read remotely (``cmd/logs``).

:class:`LogRing` is a :class:`logging.Handler` keeping the last ``capacity`` records of
the process as short lines: each numbered (``seq``, from 1 per process, under a random
``boot`` id), truncated to :data:`~core.protocol.MAX_LOG_LINE_CHARS`, with every secret
the agent registered (the broker password) replaced by ``***``.  Nothing touches the
disk; a restart starts a new ``boot``.

The ring sits on the root logger, one per process (:func:`install`), so it holds what the
process logs at the level its loggers let through (``agent run``: INFO, ``-q``: warnings,
``-v``: debug).  Several agents in one process (the demo, tests) share it.

:meth:`LogRing.answer` turns a :class:`~core.protocol.LogsRequest` into the
:class:`~core.protocol.LogLines` messages of the answer, each within the protocol's
line and byte bounds.
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import threading
from collections.abc import Iterable
from typing import Any

from core.protocol import (
    MAX_LOG_LINE_CHARS,
    MAX_LOG_LINES_PER_MESSAGE,
    MAX_LOG_LOGGER_CHARS,
    MAX_LOG_MESSAGE_BYTES,
    LogLines,
    LogsRequest,
)

__all__ = ["LogRing", "install", "DEFAULT_CAPACITY"]

DEFAULT_CAPACITY = 500
_ENVELOPE_BYTES = 512  # a LogLines message without its lines, with room to spare
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "CRITICAL": logging.CRITICAL}
_MIN_SECRET_CHARS = 4  # shorter "secrets" would redact ordinary words

_install_lock = threading.Lock()
_installed: LogRing | None = None


def _level_name(levelno: int) -> str:
    """The protocol's level name of a record level (custom levels fall to the one below)."""
    name = "DEBUG"
    for n, v in _LEVELS.items():
        if levelno >= v:
            name = n
    return name


class LogRing(logging.Handler):
    """The last ``capacity`` log records as protocol lines (thread-safe)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(logging.DEBUG)
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.boot = secrets.token_hex(8)
        self._lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._seq = 0
        self._secrets: set[str] = set()
        self._ring_lock = threading.Lock()

    # ------------------------------------------------------------------ recording
    def add_secret(self, secret: str | None) -> None:
        """Redact ``secret`` from every line recorded from now on (too short ones are ignored)."""
        if secret and len(secret) >= _MIN_SECRET_CHARS:
            with self._ring_lock:
                self._secrets.add(secret)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                # the exception's last line only: a traceback would fill the ring
                text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
            with self._ring_lock:
                for s in self._secrets:
                    text = text.replace(s, "***")
                self._seq += 1
                self._lines.append({"seq": self._seq, "ts": float(record.created), "level": _level_name(record.levelno),
                                    "logger": record.name[:MAX_LOG_LOGGER_CHARS], "msg": _truncate(text)})
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    @property
    def last_seq(self) -> int:
        with self._ring_lock:
            return self._seq

    # ------------------------------------------------------------------ answering
    def lines(self, *, since_seq: int = 0, boot: str | None = None, max_lines: int = MAX_LOG_LINES_PER_MESSAGE,
              min_level: str = "DEBUG") -> tuple[list[dict[str, Any]], int]:
        """``(lines, dropped)``: the newest ``max_lines`` lines after ``since_seq`` at ``min_level`` or
        above (all this boot's lines when ``boot`` is another); ``dropped`` counts lines after
        ``since_seq`` the ring no longer holds."""
        floor = _LEVELS.get(min_level, logging.DEBUG)
        with self._ring_lock:
            since = since_seq if boot == self.boot else 0
            held = list(self._lines)
        oldest = held[0]["seq"] if held else self.last_seq + 1
        dropped = max(0, int(oldest) - since - 1)
        picked = [ln for ln in held if ln["seq"] > since and _LEVELS[ln["level"]] >= floor]
        return picked[-max_lines:] if max_lines > 0 else [], dropped

    def answer(self, device_id: str, req: LogsRequest) -> list[LogLines]:
        """The messages answering ``req``: one at least (empty when nothing is new), each within bounds."""
        picked, dropped = self.lines(since_seq=req.since_seq, boot=req.boot, max_lines=req.max_lines,
                                     min_level=req.min_level)
        parts = list(_split(picked))
        return [LogLines(device_id=device_id, request_id=req.request_id, boot=self.boot, lines=tuple(part),
                         more=i < len(parts) - 1, dropped=dropped if i == 0 else 0)
                for i, part in enumerate(parts)]


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_LOG_LINE_CHARS else text[:MAX_LOG_LINE_CHARS - 3] + "..."


def _split(lines: list[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    """Lines in parts of at most MAX_LOG_LINES_PER_MESSAGE lines and MAX_LOG_MESSAGE_BYTES encoded."""
    part: list[dict[str, Any]] = []
    size = _ENVELOPE_BYTES
    for ln in lines:
        n = len(json.dumps(ln, separators=(",", ":"))) + 1  # as Message.encode writes it (ASCII-escaped)
        if part and (len(part) >= MAX_LOG_LINES_PER_MESSAGE or size + n > MAX_LOG_MESSAGE_BYTES):
            yield part
            part, size = [], _ENVELOPE_BYTES
        part.append(ln)
        size += n
    yield part  # possibly empty: an answer always comes, so the fleet knows the agent heard


def install(capacity: int = DEFAULT_CAPACITY) -> LogRing:
    """The process's ring on the root logger, created on first call (later calls return it)."""
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = LogRing(capacity)
            logging.getLogger().addHandler(_installed)
        return _installed

