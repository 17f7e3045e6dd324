"""An unreachable broker is logged at once, then at the 2nd, 4th, 8th... failed attempt (not silently retried)."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from core.mqtt import connect_client


class _Until(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.WARNING)
        self.needle, self.seen, self.messages = needle, threading.Event(), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if self.needle in record.getMessage():
            self.seen.set()


def test_unreachable_broker_is_logged_at_once_then_with_back_off(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = _Until("(4 attempts so far")
    log = logging.getLogger("core.mqtt")
    log.addHandler(handler)
    conn = connect_client("127.0.0.1", port, client_id="backoff-test", reconnect_min_s=0.01, reconnect_max_s=0.02)
    try:
        assert handler.seen.wait(30), handler.messages
    finally:
        conn.close()
        log.removeHandler(handler)
    unreachable = [m for m in handler.messages if f"cannot reach the MQTT broker at 127.0.0.1:{port}" in m]
    assert [m.split("(")[1].split(" ")[0] for m in unreachable][:3] == ["1", "2", "4"]  # not one line per attempt
    assert conn.last_error and str(port) in conn.last_error
