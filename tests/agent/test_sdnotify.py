"""systemd's notify protocol: the agent says READY, pings the watchdog from its loop, says STOPPING."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import sdnotify
from edge_agent.agent import Agent
from tests.plugins.agent_kit import agent_config


@pytest.fixture()
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_outside_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.notify("READY=1") is False and sdnotify.watchdog_interval_s() is None


def test_watchdog_interval_is_half_of_systemds_for_this_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sdnotify.watchdog_interval_s() is None


def test_agent_run_notifies_ready_watchdog_and_stopping(notify_socket: socket.socket, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       tiny_bundles: dict[str, Path]) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # ping every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    agent = Agent(agent_config(tmp_path / "state")).start()
    agent.install(tiny_bundles["v1"])
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,), kwargs={"poll_s": 0.1}, daemon=True)
    runner.start()
    try:
        seen = [notify_socket.recv(64).decode() for _ in range(3)]
        assert seen[0] == "READY=1" and seen[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
    finally:
        stop.set()
        runner.join(timeout=30)
        agent.close()
    states = []
    while (msg := notify_socket.recv(64).decode()) != "STOPPING=1":
        states.append(msg)
    assert set(states) <= {"WATCHDOG=1"}
