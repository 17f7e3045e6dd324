"""systemd's notify protocol (``sd_notify``) without libsystemd: READY, WATCHDOG, STOPPING.

The agent's unit is ``Type=notify`` with ``WatchdogSec``: systemd starts counting the
agent as up when it says ``READY=1`` (its model serves), and kills and restarts it when
``WATCHDOG=1`` stops arriving — a hung agent does not sit there forever.  Outside systemd
(``NOTIFY_SOCKET`` unset) every call is a no-op, so the same code runs on a laptop.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

__all__ = ["notify", "watchdog_interval_s", "Watchdog"]


def notify(state: str) -> bool:
    """Send one notification (e.g. ``"READY=1"``); False when not under systemd or it failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """Half of systemd's ``WatchdogSec`` for this process (when to ping), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.5)
    except ValueError:
        return None


class Watchdog:
    """Pings ``WATCHDOG=1`` while ``alive()`` says the agent is healthy.

    ``alive`` should check what a hang would stop (the main loop's last tick), so a
    deadlocked agent stops pinging and systemd restarts it; a thread that pinged
    unconditionally would keep a hung process alive.
    """

    def __init__(self, alive: Callable[[], bool] | None = None) -> None:
        self._alive = alive or (lambda: True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        interval = watchdog_interval_s()
        if interval is not None:
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True, name="sd-watchdog")
            self._thread.start()
        return self

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self._alive():
                notify("WATCHDOG=1")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
