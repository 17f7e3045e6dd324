"""The fleet's front door: one object that builds, starts, owns and stops a running fleet.

    from fleet.app import FleetApp
    from fleet.config import load_config

    with FleetApp.from_config(load_config("fleet.toml")) as app:   # starts everything
        print(app.api_url, app.ingest_processes)
        ...                                                         # stop() on the way out

What it owns, in start order: the :class:`~fleet.registry.Registry` (opened by
``from_config`` unless one is given), the :class:`~fleet.ingest.IngestService` and its extra
processes (``[ingest] workers``, over MQTT 5 shared subscriptions), the HTTP API with the
dashboard (``[api]``), the :class:`~fleet.rollout_driver.RolloutDriver` (publishing through
ingestion's MQTT connection) and the :class:`~fleet.worker.FleetWorker` (retraining trigger,
jobs, rollout ticks, bundle requests).  ``edgeloop fleet serve``, ``edgeloop demo``, the
fleet benchmark and the dashboard all run this; what a caller leaves out or replaces is a
keyword option of :meth:`FleetApp.from_config`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.errors import BrokerError, FleetError

from .config import FleetConfig
from .dashboard.data import DashContext
from .ingest import IngestService, IngestWorkers
from .registry import Registry
from .rollout_driver import Publisher, RolloutDriver, plan_from_config
from .worker import FleetWorker, settings_from_config

if TYPE_CHECKING:
    from .api import ApiServer
    from .retrain import RetrainSettings
    from .rollout import RolloutPlan
    from .samples import SampleStore

__all__ = ["FleetApp", "EventHook"]

log = logging.getLogger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]  # the worker's events: trigger, retrain_done, rollout_started, ...


class _IngestPublisher:
    """Publishes through ingestion's MQTT connection as it is now (a restarted ingest reconnects)."""

    def __init__(self, ingest: IngestService) -> None:
        self._ingest = ingest

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        client = self._ingest.client
        if client is None:
            raise BrokerError("the fleet is not connected to the broker", hint="start the fleet (FleetApp.start)")
        return client.publish(topic, payload, qos=qos, retain=retain)


class FleetApp:
    """A fleet: built by :meth:`from_config`, run by :meth:`start` (once), ended by :meth:`stop`."""

    def __init__(self, config: FleetConfig, registry: Registry, *, own_registry: bool = True, api: bool = True,
                 workers: bool = True, publisher: Callable[[Publisher], Publisher] | None = None,
                 retrain: RetrainSettings | None = None, plan: RolloutPlan | None = None, tick_s: float = 1.0,
                 on_event: EventHook | None = None) -> None:
        self.config = config
        self.registry = registry
        self.ingest = IngestService(config, registry)
        mqtt: Publisher = _IngestPublisher(self.ingest)
        self.publisher: Publisher = publisher(mqtt) if publisher is not None else mqtt
        # Filled in by start() with the driver: the API (and so the dashboard) starts before it.
        self.dashboard = DashContext.for_fleet(config, registry, samples_dir=self.ingest.store.root)
        self._own_registry = own_registry
        self._want_api, self._want_workers = api, workers
        self._retrain, self._plan, self._tick_s, self._on_event = retrain, plan, tick_s, on_event
        self._extra: IngestWorkers | None = None
        self._api: ApiServer | None = None
        self._driver: RolloutDriver | None = None
        self._worker: FleetWorker | None = None
        self._started = self._stopped = False

    @classmethod
    def from_config(cls, cfg: FleetConfig, *, registry: Registry | None = None, api: bool | None = None,
                    workers: bool = True, publisher: Callable[[Publisher], Publisher] | None = None,
                    retrain: RetrainSettings | None = None, plan: RolloutPlan | None = None, tick_s: float = 1.0,
                    on_event: EventHook | None = None) -> FleetApp:
        """The fleet ``cfg`` describes, not started yet (add ingest hooks, register models, then start).

        ``registry``: an open registry to use (and leave open); default: open ``[database]``.
        ``api``: serve the HTTP API and dashboard (default ``[api].enabled``).
        ``workers``: run the retraining trigger and the rollout loop; without them the caller
        ticks :attr:`driver` itself and answers bundle requests.
        ``publisher``: wraps the MQTT publisher the rollout driver sends through (fault injection).
        ``retrain`` / ``plan``: the worker's retraining settings and automatic rollout plan
        (default from ``[trigger]``, ``[gate]`` and ``[rollout]``); ``tick_s`` its loop period;
        ``on_event(kind, data)`` hears its triggers, jobs and rollouts.
        """
        own = registry is None
        reg = registry or Registry.open(cfg.database_url, busy_timeout_ms=cfg.database.busy_timeout_ms)
        try:
            return cls(cfg, reg, own_registry=own, api=cfg.api.enabled if api is None else api, workers=workers,
                       publisher=publisher, retrain=retrain, plan=plan, tick_s=tick_s, on_event=on_event)
        except BaseException:
            if own:
                reg.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FleetApp:
        """Connect ingestion, start its extra processes, the API, the rollout driver and the worker."""
        if self._started:
            raise FleetError("this fleet was already started", hint="build a new one with FleetApp.from_config")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        self.ingest.start()
        if cfg.ingest.workers > 1:
            if self.ingest.protocol != "5":
                log.warning("ingest.workers = %d needs MQTT 5 shared subscriptions; the broker speaks %s: "
                            "ingesting in one process", cfg.ingest.workers, self.ingest.protocol)
            else:
                self._extra = IngestWorkers(cfg, cfg.ingest.workers - 1).start()
        if self._want_api:
            from .api import ApiServer

            self._api = ApiServer(cfg, self.registry, ctx=self).start()
        base_url = cfg.api.public_url or (self._api.url if self._api is not None else None)
        self._driver = RolloutDriver.from_config(cfg, self.registry, self.publisher, api_base_url=base_url)
        self.dashboard.driver = self._driver  # one driver (and one lock) for the worker and the dashboard
        if self._want_workers:
            settings = self._retrain or settings_from_config(cfg)
            self._worker = FleetWorker(self.registry, self._driver, settings,
                                       plan=self._plan or plan_from_config(cfg.rollout), model_name=cfg.model_name,
                                       tick_s=self._tick_s, on_event=self._on_event)
            self.ingest.add_hook(self._worker.on_messages)
            self._worker.start()

    def stop(self) -> None:
        """Stop everything that started, newest first; closes the registry if from_config opened it."""
        if self._stopped:
            return
        self._stopped = True
        steps: list[Callable[[], None]] = []
        if self._worker is not None:
            steps.append(self._worker.stop)
        if self._api is not None:
            steps.append(self._api.stop)
        if self._extra is not None:
            steps.append(self._extra.stop)
        steps.append(self.ingest.stop)
        if self._own_registry:
            steps.append(self.registry.close)
        errors: list[BaseException] = []
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - stop the rest, then report the first failure
                log.exception("stopping the fleet: %s failed", getattr(step, "__qualname__", step))
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> FleetApp:
        return self.start() if not self._started else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ parts
    @property
    def driver(self) -> RolloutDriver:
        """The rollout driver (dashboard actions and the worker share it)."""
        if self._driver is None:
            raise FleetError("the fleet's rollout driver exists once the fleet is started", hint="call start()")
        return self._driver

    @property
    def worker(self) -> FleetWorker | None:
        """The retraining / rollout loop (None with ``workers=False``)."""
        return self._worker

    @property
    def api(self) -> ApiServer | None:
        return self._api

    @property
    def api_url(self) -> str | None:
        """Where the API listens (the bound port), None without it."""
        return self._api.url if self._api is not None else None

    @property
    def ingest_workers(self) -> IngestWorkers | None:
        """The extra ingest processes (None with ``[ingest] workers = 1`` or an MQTT 3.1.1 broker)."""
        return self._extra

    @property
    def ingest_processes(self) -> int:
        return 1 + (self._extra.count if self._extra is not None else 0)

    @property
    def store(self) -> SampleStore:
        """Where uploaded samples are kept."""
        return self.ingest.store

    def describe(self) -> str:
        """One line: broker, MQTT version, ingest processes, API, database (no credentials)."""
        cfg = self.config
        return (f"broker {cfg.broker.host}:{cfg.broker.port} (MQTT {self.ingest.protocol}, "
                f"{self.ingest_processes} ingest process(es)), API {self.api_url or 'off'}, "
                f"database {cfg.database_url.split('@')[-1]}")
