"""A real Mosquitto for tests: free loopback port, generated config, stop/start on the same port.

Also a scripted peer, :class:`Mqtt311OnlyProxy`, that answers MQTT 5 CONNECTs the way
a 3.1.1-only broker (amqtt) does and relays everything else to a real broker, to test
protocol fallback on a real socket.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MosquittoBroker", "find_mosquitto", "free_port", "write_password_file", "Mqtt311OnlyProxy"]

HOST = "127.0.0.1"


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
        raise RuntimeError("mosquitto_passwd not found: install the Debian package mosquitto")
    path.write_text("")
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    path.chmod(0o600)
    return path


class MosquittoBroker:
    """One mosquitto process on 127.0.0.1:``port``; ``stop()``/``start()`` keep the port."""

    def __init__(self, workdir: Path, *, port: int | None = None, password_file: Path | None = None,
                 acl_file: Path | None = None, persistence: bool = False, binary: str | None = None) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise RuntimeError("no mosquitto binary: install the Debian package mosquitto")
        self.binary: str = found
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.password_file, self.acl_file, self.persistence = password_file, acl_file, persistence
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
                 "max_queued_messages 10000",
                 # run as ourselves: as root, mosquitto would switch to user "mosquitto",
                 # which cannot read the test's 0600 password file
                 f"user {pwd.getpwuid(os.getuid()).pw_name}"]
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
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
        raise RuntimeError(f"mosquitto did not start on {self.host}:{self.port}: {self.log_tail()}")

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


class Mqtt311OnlyProxy:
    """Relays TCP to ``upstream`` except MQTT 5 CONNECTs, which (``silent=False``) get a 3.1.1
    CONNACK "unacceptable protocol version" and a closed socket, or (``silent=True``) no
    answer at all — the two things amqtt does, depending on the CONNECT's properties."""

    def __init__(self, upstream: tuple[str, int], *, silent: bool = False) -> None:
        self.upstream = upstream
        self.silent = silent
        self.refused = 0
        self._srv = socket.create_server((HOST, 0))
        self.host, self.port = HOST, int(self._srv.getsockname()[1])
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="mqtt311-proxy").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            first = client.recv(65536)
            if self._protocol_level(first) == 5:
                self.refused += 1
                if self.silent:
                    client.recv(1)  # hold the socket open, answer nothing, until the client hangs up
                else:
                    client.sendall(b"\x20\x02\x00\x01")
                return
            with socket.create_connection(self.upstream) as up:
                up.sendall(first)
                pump = threading.Thread(target=self._pipe, args=(up, client), daemon=True)
                pump.start()
                self._pipe(client, up)
                pump.join(5)

    @staticmethod
    def _protocol_level(packet: bytes) -> int | None:
        """CONNECT = 0x10, remaining length (1-4 byte varint), "\\0\\4MQTT", protocol level."""
        if len(packet) < 2 or packet[0] != 0x10:
            return None
        i = 1
        while i < 5 and i < len(packet) and packet[i] & 0x80:
            i += 1
        head = packet[i + 1:i + 8]
        return head[6] if len(head) == 7 and head[:6] == b"\x00\x04MQTT" else None

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._srv.close()
