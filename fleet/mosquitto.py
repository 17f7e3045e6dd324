"""Run a real Mosquitto on a free loopback port: generated config, stop/start on the same port.

One launcher for everything that needs a private broker: the tests (``tests/broker.py``),
the fleet benchmark's simulated fleet and ``edgeloop demo``.  Optional password file, ACL
and persistence (a persistent broker saves its sessions on SIGTERM).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.errors import BrokerError

__all__ = ["MosquittoBroker", "find_mosquitto", "free_port", "write_password_file", "make_broker_readable", "HOST",
           "BROKER_GROUP"]

HOST = "127.0.0.1"
# Debian's mosquitto starts as root and then runs as user ``mosquitto`` (group ``mosquitto``):
# the files it reads after that (password file, ACL) must be readable by that group.
BROKER_GROUP = "mosquitto"


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    return shutil.which("mosquitto")


def free_port() -> int:
    """A currently free loopback TCP port (never 1883)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A Mosquitto password file for ``users`` (name -> password), made by ``mosquitto_passwd``."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise BrokerError("mosquitto_passwd not found", hint="install the Debian package mosquitto")
    path.write_text("")
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    path.chmod(0o600)
    return path


def make_broker_readable(*paths: Path, group: str = BROKER_GROUP) -> bool:
    """Give the broker's ``group`` read access to ``paths`` (group ``mosquitto``, mode 0640; a folder 0750).

    False, with the files left 0600, when the group does not exist or this user may not
    hand files to it (not root, not a member): the broker must then run as this user.
    """
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False
    for p in paths:
        try:
            os.chown(p, -1, gid)
        except PermissionError:
            return False
        p.chmod(0o750 if p.is_dir() else 0o640)
    return True


class MosquittoBroker:
    """One mosquitto process on 127.0.0.1:``port``; ``stop()``/``start()`` keep the port."""

    def __init__(self, workdir: Path, *, port: int | None = None, password_file: Path | None = None,
                 acl_file: Path | None = None, persistence: bool = False, binary: str | None = None,
                 max_queued_messages: int = 10_000, extra_conf: Sequence[str] = ()) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise BrokerError("no mosquitto binary found", hint="install the Debian package mosquitto")
        self.binary: str = found
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.password_file, self.acl_file, self.persistence = password_file, acl_file, persistence
        self.max_queued_messages = max_queued_messages
        self.extra_conf = tuple(extra_conf)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        lines = [f"listener {self.port} {self.host}",
                 f"allow_anonymous {'false' if self.password_file else 'true'}",
                 f"persistence {'true' if self.persistence else 'false'}",
                 f"persistence_location {self.workdir}/",
                 f"log_dest file {self.log_path}",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 f"max_queued_messages {self.max_queued_messages}",
                 # run as ourselves: as root, mosquitto would switch to user "mosquitto",
                 # which cannot read the test's 0600 password file
                 f"user {pwd.getpwuid(os.getuid()).pw_name}"]
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        lines.extend(self.extra_conf)
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start and return once the port accepts connections."""
        if self.running:
            return self
        for attempt in range(3):
            self._write_config()
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_listening(timeout):
                return self
            if self._fixed_port or attempt == 2:
                break
            self.port = free_port()  # someone took the port between free_port() and bind
        raise BrokerError(f"mosquitto did not start on {self.host}:{self.port}: {self.log_tail()}")

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False  # exited: bad config or port in use
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                # Nothing to wait on but the socket itself: poll it, briefly.
                time.sleep(0.01)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (a persistent broker saves its sessions on the way out)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> MosquittoBroker:
        self.stop()
        return self.start()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
