"""The demo's MQTT broker: Mosquitto on a free loopback port when installed, else amqtt.

Mosquitto speaks MQTT 5 (the fleet then uses shared subscriptions); amqtt, embedded
in a thread with its own event loop, speaks 3.1.1 only, which is exactly what the agent
and the fleet must also cope with.  Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import BrokerError

__all__ = ["DemoBroker", "start_broker", "free_port"]

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # the broker is binding; nothing to wait on but the socket
    raise BrokerError(f"the demo broker did not start listening on 127.0.0.1:{port}")


@dataclass
class DemoBroker:
    """A running broker; ``protocol`` is what clients should ask for ("5" or "3.1.1")."""

    kind: str  # "mosquitto" | "amqtt"
    host: str
    port: int
    protocol: str
    _stop: Any = field(default=None, repr=False)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def _start_mosquitto(binary: str, workdir: Path) -> DemoBroker:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_inflight_messages 100\nmax_queued_messages 10000\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, 10.0, alive=lambda: proc.poll() is None)
    except BrokerError:
        proc.kill()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise BrokerError(f"mosquitto failed to start: {err.strip()[-300:]}") from None

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    return DemoBroker("mosquitto", "127.0.0.1", port, "5", stop)


def _start_amqtt() -> DemoBroker:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise BrokerError("no MQTT broker: neither mosquitto nor amqtt is installed",
                          hint="apt-get install mosquitto, or pip install 'edgeloop[fleet]'") from exc
    port = free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        try:
            broker = Broker(config)  # must be created inside the running loop
            await broker.start()
            holder["broker"] = broker
        except Exception as exc:  # noqa: BLE001 - reported to the caller below
            holder["error"] = exc
        finally:
            ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())
        if "broker" in holder:
            loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name="demo-amqtt", daemon=True)
    thread.start()
    ready.wait(30)
    if "broker" not in holder:
        raise BrokerError(f"amqtt failed to start: {holder.get('error', 'timeout')}")
    # broker.start() returned, so the listener is bound (a probe connection would only make amqtt log noise)

    def stop() -> None:
        fut = asyncio.run_coroutine_threadsafe(holder["broker"].shutdown(), loop)
        try:
            fut.result(10)
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.debug("amqtt shutdown raised", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return DemoBroker("amqtt", "127.0.0.1", port, "3.1.1", stop)


def start_broker(prefer: str = "auto", workdir: Path | None = None) -> DemoBroker:
    """Start a broker: ``prefer`` = "auto" (Mosquitto if installed), "mosquitto" or "amqtt"."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if prefer == "mosquitto" and binary is None:
        raise BrokerError("mosquitto is not installed", hint="apt-get install mosquitto, or use --broker amqtt")
    if prefer in ("auto", "mosquitto") and binary is not None:
        wd = workdir or Path(tempfile.mkdtemp(prefix="edgeloop-broker-"))
        wd.mkdir(parents=True, exist_ok=True)
        return _start_mosquitto(binary, wd)
    return _start_amqtt()
