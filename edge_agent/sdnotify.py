"""systemd's notify protocol (``sd_notify``) without libsystemd: READY, WATCHDOG, STOPPING.

The agent's unit is ``Type=notify`` with ``WatchdogSec``: systemd counts the agent as up
when ``Agent.run`` says ``READY=1``, and kills and restarts it when ``WATCHDOG=1`` stops
arriving.  ``Agent.run``'s own loop pings (not a helper thread), so a hung loop stops the
pings and a hung agent does not sit there forever.  Outside systemd
(``NOTIFY_SOCKET`` unset) every call is a no-op, so the same code runs on a laptop.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval_s"]


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
