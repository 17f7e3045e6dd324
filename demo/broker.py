"""The demo's MQTT broker: Mosquitto on a free loopback port when installed, else amqtt.

Mosquitto speaks MQTT 5 (the fleet then uses shared subscriptions); amqtt, embedded
in a thread with its own event loop, speaks 3.1.1 only, which is exactly what the agent
and the fleet must also cope with.  Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import BrokerError
from fleet.mosquitto import MosquittoBroker, find_mosquitto, free_port

__all__ = ["DemoBroker", "start_broker", "free_port"]

log = logging.getLogger(__name__)


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
    broker = MosquittoBroker(workdir, binary=binary, extra_conf=("max_inflight_messages 100",)).start()
    return DemoBroker("mosquitto", broker.host, broker.port, "5", broker.stop)


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
    binary = find_mosquitto()
    if prefer == "mosquitto" and binary is None:
        raise BrokerError("mosquitto is not installed", hint="apt-get install mosquitto, or use --broker amqtt")
    if prefer in ("auto", "mosquitto") and binary is not None:
        wd = workdir or Path(tempfile.mkdtemp(prefix="edgeloop-broker-"))
        wd.mkdir(parents=True, exist_ok=True)
        return _start_mosquitto(binary, wd)
    return _start_amqtt()
