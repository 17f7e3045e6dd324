"""The fleet's other MQTT connections: tools' publishers and the extra ingest processes.

``connect_client`` connects fleet tools (CLI, demo) as the broker user ``<user>.tool``;
:class:`IngestWorkers` starts ``ingest.workers - 1`` extra ingest processes, each as
``<user>.ingest<N>`` (the generated broker config binds client ids to user names, so every
fleet connection needs its own user: :mod:`fleet.acl`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.errors import EdgeloopError

from .acl import fleet_username
from .config import BrokerConfig, FleetConfig

__all__ = ["connect_client", "run_bulk_worker", "IngestWorkers"]


def connect_client(broker: BrokerConfig, *, client_id: str, subscriptions: Sequence[str] = (),
                   on_message: Callable[[Any], None] | None = None, timeout: float = 15.0) -> tuple[Any, str]:
    """Connect a publisher/subscriber for fleet tools; returns ``(paho client, "5" | "3.1.1")``.

    Built on :func:`core.mqtt.connect_client` (MQTT 5 with a 3.1.1 fallback);
    the returned object is the plain paho client, so ``publish``, ``disconnect`` and
    ``loop_stop`` work as in paho.  Raises :class:`BrokerError` when it cannot connect.
    """
    from core.mqtt import TlsConfig
    from core.mqtt import connect_client as _connect

    # Its own broker user: with ``use_username_as_clientid`` two connections of one user
    # would throw each other off (docs/fleet.md, broker settings).
    username = fleet_username(broker.username, "tool") if broker.username else None
    conn = _connect(broker.host, broker.port, client_id=client_id, username=username,
                    password=broker.password,
                    tls=TlsConfig(ca_file=Path(broker.ca_file) if broker.ca_file else None) if broker.tls else None,
                    keepalive=broker.keepalive, protocol=broker.protocol,  # type: ignore[arg-type]
                    clean=True, subscriptions=list(subscriptions), on_message=on_message, wait_s=timeout)
    return conn.client, conn.protocol_version


def run_bulk_worker(config: FleetConfig, index: int, conn: Any) -> None:
    """Entry point of one extra ingest process: bulk kinds only, until ``conn`` says stop.

    It opens its own registry connection; its client id is the main one's plus
    ``-bulk<index>`` (a persistent session of its own when the main one has one).
    """
    from .ingest import IngestService
    from .registry import Registry

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s ingest-{index} %(levelname)s %(message)s")
    registry = Registry.open(config.database.url)
    base = config.broker.client_id
    user = fleet_username(config.broker.username, f"ingest{index}") if config.broker.username else None
    service = IngestService(config, registry, client_id=f"{base}-bulk{index}" if base else None, bulk_only=True,
                            username=user)
    try:
        service.start()
        conn.send(("ready", None))
        while conn.recv() != "stop":
            pass
    except EOFError:
        pass  # the parent is gone: stop
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        service.stop()
        registry.close()
        conn.close()


class IngestWorkers:
    """``ingest.workers - 1`` extra ingest processes next to the main :class:`IngestService`.

    One Python process tops out near 3k MQTT messages/s on one core (paho's per-packet
    work, the decode and the write share one interpreter lock); MQTT 5 shared subscriptions let the
    broker deal the high-volume kinds (:data:`BULK_KINDS`) round-robin to every process of
    the share group.  Needs MQTT 5 (a 3.1.1 broker would give every process every message:
    the unique indexes would drop the duplicates, but nothing would be gained).
    """

    def __init__(self, config: FleetConfig, count: int) -> None:
        import multiprocessing

        self.config = config
        self.count = max(0, count)
        self._ctx = multiprocessing.get_context("spawn")  # no inherited threads, sockets or DB handles
        self.procs: list[Any] = []
        self._conns: list[Any] = []

    def start(self, timeout: float = 60.0) -> IngestWorkers:
        for i in range(self.count):
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=run_bulk_worker, args=(self.config, i + 1, child),
                                     name=f"edgeloop-ingest-{i + 1}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self._conns.append(parent)
        for i, c in enumerate(self._conns):
            if not c.poll(timeout):
                raise EdgeloopError(f"ingest worker {i + 1} did not start within {timeout:g} s",
                                    hint="check the broker and database settings in fleet.toml")
            kind, detail = c.recv()
            if kind != "ready":
                raise EdgeloopError(f"ingest worker {i + 1} failed to start: {detail}",
                                    hint="check the broker and database settings in fleet.toml")
        return self

    def cpu_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def stop(self, timeout: float = 30.0) -> None:
        for c in self._conns:
            try:
                c.send("stop")
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in self._conns:
            c.close()
        self.procs, self._conns = [], []
